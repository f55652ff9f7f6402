"""Rewards: a Megatron reward model's score, a Python function's, or both combined.

Model args (the model's YAML):
    load:         a reward-model checkpoint (HF *ForSequenceClassification); optional
    reward_fn:    "package.module:function", called as fn(sample) -> float, where the
                  sample holds the prompt's keys plus ``response_text``; optional
    model_weight, fn_weight: scores = model_weight * model score + fn_weight * function score
    reward_bias:  subtracted from the reward model's score (ChatLearn 1.x's key; default 0)
At least one of ``load`` and ``reward_fn`` is required.

``MathReward`` is ChatLearn 1.x's rule-based ``math_reward`` model of its GRPO math
example (its rule: ``chatlearn.roles.math_reward``): a reward function only, combined
with the reward model's score that reaches it from the previous stage, by
``math_reward_strategy``.
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
        self.reward_bias = float(args.get("reward_bias") or 0.0)
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
            out["model_scores"] = values["values"][rows, last_token_index(data["attention_mask"])].float() \
                - self.reward_bias
            scores = scores + self.model_weight * out["model_scores"]
        if self.reward_fn is not None:
            out["fn_scores"] = torch.tensor([float(self.reward_fn(sample)) for sample in split_batch(data)])
            scores = scores + self.fn_weight * out["fn_scores"]
        out["scores"] = scores
        return out


MATH_REWARD_STRATEGIES = ("merge", "sparse_only", "dense_only")


class MathReward(RewardInference):
    """ChatLearn 1.x's rule-based math reward model (``math_reward`` in grpo_math_vllm.yaml).

    Runs after the reward model, on its output: ``math_scores`` from ``reward_fn`` (default
    ``chatlearn.roles.math_reward:math_reward``: 1 when the response's last number is the
    record's ``answer``), ``rm_scores`` = the reward model's ``scores`` that arrive with the
    batch, and ``scores`` by ``math_reward_strategy``: ``merge`` (math + reward model, 1.x's
    default), ``sparse_only`` (math) or ``dense_only`` (reward model). Like 1.x's, it loads no
    model: a ``load`` its file includes (1.x's ``reward_shared.yaml``) names the reward model,
    which the ``reward`` model runs.
    """

    def setup(self) -> None:
        args = self.model_args
        self.reward_fn = import_callable(args.get("reward_fn") or "chatlearn.roles.math_reward:math_reward")
        self.strategy = str(args.get("math_reward_strategy") or "merge")
        if self.strategy not in MATH_REWARD_STRATEGIES:
            raise ValueError(f"model {self.name!r}: math_reward_strategy must be one of {MATH_REWARD_STRATEGIES}, "
                             f"got {self.strategy!r}")
        self.uses_model = False

    def forward_step(self, data: dict, iteration: int) -> dict:
        math_scores = torch.tensor([float(self.reward_fn(sample)) for sample in split_batch(data)])
        if self.strategy != "sparse_only" and "scores" not in data:
            raise KeyError(f"model {self.name!r}: math_reward_strategy {self.strategy!r} adds the reward model's "
                           f"`scores`, which its input lacks (has {sorted(data)}): run it after the reward model")
        rm_scores = data["scores"].float() if "scores" in data else torch.zeros_like(math_scores)
        scores = {"merge": math_scores + rm_scores, "sparse_only": math_scores, "dense_only": rm_scores}
        return {"math_scores": math_scores, "rm_scores": rm_scores, "scores": scores[self.strategy]}
