"""Training checkpoints: model/optimizer state, the grain data iterator and JSON metadata.

A thin policy layer over ``orbax.checkpoint.CheckpointManager``. Each step directory holds three
Orbax items so that each travels in its natural format:

* ``state`` - a pytree of arrays (params, optimizer state, step counter, RNG key *data*), written
  with ``StandardSave`` (tensorstore/OCDBT, every process writes its own shards);
* ``data``  - the grain iterator position, written by grain's own Orbax handler (one JSON file per
  process, ``process_{i}-of-{n}.json``, so per-process data shards resume independently);
* ``meta``  - a JSON dict (run config, versions, ...), written with ``JsonSave``.

Why a wrapper at all: the trainers need (1) one save policy (``save_every`` + ``force`` for
preemption), (2) restore onto whatever mesh is current - the caller passes a target pytree of
``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` and Orbax reshards on read, so a run saved
on 8-way FSDP resumes on 2x4 or on one device - and (3) survival of a damaged latest checkpoint:
a restore that fails falls back to the previous step with a warning instead of killing the job.

PRNG keys: Orbax stores plain arrays only, so typed keys (``jax.random.key``) must be saved as
``jax.random.key_data(key)`` and rewrapped after restore with ``jax.random.wrap_key_data``;
``save`` rejects typed keys with that advice rather than failing deep inside tensorstore.

Multi-process: every ``jax.Array`` in ``state`` must be a global array (host-local arrays such as
an unsharded ``jnp.array(3)`` created on one process fail to save); use ``np.asarray(3)`` for host
scalars (``np.int32(3)`` scalars are rejected by Orbax). All processes must call ``save``,
``restore`` and ``close`` at the same steps - they contain cross-process barriers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from grouprank_jax.errors import UserError

log = logging.getLogger(__name__)

# Sub-directory (inside the checkpoint root) where damaged steps are moved aside. Its name is not
# an integer, so Orbax's step discovery ignores it, and the data stays available for inspection.
QUARANTINE_DIR = "quarantine"


class CheckpointRestoreError(UserError, RuntimeError):
    """No step of a checkpoint directory restores (each step's error is in the message)."""


class MissingItemError(LookupError):
    """The step lacks an item the caller asked for; a caller error, so no fallback to older steps
    (deliberately not a KeyError, which ``restore`` treats as damage)."""


@dataclasses.dataclass
class Restored:
    """What ``Checkpointer.restore`` returns; the data iterator (if any) is restored in place."""

    step: int
    state: Any
    metadata: dict | None


def _reject_typed_keys(tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"state{jax.tree_util.keystr(path)} is a typed PRNG key; save "
                "jax.random.key_data(key) instead and rewrap it after restore with "
                "jax.random.wrap_key_data(data)"
            )


def _check_json(metadata: dict) -> None:
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"checkpoint metadata must be JSON-serialisable (convert dataclasses with "
            f"dataclasses.asdict, paths with str): {err}"
        ) from err


def _all_processes_ok(ok: bool) -> bool:
    """True only if ``ok`` holds on every process, so that all processes fall back together."""
    if jax.process_count() == 1:
        return ok

    flags = multihost_utils.process_allgather(np.asarray(1 if ok else 0, np.int32))
    return bool(np.all(flags))


class Checkpointer:
    """Save every ``save_every`` steps into ``directory`` keeping the newest ``keep``.

    ``async_save=True`` returns from ``save`` once the arrays are copied to host memory; the
    write to storage continues in a background thread (so the next train step may donate or
    overwrite the device buffers safely). Call ``wait()`` before reading the files and ``close()``
    at the end of training (it waits too).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        save_every: int = 1000,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1")
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 (or None to keep every checkpoint)")
        # epath so that gs:// (TPU pods) and local paths behave the same.
        self.directory = epath.Path(directory)
        if not str(directory).startswith(("gs://", "s3://")):
            self.directory = self.directory.absolute()
        self.save_every = save_every
        # A reader (export, rerank, a later stage's init_from) may run beside the job that writes
        # these steps: it falls back past a step it cannot read but never moves one aside.
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            # The save policy is ours (``save``), so Orbax is told to accept every step we pass.
            save_interval_steps=1,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # A save killed mid-way leaves <step>.orbax-checkpoint-tmp, which max_to_keep never
            # deletes (e.g. a preemption save at an off-cadence step): the writer removes them.
            cleanup_tmp_directories=not read_only,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    # -- queries -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest finalized step (Orbax only lists steps whose save committed)."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def read_metadata(self, step: int) -> dict | None:
        """The JSON metadata saved with ``step`` (None if it was saved without), read alone."""
        if "meta" not in self._item_names(step):
            return None
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    # -- save ----------------------------------------------------------------------------------
    def save(
        self, step: int, state: Any, data_iterator: Any = None, metadata: dict | None = None, force: bool = False
    ) -> bool:
        """Save if ``step`` is a multiple of ``save_every`` (or ``force``); return whether it did.

        ``data_iterator`` is a grain ``DatasetIterator`` (``iter(ds.to_iter_dataset())``) or
        ``DataLoader`` iterator; its position is saved so training resumes on the next batch.
        Saving a step that already exists is a no-op that returns False (e.g. a forced save on
        preemption right after a periodic save of the same step).
        """
        step = int(step)
        if self.read_only:
            raise PermissionError(f"{self.directory} was opened read-only")
        if step in self._mgr.all_steps():
            return False
        if not force and step % self.save_every:
            return False
        _reject_typed_keys(state)
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            import grain  # lazy: the GPU benchmark machine has no grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if metadata is not None:
            _check_json(metadata)
            items["meta"] = ocp.args.JsonSave(metadata)
        saved = self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return bool(saved)

    # -- restore -------------------------------------------------------------------------------
    def restore(
        self, step: int | None = None, target: Any = None, data_iterator: Any = None, partial: bool = False
    ) -> Restored:
        """Restore ``step`` (default: the latest) onto the shardings given by ``target``.

        ``target`` is a pytree matching the saved state whose leaves are
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(current_mesh, spec))`` (or
        concrete arrays, whose shardings are used); values are resharded on read, so the saving
        mesh does not matter. Without ``target`` arrays come back with the saved shardings, which
        only works on the same device set. ``data_iterator`` (a fresh iterator over the same
        dataset) has its position set in place. ``partial=True`` reads only the sub-tree that
        ``target`` names (e.g. ``{"trainable": ...}`` without the optimizer state), for readers
        that need the weights on a device set other than the one that saved them.

        With ``step=None``, a step that fails to restore (missing or damaged files) is reported
        with a warning and the previous one is tried; once an older step restores with the same
        target - proving the target itself is fine - the failed newer steps are moved to
        ``<directory>/quarantine/`` so that training can save those step numbers again (not
        by a ``read_only`` Checkpointer).
        An explicit ``step`` is never substituted: its error propagates.
        """
        self._mgr.reload()  # another process/job may have written steps since we started
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        if step is not None:
            if int(step) not in steps:
                raise FileNotFoundError(f"step {step} not in {self.directory}; available: {steps}")
            return self._restore_step(int(step), target, data_iterator, partial)

        failed: list[int] = []
        reasons: list[str] = []
        for candidate in reversed(steps):
            error: Exception | None = None
            result = None
            try:
                result = self._restore_step(candidate, target, data_iterator, partial)
            # Orbax/tensorstore surface damage as many exception types (ValueError from
            # tensorstore, OSError/FileNotFoundError, KeyError/JSONDecodeError from metadata).
            except (ValueError, OSError, KeyError, TypeError, RuntimeError) as err:
                error = err
            if _all_processes_ok(error is None):
                if failed and not self.read_only:
                    self._quarantine(failed)
                return result  # type: ignore[return-value]
            failed.append(candidate)
            older = [s for s in steps if s < candidate]
            reason = (
                f"{type(error).__name__}: {str(error)[:400]}" if error is not None else "failed on another process"
            )  # tensorstore errors embed huge specs
            reasons.append(f"step {candidate}: {reason[:200]}")
            log.warning(
                "checkpoint step %d in %s could not be restored (%s); %s",
                candidate,
                self.directory,
                reason,
                f"falling back to step {older[-1]}" if older else "no older step left",
            )
        raise CheckpointRestoreError(
            f"none of the checkpoints {steps} in {self.directory} could be restored ({'; '.join(reasons)}). "
            "If every step fails alike, what is being restored does not match what was saved (another "
            "model, LoRA or optimizer setting than the run's); read or decode errors mean damaged files: "
            "restore them from a copy, or move those step directories away to start over"
        )

    def _restore_step(self, step: int, target: Any, data_iterator: Any, partial: bool = False) -> Restored:
        present = set(self._item_names(step))
        if partial:
            if target is None:
                raise ValueError("a partial restore needs the target sub-tree to read")
            state_args = ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
        else:
            state_args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        items: dict[str, Any] = {"state": state_args}
        if data_iterator is not None:
            if "data" not in present:
                raise MissingItemError(
                    f"step {step} has no data iterator state (it was saved without "
                    "data_iterator=); restore without data_iterator= to start the data "
                    "from its beginning"
                )
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if "meta" in present:
            items["meta"] = ocp.args.JsonRestore()
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        log.info("checkpoint: restored step %d from %s", step, self.directory)
        return Restored(step=step, state=out["state"], metadata=out["meta"] if "meta" in items else None)

    def _item_names(self, step: int) -> list[str]:
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory {step_dir} is missing")
        return [p.name for p in step_dir.iterdir() if p.is_dir()]

    def _quarantine(self, steps: list[int]) -> None:
        """Move damaged steps aside (process 0 only), then let every process re-list the steps."""
        if jax.process_index() == 0:
            qdir = self.directory / QUARANTINE_DIR
            qdir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dest = qdir / str(step)
                suffix = 1
                while dest.exists():  # the same step may go bad more than once
                    dest = qdir / f"{step}.{suffix}"
                    suffix += 1
                (self.directory / str(step)).rename(dest)
                log.warning("checkpoint: moved damaged step %d to %s", step, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("grouprank_checkpoint_quarantine")
        self._mgr.reload()

    # -- lifecycle -----------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until any background save has been committed to storage."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
