"""Layout-independent model checkpoints through megatron's dist_checkpointing.

A checkpoint saved under one TP/PP layout loads under another: every
rank saves/loads its shards of globally-described tensors (model weights
only; the optimizer state is not included here).
"""
from __future__ import annotations

import os
from typing import Union

import torch
import torch.distributed as dist

from chatlearn.models.megatron import cpu_compat
from chatlearn.models.megatron.model import unwrap


def save_model_distributed(model: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """Collective: write the model's sharded state dict under ``path`` (a new or empty dir)."""
    from megatron.core import dist_checkpointing

    path = os.fspath(path)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    with cpu_compat.cpu_device_mode():
        dist_checkpointing.save(unwrap(model).sharded_state_dict(), path)


def load_model_distributed(model: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """Collective: load what :func:`save_model_distributed` wrote, into any TP/PP layout."""
    from megatron.core import dist_checkpointing

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no distributed checkpoint at {path}")
    gpt = unwrap(model)
    with cpu_compat.cpu_device_mode():
        state = dist_checkpointing.load(gpt.sharded_state_dict(), path)
    gpt.load_state_dict(state, strict=True)
