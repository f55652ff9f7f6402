"""Waiting on remote calls, with timeouts and errors that say where they came from.

Every remote call the driver makes is registered here with a label (model,
replica, rank, method). Waiting on them either returns results or raises one
exception naming the worker that failed or hung: a ``RemoteCallError`` with
the worker's traceback, ``WorkerDiedError`` when its process vanished, or
``WorkerTimeoutError`` when it did not answer in time.

While the driver waits on some calls, it also watches every other call still
outstanding (polling every ``POLL_S`` seconds): when one of them failed, that
failure is raised at once. A rank that raised often leaves the rest of its
replica (or the next stage) blocked in a collective or on its output; without
this the driver would wait for ``runtime.actor_timeout_s`` and then report the
blocked call instead of the one that broke.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from chatlearn.runtime.worker import RemoteCallError

# How often a wait looks at the other outstanding calls for failures.
POLL_S = 0.5


@dataclass(frozen=True)
class CallLabel:
    model: str
    replica: int
    rank: int
    method: str

    def __str__(self) -> str:
        return f"model {self.model!r} replica {self.replica} rank {self.rank} ({self.method})"


class WorkerDiedError(RuntimeError):
    pass


class WorkerTimeoutError(TimeoutError):
    pass


class CallTracker:
    """Outstanding remote calls of the driver, so none is left unchecked."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._pending: dict[ray.ObjectRef, CallLabel] = {}
        # Results of outstanding calls already fetched (while watching for failures),
        # kept until a get() asks for them.
        self._fetched: dict[ray.ObjectRef, Any] = {}
        # Seconds the driver spent blocked in ray.wait on workers: an episode's time
        # less this is the driver's own work (``time/driver``).
        self.wait_s = 0.0

    def track(self, ref: ray.ObjectRef, label: CallLabel) -> ray.ObjectRef:
        self._pending[ref] = label
        return ref

    def get(self, refs: Sequence[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
        """Results of ``refs`` in order; errors and time-outs raised with their labels.

        A failure of any outstanding call (not only of ``refs``) is raised as soon as
        it is seen: it is usually why the calls waited on do not finish."""
        refs = list(refs)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        remaining = [ref for ref in dict.fromkeys(refs) if ref not in self._fetched]
        while remaining:
            left = deadline - time.monotonic()
            done, remaining = self._wait(remaining, max(min(left, POLL_S), 0))
            for ref in done:
                self._fetched[ref] = self._fetch(ref)
            if not remaining:
                break
            self._raise_other_failures()
            if time.monotonic() >= deadline:
                stuck = self._oldest_unfinished()
                raise WorkerTimeoutError(
                    f"no answer within {timeout_s:g}s (runtime.actor_timeout_s) from "
                    + ", ".join(str(label) for label in stuck[:3])
                    + (f" and {len(stuck) - 3} more calls" if len(stuck) > 3 else "")
                )
        results = [self._fetched[ref] for ref in refs]
        for ref in refs:
            self._pending.pop(ref, None)
            self._fetched.pop(ref, None)
        return results

    def _raise_other_failures(self) -> None:
        """Fetch the outstanding calls that finished since the last look; raise the first failure.
        Their results are kept, so a later get() does not fetch them again."""
        unseen = [ref for ref in self._pending if ref not in self._fetched]
        if not unseen:
            return
        ready, _ = self._wait(unseen, 0)
        ready = set(ready)
        for ref in unseen:  # oldest first: the first failure is the likeliest cause
            if ref in ready:
                self._fetched[ref] = self._fetch(ref)

    def wait_all(self) -> None:
        """Check every call still outstanding (e.g. the non-output ranks of a stage)."""
        self.get(list(self._pending))

    def _oldest_unfinished(self) -> list[CallLabel]:
        """Unfinished calls, oldest first, one per worker and method: the first is
        most likely the one that hangs (later calls may only wait for its output)."""
        pending = list(self._pending)
        _, not_ready = self._wait(pending, 0)
        not_ready = set(not_ready)
        labels = [self._pending[r] for r in pending if r in not_ready]
        return list(dict.fromkeys(labels))

    def _wait(self, refs: list[ray.ObjectRef], timeout_s: float) -> tuple[list, list]:
        start = time.perf_counter()
        try:
            return ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        finally:
            self.wait_s += time.perf_counter() - start

    def discard(self) -> None:
        self._pending.clear()
        self._fetched.clear()

    def _fetch(self, ref: ray.ObjectRef) -> Any:
        label = self._pending.get(ref)
        try:
            return ray.get(ref, timeout=0)
        except RayTaskError as err:
            cause = err.cause if getattr(err, "cause", None) is not None else err
            if isinstance(cause, RemoteCallError):
                raise cause from None
            raise RuntimeError(f"{label or 'a remote call'} failed:\n{err}") from None
        except RayActorError as err:
            raise WorkerDiedError(f"the worker of {label or 'a remote call'} died: {err}") from None
        except GetTimeoutError:  # not finished: callers only fetch refs that ray.wait returned
            raise
