"""Exact resume on the real stack: a PPO run killed with SIGKILL anywhere and started again logs,
episode for episode, what a run never interrupted logs, and samples the very same responses.

Each run is examples/megatron/train_rlhf.py on the tiny configs (Ray, vLLM, megatron-core) in
a subprocess; tests/killable_run.py kills its driver at a chosen point of a chosen episode.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from chatlearn.data.prompts import write_jsonl
from chatlearn.utils.metrics import read_metrics
from chatlearn.utils.tiny_assets import ensure_tiny_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "megatron")
CONFIG = os.path.join(EXAMPLES, "configs", "tiny", "rlhf.yaml")
EPISODES = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from arithmetic import make_arithmetic_examples  # examples/megatron (tests/conftest.py)

    from chatlearn.models.megatron.hf_convert import make_score_checkpoint

    root = tmp_path_factory.mktemp("resume")
    assets_root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(root / "assets")
    policy = str(ensure_tiny_assets(assets_root, seed=0, arch="llama").model_dir)
    examples = make_arithmetic_examples(64, seed=0, max_operand=9)
    return {"policy_load": policy, "reward_load": make_score_checkpoint(policy, str(root / "reward"), seed=1),
            "data_path": write_jsonl(str(root / "train.jsonl"), examples[:48]),
            "eval_data_path": write_jsonl(str(root / "eval.jsonl"), examples[48:]), "root": root}


def run(tiny, name: str, kill: str | None = None, **knobs) -> subprocess.CompletedProcess:
    out = tiny["root"] / name
    env = {**os.environ, "policy_load": tiny["policy_load"], "reward_load": tiny["reward_load"],
           "data_path": tiny["data_path"], "eval_data_path": tiny["eval_data_path"], "output_dir": str(out),
           "exp_name": "ppo", "num_episode": str(EPISODES), "sample_per_episode": "16",
           "generation_batch_size": "8", "train_micro_batch_size": "4", "train_global_batch_size": "8",
           "save_episode_interval": "1", "eval_episode_interval": "2", "eval_n": "2",
           "policy_lr_warmup_steps": "0", "rollout_dump_dir": str(out / "rollouts")}
    env.update({k: str(v) for k, v in knobs.items()})
    env.pop("CHATLEARN_TEST_KILL", None)
    if kill:
        env["CHATLEARN_TEST_KILL"] = kill
    cmd = [sys.executable, os.path.join(ROOT, "tests", "killable_run.py"), os.path.join(EXAMPLES, "train_rlhf.py"),
           "-c", CONFIG]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if kill:
        assert done.returncode == -9, f"expected a SIGKILL at {kill}, got {done.returncode}:\n{done.stderr[-3000:]}"
    else:
        assert done.returncode == 0, done.stderr[-5000:]
    return done


def comparable(run_dir) -> list[dict]:
    """Every logged metric but timings (and the sync's own timings and rates, the driver's memory, start-up)."""
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "sync/", "driver/", "startup/"))} for r in records]


def rollouts(out) -> dict[str, list[dict]]:
    folder = out / "rollouts"
    return {name: [json.loads(line) for line in open(folder / name)] for name in sorted(os.listdir(folder))}


def assert_same_run(tiny, name: str) -> None:
    reference, resumed = tiny["root"] / "uninterrupted", tiny["root"] / name
    want, got = comparable(reference / "ppo"), comparable(resumed / "ppo")
    assert [r["episode"] for r in got] == [-1] + list(range(EPISODES))  # each episode logged once
    for a, b in zip(want, got):
        assert a == b, f"episode {a['episode']}: " + ", ".join(
            f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    assert rollouts(resumed) == rollouts(reference)  # the same responses, log-probs and rewards


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    run(tiny, "uninterrupted")
    return tiny["root"] / "uninterrupted" / "ppo"


def test_rollout_dump_records_every_rollout(uninterrupted):
    """runtime.rollout_dump_dir: one line per response, with what a user audits a run by."""
    dumps = rollouts(uninterrupted.parent)
    assert sorted(dumps) == [f"episode_{e:06d}.jsonl" for e in range(EPISODES)]
    rewards = {r["episode"]: r["reward/mean"] for r in comparable(uninterrupted) if r["episode"] >= 0}
    for episode in range(EPISODES):
        records = dumps[f"episode_{episode:06d}.jsonl"]
        assert len(records) == 16 and [r["index"] for r in records] == list(range(16))
        for r in records:
            assert r["episode"] == episode and r["policy_version"] == episode  # one sync per episode
            assert isinstance(r["prompt"], str) and "=" in r["prompt"] and isinstance(r["response"], str)
            assert len(r["response_ids"]) == len(r["logprobs"]) == len(r["advantage"]) > 0
            assert all(lp <= 0 for lp in r["logprobs"]) and r["prompt_ids"][0] == 1  # BOS
        assert sum(r["reward"] for r in records) / 16 == pytest.approx(rewards[episode], rel=1e-6)


def test_a_damaged_newest_checkpoint_is_reported_and_skipped(tiny, uninterrupted):
    """Truncating a file of the newest checkpoint: the start names it and resumes from the one before."""
    copy = tiny["root"] / "damaged"
    shutil.copytree(tiny["root"] / "uninterrupted", copy)
    newest = copy / "ppo" / "checkpoints" / f"episode_{EPISODES - 1:06d}"
    data_state = newest / "data_state.pt"
    data_state.write_bytes(data_state.read_bytes()[:100])
    done = run(tiny, "damaged")
    assert f"{data_state} has 100 bytes" in done.stderr
    assert "resumed from" in done.stderr and f"episode_{EPISODES - 2:06d}" in done.stderr
    assert_same_run(tiny, "damaged")  # the last episode was run again, identically
    assert any(p.startswith("superseded-") for p in os.listdir(copy / "ppo" / "checkpoints"))


@pytest.mark.slow
def test_killed_at_every_point_of_an_episode_resumes_exactly(tiny, uninterrupted):
    """One run killed six times, at every stage of an episode, restarted after each kill."""
    checkpoints = tiny["root"] / "killed_everywhere" / "ppo" / "checkpoints"
    for kill in ("0:environment", "1:rollouts", "1:sync", "2:after_sync", "2:checkpoint", "3:train"):
        run(tiny, "killed_everywhere", kill=kill)
    # Killed while training episode 3: episodes 0-2 are checkpointed (the half-written checkpoint
    # of episode 2 never counted: the restart ran episode 2 again and saved it whole).
    assert sorted(p for p in os.listdir(checkpoints) if p.startswith("episode_")) == \
        [f"episode_{e:06d}" for e in range(3)]
    run(tiny, "killed_everywhere")
    assert_same_run(tiny, "killed_everywhere")
