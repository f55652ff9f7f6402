"""ChatLearn 1.x's llama2 configs RUN here, unchanged: two episodes each on CPU.

``vllm_rlhf.yaml`` (PPO, six roles) with ``examples/megatron/train_rlhf.py`` and
``grpo_math_vllm.yaml`` (GRPO with a rule-based math reward next to a reward model)
with ``examples/megatron/train_grpo_math.py``, run as a user runs them: a subprocess
with the environment 1.x's run scripts export (``base_env.sh`` plus
``train_rlhf_llama.sh`` / ``train_grpo_math_llama.sh``), shrunk through the configs'
own variables to the tiny Llama of ``chatlearn.utils.tiny_assets`` (Hugging Face
checkpoints in ``*_load``), one CPU slot per ``num_gpu``, TP/PP 1-2, 16 responses per
episode. The configs are our copies of 1.x's (tests/data/configs/chatlearn1x/llama2/).

Checked: exit code 0; both episodes' metrics finite; the trainers' weights reach the
inference models every episode (``validate_param_sync=True``: checksums and a probe);
1.x's Megatron-LM keys take effect (``lr_warmup_iters`` shapes the logged learning
rate, ``hidden_dropout`` makes the training forward differ from the sampler's) or warn
once per model.

Slow (1.5-3 minutes each on 2 shared cores): ``bash scripts/test.sh -m slow -k chatlearn1x_runs``.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from chatlearn.data.prompts import write_jsonl
from chatlearn.utils.tiny_assets import ensure_tiny_assets, make_arithmetic_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "data", "configs", "chatlearn1x", "llama2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama (policy, reference, policy trainer), a reward/value model made from it, prompts."""
    from chatlearn.models.megatron.hf_convert import make_score_checkpoint

    root = tmp_path_factory.mktemp("cl1x")
    assets = ensure_tiny_assets(os.environ.get("CHATLEARN_TEST_ASSETS") or str(root / "assets"), seed=0)
    reward = make_score_checkpoint(str(assets.model_dir), str(root / "reward"), seed=1)
    data = write_jsonl(str(root / "train.jsonl"), make_arithmetic_examples(64, seed=0, max_operand=9))
    return {"model": str(assets.model_dir), "tokenizer": str(assets.tokenizer_dir), "reward": reward, "data": data,
            "root": root}


def base_env(ck: dict) -> dict[str, str]:
    """scripts/base_env.sh: one node of GPUS_PER_NODE=1 (num_gpu: one CPU process per model on a CPU
    run), the model sizes of the checkpoint (a Llama with 2 of 4 heads as kv groups)."""
    env = {"WORLD_SIZE": "1", "GPUS_PER_NODE": "1", "RANK": "0", "MASTER_ADDR": "localhost", "num_gpu": "1",
           "transformer_impl": "local", "use_legacy_models": "True", "group_query_attention": "True",
           "max_position_embedding": "256"}
    env.update({f"num_gpu_{m}": "1" for m in ("policy", "ref", "reward", "value", "ppo_policy", "ppo_value")})
    sizes = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256)
    for role in ("policy", "reward"):
        env.update({f"{role}_{k}": str(v) for k, v in sizes.items()})
    return env


def command_line(ck: dict, exp: str) -> dict[str, str]:
    """What the run scripts pass on the python command line, plus output and the configs' own knobs:
    two episodes, short sequences, every sync validated."""
    out = str(ck["root"] / exp)
    return {"policy_inference_load": ck["model"], "reward_load": ck["reward"], "reward_load_iteration": "",
            "tokenizer_model": os.path.join(ck["tokenizer"], "tokenizer.model"), "tokenizer_load": ck["tokenizer"],
            "data_path": ck["data"], "eval_data_path": "", "exp_name": exp, "output_dir": out,
            "data_checkpoint_path": f"{out}/data_checkpoint", "ENABLE_VLLM": "True",
            "num_episode": "2", "seq_length": "64", "max_new_tokens": "8", "validate_param_sync": "True"}


def rlhf_env(ck: dict) -> dict[str, str]:
    """scripts/train_rlhf_llama.sh (vllm backend), shrunk: the policy trainer on TP 2, the value
    trainer on PP 2 (two CPU slots each), the rest TP 1."""
    return {**base_env(ck), **command_line(ck, "vllm_rlhf"), "trainer_engine": "rlhf",
            "policy_tp": "1", "policy_pp": "1", "ppo_policy_tp": "2", "ppo_policy_pp": "1", "reward_tp": "1",
            "ppo_value_pp": "2", "num_gpu_ppo_policy": "2", "num_gpu_ppo_value": "2",
            "train_global_batch_size": "8", "generation_batch_size": "8", "ref_generation_batch_size": "8",
            "value_generation_batch_size": "8", "reward_generation_batch_size": "8", "train_micro_batch_size": "4",
            "max_num_batched_tokens": "4096", "gpu_memory_utilization": "0.5", "sample_per_episode": "16"}


def grpo_env(ck: dict) -> dict[str, str]:
    """scripts/train_grpo_math_llama.sh, shrunk: 4 responses to each of 4 prompts per episode."""
    return {**base_env(ck), **command_line(ck, "grpo_math_vllm"), "trainer_engine": "grpo",
            "train_to_compare_num_responses": "4", "num_inference_per_prompt": "4", "prompt_key": "prompt",
            "policy_tp": "1", "ppo_policy_tp": "1", "ppo_policy_pp": "1", "reward_tp": "1", "ppo_value_pp": "1",
            "sample_per_episode": "16", "train_global_batch_size": "8", "generation_batch_size": "8",
            "ref_generation_batch_size": "8", "train_micro_batch_size": "4"}


def run_1x(script: str, config: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[dict], float]:
    # Exactly the run script's variables: other lower-case variables a 1.x config may name are unset.
    clean = {k: v for k, v in os.environ.items() if not re.fullmatch(r"[a-z_][a-z0-9_]*", k)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "-c", os.path.join(CONFIGS, config)], cwd=ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=1500)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    # output_dir ends with exp_name: it is the run directory (1.x's rule)
    with open(os.path.join(env["output_dir"], "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    print(f"{config}: {seconds:.0f} s; " + "; ".join(
        ", ".join(f"{k}={v:.4g}" for k, v in m.items() if re.match(r"(reward|loss|kl|lr|.*lr$|entropy)", k))
        for m in metrics))
    return proc, metrics, seconds


def check_episodes(metrics: list[dict], syncs: list[str]) -> None:
    assert [m["episode"] for m in metrics] == [0, 1]
    for m in metrics:
        bad = {k: v for k, v in m.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
        assert not bad, bad
        for pair in syncs:  # validate_param_sync: checksums, then a probe through both models
            assert m[f"sync/{pair}/count"] == 1.0
            assert f"sync/{pair}/validate_checksum_s" in m
            assert m[f"sync/{pair}/validate_probe_max_gap"] < 1e-4


def check_1x_keys(stderr: str, models: list[str]) -> None:
    """Every model reviews its 1.x keys once: one record per model, from its first rank."""
    for name in models:
        assert len(re.findall(rf"model '{name}': \d+ ChatLearn 1.x keys have no effect here", stderr)) == 1, name
    assert re.search(r"base\.yaml: build_path: a Megatron-LM key that has no effect here", stderr)
    assert re.search(r"base\.yaml: bf16: True: has no effect on a CPU run", stderr)
    assert len(re.findall(r"vllm_policy_inference\.yaml: swap_space: a ChatLearn 1.x vLLM key", stderr)) == 1
    assert re.search(r"vllm_policy_inference\.yaml: block_size: 16 is 32 on CPU", stderr)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_1x_vllm_rlhf_config_runs_two_episodes(checkpoints):
    proc, metrics, _ = run_1x("examples/megatron/train_rlhf.py", "vllm_rlhf.yaml", rlhf_env(checkpoints))
    check_episodes(metrics, ["ppo_policy->policy", "ppo_value->value"])
    for m in metrics:
        for key in ("reward/mean", "kl", "loss/policy", "loss/value", "value/explained_variance", "entropy"):
            assert key in m, key
        assert m["samples/environment"] == 16 and m["train/steps"] == 2
    # ppo_policy.yaml: lr 2.4e-7 with lr_warmup_iters 50 -> the first two steps log 0 and lr/50: mean lr/100
    # (without the mapping: no warm-up, and a decay to min_lr after one step)
    assert metrics[0]["ppo_policy/lr"] == pytest.approx(2.4e-7 / 100)
    assert metrics[1]["ppo_policy/lr"] == pytest.approx(2.4e-7 * 5 / 100)
    assert metrics[0]["ppo_value/lr"] == pytest.approx(5e-6 / 100)  # ppo_value.yaml: value_lr 5e-6
    # hidden/attention dropout 0.1 (ppo_policy.yaml) in the training forward: the trainer's log-probs
    # differ from the sampler's (fp32 on CPU: < 1e-6 without dropout)
    assert metrics[0]["consistency/logprob_diff_max"] > 1e-3
    check_1x_keys(proc.stderr, ["policy", "reference", "reward", "value", "ppo_policy", "ppo_value"])
    assert os.path.exists(os.path.join(checkpoints["root"], "vllm_rlhf", "hf_ppo_policy", "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_1x_grpo_math_vllm_config_runs_two_episodes(checkpoints):
    proc, metrics, _ = run_1x("examples/megatron/train_grpo_math.py", "grpo_math_vllm.yaml", grpo_env(checkpoints))
    check_episodes(metrics, ["ppo_policy->policy"])
    for m in metrics:
        for key in ("reward/mean", "reward/group_std", "kl", "loss/policy", "entropy"):
            assert key in m, key
        # 1.x: sample_per_episode counts responses: 4 prompts x num_inference_per_prompt 4
        assert m["samples/environment"] == 16 and m["train/steps"] == 2
    assert "each episode samples 4 responses to each of 4 prompts" in proc.stderr
    check_1x_keys(proc.stderr, ["policy", "reference", "reward", "ppo_policy"])
    # the driver's 1.x example keys: once each, in the driver
    assert proc.stderr.count("base.yaml: ngram_coef: 1: a ChatLearn 1.x example key that has no effect") == 1
