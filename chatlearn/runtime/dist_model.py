"""One model spread over Ray workers: replicas of ranks, and the dispatch rules.

A model with ``devices`` slots and tensor x pipeline size ``tp*pp`` becomes:

* an inference model: ``devices / (tp*pp)`` independent replicas, each its own
  torch.distributed group of ``tp*pp`` ranks; or, when the module class sets
  ``one_actor_per_replica`` (vLLM, whose engine starts its own tensor-parallel
  workers), ONE actor per replica that holds the replica's ``tp*pp`` device
  slots (it runs on the first; the others stay reserved for its engine);
* a trainable model: one group of ``devices`` ranks, data parallel over
  ``dp = devices / (tp*pp)``, as Megatron expects.

The driver never talks to workers directly: flows call the module handle,
whose remote methods are bound here to ``round_robin``, ``data_parallel`` or
``all_ranks`` according to the module class's ``dispatch_modes``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from chatlearn.models.base import ALL_RANKS, DATA_PARALLEL, ROUND_ROBIN, BaseModule, WorkerInfo
from chatlearn.runtime.calls import CallLabel, CallTracker
from chatlearn.runtime.worker import ModelWorker
from chatlearn.utils.metrics import mean_metrics

# Seconds workers get to clean up before they are killed.
KILL_GRACE_S = 10.0


@dataclass
class RemoteBatch:
    """The future output of one flow stage (a batch dict once computed).

    ``ref`` is the output rank's data: it stays in Ray's object store, the next
    stage's actors get it from there (Ray resolves ObjectRef arguments in the
    actor), and the driver fetches it only where it reads it (``CallTracker.get``).
    """

    ref: ray.ObjectRef
    producer: str  # "model.method", for error messages and the flow graph


@dataclass
class WorkerHandle:
    actor: Any
    info: WorkerInfo
    dp_rank: int = 0
    is_output_rank: bool = False


@dataclass
class DistModel:
    module: BaseModule
    tp: int
    pp: int
    num_devices: int
    bundles: list[int]  # placement-group bundle (device slot) of each rank, replica-major
    share: list[float]  # fraction of its slot each rank requests (1/k when k models colocate)
    resource: str  # "GPU" or "CPU"
    trainable: bool
    replicas: list[list[WorkerHandle]] = field(default_factory=list)
    tracker: Optional[CallTracker] = None
    # Per-method call counters, passed to the module as ``iteration``; saved in checkpoints.
    iterations: dict[str, int] = field(default_factory=dict)
    loaded: bool = True  # False while offloaded (free_memory)
    has_weights: bool = True  # False: no rank holds weights (a parameter sync with it is a no-op)
    padding_config: dict = field(default_factory=dict)  # add_padding_config of its ranks
    _next_replica: Optional[itertools.cycle] = None
    _train_outputs: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.module.name

    @property
    def one_actor_per_replica(self) -> bool:
        return not self.trainable and bool(getattr(type(self.module), "one_actor_per_replica", False))

    @property
    def spans_gpus(self) -> bool:
        """One actor whose replica holds several GPUs (its engine's workers use the others)."""
        return self.one_actor_per_replica and self.resource == "GPU" and self.slots_per_replica > 1

    @property
    def slots_per_replica(self) -> int:
        """Device slots one replica holds (a trainable model is one replica)."""
        return self.num_devices if self.trainable else self.tp * self.pp

    @property
    def ranks_per_replica(self) -> int:
        """Ray actors (torch.distributed ranks) per replica."""
        return 1 if self.one_actor_per_replica else self.slots_per_replica

    @property
    def num_replicas(self) -> int:
        return self.num_devices // self.slots_per_replica

    @property
    def dp_size(self) -> int:
        return self.num_devices // (self.tp * self.pp) if self.trainable else 1

    @property
    def workers(self) -> list[WorkerHandle]:
        return [w for replica in self.replicas for w in replica]

    # -- start-up ----------------------------------------------------------------
    def create_workers(self, placement_group, config, env_vars: dict[str, str],
                       bundle_gpus: Optional[dict[int, str]] = None) -> None:
        """One Ray actor per rank on its bundle. ``bundle_gpus`` (the GPU id of each bundle,
        ``startup.bundle_gpu_ids``) is needed by a one-actor replica over several GPUs: its
        actor is placed on the replica's first bundle and made to see all of the replica's GPUs,
        for the engine's own tensor-parallel worker processes."""
        if self.spans_gpus and bundle_gpus is None:
            raise ValueError(f"model {self.name!r}: a replica over {self.slots_per_replica} GPUs needs the GPU "
                             "id of each bundle (startup.bundle_gpu_ids)")
        remote_cls = ray.remote(ModelWorker)
        for replica_id in range(self.num_replicas):
            replica = []
            for rank in range(self.ranks_per_replica):
                # Rank r of a replica sits on the replica's r-th slot; a
                # one-actor replica's actor sits on its first slot.
                index = replica_id * self.slots_per_replica + rank
                info = WorkerInfo(replica_id, rank, self.ranks_per_replica, self.tp, self.pp, self.dp_size,
                                  self.num_replicas)
                options = dict(
                    num_cpus=self.share[index] if self.resource == "CPU" else 0,
                    num_gpus=self.share[index] if self.resource == "GPU" else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=placement_group, placement_group_bundle_index=self.bundles[index]
                    ),
                    runtime_env={"env_vars": env_vars},
                    max_concurrency=1,
                )
                actor_env = env_vars
                if self.spans_gpus:
                    # Ray shows the actor its first bundle's GPU only; ModelWorker sets this
                    # before anything touches CUDA, and vLLM's workers inherit it.
                    slots = self.bundles[index:index + self.slots_per_replica]
                    actor_env = {**env_vars, "CUDA_VISIBLE_DEVICES": ",".join(bundle_gpus[b] for b in slots)}
                actor = remote_cls.options(**options).remote(type(self.module), self.name, config, info, actor_env)
                replica.append(WorkerHandle(actor, info))
            self.replicas.append(replica)
        self.reset_round_robin()

    def reset_round_robin(self) -> None:
        """Start each episode at replica 0, so a resumed run places batches as the original did."""
        self._next_replica = itertools.cycle(range(self.num_replicas))

    def init_distributed(self, timeout_s: float) -> list[ray.ObjectRef]:
        """Each replica's ranks rendezvous at its rank 0's address."""
        addresses = self.tracker.get([self._track(r[0], "start", r[0].actor.rendezvous_address.remote())
                                      for r in self.replicas], timeout_s)
        refs = []
        for replica, (addr, port) in zip(self.replicas, addresses):
            for w in replica:
                refs.append(self._track(w, "init_distributed", w.actor.init_distributed.remote(addr, port, timeout_s)))
        return refs

    def start_setup(self) -> list[ray.ObjectRef]:
        """Every rank's ``setup()``, started; pass their results to ``finish_setup``."""
        return [self._track(w, "setup", w.actor.setup.remote()) for w in self.workers]

    def finish_setup(self, infos: list[dict]) -> None:
        for w, info in zip(self.workers, infos):
            w.dp_rank, w.is_output_rank = info["dp_rank"], info["is_output_rank"]
            self.padding_config.update(info["padding_config"])
        self.has_weights = any(info["has_weights"] for info in infos)
        for replica in self.replicas:
            if not any(w.is_output_rank for w in replica):
                raise RuntimeError(f"model {self.name!r}: no rank of replica {replica[0].info.replica_id} "
                                   "says is_output_rank()")

    def bind(self) -> None:
        """Make the driver-side module handle call its workers."""
        self.module._dist = self
        for method, mode in self.module.remote_modes().items():
            if mode == ROUND_ROBIN:
                setattr(self.module, method, _bound(self.round_robin, method))
            elif mode == DATA_PARALLEL:
                setattr(self.module, method, _bound(self.data_parallel, method))
            elif mode == ALL_RANKS:
                setattr(self.module, method, _bound(self.all_ranks, method))

    def kill(self) -> None:
        # ray.kill is a SIGKILL: give workers a moment first to remove what
        # would outlive them on the node (the weight sync's /dev/shm buckets).
        refs = [w.actor.__ray_call__.remote(_release_node_resources) for w in self.workers]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=KILL_GRACE_S)
        for w in self.workers:
            ray.kill(w.actor, no_restart=True)
        self.replicas.clear()

    # -- dispatch ----------------------------------------------------------------
    def round_robin(self, method: str, *inputs) -> RemoteBatch:
        """Send a batch (or several upstream batches, merged) to the next replica."""
        replica = self.replicas[next(self._next_replica)]
        iteration = self._next_iteration(method)
        args = [x.ref if isinstance(x, RemoteBatch) else x for x in inputs]
        output = None
        for w in replica:
            ref = self._call_with_output(w, method, "forward", method, iteration, *args)
            if w.is_output_rank and output is None:
                output = ref
        return RemoteBatch(output, f"{self.name}.{method}")

    def data_parallel(self, method: str, batch, *extra) -> list[ray.ObjectRef]:
        """Each rank gets the micro-batches of its data-parallel rank. ``batch`` is a
        ``TrainBatch`` (split here by this model's dp size) or a per-dp-rank list."""
        per_dp_rank = batch.per_dp_rank(self.dp_size) if hasattr(batch, "per_dp_rank") else batch
        if len(per_dp_rank) != self.dp_size:
            raise ValueError(f"model {self.name!r}: {method} got data for {len(per_dp_rank)} "
                             f"data-parallel ranks, the model has {self.dp_size}")
        if not any(per_dp_rank):
            return []  # nothing to train on: no step (an empty step would still move Adam's moments)
        iteration = self._next_iteration(method)
        refs = [self._call_with_output(w, method, "hook", method, ("data", "iteration"), per_dp_rank[w.dp_rank],
                                       iteration, *extra)
                for w in self.workers]
        outputs = [r for r, w in zip(refs, self.workers) if w.is_output_rank]
        self._train_outputs.extend(outputs)
        return outputs

    def take_train_outputs(self) -> list[ray.ObjectRef]:
        """Output-rank results of the data-parallel calls since the last take."""
        outputs, self._train_outputs = self._train_outputs, []
        return outputs

    def all_ranks(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        return [self._track(w, method, w.actor.call.remote(method, *args, **kwargs)) for w in self.workers]

    def hook(self, method: str, **offered) -> list[ray.ObjectRef]:
        """The engine's call of hook ``method`` on every rank, with the arguments ``offered``
        (in the engine's order) that the module's override accepts (``call_hook``)."""
        names = tuple(offered)
        return [self._track(w, method, w.actor.hook.remote(method, names, *offered.values())) for w in self.workers]

    def run_on_worker(self, w: WorkerHandle, label: str, fn, *args) -> ray.ObjectRef:
        """Run ``fn(module, *args)`` inside worker ``w`` (tracked under ``label``).

        For framework code that must run next to a module without being one
        of its methods (the synchronizer's bucket export and load). Errors
        come back as ``RemoteCallError`` naming model, replica, rank and label.
        Top-level ObjectRef arguments are resolved by Ray; nested ones are not.
        """
        return self._track(w, label, w.actor.__ray_call__.remote(_run_guarded, label, fn, *args))

    def call_output_ranks(self, method: str, *args, **kwargs) -> list[Any]:
        """Run on every rank; return the results of each replica's output rank."""
        refs = self.all_ranks(method, *args, **kwargs)
        results = self.tracker.get(refs)
        return [r for r, w in zip(results, self.workers) if w.is_output_rank]

    def pop_episode_stats(self) -> tuple[dict[str, float], dict[str, float]]:
        """``(seconds per method, module metrics)`` since the last call: the seconds summed over
        replicas (max over a replica's ranks), the metrics (``get_and_clear_metrics``) averaged
        over the output ranks and named ``<prefix>/<key>`` (just ``<key>`` without a prefix)."""
        stats = self.tracker.get([self._track(w, "pop_episode_stats", w.actor.pop_episode_stats.remote())
                                  for w in self.workers])
        outputs = [s for s, w in zip(stats, self.workers) if w.is_output_rank]
        merged = mean_metrics([s["metrics"] for s in outputs])
        prefix = next((s["prefix"] for s in outputs if s["prefix"]), "")
        metrics = {(f"{prefix}/{k}" if prefix else k): v for k, v in merged.items()}
        return self._sum_timings([s["timings"] for s in stats]), metrics

    def pop_timings(self) -> dict[str, float]:
        """Seconds spent per method, summed over replicas, max over a replica's ranks."""
        per_worker = self.tracker.get([self._track(w, "pop_timings", w.actor.pop_timings.remote())
                                       for w in self.workers])
        return self._sum_timings(per_worker)

    def _sum_timings(self, per_worker: list[dict[str, float]]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for replica_id in range(self.num_replicas):
            ranks = per_worker[replica_id * self.ranks_per_replica:(replica_id + 1) * self.ranks_per_replica]
            for method in {m for t in ranks for m in t}:
                totals[method] = totals.get(method, 0.0) + max(t.get(method, 0.0) for t in ranks)
        return totals

    def _next_iteration(self, method: str) -> int:
        it = self.iterations.get(method, 0)
        self.iterations[method] = it + 1
        return it

    def _track(self, w: WorkerHandle, method: str, ref: ray.ObjectRef) -> ray.ObjectRef:
        return self.tracker.track(ref, CallLabel(self.name, w.info.replica_id, w.info.rank, method))

    def _call_with_output(self, w: WorkerHandle, method: str, call: str, *args) -> ray.ObjectRef:
        """``ModelWorker.output``: the tracker watches the call's small status; the data ref is
        returned (None on a rank that is not an output rank), for the next stage or a get()."""
        status, data = w.actor.output.options(num_returns=2).remote(call, *args)
        self.tracker.track(status, CallLabel(self.name, w.info.replica_id, w.info.rank, method), data=data)
        return data


def _release_node_resources(worker: ModelWorker) -> None:
    """Best effort, before a SIGKILL: remove the weight sync's /dev/shm buckets
    and let a module with ``shutdown()`` (vLLM) stop its own worker processes,
    whose shared memory would otherwise stay behind."""
    import sys

    buckets = sys.modules.get("chatlearn.synchronizer.buckets")  # only where a sync wrote buckets
    if buckets is not None:
        buckets.close_pools()
    shutdown = getattr(worker.module, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _run_guarded(worker: ModelWorker, label: str, fn, *args):
    """Runs inside the actor (``ModelWorker``): ``fn`` gets the module."""
    return worker._guard(label, lambda: fn(worker.module, *args))


def _bound(dispatcher, method: str):
    def call(*args, **kwargs):
        return dispatcher(method, *args, **kwargs)

    call.__name__ = method
    return call
