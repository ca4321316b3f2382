"""Hugging Face Qwen2 checkpoints in and out, streamed tensor by tensor.

Import reads each tensor through safetensors' numpy API, transforms it by the mapping table
and places it straight onto its target ``NamedSharding``; the model is never materialised
twice on a host. Export writes a transformers-5 ``Qwen2Config``, a generation config and
safetensors shards with an index above ``max_shard_bytes``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from grouprank_jax.config import ModelConfig
from grouprank_jax.models.build import variable_sharding
from grouprank_jax.models.lora import adapted_projections, merged_kernel
from grouprank_jax.models.qwen2 import Qwen2ForCausalLM
from grouprank_jax.parallel.mesh import LOGICAL_AXIS_RULES, Rules
from grouprank_jax.weights.mapping import expand

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # HF's default max_shard_size of 5GB
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class CheckpointFormatError(ValueError):
    """A HF directory that is not a loadable Qwen2 checkpoint (names the key and file)."""


def read_hf_config(path: str | Path, **overrides) -> ModelConfig:
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: expected a local HF model directory")
    with open(config_file) as fh:
        try:
            hf = json.load(fh)
        except json.JSONDecodeError as err:
            raise CheckpointFormatError(f"{config_file}: invalid JSON ({err})") from err
    return ModelConfig.from_hf_dict(hf, source=str(config_file), **overrides)


def _tensor_index(path: Path) -> dict[str, Path]:
    """HF key -> the safetensors file that holds it."""
    index_file = path / SAFE_INDEX
    if index_file.exists():
        with open(index_file) as fh:
            try:
                weight_map = json.load(fh).get("weight_map")
            except (json.JSONDecodeError, AttributeError) as err:
                raise CheckpointFormatError(f"{index_file}: not a safetensors index ({err})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index_file}: missing 'weight_map'")
        return {k: path / v for k, v in weight_map.items()}
    single = path / SAFE_SINGLE
    if not single.exists():
        raise FileNotFoundError(f"{path}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found")

    with _safe_open(single) as fh:
        return {k: single for k in fh.keys()}


def _safe_open(file: Path):
    """``safe_open`` whose failure names the file: a truncated copy fails here (safetensors checks
    that the header's tensors cover the file), as does a file that is not safetensors."""
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as err:
        raise CheckpointFormatError(f"{file}: not a readable safetensors file ({err}); copy it again") from None


def load_hf(
    path: str | Path,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    compute_dtype=None,
    rules: Rules = LOGICAL_AXIS_RULES,
    **config_overrides,
) -> Qwen2ForCausalLM:
    """Load a local HF Qwen2 directory as a ready-to-call model.

    ``dtype`` is the parameter dtype (and the compute dtype unless ``compute_dtype`` is given).
    Extra keyword arguments override ``ModelConfig`` fields (e.g. ``attention_impl="chunked"``).
    """

    path = Path(path)
    dtype_name = jnp.dtype(dtype).name
    cfg = read_hf_config(
        path,
        param_dtype=dtype_name,
        dtype=jnp.dtype(compute_dtype or dtype).name,
        **config_overrides,
    )
    locations = _tensor_index(path)
    expected = expand(cfg)
    wanted = {hf_key for hf_key, _, _ in expected}
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unknown = sorted(k for k in locations if k not in wanted and k not in ignorable)
    if unknown:
        raise CheckpointFormatError(
            f"{locations[unknown[0]]}: unexpected tensor {unknown[0]!r} "
            f"({len(unknown)} unexpected in all) for a Qwen2 model with {cfg.num_layers} layers"
        )
    missing = [k for k in sorted(wanted) if k not in locations]
    if missing:
        raise CheckpointFormatError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")

    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    handles: dict[Path, object] = {}
    try:
        for hf_key, nnx_path, mapping in expected:
            file = locations[hf_key]
            if file not in handles:
                handles[file] = _safe_open(file).__enter__()
            raw = handles[file].get_tensor(hf_key)
            variable = flat[nnx_path]
            target = variable.get_value()
            value = mapping.to_ours(raw, cfg) if _hf_shape_ok(raw, target, mapping, cfg) else None
            if value is None or value.shape != target.shape:
                raise CheckpointFormatError(
                    f"{file}: tensor {hf_key!r} has shape {tuple(raw.shape)}, "
                    f"which does not fit parameter {'.'.join(map(str, nnx_path))} of shape {target.shape}"
                )
            value = np.asarray(value).astype(target.dtype)
            if mesh is not None:
                array = jax.device_put(value, variable_sharding(variable, mesh, rules))
            else:
                array = jnp.asarray(value)
            variable.set_value(array)
            del raw, value
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return nnx.merge(graphdef, state)


def _hf_shape_ok(raw: np.ndarray, target, mapping, cfg) -> bool:
    """Whether the HF tensor has exactly the size the transform needs (reshape would fail otherwise)."""
    return int(np.prod(raw.shape)) == int(np.prod(target.shape)) and raw.ndim in (1, 2)


def _host_value(variable) -> np.ndarray:
    array = variable.get_value()
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(jax.device_get(array))


def save_hf(
    model: Qwen2ForCausalLM,
    out_dir: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer=None,
    dtype=None,
) -> Path:
    """Write ``model`` as a HF Qwen2 directory ``AutoModelForCausalLM.from_pretrained`` loads.

    Tied embeddings are written the way HF writes them: ``tie_word_embeddings=true`` and no
    ``lm_head.weight``. ``dtype`` (default: the params' dtype) sets the stored dtype. In a
    multi-process run every process must call this (gathers are collective); process 0 writes.

    The files are written into a sibling ``.NAME.partial`` directory that then replaces
    ``out_dir`` (other files already in ``out_dir`` move over): a kill mid-export leaves the
    previous export whole, never new config beside old weights, and a kill during the swap is
    finished or undone by the next export (``_recover``), so no file of ``out_dir`` is lost.
    """

    final = Path(out_dir).resolve()  # a symlinked out_dir: write beside (and into) its target
    out_dir = final.parent / f".{final.name}.partial"
    cfg = model.cfg
    writer = jax.process_index() == 0
    if writer:
        _recover(final)
        shutil.rmtree(out_dir, ignore_errors=True)  # a previous export killed before its swap: only its own files
        out_dir.mkdir(parents=True)
    store_dtype = jnp.dtype(dtype or cfg.param_dtype)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    adapted = adapted_projections(model)  # LoRA adapters are folded into their kernels

    # Shards are planned from the shapes, then converted and written one at a time, so host
    # memory holds one shard, not the model (122 GiB for 32B in fp32).
    entries = list(expand(cfg))
    sizes = [int(np.prod(flat[path].get_value().shape)) * store_dtype.itemsize for _, path, _ in entries]
    groups = _shard_groups(sizes, max_shard_bytes)
    names = (
        [SAFE_SINGLE]
        if len(groups) == 1
        else [f"model-{n:05d}-of-{len(groups):05d}.safetensors" for n in range(1, len(groups) + 1)]
    )
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(groups), desc="export shards", disable=len(groups) == 1 or not writer, leave=False)
    for name, group in zip(names, groups):
        shard = {}
        for i in group:
            hf_key, path, mapping = entries[i]
            host = merged_kernel(adapted[path]) if path in adapted else _host_value(flat[path])
            shard[hf_key] = mapping.to_hf(host, cfg).astype(store_dtype)
            assert shard[hf_key].nbytes == sizes[i], (hf_key, shard[hf_key].shape)  # the plan's size
        if writer:
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        del shard
        bar.update(1)
    bar.close()
    if not writer:
        return final

    hf_config = cfg.replace(lora_rank=0).to_hf_dict()
    hf_config["dtype"] = hf_config["torch_dtype"] = store_dtype.name  # what the shards hold
    hf_config["transformers_version"] = _transformers_version()
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": [cfg.eos_token_id, cfg.bos_token_id],
        "pad_token_id": cfg.pad_token_id,
        "do_sample": True,
        "temperature": 0.3,  # the GroupRank reference inference settings (paper-notes §1)
        "top_p": 0.8,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out_dir)
    _publish(out_dir, final)
    return final


def _shard_groups(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive tensor indices per shard: a shard closes before the tensor that would take it
    over ``max_shard_bytes`` (a single larger tensor gets a shard of its own), as HF does."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if used and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def _old_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def _publish(partial: Path, final: Path) -> None:
    """Swap the finished ``partial`` export in for ``final`` with two renames, then move the files
    of the previous ``final`` that this export does not write (a README, ...) over; stale weight
    shards are not moved. ``partial`` never holds a file of the user's, so deleting it is always
    safe; a kill at any point leaves a state ``_recover`` completes."""
    if not final.exists():
        partial.rename(final)
        return
    old = _old_dir(final)
    final.rename(old)
    partial.rename(final)  # killed before this: ``_recover`` renames ``old`` back
    _adopt_user_files(old, final)


def _adopt_user_files(old: Path, final: Path) -> None:
    """Move what ``old`` (a previous export) has and ``final`` lacks into ``final``, then drop ``old``."""
    for entry in old.iterdir():
        stale = entry.name.startswith("model") and entry.name.endswith((".safetensors", ".safetensors.index.json"))
        if not stale and not (final / entry.name).exists():
            entry.rename(final / entry.name)
    shutil.rmtree(old)


def _recover(final: Path) -> None:
    """Finish or undo a swap that a kill interrupted (see ``_publish``): with ``final`` gone, the
    previous export in ``.NAME.old`` goes back in place; with both there, the new export was
    published and the user's files still in ``.NAME.old`` move over."""
    old = _old_dir(final)
    if not old.exists():
        return
    if final.exists():
        log.warning("%s: finishing an export that was interrupted after its swap", final)
        _adopt_user_files(old, final)
    else:
        log.warning("%s: restoring the previous export (the last one was interrupted mid-swap)", final)
        old.rename(final)


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
            "chat_template.jinja",
            "added_tokens.json",
        ):
            src = Path(tokenizer) / name
            if src.exists():
                shutil.copy(src, out_dir / name)
    else:
        tokenizer.save_pretrained(str(out_dir))


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:
        return "5.24.0"
