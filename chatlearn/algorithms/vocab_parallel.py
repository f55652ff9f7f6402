"""Token log-probs and entropy from vocab-parallel logits, a chunk of positions at a time.

A tensor-parallel LM head leaves each TP rank with a slice of the vocabulary:
rank ``r`` of ``n`` holds the logits of tokens ``[r * V_local, (r + 1) * V_local)``.
Gathering the full ``[b, s, V]`` logits and taking an fp32 log-softmax costs
``b * s * V * 4`` bytes per copy (6.2 GB for 4 x 2560 tokens at Qwen2's 152k
vocabulary), and autograd keeps such copies for the backward pass. Here the
softmax statistics are reduced over the TP group instead, and only a chunk of
positions is ever converted to fp32, so the largest transient is
``[chunk, V_local]`` fp32 (``CHUNK_BYTES``). Nothing but the input logits (which
the model's output layer keeps anyway) and two fp32 numbers per position are
saved for the backward pass.

The math, for one position with tempered logits ``z = x / T`` over the full
vocabulary (``x``: the logits; ``T``: the row's temperature):

    lse      = log sum_i exp(z_i)            (max and sum-exp reduced over the group)
    log p_t  = z_t - lse                     (z_t lives on the rank owning token t)
    H        = lse - E_p[z],  E_p[z] = sum_i p_i z_i

and their gradients, with ``p = softmax(z)``:

    d log p_t / d z_i = 1[i = t] - p_i
    d H       / d z_i = -p_i (z_i - E_p[z])
    d / d x_i         = (d / d z_i) / T

Every TP rank computes the same loss from the same reduced statistics, so each
rank's gradient for its own slice needs only its own logits, ``lse`` and
``E_p[z]``: the backward pass recomputes ``p`` for its slice, chunk by chunk, and
communicates nothing (the output layer's backward all-reduces the hidden-state
gradient over TP, as for any column-parallel layer).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

# Size of one chunk's fp32 [rows, V_local] working tensor. The forward and the backward pass each
# keep two such tensors alive at once: about 256 MiB of transient memory, whatever the batch.
CHUNK_BYTES = 128 << 20


def group_size_and_rank(group: Any) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) for None or without torch.distributed."""
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def chunk_rows(vocab_local: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk whose fp32 ``[rows, vocab_local]`` fits ``chunk_bytes`` (at least one)."""
    return max(1, chunk_bytes // max(1, vocab_local * 4))


def _all_reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if group_size_and_rank(group)[0] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """``(log p(target), entropy)`` per row of ``logits`` [n, V_local]; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, inv_temperature: torch.Tensor, group: Any,
                chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, vocab_local = logits.shape
        _, rank = group_size_and_rank(group)
        start = rank * vocab_local  # this rank's vocabulary is [start, start + vocab_local)
        local_target = targets - start
        owned = (local_target >= 0) & (local_target < vocab_local)
        local_target = local_target.clamp(0, vocab_local - 1)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        mean_z = torch.empty_like(lse)  # E_p[z]
        logp = torch.empty_like(lse)
        step = chunk_rows(vocab_local, chunk_bytes)
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            z = logits[r0:r1] * inv_temperature[r0:r1, None]  # fp32 (type promotion), one pass
            # Global max first, so that exp() cannot overflow on any rank.
            m = _all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, group)
            u = z.sub_(m[:, None])  # z - m, in place
            e = u.exp()
            # The target's u on the rank that owns it, 0 elsewhere.
            picked = torch.where(owned[r0:r1], u.gather(1, local_target[r0:r1, None]).squeeze(1), 0.0)
            sum_exp = e.sum(-1)
            sum_eu = e.mul_(u).sum(-1)  # sum exp(u) u, for E_p[z]; in place: e is not needed again
            # One SUM for the three partial sums.
            sums = _all_reduce(torch.stack([sum_exp, sum_eu, picked]), dist.ReduceOp.SUM, group)
            sum_exp, sum_eu, u_t = sums
            log_sum = sum_exp.log()
            lse[r0:r1] = m + log_sum
            # In the shifted variable u = z - m: H = log sum exp(u) - E_p[u] (no cancellation of
            # two large numbers when the logits are large and the entropy small).
            mean_u = sum_eu / sum_exp
            mean_z[r0:r1] = m + mean_u
            logp[r0:r1] = u_t - log_sum
            del z, u, e
        entropy = lse - mean_z
        ctx.save_for_backward(logits, local_target, owned, inv_temperature, lse, mean_z)
        ctx.chunk_bytes = chunk_bytes
        # An output the loss does not use (the entropy when it is only a metric) gets None, not
        # zeros, in backward: its term is then skipped, half the passes over each chunk.
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        logits, local_target, owned, inv_temperature, lse, mean_z = ctx.saved_tensors
        n, vocab_local = logits.shape
        grad = torch.empty_like(logits)
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        zeros = torch.zeros_like(lse)
        step = chunk_rows(vocab_local, ctx.chunk_bytes)
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            inv_t = inv_temperature[r0:r1, None]
            # dz_i = g_logp (1[i = t] - p_i) - g_ent p_i (z_i - E_p[z]), and dx = dz / T: the 1/T
            # is folded into the per-position factors, so each chunk is a few in-place passes.
            g_logp = (zeros[r0:r1, None] if grad_logp is None else grad_logp[r0:r1, None]) * inv_t
            z = logits[r0:r1] * inv_t  # fp32 (type promotion)
            if grad_entropy is None:  # dx_i = -p_i g_logp / T (+ the one-hot term below)
                dz = z.sub_(lse[r0:r1, None]).exp_().mul_(-g_logp)
            else:  # dx_i = -p_i (g_logp + g_ent (z_i - E_p[z])) / T
                g_ent = grad_entropy[r0:r1, None] * inv_t
                p = (z - lse[r0:r1, None]).exp_()
                dz = p.mul_(z.sub_(mean_z[r0:r1, None]).mul_(g_ent).add_(g_logp)).neg_()
            # The one-hot term only on the rank owning the target.
            dz.scatter_add_(1, local_target[r0:r1, None], g_logp * owned[r0:r1, None].to(g_logp.dtype))
            grad[r0:r1] = dz  # cast to the logits' dtype on assignment
            del z, dz
        return grad, None, None, None, None


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                    temperature: Optional[torch.Tensor] = None, group: Any = None,
                                    chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``(log p(target), entropy)`` of ``softmax(logits / T)`` over the full vocabulary,
    both fp32 ``[...]`` (the shape of ``targets``), differentiable w.r.t. ``logits``.

    ``logits``: ``[..., V_local]`` (any float dtype, kept as it is), this rank's slice of the
    vocabulary when ``group`` (the tensor-parallel group) has several ranks, else the whole
    vocabulary. ``targets``: global token ids, ``logits.shape[:-1]``. ``temperature``:
    broadcastable to ``targets`` (None: 1). Collective over ``group``: every rank must call it
    with the same shapes.
    """
    vocab_local = logits.shape[-1]
    lead = logits.shape[:-1]
    if targets.shape != lead:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    world, _ = group_size_and_rank(group)
    # Checked on host tensors only: on a GPU, reading targets.max() would wait for the device.
    if world == 1 and targets.device.type == "cpu" and targets.numel() and int(targets.max()) >= vocab_local:
        # Most likely a vocab-parallel shard passed without its group: the answer would be wrong.
        raise ValueError(f"token id {int(targets.max())} is outside the logits' {vocab_local} tokens; "
                         f"pass the tensor-parallel group for vocab-parallel logits")
    flat = logits.reshape(-1, vocab_local)  # a view for the model's contiguous output
    inv_t = torch.ones(lead, dtype=torch.float32, device=logits.device) if temperature is None else \
        torch.broadcast_to(1.0 / temperature.to(device=logits.device, dtype=torch.float32), lead)
    logp, entropy = _VocabParallelLogprobEntropy.apply(
        flat, targets.reshape(-1).to(device=logits.device, dtype=torch.long), inv_t.reshape(-1).contiguous(),
        group if world > 1 else None, chunk_bytes)
    return logp.view(lead), entropy.view(lead)


class _GatherVocab(torch.autograd.Function):
    """All-gather of the vocabulary slices along the last dimension; backward: this rank's slice
    (every rank computes the same loss from the gathered tensor, so its gradient for its own
    slice is complete; megatron's ``gather_from_tensor_model_parallel_region`` does the same)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group: Any) -> torch.Tensor:
        world, rank = group_size_and_rank(group)
        ctx.rank, ctx.width = rank, shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None


def gather_vocab(shard: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Full-vocabulary ``[..., V]`` from each TP rank's ``[..., V_local]`` (differentiable;
    ``shard`` itself when ``group`` is None or has one rank). Collective over ``group``."""
    if group_size_and_rank(group)[0] == 1:
        return shard
    return _GatherVocab.apply(shard, group)
