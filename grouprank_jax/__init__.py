"""grouprank-jax: GroupRank groupwise LLM reranking, trained by SFT and GRPO, in pure JAX."""

__version__ = "0.1.0"
