"""Tensor helpers shared by the RL losses: masked statistics and token log-probs.

Alignment convention used across chatlearn (see docs/data.md): every per-token
tensor is ``[batch, seq]`` and aligned with ``input_ids``, so position ``t``
describes token ``t``: ``logprobs[:, t] = log p(input_ids[:, t] | tokens < t)``,
``values[:, t]`` is the value of the state just before token ``t``, and
``loss_mask[:, t]`` is 1 on response tokens. Position 0 never is a response
token, so it carries 0.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, Optional, Sequence, TypeVar

import torch

from chatlearn.algorithms.vocab_parallel import gather_vocab, group_size_and_rank, vocab_parallel_logprobs_entropy

ConfigT = TypeVar("ConfigT")


def config_from_args(cls: type[ConfigT], args: Mapping[str, Any]) -> ConfigT:
    """An algorithm's settings dataclass from a model's free-form args (other keys are ignored:
    one model file holds the backend's settings too)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in args.items() if k in names})


class StatelessRollouts:
    """Defaults for an ``Engine`` rollout processor with nothing to adapt or checkpoint."""

    def end_episode(self, metrics: dict[str, float]) -> dict[str, float]:
        return {}

    def is_trainable(self, sample: dict) -> bool:
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def require_rollout_keys(batch: Mapping[str, Any], keys: Sequence[str], algorithm: str) -> None:
    """A rollout processor's check that the environment flow produced every key it reads."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{algorithm} needs rollout keys {missing} from the environment flow (it has {sorted(batch)})")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1 (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / (count - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries are returned as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def masked_whiten_global(x: torch.Tensor, mask: torch.Tensor, group: Any = None, eps: float = 1e-8) -> torch.Tensor:
    """``masked_whiten`` with the mean and (unbiased) variance taken over the masked entries of
    every rank of ``group`` (a torch.distributed group; None or a single rank: this tensor only)."""
    import torch.distributed as dist

    m = mask.to(torch.float64)
    sums = torch.stack([(x.double() * m).sum(), (x.double() ** 2 * m).sum(), m.sum()])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        sums = sums.to(_collective_device())
        dist.all_reduce(sums, group=group)
        sums = sums.cpu()
    total, squares, count = sums.tolist()
    mean = total / max(count, 1.0)
    var = (squares - count * mean * mean) / max(count - 1.0, 1.0)
    out = (x - mean) * torch.rsqrt(torch.tensor(max(var, 0.0) + eps, dtype=x.dtype))
    return out * mask.to(x.dtype)


def whiten_advantages(data_list: list[dict], group: Any) -> list[dict]:
    """Whiten advantages over every response token of the global training batch: this rank's
    micro-batches and those of every other rank of ``group`` (the data-parallel group; None:
    this rank's alone); padding rows (``sample_valid`` 0) left out."""
    flat_adv = torch.cat([mb["advantages"].float().flatten() for mb in data_list])
    flat_mask = torch.cat([(mb["loss_mask"].float() * mb.get("sample_valid", torch.ones(len(mb["loss_mask"])))
                            .float()[:, None]).flatten() for mb in data_list])
    whitened = masked_whiten_global(flat_adv, flat_mask, group=group)
    whitened = whitened.split([mb["advantages"].numel() for mb in data_list])
    return [{**mb, "advantages": w.view_as(mb["advantages"])} for mb, w in zip(data_list, whitened)]


def _collective_device() -> torch.device:
    from chatlearn.utils import platform

    return platform.torch_device()


# ---------------------------------------------------------------------------------------------
# The sampling distribution
#
# A sampler (vLLM) draws each response token from q = topp(topk(softmax(z / T))): the logits z
# divided by the temperature T, cut to the k largest (top_k) and then to the smallest set of
# largest tokens holding probability top_p, renormalised. Every log-prob that enters a loss, a
# KL or a metric is of q, so the trainer and the reference score tokens with the rollout's own
# T, top_k and top_p, which the rollout batch carries per row (SAMPLING_KEYS).
# ---------------------------------------------------------------------------------------------

# Per-row sampling settings a rollout batch carries ([b] tensors), written by the sampler.
SAMPLING_KEYS = ("sampling_temperature", "sampling_top_k", "sampling_top_p")
# vLLM treats a temperature below this as greedy and scores greedy rows at temperature 1.
GREEDY_TEMPERATURE = 1e-5
# Rows of one chunk of the top-k/top-p computation: it sorts [rows, vocab] values.
_NUCLEUS_CHUNK_ROWS = 1024


def sampling_params(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The per-row sampling settings of ``batch`` (absent keys: T = 1, no top-k, no top-p)."""
    names = {"sampling_temperature": "temperature", "sampling_top_k": "top_k", "sampling_top_p": "top_p"}
    return {names[k]: batch[k] for k in SAMPLING_KEYS if k in batch}


def nucleus_mask(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """``[n, V]`` bool: the tokens vLLM's top-k/top-p filter keeps for each row of ``logits``.

    vLLM's rule (``apply_top_k_top_p``): sort ascending; top-k removes values below the
    k-th largest (ties with it stay); top-p removes the sorted prefix whose cumulative
    probability is at most ``1 - p`` (the largest token always stays). ``top_k`` <= 0 or
    >= V and ``top_p`` >= 1 switch a row's filter off.
    """
    vocab = logits.shape[-1]
    ordered, order = logits.sort(dim=-1, descending=False)
    remove = torch.zeros_like(ordered, dtype=torch.bool)
    if top_k is not None:
        k = top_k.to(device=logits.device, dtype=torch.long)
        k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
        kth = ordered.gather(1, (vocab - k).unsqueeze(1))
        remove |= ordered < kth
    if top_p is not None:
        p = top_p.to(device=logits.device, dtype=torch.float32)
        probs = ordered.masked_fill(remove, float("-inf")).softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        cut = cumulative <= (1.0 - p).unsqueeze(1)
        cut[:, -1] = False
        remove |= cut & (p < 1.0).unsqueeze(1)
    return torch.zeros_like(remove).scatter_(1, order, ~remove)


def _tempered(temperature: Optional[torch.Tensor], rows: int, device: torch.device) -> torch.Tensor:
    """Per-row fp32 temperatures; a temperature below ``GREEDY_TEMPERATURE`` counts as 1, as in vLLM."""
    t = torch.ones(rows, device=device) if temperature is None else temperature.to(device=device, dtype=torch.float32)
    return torch.where(t < GREEDY_TEMPERATURE, torch.ones_like(t), t)


def _next_token_stats(logits: torch.Tensor, input_ids: torch.Tensor, temperature: torch.Tensor,
                      group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(token t+1), entropy)`` of the tempered softmax at every position t, ``[b, s]``.

    Computed on all ``s`` positions, the last included (its target is a dummy 0 and the
    callers drop it): ``logits[:, :-1]`` would be a non-contiguous view, which the
    vocab-parallel kernel would have to copy whole."""
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=0)  # moved by the kernel
    return vocab_parallel_logprobs_entropy(logits, targets, temperature[:, None], group)


def sampling_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: Optional[torch.Tensor] = None,
                      top_k: Optional[torch.Tensor] = None, top_p: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None, group: Any = None) -> torch.Tensor:
    """``[b, s]`` log-probs of ``input_ids`` under the sampling distribution q: the first half of
    :func:`sampling_logprobs_and_entropy`, which says what the arguments are."""
    return sampling_logprobs_and_entropy(logits, input_ids, temperature, top_k, top_p, mask, group)[0]


def sampling_logprobs_and_entropy(logits: torch.Tensor, input_ids: torch.Tensor,
                                  temperature: Optional[torch.Tensor] = None, top_k: Optional[torch.Tensor] = None,
                                  top_p: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                                  group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, s]`` log-probs of ``input_ids`` under the sampling distribution q, and ``[b, s]``
    entropies of the tempered next-token distribution softmax(logits / T) (see
    :func:`entropy_from_logits`); both aligned with ``input_ids`` (position 0 is 0), in fp32,
    differentiable. One pass over the logits for both: a loss that uses both gets one
    gradient tensor for the logits, not two to add up.

    ``logits`` [b, s, V_local]: this rank's vocabulary slice when ``group`` is the tensor-parallel
    group of a vocab-parallel LM head (``chatlearn.models.megatron.schedule.vocab_group()``), else the whole
    vocabulary (``group`` None). Collective over ``group``.

    ``temperature``, ``top_k`` and ``top_p`` are per-row ``[b]`` tensors (None: 1, off, off;
    a temperature below ``GREEDY_TEMPERATURE`` counts as 1, as in vLLM). Top-k/top-p are
    applied at the positions where ``mask`` (``[b, s]``, e.g. the loss mask) is set, and
    everywhere when it is None; other positions get the tempered log-softmax.

    The token being scored always counts as inside the filter. In fp32 that changes
    nothing (the sampler drew it, so it was inside); where the filter's boundary moves
    slightly (bf16 logits, or weights that moved since sampling) it keeps the log-prob
    finite instead of -inf, so no ratio or KL can become infinite.

    Memory: the tempered log-softmax is computed vocab-parallel, a chunk of positions at a
    time (``chatlearn.algorithms.vocab_parallel``): no fp32 copy of the logits is made or
    kept for the backward pass. Only the top-k/top-p positions (a sort over the whole
    vocabulary) gather their full-vocabulary rows, ``_NUCLEUS_CHUNK_ROWS`` at a time.
    """
    b, _, vocab_local = logits.shape
    device = logits.device
    t = _tempered(temperature, b, device)
    logp, entropy = _next_token_stats(logits, input_ids, t, group)
    logp = logp[:, :-1]
    targets = input_ids[:, 1:].to(device)
    vocab = vocab_local * group_size_and_rank(group)[0]
    filtered = torch.zeros(b, dtype=torch.bool, device=device)
    if top_k is not None:
        k = top_k.to(device)
        filtered |= (k > 0) & (k < vocab)
    if top_p is not None:
        filtered |= top_p.to(device) < 1.0
    where = filtered[:, None].expand_as(targets)
    if mask is not None:
        where = where & (mask[:, 1:].to(device) > 0)
    # ``where`` is the same on every TP rank (so is the micro-batch): all of them take this
    # branch and make the same gathers.
    if where.any():
        rows, cols = where.nonzero(as_tuple=True)
        values = []
        for i in range(0, rows.numel(), _NUCLEUS_CHUNK_ROWS):
            r, c = rows[i:i + _NUCLEUS_CHUNK_ROWS], cols[i:i + _NUCLEUS_CHUNK_ROWS]
            sub = gather_vocab(logits[r, c], group).float() / t[r, None]
            tok = targets[r, c]
            with torch.no_grad():
                keep = nucleus_mask(sub, None if top_k is None else top_k.to(device)[r],
                                    None if top_p is None else top_p.to(device)[r])
                keep.scatter_(1, tok.unsqueeze(1), True)
            norm = torch.logsumexp(sub.masked_fill(~keep, float("-inf")), dim=-1)
            values.append(sub.gather(1, tok.unsqueeze(1)).squeeze(1) - norm)
        logp = logp.index_put((rows, cols), torch.cat(values))
    return torch.nn.functional.pad(logp, (1, 0), value=0.0), torch.nn.functional.pad(entropy[:, :-1], (1, 0), value=0.0)


# ---------------------------------------------------------------------------------------------
# Loss aggregation over a global batch
# ---------------------------------------------------------------------------------------------

# loss_agg_mode values (the names verl uses):
#   token-mean           sum of per-token losses / response tokens in the global batch
#   seq-mean-token-mean  mean over the global batch's sequences of each one's token mean
#   seq-mean-token-sum   mean over the global batch's sequences of each one's token sum
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# Set on every training micro-batch by MegatronModule.train_step: the global batch's totals.
GLOBAL_NUM_TOKENS = "global_num_tokens"
GLOBAL_NUM_SAMPLES = "global_num_samples"


class LossAggregator:
    """One micro-batch's *share* of a value averaged over the whole global batch.

    A global batch is spread over data-parallel ranks and micro-batches (and
    padded, see ``chatlearn.data.batching.split_global_batch``); a loss such as
    "mean over all response tokens of the global batch" is then the SUM of the
    shares every micro-batch of every rank computes here: each divides by the
    global batch's totals (``global_num_tokens``, ``global_num_samples``, set by
    ``MegatronModule.train_step``), and padding rows (``sample_valid`` 0) count
    nowhere. Without the totals (a micro-batch used on its own) the micro-batch's
    own totals are used.
    """

    def __init__(self, micro_batch: Mapping[str, Any], mask: torch.Tensor):
        valid = micro_batch.get("sample_valid")
        self.valid = torch.ones(mask.shape[0], device=mask.device) if valid is None \
            else valid.to(device=mask.device, dtype=torch.float32)
        self.mask = mask.to(torch.float32) * self.valid[:, None]
        tokens, samples = micro_batch.get(GLOBAL_NUM_TOKENS), micro_batch.get(GLOBAL_NUM_SAMPLES)
        self.num_tokens = float(tokens) if tokens is not None else float(self.mask.sum())
        self.num_samples = float(samples) if samples is not None else float(self.valid.sum())

    def loss(self, per_token: torch.Tensor, mode: str) -> torch.Tensor:
        """The share of ``per_token`` [b, s] aggregated by ``mode`` (one of ``LOSS_AGG_MODES``)."""
        masked = per_token * self.mask
        if mode == "token-mean":
            return masked.sum() / max(self.num_tokens, 1.0)
        if mode == "seq-mean-token-sum":
            return masked.sum() / max(self.num_samples, 1.0)
        if mode == "seq-mean-token-mean":
            per_seq = masked.sum(-1) / self.mask.sum(-1).clamp(min=1.0)
            return per_seq.sum() / max(self.num_samples, 1.0)
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")

    def token_mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """Share of the mean over the global batch's response tokens (metrics)."""
        return self.loss(per_token, "token-mean")

    def sequence_mean(self, per_sample: torch.Tensor, rows_per_sample: int = 1) -> torch.Tensor:
        """Share of the mean of a per-sample value over the global batch's samples.

        ``rows_per_sample`` > 1 when a sample spans several rows stacked block after block
        (a DPO pair: all chosen rows, then all rejected rows): ``per_sample`` then has one
        value per sample, the first ``len(per_sample)`` rows say which are real, and the
        global row count is divided accordingly.
        """
        valid = self.valid[:per_sample.shape[0]]
        return (per_sample * valid).sum() / max(self.num_samples / rows_per_sample, 1.0)


def entropy_from_logits(logits: torch.Tensor, temperature: Optional[torch.Tensor] = None,
                        group: Any = None) -> torch.Tensor:
    """``[b, s]`` entropy of the next-token distribution softmax(logits / T) (``temperature``:
    per-row [b], None: 1; top-k/top-p are not applied), aligned with ``input_ids`` like
    ``sampling_logprobs`` (position 0 is 0), fp32, differentiable. ``logits`` and ``group`` as
    in ``sampling_logprobs``: vocab-parallel, a chunk of positions at a time."""
    b, s, _ = logits.shape
    dummy_ids = torch.zeros(b, s, dtype=torch.long, device=logits.device)
    _, entropy = _next_token_stats(logits, dummy_ids, _tempered(temperature, b, logits.device), group)
    return torch.nn.functional.pad(entropy[:, :-1], (1, 0), value=0.0)


def shift_to_token_positions(per_position: torch.Tensor) -> torch.Tensor:
    """A head's output at hidden state ``t-1`` is about token ``t``: shift right by one (position 0 gets 0)."""
    return torch.nn.functional.pad(per_position[:, :-1], (1, 0), value=0.0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row."""
    return attention_mask.long().sum(-1).clamp(min=1) - 1


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the masked token log-probs of each row (a response's log-likelihood)."""
    return masked_sum(logprobs, mask.to(logprobs.dtype), dim=-1)
