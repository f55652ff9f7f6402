"""One PPO episode on checkpoint shapes of test_hf_architectures.py, on the real stack.

Six roles (vLLM policy, Megatron reference, reward, value and the two
trainers), the shapes at a reduced hidden size and the tiny tokenizer's
vocabulary. Per shape: the metrics are finite, the trained policy reaches vLLM
(checksums validated), and the exported policy loads in transformers. The
policy trainer runs at TP2 for the Llama 3.1 shape and with LoRA for the tied
Qwen3 one.
"""
from __future__ import annotations

import math
import os
import sys

import pytest

from chatlearn.data.prompts import write_jsonl
from tests.test_hf_architectures import SHAPES, build_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "megatron", "configs", "tiny", "rlhf.yaml")
KNOBS = {"llama-3.1-8b": {"policy_tp": "2", "num_cpu_ppo_policy": "2"}, "qwen3-0.6b": {"enable_lora": "True"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from arithmetic import make_arithmetic_examples

    root = tmp_path_factory.mktemp("ppo_shapes")
    examples = make_arithmetic_examples(16, seed=0, max_operand=9)
    return {"root": root, "data_path": write_jsonl(str(root / "train.jsonl"), examples)}


# Three of the five shapes, for CI time: TP2 training on the Llama 3.1 shape (llama3 RoPE
# scaling), LoRA on the tied Qwen3 one (qk-norm), and Qwen2.5's biases. The other two
# (Llama 3.2's tied llama3 scaling, Qwen3-8B untied) are features these cover; their
# conversion, sync and generation run in test_hf_architectures.py.
PPO_SHAPES = ["llama-3.1-8b", "qwen3-0.6b", "qwen2.5-7b"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PPO_SHAPES)
def test_one_ppo_episode_per_shape(name, ray_session, monkeypatch, data):
    from transformers import AutoModelForCausalLM
    from train_rlhf import main

    from chatlearn.models.megatron.hf_convert import make_score_checkpoint

    assets_root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(data["root"] / "assets")
    policy = build_shape(assets_root, name)
    reward = make_score_checkpoint(policy, str(data["root"] / f"reward-{name}"), seed=1)
    out = data["root"] / name
    env = {"policy_load": policy, "reward_load": reward, "data_path": data["data_path"], "output_dir": str(out),
           "exp_name": name, "num_episode": "1", "sample_per_episode": "8", "generation_batch_size": "8",
           "train_micro_batch_size": "4", "train_global_batch_size": "8", "num_training_epoch": "1",
           "save_episode_interval": "1", "eval_episode_interval": "0", "validate_param_sync": "True",
           "max_new_tokens": "4", **KNOBS.get(name, {})}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["train", "-c", CONFIG])
    history = main()

    assert len(history) == 1
    metrics = history[0]
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["sync/ppo_policy->policy/count"] == 1.0  # the trained weights reached vLLM, validated
    for key in ("loss/policy", "loss/value", "kl", "reward/mean"):
        assert key in metrics, key
    exported = out / "hf_ppo_policy"
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model.config.model_type == SHAPES[name]["arch"]
