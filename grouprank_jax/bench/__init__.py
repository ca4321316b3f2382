"""Benchmarks: each prints a table and writes JSON; ``grouprank bench <name>`` runs them.

``sampling`` (prefill/decode tok/s, fraction of the bandwidth bound, HF ``generate`` as the peer),
``train`` (SFT step time, tokens/s, MFU; the blockwise-loss memory comparison), ``rerank`` (the
group-size trade-off), ``device_suite`` (every accelerator measurement in one process). They
import only jax/flax/optax/orbax/transformers at module level, so they run on machines without
grain, datasets or pytrec_eval.
"""
