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

Whole tensors are read back with tensor-parallel size 1 only. Under TP each
rank reports its share of every tensor's checksums (sums add up over the
ranks' slices; the position weights use each slice's global offset in the
full HF tensor, see ``chatlearn/synchronizer/checksums.py``), which is what
``validate_param_sync`` compares.

These functions run inside the vLLM worker (``LLM.collective_rpc`` with a
callable); they only need ``torch`` and the model object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch

from chatlearn.synchronizer import checksums as records

# Used when a vLLM model class does not declare packed_modules_mapping.
DEFAULT_PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclass(frozen=True)
class HFSlot:
    """One HF-named tensor (or, under tensor parallelism, this rank's slice of
    it) and where it lives in the vLLM model."""

    hf_name: str
    module: torch.nn.Module
    param_name: str  # "weight" / "bias" on ``module``
    row_start: int  # rows [row_start, row_start + rows) of the vLLM tensor (dim 0)
    rows: int
    shape: tuple[int, ...]  # this rank's slice
    full_shape: tuple[int, ...] = ()  # the whole HF tensor
    copies: int = 1  # TP ranks that hold this same slice (replicated: all of them)
    shard_dim: int = 0  # the dim along which the slice is cut from the whole tensor
    offset: int = 0  # where the slice starts along shard_dim in the whole tensor


def _packed_mapping(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    mapping = getattr(model, "packed_modules_mapping", None) or DEFAULT_PACKED_MODULES
    return {k: tuple(v) for k, v in mapping.items()}


def _logical_shape(module: torch.nn.Module, param_name: str, param: torch.Tensor) -> tuple[int, ...]:
    """This rank's shape of the parameter as loaded, even when CPU repacking emptied it."""
    if param.numel() == 0 and param_name == "weight" and hasattr(module, "cpu_linear"):
        return (int(module.output_size_per_partition), int(module.input_size_per_partition))
    shape = tuple(param.shape)
    indices = getattr(module, "shard_indices", None)
    if indices is not None and shape:
        # Vocab-parallel layers pad the vocabulary (and append added tokens);
        # this rank's real rows come first.
        shape = (int(indices.num_org_elements),) + shape[1:]
    return shape


def _tp_split(module: torch.nn.Module, module_name: str, param_name: str, shape: tuple[int, ...],
              part: int, tp: int, tp_world: int) -> tuple[tuple[int, ...], int, int, int]:
    """(full HF shape, copies, shard dim, offset along it) of one slot of a module
    sharded over ``tp`` ranks in an engine of ``tp_world`` tensor-parallel ranks.

    A module that is not sharded (norms; ``tp == 1``) is held whole by every rank.

    vLLM's layouts: vocab-parallel embeddings/LM heads split the vocabulary
    (dim 0; this rank's rows start at ``shard_indices.org_vocab_start_index``);
    column-parallel linears (qkv, gate_up, ...) split dim 0 in rank order,
    except that k/v are replicated over ``num_kv_head_replicas`` ranks when
    there are fewer kv heads than ranks (rank r holds kv block
    ``r // num_kv_head_replicas``); row-parallel linears split dim 1 and keep
    the bias whole on every rank.
    """
    if tp == 1:
        return shape, tp_world, 0, 0
    rank = int(getattr(module, "tp_rank", 0))
    if hasattr(module, "shard_indices"):
        start = int(module.shard_indices.org_vocab_start_index)
        return (int(module.org_vocab_size),) + shape[1:], 1, 0, start
    if hasattr(module, "input_is_parallel"):  # RowParallelLinear
        if param_name == "weight":
            return (shape[0], shape[1] * tp) + shape[2:], 1, 1, rank * shape[1]
        return shape, tp, 0, 0
    if hasattr(module, "output_partition_sizes"):  # ColumnParallelLinear and its fused kinds
        copies = int(getattr(module, "num_kv_head_replicas", 1)) if part > 0 else 1
        return (shape[0] * tp // copies,) + shape[1:], copies, 0, (rank // copies) * shape[0]
    raise NotImplementedError(f"do not know how vLLM shards {module_name}.{param_name} "
                              f"({type(module).__name__}) over {tp} ranks")


def hf_slots(model: torch.nn.Module, allow_tp: bool = True, tp_world: int = 1) -> Iterator[HFSlot]:
    """The model's parameters, split and named as in the HF checkpoint.

    Under tensor parallelism (``tp_world`` ranks) each slot is this rank's
    slice (``full_shape`` and ``copies`` say how it relates to the whole
    tensor); ``allow_tp=False`` refuses that (reading whole tensors back
    needs every rank).
    """
    packed = _packed_mapping(model)
    for module_name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        tp = int(getattr(module, "tp_size", 1))
        if tp > 1 and not allow_tp:
            raise NotImplementedError(
                f"reading whole vLLM weights back needs tensor_parallel_size 1 "
                f"({module_name} is sharded over {tp} ranks); use the per-rank checksums"
            )
        prefix, _, leaf = module_name.rpartition(".")
        for param_name, param in params:
            shape = _logical_shape(module, param_name, param)
            parts = packed.get(leaf)
            if parts is None:
                full, copies, dim, offset = _tp_split(module, module_name, param_name, shape, 0, tp, tp_world)
                yield HFSlot(f"{module_name}.{param_name}", module, param_name, 0, shape[0], shape, full, copies,
                             dim, offset)
                continue
            sizes = list(getattr(module, "output_partition_sizes", []))
            if len(sizes) != len(parts) or sum(sizes) != shape[0]:
                raise RuntimeError(
                    f"cannot un-fuse {module_name}.{param_name}: output sizes {sizes} "
                    f"do not match {parts} and {shape}"
                )
            start = 0
            for index, (part, size) in enumerate(zip(parts, sizes)):
                name = f"{prefix}.{part}.{param_name}" if prefix else f"{part}.{param_name}"
                local = (size,) + shape[1:]
                full, copies, dim, offset = _tp_split(module, module_name, param_name, local, index, tp, tp_world)
                yield HFSlot(name, module, param_name, start, size, local, full, copies, dim, offset)
                start += size


def _is_lm_head(module: torch.nn.Module) -> bool:
    try:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    except ImportError:  # outside vLLM (unit tests of the pure functions)
        return False
    return isinstance(module, ParallelLMHead)


def _engine_tensor(module: torch.nn.Module, param_name: str) -> torch.Tensor:
    """The full tensor the engine computes with, in ``[out, in]`` layout."""
    param = getattr(module, param_name)
    if param_name == "weight" and hasattr(module, "cpu_linear") and (
            param.numel() == 0 or (param.dim() == 2 and _is_lm_head(module))):
        # CPU packed the weight into its kernel format (linears drop the
        # parameter; an LM head keeps it but computes logits from its own
        # packed copy, which a tied head does not share with the embedding).
        # Recover what the kernel computes with: I @ W.T == W.T.
        width = int(module.input_size_per_partition) if param.numel() == 0 else int(param.shape[1])
        eye = torch.eye(width, dtype=param.dtype)
        return module.cpu_linear(eye, param, None).t().contiguous()
    return param.detach()


def with_tied_lm_head(weights: Iterator[tuple[str, torch.Tensor]],
                      names: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Send the embedding again as ``lm_head.weight`` when a tied model's state lacks it.

    vLLM ties by sharing one parameter, but on CPU the LM head computes logits
    from its own packed copy, re-made only when the head itself is loaded:
    without this, a Megatron export (no ``lm_head.weight`` when tied) leaves
    the logits on the old weights (caught by test_bucketed_sync_matches_transformers).
    """
    add = "lm_head.weight" not in names
    for name, tensor in weights:
        yield name, tensor
        if add and name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


def _slot_tensors(model: torch.nn.Module, **slot_args: Any) -> Iterator[tuple[HFSlot, torch.Tensor]]:
    """Each HF slot with its rows of the tensor the engine computes with (a view; each
    fused parameter is read once for all the HF tensors packed into it)."""
    cache: dict[tuple[int, str], torch.Tensor] = {}
    for slot in hf_slots(model, **slot_args):
        key = (id(slot.module), slot.param_name)
        if key not in cache:
            cache[key] = _engine_tensor(slot.module, slot.param_name)
        yield slot, cache[key][slot.row_start:slot.row_start + slot.rows]


def _alias_tied_head(out: dict[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """vLLM shares one parameter for tied embeddings; HF state dicts list both names."""
    if tie_word_embeddings and "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


@torch.no_grad()
def read_hf_state_dict(model: torch.nn.Module, tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The vLLM model's current weights, un-fused to HF names and shapes (CPU copies)."""
    out = {slot.hf_name: part.to("cpu").clone() for slot, part in _slot_tensors(model, allow_tp=False)}
    return _alias_tied_head(out, tie_word_embeddings)


def hf_shapes(model: torch.nn.Module, tie_word_embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """HF names and whole-tensor shapes the model accepts, without reading any weight
    (the same on every tensor-parallel rank)."""
    return _alias_tied_head({slot.hf_name: slot.full_shape for slot in hf_slots(model)}, tie_word_embeddings)


@torch.no_grad()
def shard_checksums(model: torch.nn.Module, tie_word_embeddings: bool = False,
                    tp_world: int = 1) -> dict[str, tuple[float, ...]]:
    """This rank's share of the :func:`position_checksums` of every HF tensor.

    Sums are additive over a partition of a tensor's elements, and the
    position weights are those of each element's place in the WHOLE tensor
    (the slot's ``shard_dim`` and ``offset``), so adding the shares of all
    tensor-parallel ranks (:func:`merge_shard_checksums`) gives the whole
    tensor's record without gathering it: each rank divides its slice's sums
    by the number of ranks holding that same slice.
    """
    out = {}
    for slot, part in _slot_tensors(model, tp_world=tp_world):
        rows, cols = (slot.offset, 0) if slot.shard_dim == 0 else (0, slot.offset)
        out[slot.hf_name] = tuple(records.tensor_record(part, rows, cols, slot.copies))
    return _alias_tied_head(out, tie_word_embeddings)


def merge_shard_checksums(per_rank: list[Mapping[str, Any]]) -> dict[str, tuple[float, ...]]:
    """Whole-tensor checksums from every tensor-parallel rank's :func:`shard_checksums`
    (any record length: the sums add up, a unit roundoff is the largest)."""
    if not per_rank:
        return {}
    names = set(per_rank[0])
    for rank, sums in enumerate(per_rank[1:], start=1):
        if set(sums) != names:
            raise RuntimeError(f"vLLM rank {rank} reports other parameter names than rank 0: "
                               f"{sorted(set(sums) ^ names)[:5]}")
    return {name: records.merge_records([r[name] for r in per_rank]) for name in sorted(names)}


def check_incoming_weights(
    params: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    model_name: str = "vllm",
    ignore: tuple[str, ...] = ("rotary_emb.inv_freq",),
) -> None:
    """Raise before touching the engine when a sync's names or shapes are off.

    ``params`` maps names to tensors or to shapes (a bucket manifest's
    shapes: checked before any byte is read). vLLM's loader would otherwise
    fail deep inside a layer (or, for a partially sent fused layer, leave it
    half updated).
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
    for name in sorted(sent):
        value = params[name]
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
        if got != tuple(expected[name]):
            raise ValueError(f"model {model_name!r}: {name} has shape {tuple(expected[name])}, sync sent {got}")


def checksums(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """The old (sum, sum of |x|) in float64 per tensor: blind to positions (validate_param_sync
    still accepts it from a trainer and then compares those two numbers only)."""
    return {name: (float(t.double().sum()), float(t.double().abs().sum())) for name, t in state.items()}


def position_checksums(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, ...]]:
    """The position-sensitive records validate_param_sync compares (``checksums.py``), per tensor."""
    return records.state_records(state)


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
