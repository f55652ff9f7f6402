"""Start-up: Ray, the placement group, and one ``DistModel`` (its workers, set up) per model.

The order is fixed by what each step needs: the placement plan needs only the config;
the placement group needs Ray; workers need their bundles; ``setup()`` needs each
replica's torch.distributed group. ``Engine._setup`` calls these in that order.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from chatlearn.config.placement import Placement
from chatlearn.config.schema import ChatLearnConfig, RuntimeEnvConfig
from chatlearn.models.base import BaseModule
from chatlearn.runtime.calls import CallTracker
from chatlearn.runtime.dist_model import DistModel
from chatlearn.utils.logging import get_logger

logger = get_logger(__name__)

# Starting workers (process start, imports, model build) is not what
# runtime.actor_timeout_s guards, and can take minutes for large models.
STARTUP_TIMEOUT_S = 900.0


@dataclass
class Cluster:
    """What start-up reserved: the plan, the placement group, where each device pool's
    bundles begin in it, and whether this process started Ray (and must stop it)."""
    placement: Placement
    placement_group: Any
    bundle_offset: dict[str, int]
    started_ray: bool


def start_cluster(config: ChatLearnConfig) -> Cluster:
    """Plan the placement, start (or join) Ray, and reserve one placement group for every slot."""
    import ray
    from ray.util.placement_group import placement_group

    from chatlearn.config.placement import detect_device, plan_placement

    placement = plan_placement(config, detect_device(config))
    for warning in placement.warnings:
        logger.warning(warning)
    # One placement group holds every device slot: the run's own pool first,
    # then (on a mixed GPU run) the CPU-process pool.
    pools = sorted(placement.num_slots, key=lambda p: p != placement.device)
    bundle_offset, bundles, offset = {}, [], 0
    for pool in pools:
        bundle_offset[pool] = offset
        bundles += [{"GPU" if pool == "gpu" else "CPU": 1} for _ in range(placement.num_slots[pool])]
        offset += placement.num_slots[pool]
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True)
        job_env = ray_job_runtime_env(config.runtime_env)
        if job_env:
            kwargs["runtime_env"] = job_env
        if config.runtime.ray_address:
            kwargs["address"] = config.runtime.ray_address
        else:
            # Logical slots: a CPU run may place more ranks than the machine has cores.
            kwargs["num_cpus"] = max(placement.num_slots.get("cpu", 0), os.cpu_count() or 1)
        ray.init(**kwargs)
        started = True
    try:
        cluster = Cluster(placement, placement_group(bundles, strategy="PACK"), bundle_offset, started)
    except BaseException:
        if started:  # nothing else holds it yet: stop the Ray this call started
            ray.shutdown()
        raise
    if not cluster.placement_group.wait(timeout_seconds=120):
        resources = ray.cluster_resources()
        stop_cluster(cluster)
        raise RuntimeError(f"Ray could not reserve the {len(bundles)} device slots this config needs "
                           f"({bundles}); the cluster has {resources}")
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    """Give the placement group back, and stop Ray if start-up started it."""
    import ray
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(cluster.placement_group)
    if cluster.started_ray and ray.is_initialized():
        ray.shutdown()


def ray_job_runtime_env(env: RuntimeEnvConfig) -> dict[str, Any]:
    """runtime_env.working_dir / excludes / pip for every worker of the job (a remote
    cluster needs the code shipped; env_vars go per actor, see ``worker_env``)."""
    job: dict[str, Any] = {}
    if env.working_dir:
        job["working_dir"] = env.working_dir
        if env.excludes:
            job["excludes"] = list(env.excludes)
    if env.pip:
        job["pip"] = list(env.pip)
    if env.py_modules:
        job["py_modules"] = list(env.py_modules)
    return job


def worker_env(config: ChatLearnConfig, extra: dict[str, str]) -> dict[str, str]:
    """The environment every worker gets: runtime_env.env_vars, the driver's import path
    (workers import the user's model classes by module name), and ``extra``."""
    env = {k: str(v) for k, v in config.runtime_env.env_vars.items()}
    if config.runtime.debug:
        env.setdefault("CHATLEARN_LOG_LEVEL", "DEBUG")
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))
    env.update(extra)
    return env


def bundle_gpu_ids(placement_group, bundles: range, timeout_s: float = 120.0) -> dict[int, str]:
    """The GPU id (as ``CUDA_VISIBLE_DEVICES`` names it on its node) of every GPU bundle.

    Ray tells a task which GPU it got, not which GPU a bundle is: one task per bundle asks.
    Run before the model actors exist, while each bundle's whole GPU is still free."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(_gpu_ids)
    refs = {b: task.options(num_cpus=0, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=b)).remote()
            for b in bundles}
    ids = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    return {b: str(found[0]) for b, found in ids.items()}


def _gpu_ids() -> list:
    import ray

    return ray.get_gpu_ids()


def create_models(models: dict[str, BaseModule], cluster: Cluster, config: ChatLearnConfig,
                  tracker: CallTracker, env: dict[str, str], dist: dict[str, DistModel],
                  seconds: Optional[dict[str, float]] = None) -> None:
    """One ``DistModel`` per model on its planned bundles, put in ``dist`` as soon as its
    workers exist (so that a failure later leaves them there for the engine's shutdown to
    kill): workers started, each replica's torch.distributed group joined, ``init()`` and
    ``setup()`` run, handles bound. ``seconds`` receives how long each part took
    (``workers``: processes started and torch.distributed joined; ``setup.<model>``)."""
    seconds = {} if seconds is None else seconds
    began = time.perf_counter()
    planned: dict[str, DistModel] = {}
    for name, model in models.items():
        plan = cluster.placement.models[name]
        offset = cluster.bundle_offset[plan.device]
        share = cluster.placement.slot_share(plan.device)
        planned[name] = DistModel(
            module=model,
            tp=plan.tp,
            pp=plan.pp,
            num_devices=plan.num_devices,
            bundles=[offset + slot for slot in plan.slots],
            share=[1.0 / share[slot] for slot in plan.slots],
            resource="GPU" if plan.device == "gpu" else "CPU",
            trainable=plan.trainable,
            tracker=tracker,
        )
    bundle_gpus = None
    if any(d.spans_gpus for d in planned.values()):
        # Before any actor takes a share of a bundle.
        offset = cluster.bundle_offset.get("gpu", 0)
        bundle_gpus = bundle_gpu_ids(cluster.placement_group,
                                     range(offset, offset + cluster.placement.num_slots.get("gpu", 0)))
    for name, d in planned.items():
        dist[name] = d
        d.create_workers(cluster.placement_group, config, {**env, "CHATLEARN_MODEL": name}, bundle_gpus)
    tracker.get([ref for d in dist.values() for ref in d.init_distributed(STARTUP_TIMEOUT_S)], STARTUP_TIMEOUT_S)
    seconds["workers"] = time.perf_counter() - began
    # A model whose class sets ``sets_up_alone`` (vLLM: it sizes its KV cache from the device
    # memory free while it starts) is set up on its own, before the others; the rest are set
    # up together, so start-up takes the longest of them rather than their sum.
    alone = [name for name in dist if getattr(type(dist[name].module), "sets_up_alone", False)]
    waves = [[name] for name in alone] + [[name for name in dist if name not in alone]]
    for wave in filter(None, waves):
        began = time.perf_counter()
        refs = {name: dist[name].start_setup() for name in wave}
        infos = tracker.get([ref for r in refs.values() for ref in r], STARTUP_TIMEOUT_S)
        for name, r in refs.items():
            dist[name].finish_setup(infos[:len(r)])
            dist[name].bind()
            infos = infos[len(r):]
        seconds[f"setup.{'+'.join(wave)}"] = time.perf_counter() - began
    logger.info("models set up (replicas x ranks): %s",
                ", ".join(f"{n} {d.num_replicas}x{d.ranks_per_replica}" for n, d in dist.items()))
