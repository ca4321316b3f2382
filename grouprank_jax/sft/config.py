"""``SFTConfig``: the supervised stage (paper-notes §5, paper Table 8), paper values as defaults."""

from __future__ import annotations

import dataclasses

from grouprank_jax.config.model import LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    learning_rate: float = 3e-5  # [paper Table 8]
    epochs: float = 5  # [paper Table 8] (the released script uses 10)
    per_device_batch: int = 2  # [paper Table 8]
    grad_accum_steps: int = 4  # [paper Table 8]
    max_seq_len: int = 32_768  # [paper Table 8]
    packing: bool = True  # [paper Table 8] packing on
    warmup_ratio: float = 0.05  # [INFERRED] ms-swift default is 0.05 of the total steps
    weight_decay: float = 0.1  # [INFERRED] ms-swift default
    adam_b1: float = 0.9  # [INFERRED] AdamW defaults
    adam_b2: float = 0.95  # [INFERRED] ms-swift / Megatron convention
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # [INFERRED] global-norm clipping, ms-swift default
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of the peak
    total_steps: int | None = None  # None: derived from epochs and the data size
    length_buckets: tuple[int, ...] | None = None  # padded lengths of unpacked batches (None: powers of 2 >= 256)
    # A record over max_seq_len: "error" (every record is checked before the model is built and
    # an over-long one is named by file:line), or cut "left" (drops the start of the prompt: the
    # system prompt, the query) or "right" (drops the end of the target). [INFERRED]
    truncation: str = "error"
    lora_rank: int = 0  # full fine-tuning for 7B, LoRA for 32B [paper Table 8]
    lora_alpha: float = 32.0
    # [INFERRED] the paper names no SFT targets; all linear layers, as its RL stage [Table 10].
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        for name in ("per_device_batch", "grad_accum_steps", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"sft.{name} must be >= 1, got {getattr(self, name)}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"sft.total_steps must be >= 1 (or null: from sft.epochs), got {self.total_steps}")
        if not self.epochs > 0:
            raise ValueError(f"sft.epochs must be > 0, got {self.epochs}")
        if self.truncation not in ("error", "left", "right"):
            raise ValueError(f"sft.truncation={self.truncation!r}; choose 'error', 'left' or 'right'")

    def replace(self, **changes) -> SFTConfig:
        return dataclasses.replace(self, **changes)
