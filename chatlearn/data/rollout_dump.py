"""One rollout as a JSON record, for ``runtime.rollout_dump_dir`` (auditing a run; tests).

The engine writes ``<rollout_dump_dir>/episode_<NNNNNN>.jsonl`` (``NNNNNN`` the
0-based episode, as in metrics.jsonl and the checkpoint names) once the
episode's rollouts are processed: one line per rollout (every response the
environment flow produced, also those a rollout processor does not train on:
tied online-DPO pairs, responses outside a GRPO top-k).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch


def rollout_record(sample: Mapping[str, Any], index: int, episode: int, policy_version: int) -> dict[str, Any]:
    """The record of one rollout (a sample of the environment flow's output).

    ``prompt`` and ``response`` (when the sample has them: ``prompt`` as the record gave
    it, text or a list of chat messages, else its ``messages``; ``response_text``),
    ``prompt_ids``, ``response_ids``, ``logprobs`` (per response
    token, of the distribution it was sampled from: the sampler's
    ``behaviour_logprobs``/``old_logprobs``), ``reward`` (``scores``), ``advantage``
    (per response token, when the rollout processor computed advantages) and
    ``policy_version`` (how many weight syncs the sampling model had received).
    Keys a sample lacks are null.
    """
    mask = sample.get("loss_mask")
    response = mask.bool() if isinstance(mask, torch.Tensor) else None

    def per_token(key: str) -> Optional[list[float]]:
        value = sample.get(key)
        if not isinstance(value, torch.Tensor) or response is None:
            return None
        return [float(x) for x in value[response]]

    behaviour = "behaviour_logprobs" if "behaviour_logprobs" in sample else "old_logprobs"
    return {
        "episode": episode,
        "index": index,
        "policy_version": policy_version,
        # As the record gave it: text, or a conversation (a record with `messages` and no `prompt`).
        "prompt": sample["prompt"] if sample.get("prompt") is not None else sample.get("messages"),
        "response": sample.get("response_text"),
        "prompt_ids": _ids(sample.get("prompt_ids")),
        "response_ids": _ids(sample.get("response_ids")),
        "logprobs": per_token(behaviour),
        "reward": _number(sample.get("scores")),
        "advantage": per_token("advantages"),
    }


def _ids(value: Any) -> Optional[list[int]]:
    if value is None:
        return None
    return [int(x) for x in (value.tolist() if isinstance(value, torch.Tensor) else value)]


def _number(value: Any) -> Optional[float]:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)
