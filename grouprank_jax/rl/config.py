"""``GRPOConfig``: every knob of the GroupRank RL stage, with the paper's values as defaults.

Sources: paper-notes §4 = GroupRank arXiv 2511.11653v3 Table 10 / §A.4 (trained with verl).
Fields marked INFERRED are not stated in the paper; we take verl's defaults, since the paper's
run used verl. Loss / advantage / aggregation names index the registries in
``rl/advantages.py`` and ``rl/losses.py``.
"""

from __future__ import annotations

import dataclasses

from grouprank_jax.rl.advantages import ADVANTAGE_FNS
from grouprank_jax.rl.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES

GROUP_SAMPLING = ("as_written", "redraw")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyper-parameters. Batch sizes count prompts; each prompt yields G rollouts."""

    # ---- rollout ----------------------------------------------------------------------
    rollouts_per_prompt: int = 8  # G = 8 [paper Table 10]
    temperature: float = 1.0  # generation temperature [paper Table 10]
    max_prompt_len: int = 24_000  # [paper Table 10]
    max_response_len: int = 8_000  # [paper Table 10]
    # One prompt KV for its G rollouts while sampling (sampler.py); False = each rollout row holds
    # its own prompt copy (the oracle layout). Not a paper setting: memory/speed only, same tokens.
    shared_prefix_sampling: bool = True
    # One forward of each prompt per update, its G responses attending to that KV (rl/step.py);
    # False = every rollout runs its whole prompt + response (the oracle layout). Not a paper
    # setting: the same loss and gradient with P + G*C instead of G*(P + C) tokens of compute.
    shared_prefix: bool = True

    # ---- optimisation -----------------------------------------------------------------
    learning_rate: float = 1e-5  # [paper Table 10]
    # The paper ran verl, whose actor default is a constant LR without warmup
    # (optim.warmup_style=constant, lr_warmup_steps_ratio=0) [INFERRED]; "cosine" decays to
    # min_lr_ratio x learning_rate over the run.
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine only
    weight_decay: float = 0.01  # verl actor optim.weight_decay (AdamW; biases, norms exempt) [INFERRED]
    max_grad_norm: float = 1.0  # verl actor grad_clip [INFERRED]
    global_batch_prompts: int = 64  # global train batch 64 [paper Table 10]
    mini_batch_prompts: int = 64  # PPO mini-batch 64 -> one update per rollout batch [Table 10]
    epochs: int = 5  # passes over the 5,907 RL samples [paper Table 10]
    total_steps: int | None = None  # None: derived from epochs and the data size (as sft.total_steps)
    num_updates_per_batch: int = 1  # verl ppo_epochs; 1 + mini==global => on-policy [INFERRED]
    # Rows per forward/backward pass inside a mini-batch (gradient accumulation with a global
    # denominator, so the update is unchanged); None = the whole mini-batch at once.
    micro_batch_rows: int | None = None

    # ---- advantage --------------------------------------------------------------------
    advantage: str = "grpo"  # group-normalised reward [paper §A.4]; "dr_grpo" drops the std
    # verl convention: torch.std (unbiased, ddof=1) + 1e-6. TRL uses ddof=1 + 1e-4, Tunix
    # ddof=1 + 1e-6. The paper ran verl, so we match verl.
    adv_std_ddof: int = 1
    adv_eps: float = 1e-6

    # ---- policy loss ------------------------------------------------------------------
    policy_loss: str = "clip"  # clipped surrogate, Eq. 7 [paper §A.4]
    clip_eps_low: float = 0.2  # [INFERRED] verl clip_ratio_low default
    clip_eps_high: float = 0.2  # [INFERRED] verl clip_ratio_high default
    dual_clip: float | None = None  # off; verl's clip_ratio_c = 3.0 when enabled
    log_ratio_clamp: float = 20.0  # |logp - old| <= 20 before exp, as verl / Tunix do
    # "token-mean over |y_i|" [paper §A.4]; verl's default too.
    loss_agg_mode: str = "token-mean"
    # Constant divisor of seq-mean-token-sum-norm (Dr.GRPO); None -> max_response_len (TRL's
    # max_completion_length, verl's response_length), never the batch's padded length.
    loss_norm_len: int | None = None

    # ---- regularisers -----------------------------------------------------------------
    kl_coef: float = 0.001  # phi = 0.001 [paper Table 10]
    kl_estimator: str = "k3"  # verl "low_var_kl" = k3, used as a loss term [paper Table 10]
    kl_value_clamp: float | None = 10.0  # verl clamps k3 to [-10, 10]; None disables
    entropy_coef: float = 0.0  # [INFERRED] 0 as in ReasonRank's verl script

    # ---- LoRA (RL stage) --------------------------------------------------------------
    lora_enabled: bool = True  # LoRA for RL [paper Table 10]
    lora_rank: int = 32  # [paper Table 10]
    lora_alpha: float = 32.0  # [paper Table 10]
    lora_targets: tuple[str, ...] = (  # "all linear layers" [paper Table 10]
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    # ---- document-group size (multi-scale, paper Alg. 1) ------------------------------
    # "as_written": each RL record is one prompt's group, in its order: the paper's RL set
    # carries Alg. 1's size mix (~40% size 10, ~40% size 20) [paper-notes §5 "Data sizes"],
    # which `grouprank synth` writes. "redraw": each step draws a size in
    # [group_size_min, group_size_max] and a random subset of the record (augmentation,
    # the curriculum) [INFERRED option, not the paper's].
    group_sampling: str = "as_written"
    group_size_min: int = 5  # redraw: smallest size; Alg. 1's G in {5..20} [paper-notes §5]
    group_size_max: int = 20  # largest group a record may hold / redraw to [paper-notes §5]
    group_size_curriculum: bool = False  # off: the paper samples sizes, no curriculum
    curriculum_steps: int = 0  # linear min->max ramp length when the curriculum is on

    def __post_init__(self):
        _check_choice("advantage", self.advantage, tuple(ADVANTAGE_FNS))
        _check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _check_choice("kl_estimator", self.kl_estimator, tuple(KL_ESTIMATORS))
        _check_choice("loss_agg_mode", self.loss_agg_mode, tuple(AGGREGATIONS))
        _check_choice("policy_loss", self.policy_loss, tuple(POLICY_LOSSES))
        _check_choice("group_sampling", self.group_sampling, GROUP_SAMPLING)
        if self.group_size_curriculum and self.group_sampling != "redraw":
            raise ValueError("group_size_curriculum needs group_sampling: redraw (it ramps the drawn size)")
        if self.rollouts_per_prompt < 2 and self.advantage == "grpo":
            # ddof=1 std of one sample is undefined; GRPO needs a group to compare within.
            raise ValueError("advantage='grpo' needs rollouts_per_prompt >= 2")
        if self.global_batch_prompts % self.mini_batch_prompts:
            raise ValueError("global_batch_prompts must be a multiple of mini_batch_prompts")
        if not (0.0 <= self.clip_eps_low < 1.0 and self.clip_eps_high >= 0.0):
            raise ValueError("need 0 <= clip_eps_low < 1 and clip_eps_high >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            # verl asserts clip_ratio_c > 1: the bound -A*c must lie beyond the PPO clip.
            raise ValueError(f"dual_clip={self.dual_clip} must be > 1")
        if self.shared_prefix and self.micro_batch_rows and self.micro_batch_rows % self.rollouts_per_prompt:
            raise ValueError(
                f"micro_batch_rows={self.micro_batch_rows} must hold whole prompts with shared_prefix "
                f"(a multiple of rollouts_per_prompt={self.rollouts_per_prompt}), or set shared_prefix: false"
            )
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"grpo.total_steps must be >= 1 (or null: from grpo.epochs), got {self.total_steps}")
        if not 1 <= self.group_size_min <= self.group_size_max:
            raise ValueError("need 1 <= group_size_min <= group_size_max")

    def replace(self, **changes) -> GRPOConfig:
        return dataclasses.replace(self, **changes)

    def replicated_prompts_warning(self, batch_shards: int) -> str | None:
        """Shared-prefix passes whose prompt batch the mesh's batch axes do not divide run
        replicated: correct, but every chip computes every prompt forward of the pass."""
        G = self.rollouts_per_prompt
        prompts = (self.micro_batch_rows or self.mini_batch_prompts * G) // G
        if not self.shared_prefix or prompts % batch_shards == 0:
            return None
        return (
            f"grpo: micro_batch_rows={prompts * G} holds {prompts} prompts per pass, not a multiple of "
            f"data*fsdp={batch_shards}: with shared_prefix every chip runs all {prompts} prompt forwards of a "
            f"pass (replicated); use micro_batch_rows a multiple of G*{batch_shards}={G * batch_shards}, or "
            "shared_prefix: false"
        )

    @property
    def updates_per_rollout_batch(self) -> int:
        """Optimizer steps taken on one rollout batch (1 for the paper: on-policy)."""
        return self.num_updates_per_batch * (self.global_batch_prompts // self.mini_batch_prompts)

    def group_size_range(self, step: int) -> tuple[int, int]:
        """Allowed document-group sizes at ``step``; the full range unless the curriculum is on."""
        if not self.group_size_curriculum or self.curriculum_steps <= 0:
            return self.group_size_min, self.group_size_max
        frac = min(max(step, 0) / self.curriculum_steps, 1.0)
        span = self.group_size_max - self.group_size_min
        # floor, so the full range opens only at the end of the ramp
        return self.group_size_min, self.group_size_min + int(frac * span)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {choices}")
