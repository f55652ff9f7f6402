"""The Ray actor that hosts one rank of one model.

Each worker builds a fresh instance of the user's module class, joins its
replica's torch.distributed group, and runs the module's methods on real data.
Every exception is re-raised as ``RemoteCallError`` carrying the model name,
replica, rank, method and the worker's traceback, so the driver can say
exactly where a run broke.
"""
from __future__ import annotations

import os
import time
import traceback
from collections import defaultdict
from datetime import timedelta
from typing import Any

from chatlearn.models.base import BaseModule, WorkerInfo, call_hook

# How long rank 0's rendezvous store waits for the other ranks of its replica.
STORE_TIMEOUT_S = 900.0


class RemoteCallError(RuntimeError):
    """A model method raised inside a worker."""

    def __init__(self, model: str, replica: int, rank: int, method: str, remote_traceback: str):
        self.model, self.replica, self.rank, self.method = model, replica, rank, method
        self.remote_traceback = remote_traceback
        super().__init__(
            f"model {model!r} replica {replica} rank {rank} failed in {method}():\n{remote_traceback}"
        )

    def __reduce__(self):
        return (RemoteCallError, (self.model, self.replica, self.rank, self.method, self.remote_traceback))


def merge_inputs(inputs: tuple) -> dict:
    """Several upstream outputs feed one call: their keys are merged, later wins."""
    merged: dict = {}
    for item in inputs:
        if not isinstance(item, dict):
            raise TypeError(f"flow inputs must be dicts (batches), got {type(item).__name__}")
        merged.update(item)
    return merged


class ModelWorker:
    def __init__(self, module_cls: type, name: str, config, info: WorkerInfo, env_vars: dict[str, str]):
        os.environ.update(env_vars)
        from chatlearn.config.globals import set_args
        from chatlearn.utils.dependency_logs import quiet_dependencies

        quiet_dependencies()  # before the module imports megatron-core or vLLM

        set_args(config)
        self.info = info
        self.module: BaseModule = module_cls(name)
        self.module.worker = info
        self._timings: dict[str, float] = defaultdict(float)
        self._events: list[str] = []
        self._store = None  # rank 0's rendezvous store (torch.distributed.TCPStore)
        self._is_output_rank = False  # known after setup()

    # -- start-up ----------------------------------------------------------------
    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def rendezvous_address(self) -> tuple[str, int]:
        """Start the replica's rendezvous store here (rank 0); its address and port.

        The store binds port 0 and keeps its socket open, so no other process can take
        the port between choosing it and listening on it (a bind-then-close probe could
        lose it to a concurrent job).
        """
        import torch.distributed as dist

        if self._store is None:
            self._store = dist.TCPStore("0.0.0.0", 0, world_size=self.info.world_size, is_master=True,
                                        wait_for_workers=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
        return self.node_ip(), self._store.port

    def init_distributed(self, master_addr: str, master_port: int, timeout_s: float) -> None:
        import torch.distributed as dist

        from chatlearn.utils import platform

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.info.rank),
            WORLD_SIZE=str(self.info.world_size),
            LOCAL_RANK="0",  # Ray gives each GPU worker exactly one visible device
        )

        def join():
            store = self._store
            if store is None:  # not rank 0: a client of rank 0's store
                store = dist.TCPStore(master_addr, master_port, world_size=self.info.world_size, is_master=False,
                                      timeout=timedelta(seconds=timeout_s))
            dist.init_process_group(backend=platform.dist_backend(), store=store, rank=self.info.rank,
                                    world_size=self.info.world_size, timeout=timedelta(seconds=timeout_s))

        self._guard("init_distributed", join)

    def setup(self) -> dict[str, Any]:
        """``init()`` then ``setup()``; what the driver needs to know about this rank."""
        self._guard("init", lambda: call_hook(self.module.init, {}))
        self._guard("setup", lambda: call_hook(self.module.setup, {}))
        self._is_output_rank = bool(self.module.is_output_rank())
        return {"dp_rank": self.info.dp_rank, "is_output_rank": self._is_output_rank,
                "has_weights": bool(self.module.has_weights()), "padding_config": self.module.padding_config()}

    # -- calls -------------------------------------------------------------------
    def call(self, method: str, *args, **kwargs) -> Any:
        """Run ``module.method(*args, **kwargs)`` (a flow's own arguments, passed as they are)."""
        return self._guard(method, lambda: getattr(self.module, method)(*args, **kwargs))

    def hook(self, method: str, names: tuple[str, ...], *values: Any) -> Any:
        """Run ``module.method`` with the engine's arguments ``names`` (the first ``len(names)``
        of ``values``) that it accepts, and the rest of ``values`` as the flow's own (``call_hook``)."""
        offered = dict(zip(names, values[:len(names)]))
        return self._guard(method, lambda: call_hook(getattr(self.module, method), offered, *values[len(names):]))

    def forward(self, method: str, iteration: int, *inputs: dict) -> dict:
        """A flow stage: merge the upstream batches, run, and return the input
        batch updated with the keys the method returned."""
        def run():
            data = merge_inputs(inputs)
            out = call_hook(getattr(self.module, method), {"data": data, "iteration": iteration})
            if out is None:
                return data
            if not isinstance(out, dict):
                raise TypeError(f"{method} must return a dict batch, got {type(out).__name__}")
            return {**data, **out}

        return self._guard(method, run)

    def output(self, call: str, *args: Any) -> tuple[None, Any]:
        """``getattr(self, call)(*args)`` (``forward`` or ``hook``) as two results, for a call made
        with ``num_returns=2``: a status (None) and the data, which only the output rank returns.

        The driver watches the status alone for failures (an exception here makes both
        results errors), so it never pulls in data it does not read: the data goes to the
        next stage's actors from Ray's object store, and a rank that is not its replica's
        output rank (an earlier pipeline stage, a tensor-parallel peer) returns None
        instead of a copy of the batch."""
        data = getattr(self, call)(*args)
        return None, data if self._is_output_rank else None

    def pop_timings(self) -> dict[str, float]:
        timings, self._timings = dict(self._timings), defaultdict(float)
        return timings

    def pop_episode_stats(self) -> dict[str, Any]:
        """Seconds per method since the last call, and the module's own metrics
        (``get_and_clear_metrics``: ChatLearn 1.x's ``_metric_list``)."""
        prefix, metrics = self._guard("get_and_clear_metrics", self.module.get_and_clear_metrics)
        return {"timings": self.pop_timings(), "prefix": prefix, "metrics": metrics}

    def events(self) -> list[str]:
        """Method names this worker ran, in order (for tests and debugging)."""
        return list(self._events)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def _guard(self, method: str, fn):
        start = time.perf_counter()
        self._events.append(method)
        try:
            return fn()
        except Exception:
            raise RemoteCallError(
                self.module.name, self.info.replica_id, self.info.rank, method, traceback.format_exc()
            ) from None
        finally:
            self._timings[method] += time.perf_counter() - start
