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
from typing import Any, Mapping, Optional, TypeVar

import torch

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

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` token log-probs aligned with ``input_ids`` (position 0 is 0), in fp32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0), value=0.0)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` entropy of the next-token distribution, aligned like ``logprobs_from_logits``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.nn.functional.pad(entropy, (1, 0), value=0.0)


def shift_to_token_positions(per_position: torch.Tensor) -> torch.Tensor:
    """A head's output at hidden state ``t-1`` is about token ``t``: shift right by one (position 0 gets 0)."""
    return torch.nn.functional.pad(per_position[:, :-1], (1, 0), value=0.0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row."""
    return attention_mask.long().sum(-1).clamp(min=1) - 1


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the masked token log-probs of each row (a response's log-likelihood)."""
    return masked_sum(logprobs, mask.to(logprobs.dtype), dim=-1)
