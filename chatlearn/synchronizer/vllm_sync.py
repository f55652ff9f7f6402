"""Weight sync into a vLLM engine, in Hugging Face terms.

Trainers send full weights under Hugging Face names
(``model.layers.0.self_attn.q_proj.weight``, ...). vLLM keeps a different
layout in memory:

* it fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``
  (its ``packed_modules_mapping``), concatenated along the output dim;
* it may pad the vocabulary of ``embed_tokens`` / ``lm_head``;
* on CPU it repacks every linear weight into an opaque kernel format after
  loading and leaves an EMPTY ``weight`` parameter behind (shape ``(0,)``):
  the numbers only live inside the layer's ``cpu_linear`` closure.

Writing goes through vLLM's own loader (``reload_weights``), which accepts HF
names and re-runs the repacking. Reading back (to validate a sync) un-fuses
to HF names here, so both sides of ``validate_param_sync`` compare the same
keys with the same shapes. A repacked CPU weight is recovered by running the
layer's kernel on an identity matrix: ``cpu_linear(I, ...) = I @ W.T = W.T``.
That is exact in float32 (every product is by 0 or 1) and, unlike reading a
stale copy, it reads what the engine actually computes with.

Only tensor-parallel size 1 can be read back (in-process engines are TP 1;
a TP>1 engine runs its workers in other processes).

These functions run inside the vLLM worker (``LLM.collective_rpc`` with a
callable); they only need ``torch`` and the model object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch

# Used when a vLLM model class does not declare packed_modules_mapping.
DEFAULT_PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclass(frozen=True)
class HFSlot:
    """One HF-named tensor and where it lives in the vLLM model."""

    hf_name: str
    module: torch.nn.Module
    param_name: str  # "weight" / "bias" on ``module``
    row_start: int  # rows [row_start, row_start + rows) of the vLLM tensor (dim 0)
    rows: int
    shape: tuple[int, ...]


def _packed_mapping(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    mapping = getattr(model, "packed_modules_mapping", None) or DEFAULT_PACKED_MODULES
    return {k: tuple(v) for k, v in mapping.items()}


def _logical_shape(module: torch.nn.Module, param_name: str, param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the parameter as loaded, even when CPU repacking emptied it."""
    if param.numel() == 0 and param_name == "weight" and hasattr(module, "cpu_linear"):
        return (int(module.output_size_per_partition), int(module.input_size_per_partition))
    shape = tuple(param.shape)
    org_vocab = getattr(module, "org_vocab_size", None)
    if org_vocab is not None and shape and shape[0] > org_vocab:
        # Vocab-parallel layers pad the vocabulary; HF checkpoints do not.
        shape = (int(org_vocab),) + shape[1:]
    return shape


def hf_slots(model: torch.nn.Module) -> Iterator[HFSlot]:
    """The model's parameters, split and named as in the HF checkpoint."""
    packed = _packed_mapping(model)
    for module_name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        if int(getattr(module, "tp_size", 1)) > 1:
            raise NotImplementedError(
                f"reading vLLM weights back is only supported with tensor_parallel_size 1 "
                f"({module_name} is sharded over {module.tp_size} ranks)"
            )
        prefix, _, leaf = module_name.rpartition(".")
        for param_name, param in params:
            shape = _logical_shape(module, param_name, param)
            parts = packed.get(leaf)
            if parts is None:
                yield HFSlot(f"{module_name}.{param_name}", module, param_name, 0, shape[0], shape)
                continue
            sizes = list(getattr(module, "output_partition_sizes", []))
            if len(sizes) != len(parts) or sum(sizes) != shape[0]:
                raise RuntimeError(
                    f"cannot un-fuse {module_name}.{param_name}: output sizes {sizes} "
                    f"do not match {parts} and {shape}"
                )
            start = 0
            for part, size in zip(parts, sizes):
                name = f"{prefix}.{part}.{param_name}" if prefix else f"{part}.{param_name}"
                yield HFSlot(name, module, param_name, start, size, (size,) + shape[1:])
                start += size


def _engine_tensor(module: torch.nn.Module, param_name: str) -> torch.Tensor:
    """The full tensor the engine computes with, in ``[out, in]`` layout."""
    param = getattr(module, param_name)
    if param.numel() == 0 and param_name == "weight" and hasattr(module, "cpu_linear"):
        # CPU repacked the weight into its kernel format; recover it by
        # applying the kernel to the identity: I @ W.T == W.T.
        eye = torch.eye(int(module.input_size_per_partition), dtype=param.dtype)
        return module.cpu_linear(eye, param, None).t().contiguous()
    return param.detach()


@torch.no_grad()
def read_hf_state_dict(model: torch.nn.Module, tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The vLLM model's current weights, un-fused to HF names and shapes (CPU copies)."""
    out: dict[str, torch.Tensor] = {}
    cache: dict[tuple[int, str], torch.Tensor] = {}
    for slot in hf_slots(model):
        key = (id(slot.module), slot.param_name)
        if key not in cache:
            cache[key] = _engine_tensor(slot.module, slot.param_name)
        out[slot.hf_name] = cache[key][slot.row_start:slot.row_start + slot.rows].to("cpu").clone()
    if tie_word_embeddings and "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        # vLLM shares one parameter for tied embeddings; HF state dicts list both names.
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_shapes(model: torch.nn.Module, tie_word_embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """HF names and shapes the model accepts, without reading any weight."""
    shapes = {slot.hf_name: slot.shape for slot in hf_slots(model)}
    if tie_word_embeddings and "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def check_incoming_weights(
    params: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    model_name: str = "vllm",
    ignore: tuple[str, ...] = ("rotary_emb.inv_freq",),
) -> None:
    """Raise before touching the engine when a sync's names or shapes are off.

    vLLM's loader would otherwise fail deep inside a layer (or, for a
    partially sent fused layer, leave it half updated).
    """
    sent = {k for k in params if not any(k.endswith(s) for s in ignore)}
    missing = sorted(set(expected) - sent)
    unexpected = sorted(sent - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"model {model_name!r}: weight sync names do not match the vLLM model "
            f"(missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''})"
        )
    for name in sent:
        got = tuple(params[name].shape)
        if got != tuple(expected[name]):
            raise ValueError(f"model {model_name!r}: {name} has shape {tuple(expected[name])}, sync sent {got}")


def checksums(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(sum, sum of |x|) in float64 per tensor: the format validate_param_sync compares."""
    return {name: (float(t.double().sum()), float(t.double().abs().sum())) for name, t in state.items()}


def state_dict_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def first_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                   atol: float = 0.0) -> Optional[str]:
    """Name of the first tensor that differs (for tests and debugging), or None."""
    for name, tensor in expected.items():
        other = got.get(name)
        if other is None or other.shape != tensor.shape or not torch.allclose(other, tensor, atol=atol, rtol=0):
            return name
    return None
