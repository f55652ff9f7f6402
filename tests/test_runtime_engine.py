"""The runtime end to end on real Ray with six toy torch models (tests/configs/toy_rlhf.yaml)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import chatlearn
from chatlearn import Engine, Environment, Evaluator, RLHFEngine, Trainer
from chatlearn.data.prompts import PromptDataset
from chatlearn.data.relay import RelayBuffers
from chatlearn.runtime.calls import WorkerTimeoutError
from chatlearn.runtime.engine import FlowError
from chatlearn.runtime.worker import RemoteCallError
from chatlearn.utils.metrics import read_metrics
from toy_models import ToyPolicy, ToyReference, ToyReward, ToyTrainer, ToyValue, make_prompts

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "toy_rlhf.yaml")


def records(tmp_path, model: str) -> list[dict]:
    path = tmp_path / "records" / f"{model}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def build_rlhf(evaluator=None):
    policy = ToyPolicy("policy")
    reference = ToyReference("reference")
    reward = ToyReward("reward")
    value = ToyValue("value")
    ppo_policy = ToyTrainer("ppo_policy")
    ppo_value = ToyTrainer("ppo_value")
    return RLHFEngine(policy, reference, reward, value, ppo_policy, ppo_value, evaluator=evaluator,
                      compute_advantages=False)


def train_steps(tmp_path, model="ppo_policy", rank=0) -> list[dict]:
    return [r for r in records(tmp_path, model) if "iteration" in r and r["rank"] == rank]


def test_rlhf_three_episodes_with_replicas_colocation_and_sync(ray_session, toy_env):
    chatlearn.init(CONFIG)
    engine = build_rlhf()
    engine.set_dataset(make_prompts(40))
    history = engine.learn()

    assert len(history) == 3
    for m in history:
        assert m["samples/environment"] == 16 and m["samples/train"] == 16
        assert m["train/steps"] == 2  # 16 samples / global batch 8
        assert m["sync/ppo_policy->policy/count"] == 1 and m["sync/ppo_value->value/count"] == 1
        # Both trainers report "loss": each keeps its own, under its model name.
        assert "loss" not in m
        assert torch.isfinite(torch.tensor([m["ppo_policy/loss"], m["ppo_value/loss"]])).all()
    # Metrics file: one line per episode, with stage timings.
    lines = read_metrics(os.path.join(toy_env, "out", "toy", "metrics.jsonl"))
    assert [r["episode"] for r in lines] == [0, 1, 2]
    assert "time/policy.forward_step" in lines[0] and "time/ppo_policy.train_step" in lines[0]
    # ... and the same metrics as TensorBoard events beside it.
    tb_dir = os.path.join(toy_env, "out", "toy", "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb_dir))

    # Colocated models share device slots; the tensor-parallel-style reference
    # replica's two ranks all-reduced over gloo inside their group.
    plan = engine.placement.models
    assert plan["policy"].slots == plan["ppo_policy"].slots == plan["reference"].slots
    assert plan["value"].slots == plan["ppo_value"].slots == plan["reward"].slots
    ref = records(toy_env, "reference")
    assert {r["rank"] for r in ref} == {0, 1} and {r["group_size"] for r in ref} == {2.0}

    gen = [r for r in records(toy_env, "policy") if "iteration" in r]
    # Two policy replicas, four batches of 4 per episode, taken in turn.
    assert {r["replica"] for r in gen} == {0, 1}
    assert sorted(len(r["prompt_ids"]) for r in gen) == [4] * 12
    # After each sync the policy generates with the trainer's latest weights.
    trained = train_steps(toy_env)
    assert len(trained) == 6
    initial = gen[0]["weight_sum"]
    by_episode = [sorted({r["weight_sum"] for r in gen[4 * e:4 * e + 4]}) for e in range(3)]
    assert by_episode[0] == [pytest.approx(initial)]
    assert by_episode[1] == [pytest.approx(trained[1]["weight_sum"])]
    assert by_episode[2] == [pytest.approx(trained[3]["weight_sum"])]


def test_fixed_mode_trains_on_exact_samples_in_order(ray_session, toy_env):
    chatlearn.init(CONFIG)
    prompts = make_prompts(40)
    engine = build_rlhf()
    engine.set_dataset(prompts)
    engine.learn()

    expected = PromptDataset(prompts, seed=7)
    for episode in range(3):
        want = [p["prompt_id"] for p in expected.next_episode(16)]
        steps = [r for r in records(toy_env, "ppo_policy") if "iteration" in r][4 * episode:4 * episode + 4]
        # ppo_policy has 2 data-parallel ranks: each global batch of 8 is split 4 / 4.
        by_step = {}
        for r in steps:
            by_step.setdefault(r["iteration"], {})[r["rank"]] = r["prompt_ids"]
        got = [i for it in sorted(by_step) for rank in (0, 1) for i in by_step[it][rank]]
        assert got == want


def test_dynamic_mode_takes_every_sample(ray_session, toy_env, monkeypatch):
    monkeypatch.setenv("loader_type", "dynamic")
    monkeypatch.setenv("policy_n", "3")
    monkeypatch.setenv("num_episode", "1")
    chatlearn.init(CONFIG)
    engine = build_rlhf()
    engine.set_dataset(make_prompts(20))
    (metrics,) = engine.learn()
    assert metrics["samples/environment"] == 48 and metrics["samples/train"] == 48
    assert metrics["train/steps"] == 6
    seen = [i for r in records(toy_env, "ppo_value") if "iteration" in r for i in r["prompt_ids"]]
    episode_prompts = [p["prompt_id"] for p in PromptDataset(make_prompts(20), seed=7).next_episode(16)]
    # Every generated sample is trained on once, in arrival order (n=3 copies per prompt).
    assert seen == [i for i in episode_prompts for _ in range(3)]


def test_relay_buffers_with_custom_sample_fn(ray_session, toy_env, monkeypatch):
    monkeypatch.setenv("max_relay_episode", "-1")
    chatlearn.init(CONFIG)
    engine = build_rlhf()
    seen_episodes = []

    def newest_half_of_each(buffers):
        seen_episodes.append([b.episode_id for b in buffers])
        return [s for b in buffers for s in b.buffer[:8]]

    engine.set_relay_sample_fn(newest_half_of_each)
    engine.set_dataset(make_prompts(40))
    history = engine.learn()
    assert seen_episodes == [[0], [0, 1], [0, 1, 2]]
    assert [m["samples/train"] for m in history] == [8, 16, 24]
    assert [m["train/steps"] for m in history] == [1, 2, 3]
    # Samples of earlier episodes are the relay's choice, and the metrics say how many.
    assert [m["relay/samples_from_other_episodes"] for m in history] == [0, 8, 16]


def test_relay_default_sampler_trains_on_its_draw_in_order(ray_session, toy_env, monkeypatch):
    """Relay on, no relay_sample_fn: each episode trains on sample_per_episode samples drawn
    by the documented default (RelayBuffers.select) from the last two episodes, in pool order."""
    monkeypatch.setenv("max_relay_episode", "2")
    chatlearn.init(CONFIG)
    prompts = make_prompts(40)
    engine = build_rlhf()
    engine.set_dataset(prompts)
    history = engine.learn()
    assert [m["samples/train"] for m in history] == [16, 16, 16]

    expected_prompts = PromptDataset(prompts, seed=7)
    relay = RelayBuffers(max_relay_episode=2, relay_episode_offset=0, seed=7)
    trained = [r for r in records(toy_env, "ppo_policy") if "iteration" in r]
    for episode in range(3):
        current = [p["prompt_id"] for p in expected_prompts.next_episode(16)]
        relay.add(episode, [{"prompt_id": i} for i in current])
        want = [s["prompt_id"] for s in relay.select(episode, num_samples=16)]
        assert (want == current) == (episode == 0)  # later episodes mix in the previous one
        by_step = {}
        for r in trained[4 * episode:4 * episode + 4]:
            by_step.setdefault(r["iteration"], {})[r["rank"]] = r["prompt_ids"]
        got = [i for it in sorted(by_step) for rank in (0, 1) for i in by_step[it][rank]]
        assert got == want, episode


def test_evaluator_runs_every_interval(ray_session, toy_env, monkeypatch):
    monkeypatch.setenv("eval_interval", "2")
    monkeypatch.setenv("num_episode", "4")
    chatlearn.init(CONFIG)
    policy = ToyPolicy("policy")
    reward = ToyReward("reward")

    def eval_flow(batch):
        return reward.forward_step(policy.eval_forward(batch))

    evaluator = Evaluator(eval_flow).set_dataset(make_prompts(6, seed=1))
    evaluator.set_post_process_func(lambda results, episode: {
        "reward_mean": sum(float(r["reward"]) for r in results) / len(results), "n": len(results)})

    def env_flow(batch):
        return reward.forward_step(policy.forward_step(batch))

    ppo_policy = ToyTrainer("ppo_policy")

    def train_flow(batch):
        ppo_policy.train_step(batch)

    engine = Engine(Environment(env_flow), Trainer(train_flow), evaluator)
    engine.set_parameter_sync(ppo_policy, policy)
    engine.set_dataset(make_prompts(40))
    history = engine.learn()
    assert ["eval/reward_mean" in m for m in history] == [False, True, False, True]
    assert history[1]["eval/n"] == 6
    # Training pulls the policy towards response == x, so the evaluated reward improves.
    assert history[3]["eval/reward_mean"] > history[1]["eval/reward_mean"]
    # A baseline evaluation runs before the first episode, logged as episode -1.
    assert engine.initial_eval["eval/n"] == 6
    assert engine.initial_eval["eval/reward_mean"] < history[1]["eval/reward_mean"]


def test_resume_matches_uninterrupted_run(ray_session, tmp_path, monkeypatch):
    prompts = make_prompts(40)
    monkeypatch.setenv("save_interval", "1")

    def run(out: str, episodes: int):
        monkeypatch.setenv("output_dir", str(tmp_path / out))
        monkeypatch.setenv("record_dir", str(tmp_path / out / "records"))
        monkeypatch.setenv("num_episode", str(episodes))
        chatlearn.init(CONFIG)
        engine = build_rlhf()
        engine.set_dataset(prompts)
        return engine.learn()

    full = run("full", 4)
    # Crash in the middle of episode 3 (its first train step ran, the second raises):
    # episodes 1-2 are checkpointed, episode 3's partial work must be redone identically.
    monkeypatch.setenv("trainer_fail_on_iteration", "5")
    with pytest.raises(RemoteCallError, match="toy failure in ppo_policy at iteration 5"):
        run("resumed", 4)
    monkeypatch.delenv("trainer_fail_on_iteration")
    resumed = run("resumed", 4)

    assert len(resumed) == 4
    for a, b in zip(full, resumed):
        for key in ("ppo_policy/loss", "ppo_value/loss"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=0)
    # Only trainers are checkpointed; the policy is re-synced from ppo_policy on resume,
    # so it generated episodes 3-4 with the same weights as in the uninterrupted run.
    assert not os.path.exists(tmp_path / "full/toy/checkpoints/episode_000003/models/policy")

    def policy_weights(out: str) -> dict[int, float]:
        path = tmp_path / out / "records" / "policy.jsonl"
        return {r["iteration"]: r["weight_sum"] for r in map(json.loads, path.read_text().splitlines())}

    full_policy, resumed_policy = policy_weights("full"), policy_weights("resumed")
    later = [it for it in full_policy if it >= 8]  # episodes 3-4 (4 generation batches per episode)
    assert later and all(resumed_policy[it] == full_policy[it] for it in later)
    for model in ("ppo_policy", "ppo_value"):
        for rank_file in ("rank_000.pt",):
            a = torch.load(tmp_path / "full/toy/checkpoints/episode_000003/models" / model / rank_file,
                           weights_only=False)
            b = torch.load(tmp_path / "resumed/toy/checkpoints/episode_000003/models" / model / rank_file,
                           weights_only=False)
            for key in a["model"]:
                assert torch.equal(a["model"][key], b["model"][key]), (model, key)


def run_with_failing_reference(tmp_path, failure: str) -> RemoteCallError:
    """Run the toy RLHF config with the 2-rank reference's model args set to ``failure``;
    return the error the run stopped with."""
    (tmp_path / "fail.yaml").write_text(
        (open(CONFIG).read()
         .replace("model_config_file: toy_base.yaml\n    num_cpu: 2\n    tensor_model_parallel_size: 2",
                  "model_config_file: toy_fail.yaml\n    num_cpu: 2\n    tensor_model_parallel_size: 2")))
    for name in ("toy_base.yaml", "toy_policy.yaml", "toy_trainer.yaml"):
        (tmp_path / name).write_text(open(os.path.join(os.path.dirname(CONFIG), name)).read())
    (tmp_path / "toy_fail.yaml").write_text(failure)
    chatlearn.init(str(tmp_path / "fail.yaml"))
    engine = build_rlhf()
    engine.set_dataset(make_prompts(40))
    with pytest.raises(RemoteCallError) as info:
        engine.learn()
    return info.value


def test_actor_exception_names_model_replica_rank_and_cleans_up(ray_session, toy_env, tmp_path):
    err = run_with_failing_reference(tmp_path, "fail_on_iteration: 2\n")
    assert err.model == "reference" and err.replica == 0 and err.rank in (0, 1)
    assert "toy failure in reference at iteration 2" in str(err)
    assert "Traceback" in err.remote_traceback

    assert worker_processes() == []


def worker_processes(wait_s: float = 15.0) -> list:
    """chatlearn worker processes of this test session still alive (Ray titles them
    ray::ModelWorker). Only descendants of this process count (the local Ray's raylet
    starts the workers): other test runs on the same machine have workers of their own."""
    import time

    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        ours = psutil.Process().children(recursive=True)
        alive = []
        for p in ours:
            try:
                if any("ModelWorker" in part for part in p.cmdline()):
                    alive.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_one_failed_rank_is_reported_while_the_rest_of_its_replica_blocks(ray_session, toy_env, tmp_path,
                                                                           monkeypatch):
    """Rank 0 of the 2-rank reference replica raises; rank 1 (its output rank) then blocks in
    the all-reduce, and so does everything downstream. The run must stop with rank 0's error
    right away, not wait for runtime.actor_timeout_s and then blame a blocked call."""
    monkeypatch.setenv("actor_timeout", "120")  # without the watch, the run would end here with a time-out
    err = run_with_failing_reference(tmp_path, "fail_on_iteration: 2\nfail_on_rank: 0\n")
    assert (err.model, err.replica, err.rank) == ("reference", 0, 0)
    assert "toy failure in reference at iteration 2" in str(err)
    assert worker_processes() == []


def test_stuck_actor_is_reported_by_timeout(ray_session, toy_env, tmp_path, monkeypatch):
    monkeypatch.setenv("actor_timeout", "4")
    for name in ("toy_base.yaml", "toy_policy.yaml", "toy_trainer.yaml"):
        (tmp_path / name).write_text(open(os.path.join(os.path.dirname(CONFIG), name)).read())
    (tmp_path / "slow.yaml").write_text(open(CONFIG).read().replace(
        "  value:\n    model_config_file: toy_base.yaml", "  value:\n    model_config_file: toy_slow.yaml"))
    (tmp_path / "toy_slow.yaml").write_text("sleep_s: 30\n")
    chatlearn.init(str(tmp_path / "slow.yaml"))
    engine = build_rlhf()
    engine.set_dataset(make_prompts(40))
    with pytest.raises(WorkerTimeoutError, match="model 'value'"):
        engine.learn()


def test_flow_with_model_missing_from_config_is_rejected_before_start(toy_env):
    chatlearn.init(CONFIG)
    policy = ToyPolicy("policy")
    critic = ToyValue("critic")  # not under models:

    def env_flow(batch):
        return critic.forward_step(policy.forward_step(batch))

    trainer = ToyTrainer("ppo_policy")
    with pytest.raises(FlowError, match="'critic'.*not declared under models"):
        Engine(Environment(env_flow), Trainer(lambda b: trainer.train_step(b)))


def test_free_memory_offloads_idle_colocated_model(ray_session, toy_env, monkeypatch):
    monkeypatch.setenv("policy_free_memory", "True")
    monkeypatch.setenv("num_episode", "2")
    chatlearn.init(CONFIG)
    engine = build_rlhf()
    engine.set_dataset(make_prompts(40))
    engine.learn()
    events = [r["event"] for r in records(toy_env, "policy") if r["replica"] == 0 and "event" in r]
    # Offloaded for training, back for the sync into it, offloaded again for
    # the next episode's training.
    assert events[:2] == ["offload", "onload"]
    assert events.count("offload") == 2
    gen_iterations = [r for r in records(toy_env, "policy") if "iteration" in r]
    assert len(gen_iterations) == 8


class AlonePolicy(ToyPolicy):
    """A policy that must be set up on its own, as vLLM is."""
    sets_up_alone = True


def test_start_up_sets_up_alone_models_first_then_the_rest_together(ray_session, toy_env, monkeypatch):
    monkeypatch.setenv("num_episode", "2")
    (toy_env / "setup.yaml").write_text("includes:\n  - toy_base.yaml\nsetup_sleep_s: 1.5\n")
    chatlearn.init(CONFIG)
    for name in ("reference", "value"):  # slow set-ups: overlapping them shows they ran together
        chatlearn.get_args().models[name].model_config_file = str(toy_env / "setup.yaml")
    engine = RLHFEngine(AlonePolicy("policy"), ToyReference("reference"), ToyReward("reward"), ToyValue("value"),
                        ToyTrainer("ppo_policy"), ToyTrainer("ppo_value"), compute_advantages=False)
    engine.set_dataset(make_prompts(40))
    history = engine.learn()

    spans = {name: [json.loads(line) for line in (toy_env / "records" / f"{name}.setup.jsonl").read_text().splitlines()]
             for name in ("policy", "reference", "value", "ppo_policy", "ppo_value")}
    policy_done = max(r["ended"] for r in spans["policy"])
    others = [r for name, rs in spans.items() if name != "policy" for r in rs]
    assert all(r["began"] >= policy_done for r in others)  # the alone model first, by itself
    # reference and value (1.5 s each) were set up at the same time, not one after the other.
    ref, value = spans["reference"][0], spans["value"][0]
    assert ref["began"] < value["ended"] and value["began"] < ref["ended"]
    first, second = history
    rest = "setup." + "+".join(n for n in engine.models if n != "policy") + "_s"
    assert {"startup/ray_s", "startup/workers_s", "startup/setup.policy_s", f"startup/{rest}",
            "startup/total_s"} <= set(first)
    assert first[f"startup/{rest}"] >= 1.5
    assert first["startup/total_s"] >= first["startup/setup.policy_s"] + first[f"startup/{rest}"]
    assert not any(k.startswith("startup/") for k in second)
    for m in history:
        assert m["time/episode"] >= m["time/environment"] + m["time/train"] + m["time/sync"]


def test_train_batch_gives_every_data_parallel_rank_the_same_micro_batches():
    """Megatron's DP ranks pair their collectives: equal micro-batch counts and shapes; a short
    batch is padded with rows that weigh nothing, never trimmed."""
    from chatlearn.runtime.engine import TrainBatch

    samples = [{"x": torch.tensor([i])} for i in range(9)]  # dynamic mode's short last batch
    per_rank = TrainBatch(samples, micro_batch_size=2).per_dp_rank(2)
    real = [[[int(x) for x, v in zip(mb["x"].flatten(), mb["sample_valid"]) if v] for mb in rank]
            for rank in per_rank]
    assert real == [[[0, 1], [2, 3], [4]], [[5, 6], [7, 8], []]]
    assert {tuple(mb["x"].shape) for rank in per_rank for mb in rank} == {(2, 1)}
    (one,), (padding,) = TrainBatch(samples[:1], micro_batch_size=2).per_dp_rank(2)
    assert one["sample_valid"].tolist() == [1.0] and padding["sample_valid"].tolist() == [0.0]
