"""Model FLOPs and MFU (MaxText's ``calculate_tflops_training_per_device`` idea, for Qwen2).

Counts matmul FLOPs of the model, LM head included and the embedding lookup excluded:
``2 x params x tokens`` forward, 3x that for forward + backward (6x), 2 + 2 = 4x with LoRA (no
weight gradients of the frozen base; the adapters' own FLOPs are negligible). Attention's score
and value matmuls add ``4 x layers x heads x head_dim x T^2`` forward per sequence, halved for
causal masking, x3 with the backward. MFU = achieved FLOP/s per chip / the chip's peak.
"""

from __future__ import annotations

from grouprank_jax.config import ModelConfig

# bf16 dense peak TFLOP/s per chip: TPU figures from Cloud TPU's published specs (v4 275, v5e 197,
# v5p 459, v6e 918); the H200's 790 is the workplace's own measured bf16 matmul peak.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0, "TPU v6 lite": 918.0, "NVIDIA H200": 790.0}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that enter a matmul per token (q/k/v/o, MLP, LM head; no biases, norms, lookup)."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    return cfg.num_layers * per_layer + d * cfg.vocab_size


def _matmul_flops(cfg: ModelConfig, factor: int, tokens: float, head_tokens: float | None) -> float:
    """``factor`` x the matmul parameters x tokens, with the LM head (d x V) charged only on
    ``head_tokens`` (None: every token) — the positions whose logits a step really computes."""
    head = cfg.hidden_size * cfg.vocab_size
    head_tokens = tokens if head_tokens is None else head_tokens
    return factor * ((matmul_params(cfg) - head) * tokens + head * head_tokens)


def training_flops(
    cfg: ModelConfig, batch: int, seq: int, lora: bool = False, head_tokens: float | None = None
) -> float:
    """FLOPs of one training step over ``batch`` rows of ``seq`` tokens (forward + backward);
    ``head_tokens``: the positions the LM head runs on (GRPO: the completions only)."""
    factor = 4 if lora else 6
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * seq * batch / 2
    return _matmul_flops(cfg, factor, batch * seq, head_tokens) + attention


def shared_prefix_training_flops(
    cfg: ModelConfig, prompts: int, rollouts: int, prompt: int, response: int, lora=False, head_tokens=None
):
    """FLOPs of the shared-prefix GRPO update (``rl/step.py``): each prompt's forward/backward
    once (causal P x P attention) and its G responses (attention over the prompt and causally
    over themselves): ``P + G*C`` tokens per prompt instead of ``G*(P + C)``."""
    factor = 4 if lora else 6
    tokens = prompts * (prompt + rollouts * response)
    pairs = prompts * (prompt * prompt / 2 + rollouts * (response * prompt + response * response / 2))
    return _matmul_flops(cfg, factor, tokens, head_tokens) + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs


def forward_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """FLOPs of one forward (prefill) over ``batch`` rows of ``seq`` tokens."""
    return (
        2 * matmul_params(cfg) * batch * seq + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * seq * batch / 2
    )


def peak_tflops(device_kind: str) -> float | None:
    """The chip's bf16 peak, matched on its ``device_kind`` (None when unknown, e.g. CPU)."""
    for name, peak in PEAK_TFLOPS.items():
        if (
            device_kind == name
            or device_kind.startswith(name + " ")
            or (name.startswith("NVIDIA") and name in device_kind)
        ):
            return peak
    return None


def mfu(flops: float, seconds: float, devices: int, device_kind: str, peak: float | None = None) -> float | None:
    """Model FLOPs utilisation per chip (None without a known peak)."""
    peak = peak or peak_tflops(device_kind)
    if not peak:
        return None
    return flops / seconds / devices / 1e12 / peak
