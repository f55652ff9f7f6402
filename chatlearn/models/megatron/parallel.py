"""Megatron's parallel state on top of an already-initialized torch.distributed world.

The engine creates the process group (gloo on CPU, NCCL on GPU) before a
module's ``setup()``; here we only carve it into Megatron's TP / PP / DP
groups (order tp fastest, then dp, then pp, as ``WorkerInfo`` assumes) and
seed the model-parallel RNG streams.
"""
from __future__ import annotations

import random

import torch
import torch.distributed as dist

from chatlearn.models.megatron import cpu_compat
from chatlearn.utils import platform


def check_parallel_sizes(world_size: int, tp: int, pp: int) -> int:
    """Return the data-parallel size, or raise if ``tp * pp`` does not divide the world."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp}, pp={pp}")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
    return world_size // (tp * pp)


def initialize_parallel_state(tp: int = 1, pp: int = 1, seed: int = 1234) -> int:
    """Set up megatron's parallel groups and RNG; returns the DP size.

    Requires ``torch.distributed`` to be initialized. Idempotent for the same
    sizes; different sizes in the same process re-create the groups.
    """
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialized before megatron's parallel state")
    cpu_compat.apply()
    dp = check_parallel_sizes(dist.get_world_size(), tp, pp)
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) == (tp, pp):
            return dp
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # Megatron's gloo side groups serve the distributed optimizer's
        # checkpoint gathers; on CPU the main groups are gloo already and
        # the module aliases them instead (module.py).
        create_gloo_process_groups=platform.has_gpu(),
    )
    seed_everything(seed)
    return dp


def seed_everything(seed: int) -> None:
    """Seed python/torch the same on all ranks and megatron's per-TP-rank streams.

    The pipeline rank is added to the base seed (as Megatron-LM does) so that
    different stages do not draw identical dropout masks.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_parallel_state() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
