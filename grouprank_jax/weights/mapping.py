"""The ONE table between HF Qwen2 state-dict keys and our NNX parameter paths.

Each entry names the HF key template, the NNX path template and a pair of transforms
(``to_ours``, ``to_hf``) that are exact inverses (transpose/reshape only, no arithmetic), so
import and export cannot disagree and a round trip is bit-identical.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from grouprank_jax.config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    hf_key: str  # may contain {i} for the layer index
    path: tuple[str, ...]  # NNX state path; "{i}" is replaced by the layer index
    to_ours: Transform
    to_hf: Transform

    def hf(self, layer: int | None = None) -> str:
        return self.hf_key.format(i=layer)

    def nnx_path(self, layer: int | None = None) -> tuple:
        return tuple(int(layer) if p == "{i}" else p for p in self.path)


def _identity(x, cfg):
    return x


def _transpose(x, cfg):
    return np.ascontiguousarray(x.T)


def _heads_in(heads_attr: str) -> tuple[Transform, Transform]:
    """HF ``[heads*H, D]`` <-> ours ``[D, heads, H]`` (q/k/v projections)."""

    def to_ours(x, cfg):
        heads = getattr(cfg, heads_attr)
        return np.ascontiguousarray(x.T.reshape(cfg.hidden_size, heads, cfg.head_dim))

    def to_hf(x, cfg):
        heads = getattr(cfg, heads_attr)
        return np.ascontiguousarray(x.reshape(cfg.hidden_size, heads * cfg.head_dim).T)

    return to_ours, to_hf


def _bias(heads_attr: str) -> tuple[Transform, Transform]:
    """HF ``[heads*H]`` <-> ours ``[heads, H]``."""

    def to_ours(x, cfg):
        return x.reshape(getattr(cfg, heads_attr), cfg.head_dim)

    def to_hf(x, cfg):
        return x.reshape(-1)

    return to_ours, to_hf


def _o_proj() -> tuple[Transform, Transform]:
    """HF ``[D, N*H]`` <-> ours ``[N, H, D]``."""

    def to_ours(x, cfg):
        return np.ascontiguousarray(x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size))

    def to_hf(x, cfg):
        return np.ascontiguousarray(x.reshape(cfg.num_heads * cfg.head_dim, cfg.hidden_size).T)

    return to_ours, to_hf


_LAYER = "model.layers.{i}."
_L = ("layers", "{i}")

PARAM_MAPPINGS: tuple[ParamMapping, ...] = (
    ParamMapping("model.embed_tokens.weight", ("embed",), _identity, _identity),
    ParamMapping(_LAYER + "input_layernorm.weight", _L + ("input_norm", "weight"), _identity, _identity),
    ParamMapping(_LAYER + "self_attn.q_proj.weight", _L + ("attn", "q_proj", "kernel"), *_heads_in("num_heads")),
    ParamMapping(_LAYER + "self_attn.q_proj.bias", _L + ("attn", "q_proj", "bias"), *_bias("num_heads")),
    ParamMapping(_LAYER + "self_attn.k_proj.weight", _L + ("attn", "k_proj", "kernel"), *_heads_in("num_kv_heads")),
    ParamMapping(_LAYER + "self_attn.k_proj.bias", _L + ("attn", "k_proj", "bias"), *_bias("num_kv_heads")),
    ParamMapping(_LAYER + "self_attn.v_proj.weight", _L + ("attn", "v_proj", "kernel"), *_heads_in("num_kv_heads")),
    ParamMapping(_LAYER + "self_attn.v_proj.bias", _L + ("attn", "v_proj", "bias"), *_bias("num_kv_heads")),
    ParamMapping(_LAYER + "self_attn.o_proj.weight", _L + ("attn", "o_proj", "kernel"), *_o_proj()),
    ParamMapping(_LAYER + "post_attention_layernorm.weight", _L + ("post_attn_norm", "weight"), _identity, _identity),
    ParamMapping(_LAYER + "mlp.gate_proj.weight", _L + ("mlp", "gate_proj", "kernel"), _transpose, _transpose),
    ParamMapping(_LAYER + "mlp.up_proj.weight", _L + ("mlp", "up_proj", "kernel"), _transpose, _transpose),
    ParamMapping(_LAYER + "mlp.down_proj.weight", _L + ("mlp", "down_proj", "kernel"), _transpose, _transpose),
    ParamMapping("model.norm.weight", ("final_norm", "weight"), _identity, _identity),
    ParamMapping("lm_head.weight", ("lm_head",), _transpose, _transpose),
)


def expand(cfg: ModelConfig) -> list[tuple[str, tuple, ParamMapping]]:
    """Every (HF key, NNX path, mapping) of a model with this config, in HF's key order."""
    out = []
    for m in PARAM_MAPPINGS:
        if m.hf_key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if "{i}" in m.hf_key:
            out.extend((m.hf(i), m.nnx_path(i), m) for i in range(cfg.num_layers))
        else:
            out.append((m.hf(), m.nnx_path(), m))
    order = {m.hf_key: n for n, m in enumerate(PARAM_MAPPINGS)}

    def key(item):
        match = re.match(r"model\.layers\.(\d+)\.", item[0])
        return (
            0 if item[0].startswith("model.embed") else 1,
            int(match.group(1)) if match else 10**9,
            order[item[2].hf_key],
        )

    return sorted(out, key=key)
