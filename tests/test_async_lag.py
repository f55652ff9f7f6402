"""Fixed-lag asynchronous training (``runtime.policy_lag``) on real Ray with the toy models:
episode t trains on the rollouts of episode t's prompts sampled by policy version
max(t - k, 0), no sample is lost or trained twice, and a killed run resumes to the same state."""
from __future__ import annotations

import json
import os

import pytest

import chatlearn
from chatlearn.data.prompts import PromptDataset
from chatlearn.runtime.worker import RemoteCallError
from test_runtime_engine import CONFIG, build_rlhf, records, train_steps
from toy_models import make_prompts

STEPS_PER_EPISODE = 2  # toy_rlhf.yaml: 16 samples, global batch 8


def _run(tmp_path, monkeypatch, out: str, lag: int, episodes: int = 4, prompts=None) -> list[dict]:
    monkeypatch.setenv("output_dir", str(tmp_path / out))
    monkeypatch.setenv("record_dir", str(tmp_path / out / "records"))
    monkeypatch.setenv("num_episode", str(episodes))
    monkeypatch.setenv("policy_lag", str(lag))
    chatlearn.init(CONFIG)
    chatlearn.get_args().runtime.rollout_dump_dir = str(tmp_path / out / "rollouts")
    engine = build_rlhf()
    engine.set_dataset(prompts or make_prompts(40))
    return engine.learn()


def _trained_prompts(run_dir, episode: int) -> list[int]:
    steps = train_steps(run_dir, rank=0)[STEPS_PER_EPISODE * episode:STEPS_PER_EPISODE * (episode + 1)]
    steps += train_steps(run_dir, rank=1)[STEPS_PER_EPISODE * episode:STEPS_PER_EPISODE * (episode + 1)]
    return sorted(i for s in steps for i in s["prompt_ids"])


@pytest.mark.parametrize("lag", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_each_episode_trains_on_rollouts_sampled_lag_versions_earlier(ray_session, tmp_path, monkeypatch, lag):
    prompts = make_prompts(64)  # 4 episodes x 16: no prompt repeats, so each names its episode
    history = _run(tmp_path, monkeypatch, "run", lag, prompts=prompts)
    run_dir = tmp_path / "run"  # its records/ (record_dir)
    order = PromptDataset(prompts, seed=7)  # the engine's prompt order (toy_rlhf.yaml's seed)
    trained = train_steps(run_dir, rank=0)
    generated = [r for r in records(run_dir, "policy") if "iteration" in r]
    initial = generated[0]["weight_sum"]
    # The policy's weights at version v: the trainer's after episode v-1's last step.
    version_weights = [initial] + [trained[STEPS_PER_EPISODE * (v + 1) - 1]["weight_sum"] for v in range(3)]
    for t in range(4):
        episode_prompts = sorted(p["prompt_id"] for p in order.next_episode(16))
        assert _trained_prompts(run_dir, t) == episode_prompts  # every sample once, in episode order
        sampled_by = [r["weight_sum"] for r in generated if set(r["prompt_ids"]) <= set(episode_prompts)]
        assert sampled_by == [pytest.approx(version_weights[max(t - lag, 0)])] * 4
        assert history[t]["async/policy_lag"] == min(t, lag)
        dump = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / f"episode_{t:06d}.jsonl").open()]
        assert len(dump) == 16 and {d["policy_version"] for d in dump} == {max(t - lag, 0)}
        assert 0.0 <= history[t]["async/generator_idle_fraction"] <= 1.0
    # The last k episodes launch no generation beyond num_episode.
    assert len(generated) == 4 * 4  # 4 episodes x 4 generation batches (rank 0 records all)


@pytest.mark.slow  # two toy runs, ~50 s; the lag-0 path is the one every other engine test runs
def test_lag_zero_is_the_synchronous_run(ray_session, tmp_path, monkeypatch):
    prompts = make_prompts(40)
    sync = _run(tmp_path, monkeypatch, "sync", 0, episodes=2, prompts=prompts)
    monkeypatch.delenv("policy_lag")
    chatlearn_default = _run(tmp_path, monkeypatch, "default", 0, episodes=2, prompts=prompts)
    for a, b in zip(sync, chatlearn_default):
        assert not any(k.startswith("async/") for k in a)
        for key in ("ppo_policy/loss", "ppo_value/loss", "samples/train"):
            assert a[key] == b[key]


@pytest.mark.slow  # three toy runs, ~90 s
def test_a_killed_lagged_run_resumes_with_its_in_flight_rollouts(ray_session, tmp_path, monkeypatch):
    prompts = make_prompts(40)
    monkeypatch.setenv("save_interval", "1")
    full = _run(tmp_path, monkeypatch, "full", 1, prompts=prompts)
    # Killed in episode 3 (its second train step raises): the checkpoint of episode 2 holds the
    # rollouts of episode 3, generated during episode 2 and not trained on yet.
    monkeypatch.setenv("trainer_fail_on_iteration", "5")
    with pytest.raises(RemoteCallError, match="toy failure"):
        _run(tmp_path, monkeypatch, "resumed", 1, prompts=prompts)
    monkeypatch.delenv("trainer_fail_on_iteration")
    resumed = _run(tmp_path, monkeypatch, "resumed", 1, prompts=prompts)
    assert len(resumed) == 4
    for a, b in zip(full, resumed):
        for key in ("ppo_policy/loss", "ppo_value/loss", "async/policy_lag"):
            assert a[key] == b[key], key
    # Episodes 3-4 train on the same prompts as the uninterrupted run; the kept rollouts were not
    # generated again (the resumed run's policy generated only episode 4's prompts after resuming).
    for t in (2, 3):
        full_steps = sorted(i for s in train_steps(tmp_path / "full")[2 * t:2 * t + 2]
                            for i in s["prompt_ids"])
        resumed_steps = sorted(i for s in train_steps(tmp_path / "resumed")[-2 * (4 - t):][:2]
                               for i in s["prompt_ids"])
        assert full_steps == resumed_steps


def test_recompute_old_logprobs_true_with_a_lag_is_refused_before_start(tmp_path, monkeypatch):
    from chatlearn.roles import GRPOTrainer, PolicyInference, PolicyReference, RewardInference

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for key in ("policy_load", "data_path"):
        monkeypatch.setenv(key, str(tmp_path))
    chatlearn.init(os.path.join(root, "examples", "megatron", "configs", "tiny", "grpo.yaml"))
    args = chatlearn.get_args()
    args.runtime.policy_lag = 1
    args.models["policy_trainer"].args_dict["recompute_old_logprobs"] = True
    with pytest.raises(ValueError, match="recompute_old_logprobs: true with runtime.policy_lag=1"):
        chatlearn.GRPOEngine(PolicyInference("policy"), PolicyReference("reference"), RewardInference("reward"),
                             GRPOTrainer("policy_trainer"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_main_job_still_learns_with_a_policy_lag(main_job_dir):
    """GRPO on the tiny main job, trained one policy version behind its sampler."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "examples/megatron/main_tiny.py", "--algo", "grpo", "--policy-lag", "1",
                          "--episodes", "100", "--output-dir", str(main_job_dir)],
                         cwd=root, capture_output=True, text=True, timeout=1700)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads((main_job_dir / "grpo_lag1" / "summary.json").read_text())
    metrics = [json.loads(line) for line in (main_job_dir / "grpo_lag1" / "metrics.jsonl").open()]
    assert {m["async/policy_lag"] for m in metrics if m.get("episode", -1) >= 1} == {1.0}
    assert summary["heldout_accuracy_last3"] > summary["heldout_accuracy_start"] + 0.05, summary
    assert summary["heldout_greedy_accuracy_end"] > summary["heldout_greedy_accuracy_start"], summary


# ---------------------------------------------------------------- policy_lag_mode: streaming
def _run_streaming(tmp_path, monkeypatch, out: str, lag: int, episodes: int = 4, prompts=None) -> list[dict]:
    monkeypatch.setenv("policy_lag_mode", "streaming")
    return _run(tmp_path, monkeypatch, out, lag, episodes, prompts)


def _trained_by_episode(run_dir, episodes: int) -> list[list[int]]:
    return [_trained_prompts(run_dir, t) for t in range(episodes)]


def test_streaming_trains_every_sample_once_and_none_more_than_lag_versions_old(ray_session, tmp_path,
                                                                                monkeypatch):
    lag, prompts = 1, make_prompts(64)
    history = _run_streaming(tmp_path, monkeypatch, "run", lag, prompts=prompts)
    run_dir = tmp_path / "run"
    trained = train_steps(run_dir, rank=0)
    # The policy's weights at version v: the trainer's after episode v-1's last step.
    generated = [r for r in records(run_dir, "policy") if "iteration" in r]
    version_weights = [generated[0]["weight_sum"]] + \
        [trained[STEPS_PER_EPISODE * (v + 1) - 1]["weight_sum"] for v in range(3)]
    sampled_by = {p: r["weight_sum"] for r in generated for p in r["prompt_ids"]}
    per_episode = _trained_by_episode(run_dir, 4)
    seen = [p for episode in per_episode for p in episode]
    assert len(seen) == len(set(seen)) == 64  # 4 x 16 prompts, none trained twice
    for t in range(4):
        assert len(per_episode[t]) == 16
        dump = [json.loads(line) for line in (run_dir / "rollouts" / f"episode_{t:06d}.jsonl").open()]
        versions = [d["policy_version"] for d in dump]
        assert len(dump) == 16 and all(max(t - lag, 0) <= v <= t for v in versions), versions
        # Each trained prompt was sampled by the weights of a version the lag allows.
        allowed = [pytest.approx(version_weights[v]) for v in range(max(t - lag, 0), t + 1)]
        assert all(sampled_by[p] in allowed for p in per_episode[t])
        staleness = {s: history[t][f"async/staleness/{s}"] for s in range(lag + 1)}
        assert sum(staleness.values()) == 16 and history[t]["async/dropped_stale_samples"] == 0
        assert staleness == {s: float(sum(t - v == s for v in versions)) for s in range(lag + 1)}
    # Generation ran ahead: episode 1 trained on prompts sampled before the first sync.
    assert history[1]["async/staleness/1"] > 0


def test_streaming_needs_a_lag_and_no_turn_taking(tmp_path, monkeypatch):
    from chatlearn.config.errors import ConfigError

    monkeypatch.setenv("policy_lag_mode", "streaming")
    monkeypatch.setenv("policy_lag", "0")
    monkeypatch.setenv("policy_free_memory", "True")
    with pytest.raises(ConfigError) as error:
        chatlearn.init(CONFIG)
    text = str(error.value)
    assert "runtime.policy_lag_mode" in text and "policy_lag >= 1" in text and "free_memory" in text


@pytest.mark.slow  # three toy runs, ~90 s
def test_a_killed_streaming_run_resumes_with_its_generated_batches(ray_session, tmp_path, monkeypatch):
    prompts = make_prompts(64)
    monkeypatch.setenv("save_interval", "1")
    monkeypatch.setenv("trainer_fail_on_iteration", "5")  # in episode 3 (two steps per episode)
    with pytest.raises(RemoteCallError, match="toy failure"):
        _run_streaming(tmp_path, monkeypatch, "resumed", 1, prompts=prompts)
    monkeypatch.delenv("trainer_fail_on_iteration")
    resumed = _run_streaming(tmp_path, monkeypatch, "resumed", 1, prompts=prompts)
    assert len(resumed) == 4
    # What the finished run trained on: each training iteration's last record (the steps of
    # episode 2 before the failure were run again after the resume): every prompt once.
    final: dict[tuple[int, int], list[int]] = {}
    for rank in (0, 1):
        for step in train_steps(tmp_path / "resumed", rank=rank):
            final[(rank, step["iteration"])] = step["prompt_ids"]
    assert sorted(it for _, it in final) == sorted(list(range(8)) * 2)
    trained = [p for ids in final.values() for p in ids]
    assert len(trained) == len(set(trained)) == 64
    for t in range(4):
        dump = [json.loads(line) for line in (tmp_path / "resumed" / "rollouts" / f"episode_{t:06d}.jsonl").open()]
        assert len(dump) == 16 and all(max(t - 1, 0) <= d["policy_version"] <= t for d in dump)
