"""Scalar metrics: an append-only ``metrics.jsonl`` (the source of truth) plus TensorBoard.

``metrics.jsonl`` holds one JSON object per ``log`` call: ``{"step": int, "time": unix seconds,
"<name>": value, ...}``. JSON has no NaN/Infinity, and silently dropping a NaN loss would hide
exactly the event one is looking for, so non-finite values are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` (``read_metrics`` turns them back into floats). The file is flushed after
every line so a preempted run loses nothing, and reopened in append mode on resume; a step logged
again after a resume (the run restarted from an older checkpoint) supersedes the earlier value
when plotting.

Only process 0 writes by default (``enabled=jax.process_index() == 0``): metrics are global
scalars, identical on every process. ``float()`` on a jax array needs it to be fully replicated
or fully addressable, which reduced scalars returned from a jitted step are.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_TB_TAG = re.compile(r"[^A-Za-z0-9_./-]")
# Metric name prefixes that get their own rows in ``plot_run`` (training phases).
GROUP_PREFIXES = ("sft/", "grpo/")


def _to_scalar(name: str, value: Any) -> float | int:
    """Python number for JSON/TensorBoard; rejects tensors so a wrong metric is caught early."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    size = getattr(value, "size", None)
    if size is None:
        raise TypeError(f"metric {name!r}: expected a number or a scalar array, got {type(value).__name__}")
    if size != 1:
        raise ValueError(
            f"metric {name!r} has shape {getattr(value, 'shape', '?')}; log scalars (reduce with .mean() first)"
        )
    kind = getattr(getattr(value, "dtype", None), "kind", "f")
    return int(value.item()) if kind in "iub" else float(value.item())


def _json_value(x: float | int) -> float | int | str:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


class MetricsLogger:
    """Write scalars to ``run_dir/metrics.jsonl`` and TensorBoard ``run_dir/tb``.

    ``resume_step``: the step the run (re)starts from. Records of later steps, logged before a
    kill but after the last checkpoint, are dropped from the JSONL and purged from TensorBoard,
    since the resumed run logs those steps again; a torn last line is cut, so the next record
    starts on a line of its own.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool | None = None,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        if enabled is None:
            enabled = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_after(self.run_dir / METRICS_FILE, resume_step)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _EventFile(self.run_dir / TB_DIR, purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (name -> scalar) at ``step``; a no-op when disabled."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")
        values = {str(k): _to_scalar(str(k), v) for k, v in metrics.items()}
        for reserved in ("step", "time"):
            if reserved in values:
                raise ValueError(f"metric name {reserved!r} is reserved; rename it")
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _json_value(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                # TensorBoard tags allow [A-Za-z0-9_./-]; tensorboardX would rename
                # "rollout_ndcg@10" itself, with an INFO line per metric per step.
                self._tb.add_scalar(_TB_TAG.sub("_", name), value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_EVENT_FILES = itertools.count()


class _EventFile:
    """TensorBoard scalars written and flushed in the caller's thread, like ``metrics.jsonl``.

    tensorboardX's ``SummaryWriter`` queues events for a thread that writes them every
    ``flush_secs`` (its ``flush`` does not drain that queue), so a SIGKILL lost steps that the
    resumed run, starting after its checkpoint, never logs again. ``purge_step`` is
    ``SummaryWriter``'s: TensorBoard hides the events of a killed run from that step on.
    """

    def __init__(self, logdir: Path, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        logdir.mkdir(parents=True, exist_ok=True)
        self._event = Event
        # The name holds only the second: a suffix per process and file keeps a fast restart's apart.
        suffix = f".{os.getpid()}.{next(_EVENT_FILES)}"
        self._writer = EventsWriter(str(logdir / "events"), suffix)  # writes the file-version event
        if purge_step is not None:
            self._writer.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=scalar(tag, value)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the complete records of ``path`` up to ``step`` (atomically rewritten)."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept, dropped = [], 0
    for line in text.split("\n")[:-1]:  # what follows the last newline is a torn write
        try:
            record_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            record_step = None  # a damaged line: kept, ``read_metrics`` skips it
        if isinstance(record_step, int) and record_step > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    torn = not text.endswith("\n") and text != ""
    if dropped or torn:
        log.info("%s: resuming at step %d, dropped %d later record(s)%s", path, step, dropped, ", a torn line" * torn)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _from_json(value: Any) -> float | None:
    if isinstance(value, str):
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None  # a non-numeric field (e.g. added by hand): not a curve


def read_metrics(run_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}`` from ``run_dir/metrics.jsonl``, sorted by step.

    A later line for the same step and name wins (resume from an older checkpoint). A torn last
    line (process killed mid-write) is skipped with a warning rather than failing the plot.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; is {run_dir} a run directory written by MetricsLogger (grouprank sft/grpo --run-dir)?"
        )
    series: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("%s:%d is not a metrics record; skipped", path, lineno)
                continue
            for name, value in record.items():
                number = None if name in ("step", "time") else _from_json(value)
                if number is not None:
                    series.setdefault(name, {})[step] = number
    return {name: (sorted(points), [points[s] for s in sorted(points)]) for name, points in series.items()}


def _grouped(names: list[str]) -> list[tuple[str, list[str]]]:
    groups = [(prefix.rstrip("/"), sorted(n for n in names if n.startswith(prefix))) for prefix in GROUP_PREFIXES]
    other = sorted(n for n in names if not n.startswith(GROUP_PREFIXES))
    return [(g, members) for g, members in groups + [("other", other)] if members]


def plot_run(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None, max_cols: int = 4) -> Path:
    """Render every metric curve of a run into one PNG grid; returns the PNG path.

    One subplot per metric; each phase (``sft/...``, ``grpo/...``, then the rest) starts on a
    new row so the two training stages read as separate blocks. Non-finite points are gaps.
    Default output: ``run_dir/metrics.png``.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: TPU VMs and CI have no display
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    if not series:
        raise ValueError(f"{Path(run_dir) / METRICS_FILE} holds no numeric metrics to plot")
    groups = _grouped(list(series))
    ncols = min(max_cols, max(len(members) for _, members in groups))
    rows: list[list[str]] = []
    for _, members in groups:
        rows += [members[i : i + ncols] for i in range(0, len(members), ncols)]
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4 * ncols, 2.8 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            steps, values = series[row[c]]
            bad = sum(not math.isfinite(v) for v in values)
            values = [v if math.isfinite(v) else math.nan for v in values]
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
            # A diverged metric must not look like an empty plot: count its nan/inf points.
            ax.set_title(
                row[c] + (f"  ({bad} non-finite)" if bad else ""), fontsize=9, color="tab:red" if bad else "black"
            )
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).resolve().name), fontsize=11)
    fig.tight_layout()
    out = Path(out_png) if out_png is not None else Path(run_dir) / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
