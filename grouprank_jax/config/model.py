"""``ModelConfig``: the shape and numerics of a Qwen2 decoder, HF ``config.json`` interop, and
the Qwen2.5 presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from grouprank_jax.tokenizer import ENDOFTEXT_ID, IM_END_ID

ATTENTION_IMPLS = ("reference", "chunked", "cudnn", "splash", "auto")
REMAT_POLICIES = ("none", "full", "dots_saveable")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Qwen2 decoder (the fields of HF's ``Qwen2Config`` we use)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 4864
    rope_theta: float = 1_000_000.0  # Qwen2.5 HF configs
    rms_norm_eps: float = 1e-6  # Qwen2.5 HF configs
    tie_word_embeddings: bool = True  # True for Qwen2.5 0.5B-3B
    max_position_embeddings: int = 32768
    # Std of the normal init of every kernel and the embedding (HF's ``initializer_range``). 0.02
    # suits wide models; a 64-wide model from scratch wants ~1/sqrt(hidden) (see demo/run.py).
    initializer_range: float = 0.02
    # Numerics: params may be stored in bf16; matmuls run in ``dtype``; softmax, norms,
    # RoPE and the final logits always run in float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "auto"  # reference | chunked | cudnn | splash | auto
    attention_block_size: int = 512  # kv block of the chunked (online-softmax) attention
    # Splash (TPU) tile, a multiple of 128; None picks the chip generation's default
    # (models/attention.py: SPLASH_BLOCK_BY_KIND).
    splash_block_size: int | None = None
    # Run splash in Pallas interpret mode on any platform (CPU tests of its numerics; slow).
    splash_interpret: bool = False
    remat: str = "none"  # none | full | dots_saveable (per decoder layer)
    # Tokens per LM-head block of the blockwise log-probs (SFT loss, GRPO log-probs): peak memory
    # is block x vocab x 4 bytes instead of tokens x vocab x 4.
    loss_chunk_size: int = 1024
    # LoRA adapters (paper's RL stage: rank 32, alpha 32, all linear layers). 0 = no adapters.
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    bos_token_id: int = ENDOFTEXT_ID
    eos_token_id: int = IM_END_ID  # <|im_end|>, the chat models' end of turn
    pad_token_id: int = ENDOFTEXT_ID  # <|endoftext|>

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"lora_targets {sorted(unknown)} unknown; choose from {LORA_TARGETS}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = d * q + q + 2 * (d * kv + kv) + q * d
        mlp = 3 * d * f
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * layer + d + head

    # ---- HF interop -------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 ``Qwen2Config`` dictionary."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.initializer_range,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            # transformers < 5 (and servers built on it, e.g. vLLM) read only the top-level key
            # and would default to 10,000; transformers 5 reads either.
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": "bfloat16" if self.param_dtype == "bfloat16" else "float32",
            "torch_dtype": "bfloat16" if self.param_dtype == "bfloat16" else "float32",  # transformers < 5
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
        if not isinstance(hf, Mapping):
            raise ValueError(f"{source}: expected a JSON object of model settings, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != "qwen2":
            raise ValueError(
                f"{source}: model_type={model_type!r} is not 'qwen2'; "
                "grouprank-jax loads Qwen2/Qwen2.5 checkpoints only"
            )
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # the port's MLP is SwiGLU
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (Qwen2's MLP uses silu)")
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
            if hf.get(k) is None
        ]
        if missing:
            raise ValueError(f"{source}: missing {missing}, which a Qwen2 config.json always has")
        rope = hf.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ValueError(f"{source}: only default RoPE is supported, got {rope or hf.get('rope_scaling')}")
        heads = int(hf["num_attention_heads"])
        kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),  # null: no GQA, as transformers
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            intermediate_size=int(hf["intermediate_size"]),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = hf.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                kwargs[key] = int(value)
        kwargs.update(overrides)
        return cls(**kwargs)


def _qwen(hidden, layers, heads, kv, inter, vocab, tied) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        intermediate_size=inter,
        tie_word_embeddings=tied,
    )


# Shapes from the HF config.json of each Qwen2.5(-Instruct) release.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _qwen(896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": _qwen(1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-3b": _qwen(2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-7b": _qwen(3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-14b": _qwen(5120, 48, 40, 8, 13824, 152064, False),
    "qwen2.5-32b": _qwen(5120, 64, 40, 8, 27648, 152064, False),
    "qwen2.5-72b": _qwen(8192, 80, 64, 8, 29568, 152064, False),
    # Tiny shapes for tests and the CPU demo; they keep the real tokenizer's vocabulary.
    "tiny": ModelConfig(
        vocab_size=151936,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=True,
    ),
    "tiny-untied": ModelConfig(
        vocab_size=151936,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=False,
    ),
    # A very small vocabulary for unit tests that do not need the tokenizer.
    "tiny-smallvocab": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=False,
    ),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    try:
        cfg = MODEL_PRESETS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
