"""Position-sensitive per-tensor checksums for ``runtime.validate_param_sync``.

A plain (sum, sum of |x|) pair is blind to where each value sits: permuted
rows, two swapped attention heads or a transposed square matrix keep both
numbers. Each checksum here is a record of five floats:

    (sum, sum |x|, sum w*x, sum w*|x|, unit roundoff of the tensor's dtype)

computed in float64, where the weight of the element at (row i, column j) of
the FULL Hugging Face tensor is ``w = f(i) * g(j)``: ``f`` and ``g`` are two
different deterministic pseudo-random sequences in [1, 2) (a 32-bit integer
hash of the index, with a different salt per axis). Then

* moving a row (or a block of rows: a head) to another row index changes its
  weights ``f``, so ``sum w*x`` changes unless the moved rows have equal
  ``g``-weighted sums (never, for real weights);
* transposing a square matrix turns ``f^T X g`` into ``g^T X f``, different
  because ``f != g``;
* the weights depend on the GLOBAL position only, so a tensor-parallel rank
  computes its slice's share with its slice's global row/column offsets, and
  the shares of all ranks add up to the whole tensor's record
  (:func:`merge_records`); a slice that ``copies`` ranks hold identically
  divides its share by ``copies``.

1-D tensors are one column (``w = f(i) * g(0)``), higher-dimensional ones
are flattened to ``[dim 0, rest]``. Tensors are read in row chunks of at most
:data:`CHUNK_ELEMENTS` (the float64 copy never holds a whole embedding).

Tolerance (:func:`mismatch`). Both sides normally hold the same bits (the
trainer's dtype is the engine's), and then the records differ only by the
order of float64 additions: ``SAME_DTYPE_RTOL`` (1e-9) times the weighted
absolute sum. That is over 1000x the reordering error of the sums used here
(dot products over one row, at most ~1e5 terms, then a few chunk and rank
partial sums: ~1e-12 relative), and below what a corruption moves: two
swapped rows of a 150k x 4096 embedding of std 0.02 move ``sum w*x`` by
~4e-8 of that scale (``|f_i - f_k| * |row sums difference|``), one changed
element by ``w * delta``. When the dtypes differ (an fp32
trainer into a bf16 engine: the loader rounds), every element may move by
its unit roundoff ``u`` (2^-24 fp32, 2^-8 bf16, 2^-11 fp16), so the
tolerance is ``u * sum w*|x|`` (plus the reordering slack): a rigorous bound
for round-to-nearest casts, and a loose one, so cross-dtype checks catch
gross corruption only and leave layout errors to the probe.

Records with only two numbers (the old ``(sum, sum |x|)`` format, from a
module that overrides ``parameter_checksums`` with
``vllm_sync.checksums``) are compared on those two with the old rule.

Only ``torch`` is imported: vLLM's worker processes use this module.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

SUM, ABS_SUM, WEIGHTED_SUM, WEIGHTED_ABS_SUM, UNIT_ROUNDOFF = range(5)
RECORD_FIELDS = ("sum", "abs_sum", "weighted_sum", "weighted_abs_sum", "unit_roundoff")
RECORD_LEN = len(RECORD_FIELDS)

# Float64 reordering slack, relative to the absolute (weighted) sum; see the module docstring.
SAME_DTYPE_RTOL = 1e-9
# The old two-number rule (relative to max(1, |a|, |b|)).
LEGACY_RTOL = 1e-5
# At most this many elements are converted to float64 at a time.
CHUNK_ELEMENTS = 1 << 22

_MASK32 = 0xFFFFFFFF
ROW_SALT = 0x2545F491
COL_SALT = 0x6A09E667


def position_weights(index: torch.Tensor, salt: int) -> torch.Tensor:
    """Deterministic weights in [1, 2), float64, one per (non-negative) integer ``index``.

    A 32-bit integer hash (multiply-xorshift, every intermediate below 2^63 in int64),
    the same on every machine and device.
    """
    h = (index.to(torch.int64) & _MASK32) * 0x27D4EB2F + salt
    h = h & _MASK32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK32
    h = h ^ (h >> 16)
    return 1.0 + h.to(torch.float64) / 2.0**32


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a floating dtype (the round-to-nearest bound); 0 for integers."""
    return float(torch.finfo(dtype).eps) / 2 if dtype.is_floating_point else 0.0


def unit_roundoff_fp32() -> float:
    return unit_roundoff(torch.float32)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t.reshape(t.shape[0], -1) if t.dim() > 2 else t


@torch.no_grad()
def tensor_record(t: torch.Tensor, row_offset: int = 0, col_offset: int = 0, copies: int = 1) -> list[float]:
    """The checksum record of ``t``, a slice of a larger tensor that starts at
    (``row_offset``, ``col_offset``) of it (0, 0: ``t`` is the whole tensor).

    ``copies``: how many ranks report this same slice (their shares are divided by it).
    """
    u = unit_roundoff(t.dtype)
    if t.numel() == 0:
        return [0.0, 0.0, 0.0, 0.0, u]
    x = _as_matrix(t.detach())
    rows, cols = x.shape
    device = x.device
    g = position_weights(torch.arange(col_offset, col_offset + cols, device=device), COL_SALT)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    total = torch.zeros(4, dtype=torch.float64, device=device)
    for start in range(0, rows, step):
        chunk = x[start:start + step].to(torch.float64)
        f = position_weights(torch.arange(row_offset + start, row_offset + start + chunk.shape[0], device=device),
                             ROW_SALT)
        absolute = chunk.abs()
        total += torch.stack([chunk.sum(), absolute.sum(), f @ (chunk @ g), f @ (absolute @ g)])
    values = (total / copies).tolist()
    return [*values, u]


def state_records(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, ...]]:
    """Records of whole tensors (a trainer's HF state dict)."""
    return {name: tuple(tensor_record(t)) for name, t in state.items()}


def merge_records(per_rank: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """One tensor's record from the shares of every rank: sums add, the unit roundoff is the largest."""
    lengths = {len(r) for r in per_rank}
    if len(lengths) != 1:
        raise ValueError(f"checksum records of different lengths: {sorted(lengths)}")
    merged = [sum(float(r[i]) for r in per_rank) for i in range(min(lengths.pop(), UNIT_ROUNDOFF))]
    if len(per_rank[0]) > UNIT_ROUNDOFF:
        merged.append(max(float(r[UNIT_ROUNDOFF]) for r in per_rank))
    return tuple(merged)


def mismatch(expected: Sequence[float], got: Sequence[float]) -> Optional[str]:
    """None when two records agree within the tolerance (module docstring), else why not."""
    if min(len(expected), len(got)) < RECORD_LEN:
        for x, y in zip(expected[:2], got[:2]):
            if abs(x - y) > LEGACY_RTOL * max(1.0, abs(x), abs(y)):
                return "values differ (sum, sum |x|)"
        return None
    u_a, u_b = float(expected[UNIT_ROUNDOFF]), float(got[UNIT_ROUNDOFF])
    rtol = SAME_DTYPE_RTOL + (0.0 if u_a == u_b else max(u_a, u_b) * 1.01)

    def differs(value: int, scale: int) -> bool:
        a, b = float(expected[value]), float(got[value])
        if math.isnan(a) and math.isnan(b):
            return False  # both sides hold the same non-finite weights
        bound = rtol * max(abs(float(expected[scale])), abs(float(got[scale])))
        return not abs(a - b) <= bound  # a NaN on one side only differs

    if differs(SUM, ABS_SUM) or differs(ABS_SUM, ABS_SUM):
        return "values differ"
    if differs(WEIGHTED_SUM, WEIGHTED_ABS_SUM) or differs(WEIGHTED_ABS_SUM, WEIGHTED_ABS_SUM):
        return ("the same values at other positions: rows or heads permuted, or a transpose "
                "(plain sums agree, position-weighted sums do not)")
    return None


def close(expected: Sequence[float], got: Sequence[float]) -> bool:
    return mismatch(expected, got) is None


def format_record(record: Iterable[Any]) -> str:
    values = list(record)
    shown = [f"{float(v):.9g}" for v in values[:UNIT_ROUNDOFF]]
    return "(" + ", ".join(shown) + ")"


def dtype_of_roundoff(u: float) -> str:
    """A name for the precision a unit roundoff stands for (for messages and probe bounds)."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        if u == unit_roundoff(dtype):
            return str(dtype).removeprefix("torch.")
    return f"unit roundoff {u:g}"
