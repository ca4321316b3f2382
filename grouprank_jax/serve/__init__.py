"""``grouprank serve``: the reranker behind HTTP (rerank and OpenAI-compatible APIs), batching on the sampler.

Modules, one concept each: ``config`` (the flags), ``engine`` (the worker thread that owns the model
and batches generations), ``rerank`` / ``completions`` (what the endpoints compute, on the shared
library code), ``schemas`` (request bodies), ``api_errors`` (error bodies), ``metrics`` (Prometheus
text), ``app`` (FastAPI routes), ``server`` (uvicorn, signals, shutdown). README "Serving" has the API.
"""
