"""LoRA for megatron's tensor-parallel linears, TP-correct and exportable as merged HF weights.

``convert_layer_to_lora(model, rank, alpha)`` wraps the chosen linears in
:class:`LoraLinear` and freezes every other parameter; build DDP and the
optimizer afterwards so that only the LoRA factors are trained.

Sharding follows the base layer, so ``B @ A`` has exactly the base weight's
shard shape and merging is local to each rank:

    column-parallel (linear_qkv, linear_fc1): A [r, in] replicated, B [out/T, r] sharded
    row-parallel    (linear_proj, linear_fc2): A [r, in/T] sharded,  B [out, r] replicated

The TP collectives mirror the base layer's: the column case all-reduces the
gradient of ``A x`` (each rank only sees its own output columns); the row
case all-reduces ``A x`` in the forward (each rank holds part of the input).

For dist_checkpointing the factors are described the same way (the sharded
one split on the base weight's TP axis), next to the base layer's own tensors
under ``<layer>.base.``, so a LoRA checkpoint reloads under any TP/PP layout.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from chatlearn.models.megatron.model import unwrap

DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, seed: int, swiglu: bool = False):
        """``swiglu``: ``base`` is a gated MLP's linear_fc1, whose TP shard is ``[gate_r; up_r]``."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.column = isinstance(base, ColumnParallelLinear)
        self.swiglu = swiglu
        if not self.column and not isinstance(base, RowParallelLinear):
            raise TypeError(f"LoRA needs a Column/RowParallelLinear, got {type(base).__name__}")
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        out_local, in_local = base.weight.shape
        full_in = in_local if self.column else in_local * tp
        # A is initialized full from a seed that depends on the layer only, then
        # sharded: the same model under any TP layout starts from the same A.
        gen = torch.Generator().manual_seed(seed)
        a_full = torch.empty(rank, full_in).uniform_(-1, 1, generator=gen) / math.sqrt(full_in)
        dtype = base.weight.dtype
        a = a_full if self.column else a_full.chunk(tp, 1)[tp_rank]
        self.lora_A = torch.nn.Parameter(a.to(device=base.weight.device, dtype=dtype).contiguous())
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, rank,
                                                     device=base.weight.device, dtype=dtype))
        # Tag the sharded factor so grad-norm and checkpoint code see it as TP-split.
        if self.column:
            set_tensor_model_parallel_attributes(self.lora_B, True, 0, 1)
        else:
            set_tensor_model_parallel_attributes(self.lora_A, True, 1, 1)

    def __getattr__(self, name: str):
        # Megatron code reads attributes of its linears (sequence_parallel, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        out, bias = self.base(x, *args, **kwargs)
        h = F.linear(x, self.lora_A)
        h = copy_to_tensor_model_parallel_region(h) if self.column else reduce_from_tensor_model_parallel_region(h)
        return out + self.scale * F.linear(h, self.lora_B), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """The base layer's sharded tensors plus the factors, for dist_checkpointing."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.base.sharded_state_dict(f"{prefix}base.", sharded_offsets, metadata)
        factors = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        tp_axis = {"lora_B": 0} if self.column else {"lora_A": 1}
        state.update(make_sharded_tensors_for_checkpoint(factors, prefix, tp_axis, sharded_offsets))
        if self.swiglu:
            # Megatron's MLP re-cuts fc1's [gate_r; up_r] shards into global gate and
            # up halves, but only under its own key names; B's rows are laid out
            # like fc1's, so it needs the same treatment.
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for key in (f"{prefix}base.weight", f"{prefix}base.bias", f"{prefix}lora_B"):
                if key in state:
                    state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets, singleton)
        return state

    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of ``W + scale * B @ A`` (the base weight's shape)."""
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A)


def convert_layer_to_lora(model: torch.nn.Module, rank: int = 8, alpha: float = 16.0,
                          targets: Iterable[str] = DEFAULT_TARGETS, seed: int = 0) -> list[str]:
    """Wrap the target linears of every decoder layer in LoRA; freeze the rest. Returns wrapped names."""
    gpt = unwrap(model)
    targets = tuple(targets)
    for param in gpt.parameters():
        param.requires_grad_(False)
    wrapped = []
    for layer in gpt.decoder.layers:
        for name, module in list(layer.named_modules()):
            parent_name, _, attr = name.rpartition(".")
            if attr not in targets or isinstance(module, LoraLinear):
                continue
            parent = layer.get_submodule(parent_name) if parent_name else layer
            global_name = f"layers.{layer.layer_number - 1}.{name}"
            layer_seed = seed + int(hashlib.sha256(global_name.encode()).hexdigest()[:8], 16)
            swiglu = attr == "linear_fc1" and layer.config.gated_linear_unit
            setattr(parent, attr, LoraLinear(module, rank, alpha, layer_seed, swiglu=swiglu))
            wrapped.append(global_name)
    return wrapped
