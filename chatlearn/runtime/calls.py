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

Calls whose result is data (flow stages, training steps: ``ModelWorker.output``)
return two Ray objects, a small status and the data. Only the status is watched:
a failure makes both objects errors, so fetching the status says whether the call
failed without pulling a batch into the driver. The data is fetched only when a
``get()`` asks for it, once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

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
    """Outstanding remote calls of the driver, so none is left unchecked.

    Each call is tracked by the ref fetched to learn whether it failed: its result, or
    for a call with two returns its status (its data ref is given to ``track`` apart).
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._pending: dict[ray.ObjectRef, CallLabel] = {}
        # Results of outstanding calls already fetched (while watching for failures),
        # kept until a get() asks for them.
        self._fetched: dict[ray.ObjectRef, Any] = {}
        # Data ref -> its call's status ref, and back. Keyed by the data ref's id, not the
        # ref itself: holding the ref would keep the data alive in Ray's object store after
        # the stages that take it are done.
        self._status_of: dict[bytes, ray.ObjectRef] = {}
        self._data_of: dict[ray.ObjectRef, bytes] = {}
        # Seconds the driver spent blocked in ray.wait on workers: an episode's time
        # less this is the driver's own work (``time/driver``).
        self.wait_s = 0.0

    def track(self, ref: ray.ObjectRef, label: CallLabel, data: ray.ObjectRef | None = None) -> ray.ObjectRef:
        """Watch the call whose result is ``ref``; with ``data``, ``ref`` is the call's status and
        ``data`` its result, fetched only by a get() that asks for it."""
        self._pending[ref] = label
        if data is not None:
            self._status_of[data.binary()] = ref
            self._data_of[ref] = data.binary()
        return ref

    def get(self, refs: Sequence[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
        """Results of ``refs`` in order (calls' results, or data refs of tracked calls);
        errors and time-outs raised with their labels.

        A failure of any outstanding call (not only of ``refs``) is raised as soon as
        it is seen: it is usually why the calls waited on do not finish."""
        refs = list(refs)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        # The ref that says whether each call succeeded: a data ref's status, else the ref itself.
        calls = [self._status_of.get(ref.binary(), ref) for ref in refs]
        remaining = [call for call in dict.fromkeys(calls) if call not in self._fetched]
        while remaining:
            left = deadline - time.monotonic()
            done, remaining = self._wait(remaining, max(min(left, POLL_S), 0))
            for ref in done:
                self._fetched[ref] = self._fetch(ref)
            if not remaining:
                break
            self._raise_other_failures()
            if time.monotonic() >= deadline:
                raise self._timeout_error(timeout_s)
        # Every call succeeded: now fetch the data asked for (a data ref of a finished call
        # is ready, unless it must first come over from another node).
        data: dict[ray.ObjectRef, Any] = {}
        for ref, call in zip(refs, calls):
            if ref is not call and ref not in data:
                data[ref] = self._fetch(ref, max(deadline - time.monotonic(), POLL_S), self._pending.get(call))
        results = [data[ref] if ref is not call else self._fetched[call] for ref, call in zip(refs, calls)]
        for call in calls:
            self._forget(call)
        return results

    def first_done(self, groups: Sequence[Sequence[ray.ObjectRef]], timeout_s: float | None = None) -> int:
        """The lowest index of a group of refs (one flow call's outputs) whose calls have all
        finished, waiting until one has; failures raised as in :meth:`get`. The results stay
        for a ``get`` of that group."""
        if not groups:
            raise ValueError("first_done() of no groups")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        calls = [[self._status_of.get(ref.binary(), ref) for ref in group] for group in groups]
        while True:
            unfinished = [call for group in calls for call in group if call not in self._fetched]
            done, _ = self._wait(unfinished, 0) if unfinished else ([], [])
            for ref in done:
                self._fetched[ref] = self._fetch(ref)
            for i, group in enumerate(calls):
                if all(call in self._fetched for call in group):
                    return i
            self._raise_other_failures()
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout_error(timeout_s)
            self._wait([c for c in unfinished if c not in done], min(left, POLL_S), num_returns=1)

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
        """Check every call still outstanding (e.g. the non-output ranks of a stage, the earlier
        stages of a flow): their results or statuses, never their data."""
        self.get(list(self._pending))

    def _oldest_unfinished(self) -> list[CallLabel]:
        """Unfinished calls, oldest first, one per worker and method: the first is
        most likely the one that hangs (later calls may only wait for its output)."""
        pending = list(self._pending)
        _, not_ready = self._wait(pending, 0)
        not_ready = set(not_ready)
        labels = [self._pending[r] for r in pending if r in not_ready]
        return list(dict.fromkeys(labels))

    def _timeout_error(self, timeout_s: float) -> WorkerTimeoutError:
        stuck = self._oldest_unfinished()
        return WorkerTimeoutError(f"no answer within {timeout_s:g}s (runtime.actor_timeout_s) from "
                                  + ", ".join(str(label) for label in stuck[:3])
                                  + (f" and {len(stuck) - 3} more calls" if len(stuck) > 3 else ""))

    def _wait(self, refs: list[ray.ObjectRef], timeout_s: float,
              num_returns: int | None = None) -> tuple[list, list]:
        """``ray.wait`` for all of ``refs`` (or the first ``num_returns``), counted in ``wait_s``."""
        start = time.perf_counter()
        try:
            return ray.wait(refs, num_returns=num_returns or len(refs), timeout=timeout_s)
        finally:
            self.wait_s += time.perf_counter() - start

    def _forget(self, call: ray.ObjectRef) -> None:
        self._pending.pop(call, None)
        self._fetched.pop(call, None)
        self._status_of.pop(self._data_of.pop(call, b""), None)

    def discard(self) -> None:
        self._pending.clear()
        self._fetched.clear()
        self._status_of.clear()
        self._data_of.clear()

    def _fetch(self, ref: ray.ObjectRef, timeout_s: float = 0, label: CallLabel | None = None) -> Any:
        label = label or self._pending.get(ref)
        try:
            return ray.get(ref, timeout=timeout_s)
        except RayTaskError as err:
            cause = err.cause if getattr(err, "cause", None) is not None else err
            if isinstance(cause, RemoteCallError):
                raise cause from None
            raise RuntimeError(f"{label or 'a remote call'} failed:\n{err}") from None
        except RayActorError as err:
            raise WorkerDiedError(f"the worker of {label or 'a remote call'} died: {err}") from None
        except ObjectLostError as err:  # the data of a finished call, on a node that went away
            raise WorkerDiedError(f"the result of {label or 'a remote call'} was lost: {err}") from None
        except GetTimeoutError:
            # A finished call's data still on its way from another node (a status or result is
            # only fetched once ray.wait returned it).
            raise WorkerTimeoutError(f"the result of {label or 'a remote call'} did not arrive within "
                                     f"{timeout_s:g}s") from None
