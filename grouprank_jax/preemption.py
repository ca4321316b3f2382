"""Graceful stop on preemption (SIGTERM): finish the current step, save, exit 0.

Cloud TPU VMs and most GPU schedulers (Kubernetes, Slurm with ``--signal``) send SIGTERM some
seconds before killing a preempted job. Exiting from inside the handler would abandon a step
half-way (and possibly a half-written checkpoint), so the handler only sets a flag; the training
loop polls ``guard.should_stop`` after each step, saves with ``force=True`` and returns normally::

    with PreemptionGuard() as guard:
        for step in range(start, total):
            state = train_step(state, next(batches))
            ckpt.save(step, state, data_iterator=batches)
            if guard.should_stop:
                ckpt.save(step, state, data_iterator=batches, force=True)
                break
    ckpt.close()  # waits for the async write; then exit 0

Multi-process: SIGTERM may reach the processes at different moments (or only some of them),
but a checkpoint save is collective, so all processes must decide to stop at the same step.
With ``jax.process_count() > 1`` ``should_stop`` therefore all-gathers the local flags (any
process signalled -> everyone stops). That is a small cross-process collective, so every process
must read ``should_stop`` at the same points of the loop; ``sync_every=N`` restricts the
collective to every N-th read (the others return the last agreed answer) when per-step latency
matters. JAX's own ``multihost_utils.reached_preemption_sync_point`` is the alternative on TPU
pods whose coordination service receives the preemption notice; it needs that service to be
configured, which this guard does not assume.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager that turns SIGTERM (and optionally other signals) into a stop flag.

    The previous handlers are restored on exit, so nesting guards or running them inside a
    test runner leaves the process's signal setup unchanged.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), sync_every: int = 1):
        if sync_every < 1:
            raise ValueError(f"sync_every={sync_every} must be >= 1")
        self.signals = tuple(signals)
        self.sync_every = sync_every
        self._local = threading.Event()  # set from the handler; Event is safe to set there
        self._agreed = False
        self._reads = 0
        self._previous: dict[int, Any] = {}
        self.received: int | None = None

    # -- signal plumbing -------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        if not self._local.is_set():
            # Logging from a signal handler is acceptable in CPython: handlers run between
            # bytecodes in the main thread, not asynchronously inside the logging lock.
            log.warning(
                "received %s: will save and stop after the current step%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )
        self.received = signum
        self._local.set()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionGuard must be entered in the main thread: Python only "
                "delivers signals there (run the training loop in the main thread)"
            )
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            # ``None`` means the old handler was not installed from Python; SIG_DFL is the
            # closest faithful restoration.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # -- the flag ----------------------------------------------------------------------------------
    @property
    def signalled(self) -> bool:
        """This process received a stop signal (no cross-process agreement)."""
        return self._local.is_set()

    def request_stop(self) -> None:
        """Ask for a stop as if signalled (e.g. from a time-limit check); local only."""
        self._local.set()

    @property
    def should_stop(self) -> bool:
        """Whether the loop must save and stop now; identical on every process.

        Single process: the local flag. Multi-process: a collective (see the module docstring) -
        call it from every process at the same points of the loop.
        """
        if self._agreed:
            return True

        if jax.process_count() == 1:
            self._agreed = self._local.is_set()
            return self._agreed
        self._reads += 1
        if self._reads % self.sync_every:
            return False

        flags = multihost_utils.process_allgather(np.asarray(1 if self._local.is_set() else 0, np.int32))
        self._agreed = bool(np.any(flags))
        if self._agreed and not self._local.is_set():
            log.warning("another process received a stop signal: stopping after this step")
        return self._agreed
