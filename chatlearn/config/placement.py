"""Where each model's ranks run: a pure plan from the config, no Ray, no torch.

The plan works in *device slots*: on a GPU run one slot is one GPU, on a CPU
run one slot is one CPU process (Ray may oversubscribe the real cores).

* A model uses ``num_gpu`` slots on a GPU run and ``num_cpu`` on a CPU run.
  Two fallbacks, both documented in docs/configuration.md:
  - CPU run, model with ``num_cpu: 0`` but ``num_gpu > 0``: its ``num_gpu``
    becomes its CPU slot count (so a GPU config can be dry-run on a laptop);
    the plan carries a warning saying so.
  - GPU run, model with ``num_gpu: 0`` but ``num_cpu > 0``: the model runs on
    ``num_cpu`` CPU processes (e.g. a rule-based reward); its slots are
    numbered in a separate "cpu" pool (``ModelPlacement.device == "cpu"``).
* An inference model of ``n`` slots with tensor x pipeline size ``tp*pp`` has
  ``n / (tp*pp)`` independent replicas. The sizes are the model's
  ``tensor_model_parallel_size`` / ``pipeline_model_parallel_size``, which the
  loader takes from its ``model_config_file`` when set there (ChatLearn 1.x's rule). A trainable model is one replica
  group, data parallel over ``dp = n / (tp*pp)``.
* Models in one colocation group share slots: slot ``i`` of every member is
  the same device. The group takes as many slots as its largest member.
  Every other model gets slots of its own. Slots are numbered in the order the
  models appear under ``models:``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from chatlearn.config.schema import ChatLearnConfig, ModelConfig

__all__ = [
    "CPU", "GPU", "ModelPlacement", "Placement", "plan_placement", "detect_device", "probe_gpu",
    "device_count", "parse_colocation", "format_placement",
]

CPU = "cpu"
GPU = "gpu"


def device_count(model: ModelConfig, device: str) -> tuple[str, int, str]:
    """(device the model's ranks run on, slot count, the config key that gave it) for a run on ``device``."""
    if device == GPU:
        if model.num_gpu > 0:
            return GPU, model.num_gpu, "num_gpu"
        return CPU, model.num_cpu, "num_cpu"
    if device != CPU:
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if model.num_cpu > 0:
        return CPU, model.num_cpu, "num_cpu"
    return CPU, model.num_gpu, "num_gpu"


def parse_colocation(entries: list[str]) -> list[tuple[str, ...]]:
    """``["policy,ppo_policy", ...]`` -> ``[("policy", "ppo_policy"), ...]`` (blanks dropped)."""
    return [tuple(n.strip() for n in entry.split(",") if n.strip()) for entry in entries]


@dataclass(frozen=True)
class ModelPlacement:
    name: str
    device: str  # "gpu" or "cpu": what this model's ranks run on
    num_devices: int  # slots it occupies
    device_key: str  # "num_gpu" or "num_cpu": the config key num_devices came from
    tp: int
    pp: int
    trainable: bool
    num_replicas: int  # inference: num_devices / (tp*pp); trainable: 1
    dp_size: int  # trainable: num_devices / (tp*pp); inference: 1
    num_processes: int  # ranks: num_devices / gpu_per_process on GPU, num_devices on CPU
    slots: tuple[int, ...]  # slot of each device, replica-major (rank order inside a replica)
    colocation_group: tuple[str, ...] = ()  # the members of its group (itself included); () if none

    @property
    def ranks_per_replica(self) -> int:
        return self.num_processes // self.num_replicas if self.num_replicas else 0

    @property
    def devices_per_process(self) -> int:
        return self.num_devices // self.num_processes if self.num_processes else 0

    def replica_slots(self, replica: int) -> tuple[int, ...]:
        """The slots of one replica (for a trainable model: all of them)."""
        per = self.num_devices // self.num_replicas
        return self.slots[replica * per:(replica + 1) * per]

    @property
    def rank_slots(self) -> tuple[tuple[int, ...], ...]:
        """The slots each rank (process) uses, in rank order; one each unless gpu_per_process > 1."""
        per = self.devices_per_process
        return tuple(self.slots[i * per:(i + 1) * per] for i in range(self.num_processes))


@dataclass(frozen=True)
class Placement:
    device: str  # the run's device kind: "gpu" or "cpu"
    models: dict[str, ModelPlacement]
    colocation_groups: tuple[tuple[str, ...], ...]
    num_slots: dict[str, int]  # slots per pool: {"gpu": 8} or {"cpu": 5}, or both on a mixed GPU run
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_slots(self) -> int:
        """Slots of the run's device kind (GPUs on a GPU run, CPU processes on a CPU run)."""
        return self.num_slots.get(self.device, 0)

    def slot_share(self, pool: Optional[str] = None) -> dict[int, int]:
        """How many models use each slot of ``pool`` (default: the run's device kind)."""
        pool = pool or self.device
        share: dict[int, int] = {}
        for mp in self.models.values():
            if mp.device == pool:
                for slot in set(mp.slots):
                    share[slot] = share.get(slot, 0) + 1
        return share


def plan_placement(cfg: ChatLearnConfig, device: str = CPU) -> Placement:
    """Plan the slots of every model in ``cfg`` for a run on ``device`` ("cpu" or "gpu").

    Pure: it reads only ``cfg``. Sizes are assumed validated (``load_config``
    does that); impossible sizes are floored rather than raised.
    """
    if device not in (CPU, GPU):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    groups = []
    group_of: dict[str, int] = {}
    for members in parse_colocation(cfg.runtime.colocation):
        members = tuple(n for n in members if n in cfg.models and n not in group_of)
        if members:
            for n in members:
                group_of[n] = len(groups)
            groups.append(members)

    warnings = []
    counts: dict[str, tuple[str, int, str]] = {}
    for name, model in cfg.models.items():
        counts[name] = device_count(model, device)
        if device == CPU and counts[name][2] == "num_gpu" and model.num_gpu > 0:
            warnings.append(f"model {name!r} sets num_gpu={model.num_gpu} but no num_cpu: "
                            f"this CPU run gives it {model.num_gpu} CPU slots")

    next_slot: dict[str, int] = {}
    group_base: dict[tuple[int, str], int] = {}
    models: dict[str, ModelPlacement] = {}
    for name, model in cfg.models.items():
        pool, n, key = counts[name]
        if name in group_of:
            gid = group_of[name]
            if (gid, pool) not in group_base:
                # The group's slots in this pool: as many as its largest member there.
                size = max(counts[m][1] for m in groups[gid] if counts[m][0] == pool)
                group_base[(gid, pool)] = next_slot.get(pool, 0)
                next_slot[pool] = next_slot.get(pool, 0) + size
            base = group_base[(gid, pool)]
        else:
            base = next_slot.get(pool, 0)
            next_slot[pool] = base + n
        tpp = max(1, model.tensor_model_parallel_size * model.pipeline_model_parallel_size)
        if model.trainable:
            replicas, dp = (1 if n >= tpp else 0), n // tpp
        else:
            replicas, dp = n // tpp, 1
        per_process = max(1, model.gpu_per_process) if pool == GPU else 1
        models[name] = ModelPlacement(
            name=name,
            device=pool,
            num_devices=n,
            device_key=key,
            tp=model.tensor_model_parallel_size,
            pp=model.pipeline_model_parallel_size,
            trainable=model.trainable,
            num_replicas=replicas,
            dp_size=dp,
            num_processes=n // per_process,
            slots=tuple(range(base, base + n)),
            colocation_group=groups[group_of[name]] if name in group_of else (),
        )
    pools = {mp.device for mp in models.values()} | {device}
    num_slots = {pool: next_slot.get(pool, 0) for pool in sorted(pools)}
    mixed = [n for n, mp in models.items() if mp.device != device]
    if mixed:
        warnings.append(f"models {', '.join(mixed)} have num_gpu: 0 and run on CPU processes "
                        f"(their slots are a separate 'cpu' pool)")
    return Placement(device, models, tuple(groups), num_slots, tuple(warnings))


# ------------------------------------------------------------------ device kind
def probe_gpu() -> bool:
    """A cheap guess whether CUDA GPUs are usable, without importing torch (for the CLI)."""
    if os.environ.get("CHATLEARN_FORCE_CPU", "0") == "1":
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = "/proc/driver/nvidia/gpus"
    return (os.path.isdir(gpus) and bool(os.listdir(gpus))) or os.path.exists("/dev/nvidia0")


def detect_device(cfg: ChatLearnConfig, gpu_available: Optional[bool] = None) -> str:
    """"gpu" if some model asks for GPUs (num_gpu > 0) and GPUs are usable, else "cpu".

    ``gpu_available`` None asks ``chatlearn.utils.platform.has_gpu()``, which
    imports torch; the CLI passes ``probe_gpu()`` instead to stay fast.
    """
    if not any(m.num_gpu > 0 for m in cfg.models.values()):
        return CPU
    if gpu_available is None:
        from chatlearn.utils.platform import has_gpu

        gpu_available = has_gpu()
    return GPU if gpu_available else CPU


# ------------------------------------------------------------------ printing
def _format_slots(slots: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    runs: list[str] = []
    i = 0
    while i < len(slots):
        j = i
        while j + 1 < len(slots) and slots[j + 1] == slots[j] + 1:
            j += 1
        runs.append(str(slots[i]) if i == j else f"{slots[i]}-{slots[j]}")
        i = j + 1
    return ",".join(runs) or "-"


def format_placement(placement: Placement) -> str:
    """The plan as a text table: model, device, devices, TP, PP, replicas/DP, slots, colocation."""
    header = ("model", "device", "devices", "TP", "PP", "replicas/DP", "slots", "colocation")
    rows = [header]
    for mp in placement.models.values():
        replicas = f"1 (DP {mp.dp_size})" if mp.trainable else str(mp.num_replicas)
        rows.append((mp.name, mp.device, f"{mp.num_devices} ({mp.device_key})", str(mp.tp), str(mp.pp),
                     replicas, _format_slots(mp.slots), ",".join(mp.colocation_group) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    pools = ", ".join(f"{n} {pool} slot{'s' if n != 1 else ''}" for pool, n in placement.num_slots.items())
    lines.append(f"device: {placement.device}; total: {pools}")
    lines.extend(f"warning: {w}" for w in placement.warnings)
    return "\n".join(lines)
