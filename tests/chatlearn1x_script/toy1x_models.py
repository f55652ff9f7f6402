"""Toy model classes written the ChatLearn 1.x way (for tests/test_chatlearn1x_script.py).

What makes them 1.x-style: hooks without arguments (``before_episode(self)``),
``eval_forward(self, policy_res)`` without an iteration, ``save_checkpoint(self,
iteration)`` that saves to the module's own path and a ``setup()`` that reloads it
when ``self.resume_training``, a Dataset with its own ``collate_fn``, metrics
through ``self._metric_list``, ``self.put``/``self.get``, 1.x's helpers
(``is_last_rank()``, ``replica_id``, ``data_parallel_rank``, ...), their own key
names, and the algorithm in the models: the reward model computes the rewards
and the targets the trainers use. The value model and its trainer hold no
weights (a rule-based baseline), so their parameter sync is a no-op.

A prompt is a string; its "embedding" is a seeded random vector, the policy maps
it through a linear layer (plus noise when sampling), and the reward prefers
responses close to the prompt vector.

Every model appends what it did to ``<output_dir>/records/<name>.jsonl``.
"""
import json
import os
import zlib

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from chatlearn import BaseModule, Evaluator, TorchModule

DIM = 4


def embed(prompt):
    generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return torch.randn(DIM, generator=generator)


def record(module, **event):
    path = os.path.join(module.runtime_args.output_dir, "records")
    os.makedirs(path, exist_ok=True)
    event = {"replica": module.replica_id, "rank": module.get_rank(), **event}
    with open(os.path.join(path, f"{module.name}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def get_prompts(path, num_limit=-1):
    with open(path, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts if num_limit in (None, -1) else prompts[:num_limit]


class PromptDataset(Dataset):
    def __init__(self, prompts):
        self.data = [{"prompt": p, "x": embed(p)} for p in prompts]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]

    def collate_fn(self, samples):
        return {"prompt": [s["prompt"] for s in samples], "x": torch.stack([s["x"] for s in samples])}


class _Linear(TorchModule):
    def setup(self):
        torch.manual_seed(self.model_args["seed"])  # the policy and its trainer start alike
        self.model = torch.nn.Linear(DIM, DIM)
        record(self, event="setup", tp=self.tensor_model_parallel_size(), pp=self.pipeline_model_parallel_size(),
               dp_rank=self.data_parallel_rank, dp_size=self.data_parallel_size, num_replica=self.num_replica,
               last_rank=self.is_last_rank(), params=sorted(self.named_parameters))

    def before_episode(self):
        record(self, event="before_episode")

    def after_episode(self):
        record(self, event="after_episode")

    def weight_sum(self):
        return float(self.model.weight.detach().sum())


class PolicyInference(_Linear):
    def setup(self):
        super().setup()
        self._metric_prefix = "policy_inference"

    def build_dataset(self, train_prompts, is_eval=False):
        return PromptDataset(train_prompts)

    def forward_step(self, data, iteration=0):
        with torch.no_grad():
            response = self.model(data["x"]) + 0.05 * torch.randn(data["x"].shape)
        record(self, event="forward_step", iteration=iteration, weight_sum=self.weight_sum())
        if self.is_last_rank():
            self._metric_list.append({"response_norm": response.norm(dim=-1).mean()})
        return {"response": response}

    def eval_forward(self, data):
        with torch.no_grad():
            response = self.model(data["x"])
        record(self, event="eval_forward")
        return {"response": response}


class PolicyReference(_Linear):
    def init(self):  # 1.x's hook before setup()
        record(self, event="init")

    def forward_step(self, data, iteration):
        with torch.no_grad():
            return {"ref_response": self.model(data["x"])}


class ValueInference(BaseModule):
    """A rule-based baseline: no weights."""

    def forward_step(self, data):
        return {"old_values": torch.zeros(len(data["x"]))}


class RewardInference(BaseModule):
    """Rule-based: the reward, a KL-like penalty against the reference, and the targets."""

    def setup(self):
        self._metric_prefix = "rewards_each"
        self.add_padding_config("action_ids", -7)  # variable-length rows, padded when training batches form

    def forward_step(self, data, iteration=None):
        kl_coef = self.get("kl_coef")
        record(self, event="forward_step", kl_coef=kl_coef)
        score = -((data["response"] - data["x"]) ** 2).mean(-1)
        penalty = ((data["response"] - data["ref_response"]) ** 2).mean(-1)
        rewards = score - (kl_coef or 0.0) * penalty
        self._metric_list.append({"score_mean": score.mean()})
        action_ids = [torch.arange(1 + len(p) % 3) for p in data["prompt"]]
        return {"rewards": rewards, "adv": rewards - data["old_values"], "action_ids": action_ids}

    def eval_forward(self, policy_res: dict):
        record(self, event="eval_forward")
        return {"eval_rewards": -((policy_res["response"] - policy_res["x"]) ** 2).mean(-1)}


class PolicyTrainer(_Linear):
    def setup(self):
        super().setup()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.model_args["lr"])
        self.save_dir = os.path.join(self.runtime_args.output_dir, "save_model", self.name)
        if self.resume_training:  # 1.x: continue from what save_checkpoint(iteration) wrote
            latest = max(int(f.split("_")[1].split(".")[0]) for f in os.listdir(self.save_dir))
            state = torch.load(os.path.join(self.save_dir, f"iter_{latest}.{self.get_rank()}.pt"))
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            record(self, event="resumed", iteration=latest, weight_sum=self.weight_sum())

    def train_step(self, data, iteration):
        losses = []
        for micro in data:
            self.optimizer.zero_grad()
            weight = torch.sigmoid(micro["adv"]) * micro["sample_valid"]
            loss = (((self.model(micro["x"]) - micro["x"]) ** 2).mean(-1) * weight).sum() / weight.sum().clamp(min=1)
            loss.backward()
            if self.data_parallel_size > 1:
                for p in self.model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= self.data_parallel_size
            self.optimizer.step()
            losses.append(loss.item())
        self.put("kl_coef", 0.1)
        pads = sorted({int(v) for micro in data for v in micro["action_ids"].flatten() if v < 0})
        record(self, event="train_step", iteration=iteration, weight_sum=self.weight_sum(), pads=pads)
        self._metric_list.append({"policy_loss": sum(losses) / len(losses)})

    def save_checkpoint(self, iteration):
        os.makedirs(self.save_dir, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                   os.path.join(self.save_dir, f"iter_{iteration}.{self.get_rank()}.pt"))
        record(self, event="save_checkpoint", iteration=iteration)


class ValueTrainer(BaseModule):
    """The rule-based value has nothing to train: no weights."""

    def train_step(self, data, iteration):
        record(self, event="train_step", iteration=iteration, micro_batches=len(data))


class EvaluatorPostProcess(Evaluator):
    """ChatLearn 1.0.3's way: subclass and override post_process(results, eval_info)."""

    def post_process(self, results, eval_info):
        rewards = torch.cat([batch["eval_rewards"] for batch in results["reward"]])
        limit = self.args.get("eval_data_num_limit")
        assert len(rewards) == limit, (len(rewards), limit)
        self._metric_list.append({"eval_reward_mean": float(rewards.mean())})
        path = os.path.join(self.args.output_dir, "eval", str(eval_info["train_iteration"]))
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"episode": eval_info["episode_iteration"], "rewards": rewards.tolist()}, f)
        return results
