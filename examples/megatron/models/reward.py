"""Rewards: a Megatron reward model's score, a Python function's, or both combined.

Model args (the model's YAML):
    load:         a reward-model checkpoint (HF *ForSequenceClassification); optional
    reward_fn:    "package.module:function", called as fn(sample) -> float, where the
                  sample holds the prompt's keys plus ``response_text``; optional
    model_weight, fn_weight: scores = model_weight * model score + fn_weight * function score
At least one of ``load`` and ``reward_fn`` is required.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from chatlearn.algorithms.core import last_token_index
from chatlearn.data.batching import split_batch
from chatlearn.models.base import BaseModule
from chatlearn.models.megatron import MegatronModule


def import_callable(spec: str) -> Callable:
    """``"package.module:function"`` -> the function."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward_fn must look like 'package.module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward_fn {spec!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward_fn {spec!r} is not callable")
    return fn


class RewardInference(MegatronModule):
    """``scores`` [b] per response, plus ``model_scores`` / ``fn_scores`` for each source used."""

    def setup(self) -> None:
        args = self.model_args
        spec: Optional[str] = args.get("reward_fn")
        self.reward_fn = import_callable(spec) if spec else None
        self.model_weight = float(args.get("model_weight", 1.0))
        self.fn_weight = float(args.get("fn_weight", 1.0))
        self.uses_model = bool(args.get("load"))
        if not self.uses_model and self.reward_fn is None:
            raise ValueError(f"model {self.name!r}: a reward needs `load` (a reward model), `reward_fn`, or both")
        if self.uses_model:
            super().setup()

    def is_output_rank(self) -> bool:
        return super().is_output_rank() if self.uses_model else BaseModule.is_output_rank(self)

    def forward_step(self, data: dict, iteration: int) -> dict:
        out: dict = {}
        scores = torch.zeros(data["input_ids"].shape[0])
        if self.uses_model:
            values = super().forward_step({"input_ids": data["input_ids"]}, iteration)
            if not values:  # not the last pipeline stage
                return {}
            rows = torch.arange(scores.shape[0])
            out["model_scores"] = values["values"][rows, last_token_index(data["attention_mask"])].float()
            scores = scores + self.model_weight * out["model_scores"]
        if self.reward_fn is not None:
            out["fn_scores"] = torch.tensor([float(self.reward_fn(sample)) for sample in split_batch(data)])
            scores = scores + self.fn_weight * out["fn_scores"]
        out["scores"] = scores
        return out
