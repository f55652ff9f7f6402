"""Waiting on remote calls, with timeouts and errors that say where they came from.

Every remote call the driver makes is registered here with a label (model,
replica, rank, method). Waiting on them either returns results or raises one
exception naming the worker that failed or hung: a ``RemoteCallError`` with
the worker's traceback, ``WorkerDiedError`` when its process vanished, or
``WorkerTimeoutError`` when it did not answer in time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from chatlearn.runtime.worker import RemoteCallError


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

    def track(self, ref: ray.ObjectRef, label: CallLabel) -> ray.ObjectRef:
        self._pending[ref] = label
        return ref

    def get(self, refs: Sequence[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
        """Results of ``refs`` in order; errors and time-outs raised with their labels."""
        refs = list(refs)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        remaining = list(refs)
        while remaining:
            left = deadline - time.monotonic()
            done, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=max(left, 0))
            for ref in done:
                self._raise_if_failed(ref)
            if remaining and time.monotonic() >= deadline:
                stuck = self._oldest_unfinished()
                raise WorkerTimeoutError(
                    f"no answer within {timeout_s:g}s (runtime.actor_timeout_s) from "
                    + ", ".join(str(label) for label in stuck[:3])
                    + (f" and {len(stuck) - 3} more calls" if len(stuck) > 3 else "")
                )
        results = [self._fetch(ref) for ref in refs]
        for ref in refs:
            self._pending.pop(ref, None)
        return results

    def wait_all(self) -> None:
        """Check every call still outstanding (e.g. the non-output ranks of a stage)."""
        self.get(list(self._pending))

    def _oldest_unfinished(self) -> list[CallLabel]:
        """Unfinished calls, oldest first, one per worker and method: the first is
        most likely the one that hangs (later calls may only wait for its output)."""
        pending = list(self._pending)
        _, not_ready = ray.wait(pending, num_returns=len(pending), timeout=0)
        not_ready = set(not_ready)
        labels = [self._pending[r] for r in pending if r in not_ready]
        return list(dict.fromkeys(labels))

    def discard(self) -> None:
        self._pending.clear()

    def _raise_if_failed(self, ref: ray.ObjectRef) -> None:
        self._fetch(ref)

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
