"""Megatron -> vLLM parameter sync through the real Ray engine (DistModel +
StateDictSynchronizer; nothing hand-wired).

A trainable Megatron policy (TP/PP layouts below) trains on the rollouts of a
vLLM policy with two replicas; after every step its weights are synced, in
1 MB buckets (``runtime.coalesced_buffer_mb``) through /dev/shm, into both
replicas at once, and validated by checksums (``validate_param_sync``).

Before each step the trainer exports its weights (``save_hf_checkpoint``) and
checks the rollout it was given, which vLLM generated with the weights of the
previous sync:

* vLLM's greedy responses equal transformers ``generate(do_sample=False)`` on
  the exported weights, token for token;
* vLLM's ``old_logprobs`` equal transformers' and Megatron's own logprobs
  within 1e-4;
* they are far from the logprobs of the weights before the last step (so the
  engine did not decode with stale weights or stale prefix-cache KV: half of
  the prompts share a preamble longer than one 128-token KV block).

The third sync of the default run corrupts one element of one parameter on
the way; validation must stop the run naming it.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

import chatlearn
from chatlearn import Engine, Environment, Trainer
from chatlearn.models.megatron.module import MegatronModule
from chatlearn.models.vllm_module import VLLMModule
from chatlearn.synchronizer import vllm_sync
from chatlearn.synchronizer.base import ParamSyncError
from chatlearn.utils.tiny_assets import PAD_ID, ensure_tiny_assets, make_arithmetic_examples

MAX_NEW = 8
CPU_KV_BLOCK = 128
CORRUPTED = "model.layers.1.self_attn.k_proj.weight"  # inside vLLM's fused qkv_proj
# 4 layers with a wider MLP: ~4.6 MB of float32, so 1 MB buckets give several.
MODEL = dict(arch="qwen2", layers=4, ffn=512)


class CheckedMegatronPolicy(MegatronModule):
    """Trains with the default NLL loss on the sampled responses; checks each
    rollout first (output rank) and can corrupt one sync on purpose."""

    def named_parameters_for_sync(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        from megatron.core import parallel_state as ps

        state = super().named_parameters_for_sync(device)
        with open(os.path.join(self.model_args["check_dir"], "exports.jsonl"), "a") as f:
            f.write(json.dumps({"dp_rank": ps.get_data_parallel_rank()}) + "\n")
        self._syncs = getattr(self, "_syncs", 0) + 1
        if self._syncs == int(self.model_args.get("corrupt_on_sync", 0)):
            state = dict(state)
            state[CORRUPTED] = state[CORRUPTED].clone()
            state[CORRUPTED][3, 5] += 0.5
        return state

    def parameter_checksums(self) -> dict[str, tuple[float, float]]:
        # What the trainer really holds (not what a corrupted sync sent).
        return vllm_sync.checksums(super().named_parameters_for_sync())

    def offload(self) -> None:
        super().offload()
        # Counted only when the storages really went (CHATLEARN_OFFLOAD_ON_CPU on CPU).
        if self._host.offloaded:
            self._offloads = getattr(self, "_offloads", 0) + 1

    def train_step(self, data_list: list[dict], iteration: int):
        (micro,) = data_list
        check_dir = self.model_args["check_dir"]
        export = os.path.join(check_dir, f"export-{iteration}")
        self.save_hf_checkpoint(export)  # collective: the weights vLLM should hold now
        own = self.forward_step({"input_ids": micro["input_ids"]}, iteration)  # collective over PP
        if self.is_output_rank():
            previous = os.path.join(check_dir, f"export-{iteration - 1}") if iteration else None
            record = check_rollout(micro, export, previous, own["logprobs"])
            record["offloads"] = getattr(self, "_offloads", 0)
            with open(os.path.join(check_dir, "checks.jsonl"), "a") as f:
                f.write(json.dumps({"iteration": iteration, **record}) + "\n")
        return super().train_step(data_list, iteration)


def _hf_logprobs(model, micro: dict) -> torch.Tensor:
    """log p(token t | tokens < t) at every position t (position 0: 0), like old_logprobs."""
    ids, attn = micro["input_ids"], micro["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def check_rollout(micro: dict, export: str, previous: str | None, megatron_logprobs: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    mask = micro["loss_mask"].bool()
    old = micro["old_logprobs"]
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    mismatches, long_prompts, long_mismatches = 0, 0, 0
    for prompt, response in zip(micro["prompt_ids"], micro["response_ids"]):
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, pad_token_id=PAD_ID)
        wrong = int(out[0, len(prompt):].tolist() != list(response))
        mismatches += wrong
        if len(prompt) > CPU_KV_BLOCK:
            long_prompts += 1
            long_mismatches += wrong
    record = {
        "samples": len(micro["prompt_ids"]),
        "greedy_mismatches": mismatches,
        "long_prompts": long_prompts,
        "long_prompt_mismatches": long_mismatches,
        "logprob_max_diff": float((_hf_logprobs(model, micro) - old)[mask].abs().max()),
        "megatron_logprob_max_diff": float((megatron_logprobs[:, :old.shape[1]] - old)[mask].abs().max()),
    }
    if previous is not None:
        before = AutoModelForCausalLM.from_pretrained(previous, dtype=torch.float32).eval()
        record["stale_logprob_max_diff"] = float((_hf_logprobs(before, micro) - old)[mask].abs().max())
    return record


def make_prompts(model_dir: str, n: int = 8) -> list[dict]:
    """Arithmetic prompts; half of them after one shared preamble longer than a KV block."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    preamble = " ".join(ex["prompt"] for ex in make_arithmetic_examples(30, seed=11))
    assert CPU_KV_BLOCK + 8 < len(tok(preamble).input_ids) < 256 - 2 * MAX_NEW - 16
    prompts = []
    for i, ex in enumerate(make_arithmetic_examples(n, seed=3)):
        text = f"{preamble}\n{ex['prompt']}" if i % 2 else ex["prompt"]
        prompts.append({"prompt": text, "answer": ex["answer"]})
    return prompts


def write_config(tmp_path, model_dir: str, tp: int, pp: int, vllm_tp: int, vllm_replicas: int,
                 num_episode: int, corrupt_on_sync: int = 0, free_memory: bool = False,
                 transport: str = "auto", dp: int = 1) -> str:
    check_dir = tmp_path / "checks"
    check_dir.mkdir()
    config = {
        # free_memory: the trainer's offload runs on CPU too (it frees nothing there, but every
        # weight and gradient storage makes the round trip between the phases).
        "runtime_env": {"platform": "local", "env_vars": {"CHATLEARN_OFFLOAD_ON_CPU": "1"} if free_memory else {}},
        "models": {
            "policy": {"num_cpu": vllm_tp * vllm_replicas, "tensor_model_parallel_size": vllm_tp,
                       "free_memory": free_memory, "args_dict": {
                "load": model_dir, "max_model_len": 256, "kv_cache_memory_bytes": 32 * 2**20,
                "temperature": 0.0, "new_token_limit": True, "max_new_tokens": MAX_NEW}},
            "ppo_policy": {"num_cpu": tp * pp * dp, "trainable": True, "tensor_model_parallel_size": tp,
                           "free_memory": free_memory,
                           "pipeline_model_parallel_size": pp, "args_dict": {
                               "load": model_dir, "optimizer": "sgd", "lr": 0.05, "clip_grad": 0.0,
                               "pad_token_id": PAD_ID, "check_dir": str(check_dir),
                               "corrupt_on_sync": corrupt_on_sync}},
        },
        "runtime": {
            "num_episode": num_episode, "sample_per_episode": 8, "generation_batch_size": 8 // vllm_replicas,
            "train_micro_batch_size": 8 // dp, "train_global_batch_size": 8, "validate_param_sync": True,
            "coalesced_buffer_mb": 1, "param_sync_transport": transport, "output_dir": str(tmp_path / "out"), "exp_name": "param_sync",
            "actor_timeout_s": 400, "seed": 1,
        },
    }
    path = tmp_path / "param_sync.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_engine(config: str, model_dir: str):
    chatlearn.init(config)
    policy, trainer = VLLMModule("policy"), CheckedMegatronPolicy("ppo_policy")

    def env_flow(batch):
        return policy.forward_step(batch)

    def trainer_flow(batch):
        trainer.train_step(batch)

    engine = Engine(Environment(env_flow), Trainer(trainer_flow))
    engine.set_parameter_sync(trainer, policy)
    engine.set_dataset(make_prompts(model_dir))
    return engine


def read_checks(config: str) -> list[dict]:
    check_dir = yaml.safe_load(open(config))["models"]["ppo_policy"]["args_dict"]["check_dir"]
    with open(os.path.join(check_dir, "checks.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_rollouts_match_trainer(checks: list[dict], episodes: int) -> None:
    assert [c["iteration"] for c in checks] == list(range(episodes))
    for c in checks:
        where = f"episode {c['iteration']}: {c}"
        assert c["samples"] == 8, where
        assert c["greedy_mismatches"] == 0, where  # covers both replicas' samples
        assert c["logprob_max_diff"] < 1e-4, where
        assert c["megatron_logprob_max_diff"] < 1e-4, where
        assert c["long_prompts"] >= 1, where
    for c in checks[1:]:
        # The weights moved far more than the tolerance since the last rollout:
        # matching them means vLLM really decoded with the synced weights.
        assert c["stale_logprob_max_diff"] > 1e-2, c


def assert_bucketed(metrics: dict, replicas: int, transport: str = "shm") -> None:
    key = "sync/ppo_policy->policy/"
    assert metrics[key + "count"] == 1
    assert metrics[key + "bytes"] > 4e6  # the tiny model: ~4.07 MB of float32
    assert metrics[key + "num_buckets"] >= 4
    assert metrics[key + "max_bucket_bytes"] <= 2**20  # no message holds the whole model
    assert metrics[key + f"transport_{transport}"] == 1  # auto on one node: /dev/shm
    assert metrics[key + "replicas"] == replicas


@pytest.fixture(scope="module")
def assets_root(tmp_path_factory):
    return os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def model_dir(assets_root):
    return str(ensure_tiny_assets(assets_root, seed=2, **MODEL).model_dir)


@pytest.fixture(scope="module")
def tied_model_dir(assets_root):
    # Tied embeddings: Megatron exports no lm_head.weight, vLLM shares one parameter.
    return str(ensure_tiny_assets(assets_root, seed=2, tie_embeddings=True, **MODEL).model_dir)


def test_megatron_tp2pp2_syncs_into_two_vllm_replicas(ray_session, tmp_path, model_dir):
    """The default-suite run: TP2xPP2 trainer, two vLLM TP1 replicas, three syncs, the third corrupted."""
    config = write_config(tmp_path, model_dir, tp=2, pp=2, vllm_tp=1, vllm_replicas=2, num_episode=3,
                          corrupt_on_sync=3)
    engine = run_engine(config, model_dir)
    with pytest.raises(ParamSyncError, match=rf"parameter {CORRUPTED.replace('.', '[.]')} differs on replica 0"):
        engine.learn()
    assert len(engine.history) == 2  # two good syncs in a row, then the corrupted one stopped the run
    for metrics in engine.history:
        assert_bucketed(metrics, replicas=2)
    assert_rollouts_match_trainer(read_checks(config), episodes=3)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,tied", [(2, 1, False), (2, 2, True)], ids=["tp2", "tp2pp2-tied"])
def test_megatron_layouts_sync_into_two_vllm_replicas(ray_session, tmp_path, request, tp, pp, tied):
    model_dir = request.getfixturevalue("tied_model_dir" if tied else "model_dir")
    config = write_config(tmp_path, model_dir, tp=tp, pp=pp, vllm_tp=1, vllm_replicas=2, num_episode=3)
    history = run_engine(config, model_dir).learn()
    assert len(history) == 3
    for metrics in history:
        assert_bucketed(metrics, replicas=2)
    assert_rollouts_match_trainer(read_checks(config), episodes=3)


@pytest.mark.slow
def test_megatron_offloaded_between_phases_still_syncs_exactly(ray_session, tmp_path, model_dir):
    """free_memory on both models: the trainer's weights and grad buffer leave and come back
    around every rollout (and vLLM's offload is a no-op on CPU); every check still holds."""
    config = write_config(tmp_path, model_dir, tp=2, pp=1, vllm_tp=1, vllm_replicas=2, num_episode=3,
                          free_memory=True)
    history = run_engine(config, model_dir).learn()
    assert len(history) == 3
    checks = read_checks(config)
    assert_rollouts_match_trainer(checks, episodes=3)
    # Offloaded for each episode's rollout, before the train step that wrote the check.
    assert [c["offloads"] for c in checks] == [1, 2, 3]


@pytest.mark.slow
def test_megatron_tp2_syncs_into_vllm_tp2(ray_session, tmp_path, model_dir):
    """vLLM's own tensor parallelism (worker processes, VLLM_CPU_OMP_THREADS_BIND):
    one actor holds the replica; the weights reach both vLLM ranks through
    /dev/shm and the worker extension; checksums are merged over the ranks."""
    config = write_config(tmp_path, model_dir, tp=2, pp=1, vllm_tp=2, vllm_replicas=1, num_episode=3,
                          corrupt_on_sync=3)
    engine = run_engine(config, model_dir)
    with pytest.raises(ParamSyncError, match=rf"parameter {CORRUPTED.replace('.', '[.]')} differs on replica 0"):
        engine.learn()
    assert len(engine.history) == 2
    for metrics in engine.history:
        assert_bucketed(metrics, replicas=1)
    assert_rollouts_match_trainer(read_checks(config), episodes=3)


@pytest.mark.slow
def test_collective_transport_broadcasts_into_vllm_tp2(ray_session, tmp_path, model_dir):
    """runtime.param_sync_transport: collective: a gloo group of the trainer's writer rank and
    the two worker processes of a vLLM TP2 engine (tests/test_vllm_server.py runs it into a
    server's worker and plain actors; test_param_sync_collective.py into two receivers)."""
    replicas = 1
    config = write_config(tmp_path, model_dir, tp=2, pp=1, vllm_tp=2, vllm_replicas=replicas,
                          num_episode=3, corrupt_on_sync=3, transport="collective")
    engine = run_engine(config, model_dir)
    with pytest.raises(ParamSyncError, match=rf"parameter {CORRUPTED.replace('.', '[.]')} differs on replica 0"):
        engine.learn()
    assert len(engine.history) == 2
    for metrics in engine.history:
        assert_bucketed(metrics, replicas=replicas, transport="collective")
        assert metrics["sync/ppo_policy->policy/send_s"] > 0
    assert_rollouts_match_trainer(read_checks(config), episodes=3)


@pytest.mark.slow
def test_only_the_writing_data_parallel_group_exports(ray_session, tmp_path, model_dir):
    """A DP2 trainer: the rank of the group that writes the buckets exports, the other DP rank
    does no gather at all; every sync still validates (checksums and probe)."""
    config = write_config(tmp_path, model_dir, tp=1, pp=1, vllm_tp=1, vllm_replicas=1, num_episode=2, dp=2)
    history = run_engine(config, model_dir).learn()
    assert len(history) == 2 and all(m["sync/ppo_policy->policy/count"] == 1 for m in history)
    check_dir = yaml.safe_load(open(config))["models"]["ppo_policy"]["args_dict"]["check_dir"]
    with open(os.path.join(check_dir, "exports.jsonl")) as f:
        exports = [json.loads(line)["dp_rank"] for line in f]
    assert exports == [0, 0]  # one export per sync, by DP rank 0 alone
