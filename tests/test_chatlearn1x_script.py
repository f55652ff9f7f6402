"""A ChatLearn 1.x entry script and its 1.x-style models run unchanged, as a user runs them:
``python tests/chatlearn1x_script/train_rlhf.py -c tests/chatlearn1x_script/configs/rlhf.yaml``
(real Ray, CPU). See tests/chatlearn1x_script/toy1x_models.py for what is 1.x-style about them.

Three PPO episodes through RLHFEngine with the models' own keys and targets (the driver's PPO
step stays off: no model asks for it), an evaluator subclass with 1.x's post_process, hooks
without arguments, a weightless value pair synced as a no-op with one warning, the trainer's
weights reaching the policy; then a second run resumes, and the trainer reloads what its 1.x
``save_checkpoint(iteration)`` wrote, because ``resume_training`` is True in its setup().
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("tests", "chatlearn1x_script", "train_rlhf.py")
CONFIG = os.path.join("tests", "chatlearn1x_script", "configs", "rlhf.yaml")
WARNING = "parameter sync ppo_value -> value: ppo_value and value hold no weights"


def run_script(out, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "output_dir": str(out), **{k: str(v) for k, v in env.items()}}
    run = subprocess.run([sys.executable, SCRIPT, "-c", CONFIG], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=480)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run


def records(out, model: str) -> list[dict]:
    return [json.loads(line) for line in (out / "records" / f"{model}.jsonl").read_text().splitlines()]


def events(out, model: str, event: str) -> list[dict]:
    return [r for r in records(out, model) if r["event"] == event]


def test_chatlearn1x_entry_script_runs_unchanged(tmp_path):
    out = tmp_path / "out"
    first = run_script(out)
    assert first.stderr.count(WARNING) == 1, first.stderr[-3000:]  # one warning at start

    lines = [json.loads(line) for line in (out / "chatlearn1x" / "metrics.jsonl").read_text().splitlines()]
    assert [m["episode"] for m in lines] == [-1, 0, 1, 2]  # a baseline evaluation, then three episodes
    for m in lines[1:]:
        assert m["samples/train"] == 8 and m["train/steps"] == 2
        # The weightless pair syncs as a no-op; the policy pair for real.
        assert m["sync/ppo_value->value/noop"] == 1 and "sync/ppo_value->value/count" not in m
        assert m["sync/ppo_policy->policy/count"] == 1
        # The models' own metrics (1.x's _metric_list), under their _metric_prefix.
        assert {"policy_inference/response_norm", "rewards_each/score_mean", "policy_loss"} <= set(m)
        # Pass-through: the driver's PPO step did not run (its metrics are absent).
        assert "returns/mean" not in m and "kl_coef" not in m
    # The evaluator (1.x's post_process override) ran before training and after every episode.
    assert all("eval/eval_reward_mean" in m for m in lines)
    assert sorted(os.listdir(out / "eval")) == ["0", "2", "4", "6"]  # eval_info["train_iteration"]
    assert len(json.loads((out / "eval" / "6" / "eval.json").read_text())["rewards"]) == 4

    # Hooks written the 1.x way were called: no-argument before/after_episode on every rank of
    # every model, eval_forward(data), save_checkpoint(iteration) with the training iteration.
    for model, ranks in (("policy", 2), ("reference", 1), ("ppo_policy", 2)):
        assert len(events(out, model, "before_episode")) == len(events(out, model, "after_episode")) == 3 * ranks
    assert len(events(out, "policy", "eval_forward")) == 4 * 2  # 4 evaluations x 2 batches
    assert len(events(out, "reward", "eval_forward")) == 4 * 2
    assert sorted(r["iteration"] for r in events(out, "ppo_policy", "save_checkpoint")) == [2, 2, 4, 4, 6, 6]
    assert sorted(os.listdir(out / "save_model" / "ppo_policy")) == [f"iter_{i}.{r}.pt" for i in (2, 4, 6)
                                                                     for r in (0, 1)]
    # 1.x helpers inside the workers.
    setups = {(r["replica"], r["rank"]): r for r in events(out, "ppo_policy", "setup")}
    assert {k: (r["dp_rank"], r["dp_size"], r["last_rank"]) for k, r in setups.items()} == \
        {(0, 0): (0, 2, False), (0, 1): (1, 2, True)}
    assert {r["num_replica"] for r in events(out, "policy", "setup")} == {2}
    assert events(out, "policy", "setup")[0]["params"] == ["bias", "weight"]
    assert [r["event"] for r in records(out, "reference")][:2] == ["init", "setup"]
    # add_padding_config: the reward's variable-length rows were padded with its value for training.
    assert any(r["pads"] == [-7] for r in events(out, "ppo_policy", "train_step"))
    # put/get: the reward sees the trainer's kl_coef from the second episode on.
    assert [r["kl_coef"] for r in events(out, "reward", "forward_step")] == [None] * 4 + [0.1] * 8

    # The trainer's weights reached the policy: each episode samples with the weights the
    # trainer had at the end of the previous one.
    gen = events(out, "policy", "forward_step")
    trained = [r["weight_sum"] for r in events(out, "ppo_policy", "train_step") if r["rank"] == 0]
    by_episode = [{round(r["weight_sum"], 5) for r in gen if 4 * e <= r["iteration"] < 4 * e + 4} for e in range(3)]
    assert by_episode[1] == {round(trained[1], 5)} and by_episode[2] == {round(trained[3], 5)}
    assert by_episode[0] != by_episode[1]

    # Resume: one more episode; the trainer reloads its own save in setup() (resume_training),
    # and the engine syncs that into the policy before sampling.
    second = run_script(out, num_episode=4)
    assert second.stderr.count(WARNING) == 1
    resumed = events(out, "ppo_policy", "resumed")
    assert {(r["rank"], r["iteration"]) for r in resumed} == {(0, 6), (1, 6)}
    assert resumed[0]["weight_sum"] == pytest.approx(trained[-1])
    episode4 = {round(r["weight_sum"], 5) for r in events(out, "policy", "forward_step") if r["iteration"] >= 12}
    assert episode4 == {round(trained[-1], 5)}
    lines = [json.loads(line) for line in (out / "chatlearn1x" / "metrics.jsonl").read_text().splitlines()]
    assert [m["episode"] for m in lines] == [-1, 0, 1, 2, 3]
