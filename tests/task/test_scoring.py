"""The sampler-backed score_fn: a shared Sampler gives the same texts as a fresh one and compiles
nothing new for another seed or temperature."""

import pytest

from grouprank_jax.config import model_preset
from grouprank_jax.models import create_model
from grouprank_jax.sampling import Sampler
from grouprank_jax.task.scoring import sampler_score_fn
from grouprank_jax.tokenizer import load_tokenizer

PROMPTS = ["Rank these passages for the query: jax sharding", "Another prompt, a little longer than the first one"]


def test_a_shared_sampler_scores_like_a_fresh_one_and_compiles_once():
    tokenizer = load_tokenizer()
    model = create_model(model_preset("tiny"), seed=0)
    kwargs = dict(max_prompt_len=64, max_new_tokens=8)
    shared = Sampler(model, tokenizer=tokenizer, **kwargs)
    for temperature, seed in [(0.0, 0), (1.0, 0), (1.0, 5)]:
        fresh_fn = sampler_score_fn(model, tokenizer, temperature=temperature, top_p=1.0, seed=seed, **kwargs)
        shared_fn = sampler_score_fn(
            model, tokenizer, temperature=temperature, top_p=1.0, seed=seed, sampler=shared, **kwargs
        )
        assert shared_fn(PROMPTS) == fresh_fn(PROMPTS)
    # greedy and sampled are two decode programs; the second seed reused the sampled one
    assert shared._decode._cache_size() == 2
    with pytest.raises(ValueError, match="Sampler of the model being scored"):
        sampler_score_fn(create_model(model_preset("tiny"), seed=1), tokenizer, sampler=shared)
