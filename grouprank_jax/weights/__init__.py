"""HF checkpoints in and out (one mapping table drives both directions)."""

from grouprank_jax.weights.hf_io import CheckpointFormatError, load_hf, read_hf_config, save_hf

__all__ = ["CheckpointFormatError", "load_hf", "read_hf_config", "save_hf"]
