"""The on-policy shortcut of ``recompute_old_logprobs``: when an episode makes one optimizer
step right after the sync, the engine skips the trainer's old-log-prob pass and the trainer
takes the old log-probs from its own training forward pass (docs/algorithms.md)."""
from __future__ import annotations

import os

import pytest
import torch

import chatlearn
from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_YAML = os.path.join(ROOT, "examples", "megatron", "configs", "tiny", "grpo.yaml")


def _rollout_batch(vocab: int, rows: int = 3, seq: int = 11) -> dict:
    g = torch.Generator().manual_seed(5)
    mask = torch.zeros(rows, seq)
    for r in range(rows):
        mask[r, 4:seq - r] = 1  # responses of different lengths (rows 1 and 2 end early)
    # The sampler's log-probs: near, not equal to, what the trainer computes (as bf16 vLLM's are).
    return {"input_ids": torch.randint(4, vocab, (rows, seq), generator=g), "loss_mask": mask,
            "advantages": torch.randn(rows, 1, generator=g).expand(rows, seq) * mask,
            "ref_logprobs": -torch.rand(rows, seq, generator=g) * mask}


def _worker(rank: int, world: int, model_dir: str, out_dir: str) -> None:
    from chatlearn.algorithms.grpo import GRPOConfig
    from chatlearn.models.megatron.model import unwrap
    from chatlearn.models.megatron.module import MegatronModule, MegatronSettings
    from chatlearn.roles.policy_trainer import GRPOTrainer

    class Trainer(GRPOTrainer):
        def setup(self) -> None:
            MegatronModule.setup(self)
            self.cfg = GRPOConfig(kl_coef=0.1, tis_cap=1.005, loss_agg_mode="token-mean", recompute_old_logprobs=True)
            self._check_consistency, self._consistency = True, []
            self._recompute, self._old_in_loss, self._steps_this_episode = True, False, 0

    module = Trainer("policy_trainer")
    module.settings = MegatronSettings(load=model_dir, trainable=True, optimizer="sgd", lr=0.0, clip_grad=0.0)
    module.setup()
    batch = _rollout_batch(int(unwrap(module.model).vocab_size))
    own = MegatronModule.forward_step(module, batch, 0)["logprobs"] * batch["loss_mask"]
    noise = 0.01 * torch.randn(own.shape, generator=torch.Generator().manual_seed(1))
    batch["old_logprobs"] = (own + noise) * batch["loss_mask"]  # the sampler's

    results = {}
    staged = {**batch, **GRPOTrainer.forward_step(module, batch, 0)}  # the old-log-prob stage
    for path, data in (("stage", staged), ("in_loss", batch)):
        module.before_episode(0)
        metrics = module.train_step([data], 0)
        grads = {n: p.main_grad.clone() for n, p in unwrap(module.model).named_parameters()}
        results[path] = {"metrics": metrics, "grads": grads}
    try:
        module.train_step([batch], 1)  # a second step of the same episode
        results["second_step"] = "no error"
    except RuntimeError as e:
        results["second_step"] = str(e)
    torch.save(results, os.path.join(out_dir, "paths.pt"))


def test_old_logprobs_from_the_training_pass_equal_the_separate_stage(tmp_path):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    spawn(_worker, 1, str(ensure_tiny_assets(root, seed=0, arch="llama").model_dir), str(tmp_path))
    r = torch.load(tmp_path / "paths.pt")
    stage, in_loss = r["stage"]["metrics"], r["in_loss"]["metrics"]
    # The sampler's log-probs differ from the trainer's by ~0.01: the importance weights see it on both paths.
    assert stage["tis/capped_fraction"] > 0.1
    for key in ("loss/policy", "kl", "tis/weight_mean", "tis/capped_fraction", "clipfrac", "consistency/kl"):
        assert in_loss[key] == pytest.approx(stage[key], rel=1e-5, abs=1e-7), key
    for name, grad in r["stage"]["grads"].items():
        torch.testing.assert_close(r["in_loss"]["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert "step 2 of the episode" in r["second_step"] and "recompute_old_logprobs: false" in r["second_step"]


@pytest.mark.parametrize("knobs, stage", [
    ({}, False),  # 16 prompts x n=4 = 64 samples = one global batch, one epoch: on-policy
    ({"num_training_epoch": 2}, True),
    ({"train_global_batch_size": 32}, True),
    ({"sync_frequency": 2}, True),
    ({"max_relay_episode": 1}, True),
    ({"recompute": False}, False),
])
def test_engine_runs_the_old_logprob_stage_only_when_the_step_is_not_on_policy(monkeypatch, tmp_path, knobs, stage):
    from chatlearn.roles import GRPOTrainer, PolicyInference
    from chatlearn.runtime.rl_engines import old_logprobs_stage

    for key in ("policy_load", "data_path"):
        monkeypatch.setenv(key, str(tmp_path))
    monkeypatch.setenv("num_training_epoch", str(knobs.get("num_training_epoch", 1)))
    chatlearn.init(GRPO_YAML)
    args = chatlearn.get_args()
    args.models["policy"].args_dict["n"] = 4
    args.models["policy_trainer"].args_dict["recompute_old_logprobs"] = knobs.get("recompute", True)
    args.runtime.sample_per_episode = 16
    args.runtime.train_global_batch_size = knobs.get("train_global_batch_size", 64)
    args.runtime.max_relay_episode = knobs.get("max_relay_episode", 0)
    args.models["policy_trainer"].sync_frequency = knobs.get("sync_frequency", 1)
    assert old_logprobs_stage(GRPOTrainer("policy_trainer"), PolicyInference("policy")) is stage


@pytest.mark.parametrize("algo, trainer_args, stage", [
    ("grpo", {}, False),
    ("rloo", {}, True),  # the KL in the reward: the driver reads old_logprobs before training
    ("rloo", {"kl_in_reward": False}, False),
    ("rloo", {"kl_coef": 0.0}, False),
    ("reinforce_pp", {}, True),
    ("reinforce_pp", {"kl_coef": 0.0}, False),
])
def test_a_kl_in_the_reward_keeps_the_old_logprob_stage_on_an_on_policy_step(monkeypatch, tmp_path, algo,
                                                                              trainer_args, stage):
    """The on-policy shortcut moves the old log-probs into the training pass, after the driver's
    step: a step that shapes rewards with them needs them from the stage, as PPO does."""
    from chatlearn.roles import PolicyInference, PolicyReference, RewardInference

    engine_cls, trainer_cls = {"grpo": ("GRPOEngine", "GRPOTrainer"), "rloo": ("RLOOEngine", "RLOOTrainer"),
                               "reinforce_pp": ("ReinforcePPEngine", "ReinforcePPTrainer")}[algo]
    for key in ("policy_load", "data_path"):
        monkeypatch.setenv(key, str(tmp_path))
    monkeypatch.setenv("num_training_epoch", "1")
    chatlearn.init(os.path.join(os.path.dirname(GRPO_YAML), f"{algo}.yaml"))
    args = chatlearn.get_args()
    args.models["policy_trainer"].args_dict.update(recompute_old_logprobs=True, **trainer_args)
    args.runtime.sample_per_episode = 16  # x n (8, or 1 for REINFORCE++) <= one global batch of 128
    args.runtime.train_global_batch_size = 128
    engine = getattr(chatlearn, engine_cls)(PolicyInference("policy"), PolicyReference("reference"),
                                            RewardInference("reward"), getattr(chatlearn, trainer_cls)("policy_trainer"))
    stages = {(node.model, node.method) for node in engine.environment.graph}
    assert (("policy_trainer", "forward_step") in stages) is stage
