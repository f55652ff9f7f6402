"""Layout-independent checkpoints through megatron's dist_checkpointing.

Every rank saves and loads its shards of globally described tensors, so a
checkpoint written under one TP/PP/DP layout loads under another: model
weights, the optimizer state (Adam moments, the distributed optimizer's fp32
main params, the step count) and, when the layout is unchanged, the RNG state.

Next to megatron's files a checkpoint directory holds ``chatlearn_checkpoint.json``
(architecture, LoRA, optimizer and layout at save time). Both checkpoint
formats of ``MegatronModule`` write it; :func:`check_checkpoint` compares it
with the model about to load, so a checkpoint of another model fails with an
error naming the path and the difference, on every rank, before any tensor
is read or any collective starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist

from chatlearn.models.megatron import cpu_compat
from chatlearn.models.megatron.model import HFArch, hf_arch, optimizer_parts, unwrap
from chatlearn.utils.rng import capture_rng_state, restore_rng_state

INFO_FILE = "chatlearn_checkpoint.json"
FORMAT_DIST = "dist_checkpointing"   # any layout (this module)
FORMAT_PER_RANK = "per_rank"         # one file per rank; the saving layout only
FLAG_NAME = "adaptive_parallel_strategy_on_checkpoint"

# fully_reshardable: the distributed optimizer gathers its flat shards into
# per-parameter tensors (like a plain optimizer's) when saving, so they can be
# re-cut for any TP/PP/DP layout on load. Without the chained-optimizer prefix
# the keys do not depend on how megatron groups its optimizers.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}

PathLike = Union[str, os.PathLike]


# -- metadata -------------------------------------------------------------------
def describe_checkpoint(hf_config: dict, fmt: str, lora_rank: int = 0, lora_targets: Iterable[str] = (),
                        optimizer: Optional[str] = None, distributed_optimizer: bool = False) -> dict[str, Any]:
    """What a checkpoint of this rank's model holds (megatron parallel state must be up).

    ``optimizer`` is the optimizer's name when its state is (to be) saved, else None.
    """
    from megatron.core import parallel_state as ps

    return {
        "format": fmt,
        "arch": dataclasses.asdict(hf_arch(hf_config)),
        "lora": {"rank": lora_rank, "targets": sorted(lora_targets) if lora_rank else []},
        "optimizer": None if optimizer is None else {"name": optimizer, "distributed": bool(distributed_optimizer)},
        "layout": {"tp": ps.get_tensor_model_parallel_world_size(),
                   "pp": ps.get_pipeline_model_parallel_world_size(),
                   "dp": ps.get_data_parallel_world_size()},
    }


def write_checkpoint_info(path: PathLike, info: dict[str, Any]) -> None:
    """Rank 0 writes the metadata file (call on every rank: it is a no-op elsewhere)."""
    from chatlearn.utils.atomic import atomic_write_bytes

    if dist.get_rank() == 0:
        atomic_write_bytes(os.path.join(os.fspath(path), INFO_FILE), json.dumps(info, indent=1).encode())


def read_checkpoint_info(path: PathLike) -> Optional[dict[str, Any]]:
    """The metadata of the checkpoint at ``path``; None for an older per-rank checkpoint without it.

    Raises FileNotFoundError naming ``path`` when there is no directory there.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    file = os.path.join(path, INFO_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def check_checkpoint(path: PathLike, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ValueError naming ``path`` if the checkpoint cannot load into the ``current`` model."""
    path = os.fspath(path)
    if saved.get("format") not in (FORMAT_PER_RANK, FORMAT_DIST):
        raise ValueError(f"checkpoint {path} has unknown format {saved.get('format')!r}")
    # A field the checkpoint lacks was written before it existed: it had the default then.
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING
                else dataclasses.asdict(f.default_factory()) for f in dataclasses.fields(HFArch)}
    diffs = [f"{key}={saved['arch'].get(key, defaults.get(key))!r} in the checkpoint, {value!r} here"
             for key, value in current["arch"].items() if saved["arch"].get(key, defaults.get(key)) != value]
    if diffs:
        raise ValueError(f"checkpoint {path} is for another model architecture: {'; '.join(diffs)}")
    if saved["lora"] != current["lora"]:
        raise ValueError(f"checkpoint {path} has LoRA {saved['lora']}, this model {current['lora']}")
    want = current["optimizer"]
    if want is not None:
        have = saved["optimizer"]
        if have is None:
            raise ValueError(f"checkpoint {path} has no optimizer state (saved by a model that was not "
                             f"trainable, or weights only); this model trains with {want['name']}")
        if have != want:
            raise ValueError(f"checkpoint {path} holds {_optim_name(have)} state, this model uses {_optim_name(want)}")
    if saved["format"] == FORMAT_PER_RANK and saved["layout"] != current["layout"]:
        raise ValueError(f"checkpoint {path} was saved per rank under {_layout(saved['layout'])} and loads "
                         f"only under that layout, this model runs {_layout(current['layout'])}; save with "
                         f"runtime.{FLAG_NAME}: true for a checkpoint that loads under any layout")


def _optim_name(optim: dict) -> str:
    return f"{optim['name']} ({'distributed' if optim['distributed'] else 'plain'} optimizer)"


def _layout(layout: dict) -> str:
    return f"tp={layout['tp']} pp={layout['pp']} dp={layout['dp']}"


# -- save / load ----------------------------------------------------------------
def save_distributed(model: torch.nn.Module, optimizer, path: PathLike, info: dict[str, Any]) -> None:
    """Collective: model (+ optimizer) state and this rank's RNG state under ``path``.

    ``info`` comes from :func:`describe_checkpoint` with ``FORMAT_DIST``.
    Returns when every rank has finished writing.
    """
    from megatron.core import dist_checkpointing

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if optimizer is not None:
        _init_optimizer_state(optimizer)  # a model saved before its first step
    dist.barrier()  # the directory exists for everyone (shared filesystem) before anyone writes
    with cpu_compat.cpu_device_mode():
        dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False, with_rng=True), path)
    write_checkpoint_info(path, info)
    dist.barrier()


def load_distributed(model: torch.nn.Module, optimizer, path: PathLike, saved: dict[str, Any],
                     current: dict[str, Any], restore_rng: bool = True) -> None:
    """Collective: load what :func:`save_distributed` wrote, under any TP/PP/DP layout.

    ``saved`` / ``current`` are the checkpoint's and this model's
    :func:`describe_checkpoint` (checked by :func:`check_checkpoint` first).
    The optimizer state is loaded when ``optimizer`` is given; the RNG state
    (``restore_rng``) only under the saving layout: random streams do not map
    between layouts.
    """
    from megatron.core import dist_checkpointing

    path = os.fspath(path)
    with_rng = restore_rng and saved["layout"] == current["layout"]
    if optimizer is not None:
        _init_optimizer_state(optimizer)
    with cpu_compat.cpu_device_mode():
        request = _sharded_state(model, optimizer, is_loading=True, with_rng=with_rng)
        state = dist_checkpointing.load(request, path)
        unwrap(model).load_state_dict(state["model"], strict=True)
        if optimizer is not None:
            # Copies into fp32 main params that require grad: no autograd here.
            with torch.no_grad():
                _load_optimizer_state(optimizer, state["optimizer"])
    if with_rng:
        restore_rng_state(state["rng"])


def _sharded_state(model: torch.nn.Module, optimizer, is_loading: bool, with_rng: bool) -> dict[str, Any]:
    model_state = unwrap(model).sharded_state_dict()
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=dict(_OPTIM_METADATA))
    if with_rng:
        state["rng"] = _rng_sharded_object()
    return state


def _init_optimizer_state(optimizer) -> None:
    """Give torch Adam its per-parameter state before the first step, as the first step would.

    Megatron's checkpoint code expects the state to exist: the distributed
    optimizer's ``state_dict()`` needs a ``step`` on every parameter (also
    while building a load request), and a plain optimizer saved before any step
    would write no moments that a later load could find. Zero moments and step
    0 are exactly what torch Adam starts from; on load the checkpoint's values
    replace them.
    """
    for opt in optimizer_parts(optimizer):
        inner = opt.optimizer
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                st = inner.state[param]
                if not st:
                    st["exp_avg"] = torch.zeros_like(param.data)
                    st["exp_avg_sq"] = torch.zeros_like(param.data)
                st.setdefault("step", torch.tensor(0.0))


def _load_optimizer_state(optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` that survives torch Adam under the distributed optimizer.

    Two fixes around megatron 0.16's distributed optimizer with torch Adam:
    it copies the loaded parameter state over *every* key of the live
    per-parameter state, and ``step`` is not among the saved tensors
    (KeyError), so the parameter state is loaded with ``step`` set aside; and
    it restores ``step`` as ONE tensor shared by all parameters, which torch
    Adam increments in place once per parameter, so each gets its own copy.
    """
    optimizers = optimizer_parts(optimizer)
    states = [state] if len(optimizers) == 1 else [state[key] for key in sorted(state)]
    for opt, opt_state in zip(optimizers, states):
        param_state = opt_state.pop("param_state", None)
        sharding = opt_state.pop("param_state_sharding_type", None)
        opt.load_state_dict(opt_state)
        if param_state is None:
            continue
        if sharding != _OPTIM_METADATA["distrib_optim_sharding_type"]:
            raise ValueError(f"unexpected distributed-optimizer checkpoint format {sharding!r}")
        live = [st for st in opt.optimizer.state.values()]
        steps = [st.pop("step", None) for st in live]
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for st, step in zip(live, steps):
            if step is not None:
                st["step"] = step.clone()


def _rng_sharded_object():
    """This rank's RNG streams, one object per (pp, tp, dp) rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", capture_rng_state(), shape, offset, replica_id=0)
