"""Six toy models for the runtime: tiny torch layers with checkable behaviour.

They exercise the engine without a language model: the "policy" maps a prompt
vector through a linear layer plus seeded noise, the trainers take SGD steps
towards a fixed target, and every role records what it saw so tests can check
sample counts, order, weight sync and resume. They live with the example toy run
(``examples/toy/train_rlhf.py``); the tests import them as ``toy_models``
(tests/conftest.py puts this folder on sys.path).

Model args (in the model's ``model_config_file``) that inject faults for tests:
``fail_on_iteration: N`` raises in call N (on every rank, or only on rank
``fail_on_rank`` when that is set); ``sleep_s`` delays every call, ``setup_sleep_s`` the set-up.

A prompt is ``{"prompt_id": int, "x": tensor[DIM]}``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from chatlearn.models.torch_module import TorchModule

DIM = 4


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_id": i, "x": torch.randn(DIM, generator=g)} for i in range(n)]


def _record(module: TorchModule, event: dict) -> None:
    """Append what this rank saw to ``<record_dir>/<model>.jsonl`` (if configured)."""
    record_dir: Optional[str] = module.model_args.get("record_dir")
    if not record_dir:
        return
    os.makedirs(record_dir, exist_ok=True)
    info = module.worker
    event = {"replica": info.replica_id, "rank": info.rank, **event}
    with open(os.path.join(record_dir, f"{module.name}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


class _Linear(TorchModule):
    def setup(self) -> None:
        began = time.time()
        time.sleep(float(self.model_args.get("setup_sleep_s", 0)))
        self._setup_model()
        record_dir = self.model_args.get("record_dir")
        if record_dir:  # when set-up ran (its own file: the other records are per call)
            os.makedirs(record_dir, exist_ok=True)
            with open(os.path.join(record_dir, f"{self.name}.setup.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"rank": self.worker.rank, "began": began, "ended": time.time()}) + "\n")

    def _setup_model(self) -> None:
        torch.manual_seed(self.runtime_args.seed + 1)  # same init for a trainer and its inference twin
        self.model = torch.nn.Linear(DIM, DIM)
        if self.module_args.trainable:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=float(self.model_args.get("lr", 0.1)))
        fail_at = self.model_args.get("fail_on_iteration")
        self._fail_at = None if fail_at is None else int(fail_at)
        fail_rank = self.model_args.get("fail_on_rank")
        self._fail_rank = None if fail_rank is None else int(fail_rank)

    def _maybe_fail(self, iteration: int) -> None:
        if self._fail_at is not None and iteration == self._fail_at and \
                self._fail_rank in (None, self.worker.rank if self.worker else 0):
            raise RuntimeError(f"toy failure in {self.name} at iteration {iteration}")
        time.sleep(float(self.model_args.get("sleep_s", 0)))

    def offload(self) -> None:
        _record(self, {"event": "offload"})

    def onload(self) -> None:
        _record(self, {"event": "onload"})


class ToyPolicy(_Linear):
    """Generation: response = W x + b + noise (noise from this worker's torch RNG).
    With ``n`` > 1 in its model args, each prompt yields n samples (for ``dynamic`` mode)."""

    def forward_step(self, data: dict, iteration: int) -> dict:
        self._maybe_fail(iteration)
        n = int(self.model_args.get("n", 1))
        if n > 1:
            data = {k: (v.repeat_interleave(n, 0) if isinstance(v, torch.Tensor) else [x for x in v for _ in range(n)])
                    for k, v in data.items()}
        with torch.no_grad():
            response = self.model(data["x"]) + 0.01 * torch.randn(data["x"].shape)
        _record(self, {"iteration": iteration, "prompt_ids": [int(i) for i in data["prompt_id"]],
                       "weight_sum": float(self.model.weight.detach().sum())})
        return {**data, "response": response,
                "policy_weight_sum": torch.full((len(response),), float(self.model.weight.detach().sum()))}


class ToyReference(_Linear):
    """Forward only. With tensor_model_parallel_size 2 it all-reduces inside its replica,
    as a TP layer would, and reports the group size it saw."""

    def forward_step(self, data: dict, iteration: int) -> dict:
        self._maybe_fail(iteration)
        with torch.no_grad():
            ref = self.model(data["x"])
        ones = torch.ones(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ones)
        _record(self, {"iteration": iteration, "group_size": float(ones.item())})
        return {"ref_response": ref, "ref_group_size": torch.full((len(ref),), float(ones.item()))}


class ToyValue(_Linear):
    def forward_step(self, data: dict, iteration: int) -> dict:
        self._maybe_fail(iteration)
        with torch.no_grad():
            return {"value": self.model(data["response"]).mean(-1)}


class ToyReward(TorchModule):
    """Rule-based: reward is higher the closer the response is to the prompt."""

    def forward_step(self, data: dict, iteration: int) -> dict:
        reward = -((data["response"] - data["x"]) ** 2).mean(-1)
        return {"reward": reward}


class ToyTrainer(_Linear):
    """One SGD step per micro-batch towards response == x; records the sample ids it trained on.
    Padding rows (``sample_valid`` 0, see ``split_global_batch``) weigh nothing."""

    def train_step(self, data_list: list[dict], iteration: int) -> dict:
        self._maybe_fail(iteration)
        losses = []
        for micro in data_list:
            self.optimizer.zero_grad()
            valid = micro["sample_valid"]
            per_row = ((self.model(micro["x"]) - micro["x"]) ** 2).mean(-1)
            loss = (per_row * valid).sum() / valid.sum().clamp(min=1)
            loss.backward()
            if dist.is_initialized() and dist.get_world_size() > 1:
                # Plain data-parallel gradient averaging across this trainer's ranks.
                for p in self.model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
            self.optimizer.step()
            losses.append(loss.item())
        real = [(m, i) for m in data_list for i in range(len(m["sample_valid"])) if m["sample_valid"][i]]
        _record(self, {"iteration": iteration, "prompt_ids": [m["prompt_id"][i] for m, i in real],
                       "weight_sum": float(self.model.weight.detach().sum())})
        rewards = [float(m["reward"][i]) for m, i in real if "reward" in m]
        metrics = {"loss": sum(losses) / len(losses), "num_micro_batches": float(len(data_list))}
        if rewards:
            metrics["reward/mean"] = sum(rewards) / len(rewards)
        return metrics
