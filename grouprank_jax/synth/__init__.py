"""Teacher label synthesis (``grouprank synth``, paper-notes §5): candidate pools, pointwise and
listwise teacher labels, rank fusion (Eq. 2) and multi-scale groups (Alg. 1) written as the SFT
and RL records ``grouprank sft`` / ``grouprank grpo`` read. One module per concept:

- ``pools``: first-stage runs (hybrid min-max fusion) -> 10 top + 40 sampled documents per query;
- ``prompts``: teacher prompts D.1 / D.2 and the parsers of their answers (permutation repair);
- ``cache`` / ``client``: crash-safe disk cache, async OpenAI-compatible HTTP teacher;
- ``jax_teacher``: the in-process teacher on the JAX sampler;
- ``stages``: the teacher calls in rounds, with format retries and the listwise sliding window;
- ``fusion``: Eq. 2; ``groups``: interval sampling and the records; ``pipeline``: all of it.
"""
