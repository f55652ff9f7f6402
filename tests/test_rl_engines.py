"""PPO, GRPO, RLOO, REINFORCE++ and online DPO end to end on the real stack (Ray, vLLM, megatron-core),
a few episodes each.

Each run uses the tiny configs of examples/megatron/configs/tiny with an untrained
tiny model (learning is checked by the main job's slow test, test_main_job.py):
metrics must be finite, the policy's weights must reach vLLM every episode (checked
by checksums with validate_param_sync), checkpoints must be written, and the final
policy exported in Hugging Face format.
"""
from __future__ import annotations

import math
import os
import sys

import pytest

import chatlearn
from chatlearn.data.prompts import write_jsonl
from chatlearn.utils.tiny_assets import ensure_tiny_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The entry scripts and arithmetic.py are imported from examples/megatron (on sys.path: tests/conftest.py).
CONFIGS = os.path.join(ROOT, "examples", "megatron", "configs", "tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from arithmetic import make_arithmetic_examples

    from chatlearn.models.megatron.hf_convert import make_score_checkpoint

    root = tmp_path_factory.mktemp("rl")
    assets_root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(root / "assets")
    policy = str(ensure_tiny_assets(assets_root, seed=0, arch="llama").model_dir)
    reward = make_score_checkpoint(policy, str(root / "reward"), seed=1)
    examples = make_arithmetic_examples(64, seed=0, max_operand=9)
    return {"policy_load": policy, "reward_load": reward,
            "data_path": write_jsonl(str(root / "train.jsonl"), examples[:48]),
            "eval_data_path": write_jsonl(str(root / "eval.jsonl"), examples[48:]), "root": root}


def _run(monkeypatch, tiny, algo: str, main, **knobs):
    out = tiny["root"] / algo
    env = {"policy_load": tiny["policy_load"], "reward_load": tiny["reward_load"], "data_path": tiny["data_path"],
           "eval_data_path": tiny["eval_data_path"], "output_dir": str(out), "exp_name": algo,
           "num_episode": "2", "save_episode_interval": "1", "eval_episode_interval": "2",
           "validate_param_sync": "True", **knobs}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(sys, "argv", ["train", "-c", os.path.join(CONFIGS, f"{algo}.yaml")])
    history = main()
    return history, out  # output_dir ends with exp_name: the run directory itself (ChatLearn 1.x's rule)


def _check_run(history, run_dir, trainers: list[str], syncs: list[str]) -> None:
    """Two episodes, syncs every episode, checkpoints of each trainer, the policy trainer's final
    weights in Hugging Face format (trainers[0])."""
    assert len(history) == 2
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        for pair in syncs:
            assert metrics[f"sync/{pair}/count"] == 1.0  # every episode, checksums validated
    assert "eval/reward/mean" in history[1]
    episodes = sorted(os.listdir(run_dir / "checkpoints"))
    assert episodes == ["episode_000000", "episode_000001"]  # numbered from 0
    for trainer in trainers:
        assert os.listdir(run_dir / "checkpoints" / episodes[-1] / "models" / trainer)
    assert os.path.exists(run_dir / f"hf_{trainers[0]}" / "model.safetensors")


def test_ppo_rlhf_engine_runs_six_roles(ray_session, monkeypatch, tiny):
    from train_rlhf import main

    history, run_dir = _run(monkeypatch, tiny, "rlhf", main)
    _check_run(history, run_dir, ["ppo_policy", "ppo_value"], ["ppo_policy->policy", "ppo_value->value"])
    first = history[0]
    for key in ("reward/mean", "kl", "clipfrac", "approx_kl", "entropy", "value/explained_variance",
                "loss/policy", "loss/value", "kl_coef"):
        assert key in first, key
    # The first step of an episode trains on the weights vLLM sampled with (fp32 on CPU).
    assert first["consistency/logprob_diff_max"] < 1e-4


def test_grpo_engine_runs(ray_session, monkeypatch, tiny):
    from train_grpo import main

    history, run_dir = _run(monkeypatch, tiny, "grpo", main, sample_per_episode=8, generation_batch_size=8, policy_n=4)
    _check_run(history, run_dir, ["policy_trainer"], ["policy_trainer->policy"])
    assert history[0]["samples/environment"] == 32  # 8 prompts x n=4
    assert "kl" in history[0] and "reward/group_std" in history[0]


@pytest.mark.parametrize("algo, knobs, samples, keys", [
    # 8 prompts x n=4; the KL to the reference is in the driver's rewards, so the driver reports it
    ("rloo", {"policy_n": 4}, 32, ("kl", "advantages/abs_mean", "reward/group_std")),
    # the tiny config's n=1: the whitening over the training batch is the only baseline
    ("reinforce_pp", {}, 8, ("kl", "returns/mean")),
])
def test_critic_free_policy_gradient_engines_run(ray_session, monkeypatch, tiny, algo, knobs, samples, keys):
    import importlib

    main = importlib.import_module(f"train_{algo}").main
    history, run_dir = _run(monkeypatch, tiny, algo, main, sample_per_episode=8, generation_batch_size=8, **knobs)
    _check_run(history, run_dir, ["policy_trainer"], ["policy_trainer->policy"])
    assert history[0]["samples/environment"] == samples
    for key in ("reward/mean", "loss/policy", "clipfrac", "entropy", *keys):
        assert key in history[0], key
    # The policy is the reference until its first update (on CPU vLLM's and Megatron's fp32 log-probs
    # agree to ~1e-6 per token); after it, the driver's KL measures the policy's drift.
    assert abs(history[0]["kl"]) < 1e-4
    assert abs(history[1]["kl"]) > 1e-4


def test_rloo_needs_two_responses_per_prompt_before_any_worker_starts(monkeypatch, tiny):
    from chatlearn.roles import PolicyInference, PolicyReference, RewardInference, RLOOTrainer

    for key in ("policy_load", "data_path"):
        monkeypatch.setenv(key, tiny[key])
    monkeypatch.setenv("policy_n", "1")
    chatlearn.init(os.path.join(CONFIGS, "rloo.yaml"))
    with pytest.raises(ValueError, match=r"policy_inference_grpo\.yaml \(models\.policy\): n: RLOO .* needs n >= 2 "
                                         r"responses per prompt, got n=1"):
        chatlearn.RLOOEngine(PolicyInference("policy"), PolicyReference("reference"), RewardInference("reward"),
                             RLOOTrainer("policy_trainer"))


def test_online_dpo_engine_runs(ray_session, monkeypatch, tiny):
    from train_online_dpo import main

    # A random policy rarely gets arithmetic right; the reward model's scores rank every pair.
    history, run_dir = _run(monkeypatch, tiny, "online_dpo", main, sample_per_episode=8, generation_batch_size=8,
                            reward_fn_weight=0.0)
    _check_run(history, run_dir, ["policy_trainer"], ["policy_trainer->policy"])
    assert history[0]["pairs/kept_fraction"] == 1.0
    assert "dpo/accuracy" in history[0]


@pytest.mark.parametrize("algo, n, needs_dynamic", [
    ("grpo", 8, True), ("rloo", 8, True), ("reinforce_pp", 2, True),
    ("reinforce_pp", 1, False),  # one response per prompt: the fixed loader's count is right
])
def test_engines_with_n_responses_per_prompt_need_the_dynamic_loader(monkeypatch, tiny, algo, n, needs_dynamic):
    from chatlearn.roles import PolicyInference, PolicyReference, RewardInference

    engine, trainer = {"grpo": ("GRPOEngine", "GRPOTrainer"), "rloo": ("RLOOEngine", "RLOOTrainer"),
                       "reinforce_pp": ("ReinforcePPEngine", "ReinforcePPTrainer")}[algo]
    for key in ("policy_load", "data_path"):
        monkeypatch.setenv(key, tiny[key])
    monkeypatch.setenv("exp_name", "x")
    monkeypatch.setenv("policy_n", str(n))
    chatlearn.init(os.path.join(CONFIGS, f"{algo}.yaml"))
    chatlearn.get_args().runtime.stream_data_loader_type = "fixed"

    def build():
        return getattr(chatlearn, engine)(PolicyInference("policy"), PolicyReference("reference"),
                                          RewardInference("reward"), getattr(chatlearn, trainer)("policy_trainer"))

    if needs_dynamic:
        with pytest.raises(ValueError, match=f"runtime.stream_data_loader_type: {engine} needs 'dynamic'"):
            build()
    else:
        assert build().rollout_processor is not None


@pytest.mark.parametrize("algo", ["online_dpo", "grpo"])
def test_an_episode_with_nothing_to_train_on_is_skipped_and_the_run_goes_on(ray_session, monkeypatch, tiny, algo):
    """Every response scores alike: no online-DPO pair has a winner, every GRPO advantage is zero.
    Training is skipped (counted), and the run completes its episodes."""
    import importlib

    main = importlib.import_module({"online_dpo": "train_online_dpo", "grpo": "train_grpo"}[algo]).main
    history, _ = _run(monkeypatch, tiny, algo, main, sample_per_episode=8, generation_batch_size=8, policy_n=4,
                      reward_fn="tests.rewards:constant", reward_model_weight=0.0, exp_name=f"{algo}_skip")
    assert len(history) == 2
    for metrics in history:
        assert metrics["train/steps"] == 0
        if algo == "online_dpo":
            assert metrics["samples/train"] == 0 and metrics["pairs/kept_fraction"] == 0.0
        else:
            assert metrics["train/skipped_batches"] >= 1 and metrics["groups/solved_none_or_all"] == 1.0
