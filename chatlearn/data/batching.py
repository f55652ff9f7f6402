"""Samples, batches and the conversions between them.

A *sample* is a ``dict`` mapping ``str`` to a Python value or a ``torch.Tensor``
describing ONE sample. A *batch* is a ``dict`` of lists / tensors whose first
dimension is the batch dimension.

Padding rule (the only place it is defined)
-------------------------------------------
``collate`` combines the values of one key across samples:

* every value a tensor, all of the same shape  -> ``torch.stack`` (new dim 0);
* every value a 1-D tensor, lengths differ     -> each is RIGHT-padded to the
  longest length with ``pad_values.get(key, DEFAULT_PAD_VALUE)`` (0), then stacked;
  the padded tensor keeps the dtype of the first sample's tensor;
* tensors of different shapes that are not all 1-D -> ``ValueError``
  (there is no single obvious padding for them; pad them yourself);
* anything else (strings, ints, dicts, a mix of tensors and non-tensors)
  -> a plain Python ``list``, in sample order.

``split_batch`` is the inverse for stacked values, but padding is not undone:
a sample split from a padded batch carries the padded row. Keep the true length
in its own key (e.g. ``response_len``) when it matters.

This module also holds the seeded helpers shared by the data package
(``derive_seed``, ``seeded_permutation``, ``shard_sizes``).
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Mapping, Optional, Sequence

import torch

Sample = dict[str, Any]
Batch = dict[str, Any]

DEFAULT_PAD_VALUE = 0


def split_batch(batch: Mapping[str, Any]) -> list[Sample]:
    """Split a batch (dict of lists/tuples/tensors, first dim = batch) into samples."""
    if not batch:
        return []
    sizes: dict[str, int] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                raise ValueError(f"split_batch: key {key!r} is a 0-d tensor; it has no batch dimension")
            sizes[key] = value.shape[0]
        elif isinstance(value, (list, tuple)):
            sizes[key] = len(value)
        else:
            raise TypeError(
                f"split_batch: key {key!r} has type {type(value).__name__}; "
                "batch values must be lists, tuples or tensors with a batch dimension"
            )
    if len(set(sizes.values())) != 1:
        raise ValueError(f"split_batch: keys disagree on the batch size: {sizes}")
    size = next(iter(sizes.values()))
    return [{key: value[i] for key, value in batch.items()} for i in range(size)]


def concat_padded(tensors: Sequence[torch.Tensor], pad_value: Any = DEFAULT_PAD_VALUE) -> torch.Tensor:
    """Concatenate ``[n_i, s_i]`` tensors along dim 0, RIGHT-padding each to the longest ``s_i``."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad_value) for t in tensors])


def collate(samples: Sequence[Mapping[str, Any]], pad_values: Optional[Mapping[str, Any]] = None) -> Batch:
    """Combine samples into one batch; see the module docstring for the padding rule."""
    if not samples:
        return {}
    pad_values = pad_values or {}
    keys = list(samples[0].keys())
    key_set = set(keys)
    for i, sample in enumerate(samples):
        if set(sample.keys()) != key_set:
            raise ValueError(
                f"collate: sample {i} has keys {sorted(sample.keys())}, sample 0 has {sorted(key_set)}"
            )
    return {key: _collate_key(key, [s[key] for s in samples], pad_values) for key in keys}


def _collate_key(key: str, values: list[Any], pad_values: Mapping[str, Any]) -> Any:
    if not all(isinstance(v, torch.Tensor) for v in values):
        return list(values)
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) == 1:
        return torch.stack(values)
    if all(v.dim() == 1 for v in values):
        max_len = max(v.shape[0] for v in values)
        pad = pad_values.get(key, DEFAULT_PAD_VALUE)
        out = torch.full((len(values), max_len), pad, dtype=values[0].dtype, device=values[0].device)
        for row, v in enumerate(values):
            out[row, : v.shape[0]] = v
        return out
    raise ValueError(
        f"collate: key {key!r} has tensors of shapes {sorted(shapes)}; only 1-D tensors of "
        "different lengths are padded automatically"
    )


# Keys the batching path adds to every training micro-batch (see split_global_batch).
SAMPLE_VALID = "sample_valid"


def split_global_batch(samples: Sequence[Mapping[str, Any]], dp_size: int, micro_batch_size: int,
                       pad_values: Optional[Mapping[str, Any]] = None) -> list[list[Batch]]:
    """Split one global batch over ``dp_size`` data-parallel ranks and into micro-batches.

    The one splitter every caller uses (the engine's trainers, Megatron's forward
    and training, the standalone examples). Nothing is dropped and nothing fails
    on an awkward size: every rank gets the same number ``k`` of micro-batches,
    every micro-batch the same number of rows ``r``, with

        k = ceil(n / (dp_size * micro_batch_size)),   r = ceil(n / (dp_size * k)) <= micro_batch_size

    (equal shapes keep pipeline stages and data-parallel collectives paired). The
    ``n`` samples are cut into ``dp_size`` contiguous shards whose sizes differ by
    at most one (lower ranks get the extra sample), each shard fills its rank's
    micro-batches in order, and the ``dp_size * k * r - n`` empty rows left at the
    tail of some ranks are *padding rows*: copies of a real sample whose
    ``loss_mask`` (and every ``*_loss_mask``) is zero. Every micro-batch carries
    ``sample_valid`` ([r] float, 1 for a real sample, 0 for padding), so losses
    (``chatlearn.algorithms.core.LossAggregator``) and metrics leave padding out:
    padding changes no gradient.
    """
    if dp_size <= 0 or micro_batch_size <= 0:
        raise ValueError(f"dp_size and micro_batch_size must be positive, got {dp_size} and {micro_batch_size}")
    n = len(samples)
    if n == 0:
        raise ValueError("split_global_batch: the global batch is empty")
    k = -(-n // (dp_size * micro_batch_size))
    r = -(-n // (dp_size * k))
    per_rank: list[list[Batch]] = []
    start = 0
    for size in shard_sizes(n, dp_size):
        shard = [{**s, SAMPLE_VALID: torch.tensor(1.0)} for s in samples[start:start + size]]
        start += size
        filler = _padding_row(shard[-1] if shard else samples[-1])
        shard += [filler] * (k * r - len(shard))
        per_rank.append([collate(shard[i * r:(i + 1) * r], pad_values) for i in range(k)])
    return per_rank


def _padding_row(sample: Mapping[str, Any]) -> Sample:
    """A row that shapes like ``sample`` and weighs nothing: its loss masks are zero."""
    row = {key: torch.zeros_like(value) if _is_loss_mask(key) and isinstance(value, torch.Tensor) else value
           for key, value in sample.items()}
    row[SAMPLE_VALID] = torch.tensor(0.0)
    return row


def _is_loss_mask(key: str) -> bool:
    return key == "loss_mask" or key.endswith("_loss_mask")


def shard_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous shards of ``total`` items, differing by at most one.

    The first ``total % parts`` shards get the extra item.
    """
    if parts <= 0:
        raise ValueError(f"parts must be positive, got {parts}")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from several integers (e.g. seed, episode_id, epoch).

    Hashing keeps nearby tuples such as (1234, 1, 0) and (1234, 0, 1) independent,
    and, unlike ``hash()``, does not depend on PYTHONHASHSEED.
    """
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def seeded_permutation(n: int, *seed_parts: int) -> list[int]:
    """A permutation of ``range(n)`` determined only by ``n`` and ``seed_parts``.

    Fisher-Yates driven by ``Random.random()``: Python guarantees that
    ``random()`` yields the same sequence for the same seed across versions,
    which ``Random.shuffle`` does not, so resumed runs on a newer Python still
    see the same order. The bias of ``int(random() * k)`` is about k / 2**53.
    """
    rng = random.Random(derive_seed(*seed_parts))
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order
