"""validate_param_sync sees layout: position-sensitive checksums and the end-to-end probe.

* Pure functions (no engine): the checksum records see row permutations, swapped
  heads and transposes that the old (sum, sum |x|) pair cannot; tensor-parallel
  shares with global offsets add up to the whole tensor (vLLM-like fake layers,
  including replicated kv heads); the probe's bound, message and skip rule.
* In-process vLLM (one engine per tiny variant: Llama and Qwen2, untied and tied)
  with an in-process transformers trainer: a correct sync passes both checks;
  rows permuted, two heads swapped and a square matrix transposed in transit are
  each caught by the checksum, naming the parameter and the replica, where the
  old checksum passes.
* Megatron (real megatron-core, TP2 in spawned processes) exporting with a wrong
  q/k/v interleave: exported, loaded and read back consistently, so every
  checksum agrees; the probe catches it. The same Megatron export, correct, passes.
* Slow: the same corruptions through the real Ray engine (StateDictSynchronizer
  with an in-transit hook, the wrong interleave patched inside the trainer's workers).
"""
from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from types import SimpleNamespace

import pytest
import torch

from chatlearn.synchronizer import checksums as records
from chatlearn.synchronizer import vllm_sync
from chatlearn.synchronizer.base import (BF16_PROBE_ATOL, FP32_PROBE_ATOL, ParameterSynchronizer, ParamSyncError,
                                         StateDictSynchronizer, check_checksums, make_probe_tokens)
from chatlearn.utils.tiny_assets import ensure_tiny_assets

HEAD_DIM = 32  # the tiny models: hidden 128, 4 heads of 32, 2 kv heads

# --------------------------------------------------------------------------
# Corruptions (module-level and picklable: the Ray test runs them in the trainer's writer rank)
# --------------------------------------------------------------------------


def permute_rows(state: dict, name: str, seed: int = 0) -> dict:
    t = state[name]
    order = torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(seed))
    return {**state, name: t[order].contiguous()}


def swap_heads(state: dict, name: str, a: int = 1, b: int = 2, head_dim: int = HEAD_DIM) -> dict:
    t = state[name].clone()
    rows_a, rows_b = slice(a * head_dim, (a + 1) * head_dim), slice(b * head_dim, (b + 1) * head_dim)
    t[rows_a], t[rows_b] = state[name][rows_b], state[name][rows_a]
    return {**state, name: t}


def transpose(state: dict, name: str) -> dict:
    t = state[name]
    assert t.shape[0] == t.shape[1], "a transpose keeps the shape of a square matrix only"
    return {**state, name: t.t().contiguous()}


# (parameter, corruption): the up half of vLLM's fused gate_up_proj, q inside qkv_proj
# (heads 1 and 2 lie in different kv groups), o_proj (hidden == heads * head_dim).
CORRUPTIONS = {
    "rows": ("model.layers.1.mlp.up_proj.weight", permute_rows),
    "heads": ("model.layers.0.self_attn.q_proj.weight", swap_heads),
    "transpose": ("model.layers.1.self_attn.o_proj.weight", transpose),
}


def corrupt(kind: str, state: dict) -> dict:
    name, fn = CORRUPTIONS[kind]
    return fn(state, name)


# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------

def _legacy_close(a, b) -> bool:
    return records.mismatch(tuple(a[:2]), tuple(b[:2])) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_records_see_positions_the_old_pair_misses(dtype):
    gen = torch.Generator().manual_seed(0)
    w = (0.02 * torch.randn(128, 128, generator=gen)).to(dtype)
    state = {"w": w}
    base = records.state_records(state)["w"]
    assert len(base) == records.RECORD_LEN and base[records.UNIT_ROUNDOFF] == records.unit_roundoff(dtype)
    assert records.mismatch(base, records.state_records({"w": w.clone()})["w"]) is None
    for kind, fn in [("rows", permute_rows), ("heads", swap_heads), ("transpose", transpose)]:
        moved = fn(state, "w")["w"]
        assert not torch.equal(moved, w)
        after = records.state_records({"w": moved})["w"]
        assert _legacy_close(base, after), kind  # the old checksum is blind to it
        why = records.mismatch(base, after)
        assert why is not None and "other positions" in why, kind
    # One changed value: the plain sums see it.
    bumped = w.clone()
    bumped[3, 5] += 0.5
    assert records.mismatch(base, records.state_records({"w": bumped})["w"]) == "values differ"


def test_cast_to_a_coarser_dtype_is_tolerated_and_gross_errors_are_not():
    gen = torch.Generator().manual_seed(1)
    w = 0.02 * torch.randn(256, 64, generator=gen)
    fp32 = records.state_records({"w": w})["w"]
    bf16 = records.state_records({"w": w.to(torch.bfloat16)})["w"]
    assert records.mismatch(fp32, bf16) is None  # an fp32 trainer into a bf16 engine
    assert records.mismatch(fp32, records.state_records({"w": (2 * w).to(torch.bfloat16)})["w"]) is not None
    # A NaN that reached one side only is a difference; the same NaN on both sides is not.
    broken = w.clone()
    broken[0, 0] = float("nan")
    nan = records.state_records({"w": broken})["w"]
    assert records.mismatch(fp32, nan) == "values differ" and records.mismatch(nan, nan) is None


def test_records_accept_any_rank_and_empty_tensors():
    assert records.state_records({"e": torch.zeros(0)})["e"][:4] == (0.0, 0.0, 0.0, 0.0)
    scalar = records.state_records({"s": torch.tensor(2.0)})["s"]
    assert scalar[0] == 2.0 and 2.0 <= scalar[2] < 8.0
    cube = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2))
    assert records.state_records({"c": cube})["c"] == pytest.approx(
        records.state_records({"c": cube.reshape(4, 15)})["c"], rel=1e-12)


def test_shares_with_global_offsets_add_up_to_the_whole_tensor(monkeypatch):
    monkeypatch.setattr(records, "CHUNK_ELEMENTS", 100)  # several row chunks per slice
    full = torch.randn(12, 10, generator=torch.Generator().manual_seed(3))
    whole = records.tensor_record(full)
    by_rows = [records.tensor_record(full[:5], 0, 0), records.tensor_record(full[5:], 5, 0)]
    by_cols = [records.tensor_record(full[:, :4], 0, 0), records.tensor_record(full[:, 4:], 0, 4)]
    replicated = [records.tensor_record(full, copies=2)] * 2
    for shares in (by_rows, by_cols, replicated):
        assert records.merge_records(shares) == pytest.approx(tuple(whole), rel=1e-12)
    # A slice reported at the wrong offset (rank 1's rows as rank 0's) is caught.
    wrong = records.merge_records([records.tensor_record(full[5:], 0, 0), records.tensor_record(full[:5], 7, 0)])
    assert records.mismatch(tuple(whole), wrong) is not None


class _Layer(torch.nn.Module):
    """Enough of a vLLM layer for hf_slots: its parameters and TP attributes."""

    def __init__(self, weight=None, bias=None, **attrs):
        super().__init__()
        if weight is not None:
            self.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
        for key, value in attrs.items():
            setattr(self, key, value)


def _fake_vllm_rank(hf: dict, tp: int, rank: int, kv_heads: int, swap_kv: bool = False) -> torch.nn.Module:
    """One TP rank of a vLLM-like model holding ``hf`` (q/k/v fused, vocab, column, row parallel)."""
    vocab, hidden = hf["model.embed_tokens.weight"].shape
    per = vocab // tp
    indices = SimpleNamespace(num_org_elements=per, org_vocab_start_index=rank * per)
    embed = _Layer(torch.cat([hf["model.embed_tokens.weight"][rank * per:(rank + 1) * per], torch.zeros(2, hidden)]),
                   shard_indices=indices, org_vocab_size=vocab, tp_size=tp, tp_rank=rank)
    replicas = max(1, tp // kv_heads)
    q_rows = hf["q.weight"].shape[0] // tp
    kv_rows = hf["k.weight"].shape[0] * replicas // tp
    kv_block = rank // replicas
    if swap_kv:
        kv_block = (kv_block + 1) % (tp // replicas)
    parts = [hf["q.weight"][rank * q_rows:(rank + 1) * q_rows],
             hf["k.weight"][kv_block * kv_rows:(kv_block + 1) * kv_rows],
             hf["v.weight"][kv_block * kv_rows:(kv_block + 1) * kv_rows]]
    qkv = _Layer(torch.cat(parts), output_partition_sizes=[q_rows, kv_rows, kv_rows],
                 num_kv_head_replicas=replicas, tp_size=tp, tp_rank=rank)
    cols = hf["o.weight"].shape[1] // tp
    o_proj = _Layer(hf["o.weight"][:, rank * cols:(rank + 1) * cols], hf["o.bias"], input_is_parallel=True,
                    tp_size=tp, tp_rank=rank)
    model = torch.nn.Module()
    model.embed_tokens = embed
    model.qkv_proj = qkv
    model.o_proj = o_proj
    model.norm = _Layer(hf["norm.weight"])
    return model


@pytest.mark.parametrize("tp", [2, 4])  # 4 ranks over 2 kv heads: k/v replicated on pairs of ranks
def test_vllm_shard_checksums_merge_to_the_trainers_under_tp(tp):
    gen = torch.Generator().manual_seed(4)
    hidden, kv_heads = 16, 2
    hf = {"model.embed_tokens.weight": torch.randn(24, hidden, generator=gen),
          "q.weight": torch.randn(4 * 4, hidden, generator=gen), "k.weight": torch.randn(2 * 4, hidden, generator=gen),
          "v.weight": torch.randn(2 * 4, hidden, generator=gen), "o.weight": torch.randn(hidden, 16, generator=gen),
          "o.bias": torch.randn(hidden, generator=gen), "norm.weight": torch.randn(hidden, generator=gen)}
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "q_proj.weight": "q.weight",
             "k_proj.weight": "k.weight", "v_proj.weight": "v.weight", "o_proj.weight": "o.weight",
             "o_proj.bias": "o.bias", "norm.weight": "norm.weight"}
    want = vllm_sync.position_checksums({ours: hf[theirs] for ours, theirs in names.items()})
    per_rank = [vllm_sync.shard_checksums(_fake_vllm_rank(hf, tp, r, kv_heads), tp_world=tp) for r in range(tp)]
    slots = {s.hf_name: s for s in vllm_sync.hf_slots(_fake_vllm_rank(hf, tp, 1, kv_heads), tp_world=tp)}
    assert (slots["o_proj.weight"].shard_dim, slots["o_proj.weight"].offset) == (1, 16 // tp)
    assert slots["embed_tokens.weight"].offset == 24 // tp
    merged = vllm_sync.merge_shard_checksums(per_rank)
    check_checksums("trainer", "policy", want, [merged])
    # Ranks holding the right k/v values under the wrong kv block: same sums, other positions.
    swapped = vllm_sync.merge_shard_checksums(
        [vllm_sync.shard_checksums(_fake_vllm_rank(hf, tp, r, kv_heads, swap_kv=True), tp_world=tp)
         for r in range(tp)])
    with pytest.raises(ParamSyncError, match=r"parameter k_proj\.weight differs on replica 0: the same values"):
        check_checksums("trainer", "policy", want, [swapped])


class _CanProbe:
    """A driver-side module handle with the probe methods (what ``can_probe`` looks for)."""

    def probe_outputs(self, token_ids):
        raise AssertionError("runs in the workers, not on the handle")

    def probe_vocab_size(self):
        raise AssertionError("runs in the workers, not on the handle")


class _Prober:
    """A driver-side stand-in for one model: records for checksums, fixed probe outputs."""

    def __init__(self, name, state, outputs=None, vocab=100, probes=True):
        self.name, self._records, self._outputs, self._vocab = name, vllm_sync.position_checksums(state), outputs, vocab
        self.calls = []
        self.module = _CanProbe() if probes else object()

    def call_output_ranks(self, method, *args):
        self.calls.append(method)
        if method == "parameter_checksums":
            return [self._records]
        if method == "probe_vocab_size":
            return [self._vocab]
        assert method == "probe_outputs" and len(args[0]) == 4 and len(args[0][0]) == 32
        assert max(max(row) for row in args[0]) < 64  # the smaller vocabulary of the two
        return [self._outputs]


def test_probe_bound_message_and_skip(caplog):
    state = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(5))}
    want = torch.zeros(4, 32)
    good = ParameterSynchronizer().validate(_Prober("trainer", state, want, vocab=64),
                                            _Prober("policy", state, want + 5e-5))
    assert good["probe_max_gap"] == pytest.approx(5e-5) and good["checksum_s"] >= 0 and good["probe_s"] >= 0
    with pytest.raises(ParamSyncError) as err:
        ParameterSynchronizer().validate(_Prober("trainer", state, want, vocab=64),
                                         _Prober("policy", state, want + 0.3))
    message = str(err.value)
    for part in ("trainer -> policy", "replica 0", "up to 0.3", f"bound {FP32_PROBE_ATOL:g} for float32",
                 "although every parameter checksum agreed", "layout table is wrong"):
        assert part in message, (part, message)
    # bf16 weights on either side: the bf16 bound (configurable).
    bf16 = {"w": state["w"].to(torch.bfloat16)}
    assert ParameterSynchronizer().validate(_Prober("trainer", bf16, want, vocab=64),
                                            _Prober("policy", bf16, want + 0.3))["probe_max_gap"] < BF16_PROBE_ATOL
    with pytest.raises(ParamSyncError, match="bound 0.1 for bfloat16"):
        StateDictSynchronizer(probe_atol_bf16=0.1).validate(_Prober("trainer", bf16, want, vocab=64),
                                                            _Prober("policy", bf16, want + 0.3))
    # One side cannot probe: checksums only, one warning per pair however many syncs.
    synchronizer = ParameterSynchronizer()
    with caplog.at_level(logging.WARNING, logger="chatlearn.synchronizer.base"):
        for _ in range(3):
            plain = _Prober("policy", state, probes=False)
            assert set(synchronizer.validate(_Prober("trainer", state, want, vocab=64), plain)) == {"checksum_s"}
            assert plain.calls == ["parameter_checksums"]
    warnings = [r for r in caplog.records if "no probe" in r.getMessage()]
    assert len(warnings) == 1 and "policy has no probe_outputs" in warnings[0].getMessage()
    assert make_probe_tokens(64, 4, 32, 1234) == make_probe_tokens(64, 4, 32, 1234)


# --------------------------------------------------------------------------
# In-process vLLM, one engine per variant
# --------------------------------------------------------------------------

VARIANTS = {"llama": dict(arch="llama"), "qwen2": dict(arch="qwen2"),
            "llama_tied": dict(arch="llama", tie_embeddings=True),
            "qwen2_tied": dict(arch="qwen2", tie_embeddings=True)}


@pytest.fixture(scope="module")
def assets_root(tmp_path_factory):
    return os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module", params=list(VARIANTS))
def engine(request, assets_root):
    """A set-up in-process VLLMModule for one variant; restores env and torch threads afterwards."""
    from chatlearn.models.vllm_module import VLLMModule
    from tests.test_vllm_module import base_args

    assets = ensure_tiny_assets(assets_root, seed=0, **VARIANTS[request.param])
    saved_env = os.environ.copy()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_num_threads", torch.set_num_threads)
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        module = VLLMModule("policy", model_args=base_args(assets))
        module.setup()
        yield SimpleNamespace(module=module, assets=assets, variant=request.param,
                              tied="tied" in request.param)
        module.shutdown()
    os.environ.clear()
    os.environ.update(saved_env)
    torch.set_num_threads(threads)


class _Local:
    """The part of DistModel that validate uses, around one in-process module."""

    def __init__(self, module):
        self.module, self.name = module, module.name

    def call_output_ranks(self, method, *args):
        return [getattr(self.module, method)(*args)]


@pytest.fixture
def trainer(engine):
    """A TorchModule around the variant's transformers model, moved away from the checkpoint."""
    from transformers import AutoModelForCausalLM

    from chatlearn.models.torch_module import TorchModule
    from tests.test_vllm_module import perturbed_state

    module = TorchModule("ppo_policy")
    module.model = AutoModelForCausalLM.from_pretrained(str(engine.assets.model_dir), dtype=torch.float32).eval()
    perturbed_state(module.model, seed=3)
    return module


def test_correct_sync_passes_checksums_and_probe(engine, trainer, record_property):
    policy = engine.module
    state = trainer.named_parameters_for_sync()
    if engine.tied:
        state.pop("lm_head.weight")  # as Megatron's export of a tied model
    policy.load_parameters_from_sync(state)
    src, dst = _Local(trainer), _Local(policy)
    stats = ParameterSynchronizer().validate(src, dst)
    assert stats["probe_max_gap"] < FP32_PROBE_ATOL, stats
    assert policy.probe_vocab_size() == trainer.probe_vocab_size()
    # The probe samples greedily: the engine's generator (this process's, in-process) is untouched.
    rng = torch.get_rng_state()
    policy.probe_outputs(make_probe_tokens(policy.probe_vocab_size(), 4, 32, 1234))
    assert torch.equal(rng, torch.get_rng_state())
    # Overhead (warm: the first probe of an engine also pays a one-time ~4 s warm-up):
    # medians of 5 validations, each part timed on its own, and the old pair for comparison.
    runs = [ParameterSynchronizer().validate(src, dst) for _ in range(5)]
    tokens = make_probe_tokens(policy.probe_vocab_size(), 4, 32, 1234)
    parts = {"trainer_checksums_s": trainer.parameter_checksums, "vllm_checksums_s": policy.parameter_checksums,
             "trainer_old_pair_s": lambda: vllm_sync.checksums(trainer.named_parameters_for_sync()),
             "trainer_probe_s": lambda: trainer.probe_outputs(tokens),
             "vllm_probe_s": lambda: policy.probe_outputs(tokens)}
    numbers = {key: statistics.median(r[key] for r in runs) for key in ("checksum_s", "probe_s")}
    for label, fn in parts.items():
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        numbers[label] = statistics.median(seconds)
    numbers = {k: float(f"{v:.3g}") for k, v in numbers.items()}
    numbers["first_validate"] = {k: float(f"{v:.3g}") for k, v in stats.items()}
    record_property("validation_overhead", numbers)
    print(f"validation overhead ({engine.variant}): {numbers}")


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_in_transit_is_named_by_the_checksum(engine, trainer, kind):
    policy = engine.module
    state = trainer.named_parameters_for_sync()
    name = CORRUPTIONS[kind][0]
    policy.load_parameters_from_sync(corrupt(kind, state))  # what reaches vLLM
    src, dst = _Local(trainer), _Local(policy)
    with pytest.raises(ParamSyncError,
                       match=rf"policy: parameter {name.replace('.', '[.]')} differs on replica 0: the same values "
                             rf"at other positions"):
        ParameterSynchronizer().validate(src, dst)
    # The old (sum, sum |x|) pair would have passed this sync.
    old_trainer = vllm_sync.checksums(state)
    engine_records = policy.parameter_checksums()
    assert all(_legacy_close(old_trainer[n], engine_records[n]) for n in old_trainer)
    # ... and so would the new records computed through the corrupted state: the
    # engine holds exactly what was sent.
    check_checksums("sent", "policy", vllm_sync.position_checksums(corrupt(kind, state)), [engine_records])


# --------------------------------------------------------------------------
# Megatron exporting with a wrong q/k/v interleave: only the probe can tell
# --------------------------------------------------------------------------

def wrong_qkv_unshard(shards, arch):
    """The export's q/k/v split, wrong: reads the fused tensor as [all q | all k | all v]
    instead of Megatron's per-group [q heads of g | k_g | v_g]. Shapes stay right."""
    full = torch.cat(shards, 0)
    nq, nkv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return [full[:nq].contiguous(), full[nq:nq + nkv].contiguous(), full[nq + nkv:].contiguous()]


def patch_qkv_export(module=None, wrong: bool = True) -> None:
    """Swap the ``qkv`` layout's export in this process (loading stays right: the
    trainer's own model is correct, only what it sends is scrambled)."""
    import dataclasses

    from chatlearn.models.megatron import hf_convert

    original = hf_convert.__dict__.setdefault("_original_qkv_layout", hf_convert.LAYOUTS["qkv"])
    hf_convert.LAYOUTS["qkv"] = dataclasses.replace(original, unshard=wrong_qkv_unshard) if wrong else original


def _megatron_export_worker(rank: int, world: int, model_dir: str, tokens: list, out: str) -> None:
    from tests.test_megatron_module import _module

    module = _module(model_dir, world, 1, trainable=False)
    result = {}
    for label, wrong in (("right", False), ("wrong", True)):
        patch_qkv_export(wrong=wrong)
        start = time.perf_counter()
        sums = module.parameter_checksums()
        checksum_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = module.probe_outputs(tokens)
        result[label] = {"state": module.named_parameters_for_sync(), "records": sums, "outputs": outputs,
                         "vocab": module.probe_vocab_size(), "checksum_s": checksum_s,
                         "probe_s": time.perf_counter() - start}
    if module.is_output_rank():
        torch.save(result, out)


class _Recorded:
    """A trainer whose answers were recorded in another process (it ran as a Megatron world)."""

    def __init__(self, name, recorded, tokens):
        self.name, self._recorded, self._tokens = name, recorded, tokens
        self.module = _CanProbe()

    def call_output_ranks(self, method, *args):
        if method == "probe_outputs":
            assert args[0] == self._tokens
        return [{"parameter_checksums": self._recorded["records"], "probe_vocab_size": self._recorded["vocab"],
                 "probe_outputs": self._recorded["outputs"]}[method]]


@pytest.fixture(scope="module")
def megatron_exports(engine, tmp_path_factory):
    """Megatron TP2 on the variant's checkpoint: a right and a wrong-interleave export."""
    from chatlearn.utils.launch import spawn

    if engine.variant not in ("qwen2", "llama_tied"):
        pytest.skip("runs on Qwen2 (q/k/v biases) and tied Llama (no lm_head exported): one spawn each")

    tokens = make_probe_tokens(128, ParameterSynchronizer.probe_batch, ParameterSynchronizer.probe_length,
                               ParameterSynchronizer.probe_seed)
    out = str(tmp_path_factory.mktemp("megatron") / f"{engine.variant}.pt")
    start = time.perf_counter()
    spawn(_megatron_export_worker, 2, str(engine.assets.model_dir), tokens, out)
    recorded = torch.load(out, weights_only=False)
    recorded["spawn_s"] = time.perf_counter() - start
    recorded["tokens"] = tokens
    return recorded


def test_megatron_wrong_qkv_interleave_is_caught_by_the_probe(engine, megatron_exports, record_property):
    policy, tokens = engine.module, megatron_exports["tokens"]
    right, wrong = megatron_exports["right"], megatron_exports["wrong"]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(right["state"][name], wrong["state"][name])

    # The right export: both checks pass (Megatron against vLLM, fp32).
    policy.load_parameters_from_sync(right["state"])
    stats = ParameterSynchronizer().validate(_Recorded("ppo_policy", right, tokens), _Local(policy))
    assert stats["probe_max_gap"] < FP32_PROBE_ATOL, stats

    # The wrong one: what vLLM holds is exactly what was sent, so every checksum agrees ...
    policy.load_parameters_from_sync(wrong["state"])
    check_checksums("ppo_policy", "policy", wrong["records"], [policy.parameter_checksums()])
    # ... and the probe does not.
    with pytest.raises(ParamSyncError, match=r"ppo_policy -> policy: the probe's outputs on replica 0 differ") as err:
        ParameterSynchronizer().validate(_Recorded("ppo_policy", wrong, tokens), _Local(policy))
    gap = float(str(err.value).split("up to ")[1].split(" ")[0])
    assert gap > 100 * FP32_PROBE_ATOL
    numbers = {"right_probe_max_gap": float(f"{stats['probe_max_gap']:.3g}"), "wrong_interleave_gap": gap,
               "megatron_tp2_checksums_s": round(right["checksum_s"], 4),
               "megatron_tp2_probe_s": round(right["probe_s"], 4), "spawn_s": round(megatron_exports["spawn_s"], 1)}
    record_property("megatron_probe", numbers)
    print(f"megatron probe ({engine.variant}): {numbers}")


# --------------------------------------------------------------------------
# Slow: the real Ray engine (DistModel calls, StateDictSynchronizer's in-transit hook)
# --------------------------------------------------------------------------

class ScriptedSynchronizer(StateDictSynchronizer):
    """Sync k does ``script[k]`` (None: clean; a CORRUPTIONS key: that corruption in
    transit; "wrong_qkv": the trainer's workers export with the wrong interleave) and
    records each validation's outcome instead of stopping the run."""

    def __init__(self, script):
        super().__init__(bucket_mb=1)
        self.script, self.outcomes = list(script), []

    def sync(self, src, dst):
        step = self.script[len(self.outcomes)] if len(self.outcomes) < len(self.script) else None
        self.in_transit = functools.partial(corrupt, step) if step in CORRUPTIONS else None
        if step == "wrong_qkv":
            src.tracker.get([src.run_on_worker(w, "patch", patch_qkv_export, True) for w in src.workers])
        return super().sync(src, dst)

    def validate(self, src, dst):
        step = self.script[len(self.outcomes)] if len(self.outcomes) < len(self.script) else None
        try:
            self.outcomes.append((step, "ok", super().validate(src, dst)))
        except ParamSyncError as err:
            self.outcomes.append((step, "error", str(err)))
        finally:
            if step == "wrong_qkv":
                src.tracker.get([src.run_on_worker(w, "unpatch", patch_qkv_export, False) for w in src.workers])
        return {}


@pytest.mark.slow
def test_ray_engine_catches_each_corruption(ray_session, tmp_path, assets_root):
    import chatlearn
    from chatlearn import Engine, Environment, Trainer
    from chatlearn.models.megatron.module import MegatronModule
    from chatlearn.models.vllm_module import VLLMModule
    from tests.test_param_sync_engine import MODEL, make_prompts, write_config

    model_dir = str(ensure_tiny_assets(assets_root, seed=2, **MODEL).model_dir)
    script = [None, "rows", "heads", "transpose", "wrong_qkv", None]
    config = write_config(tmp_path, model_dir, tp=2, pp=1, vllm_tp=1, vllm_replicas=1, num_episode=len(script))
    chatlearn.init(config)
    policy, trainer = VLLMModule("policy"), MegatronModule("ppo_policy")

    def env_flow(batch):
        return policy.forward_step(batch)

    def trainer_flow(batch):
        trainer.train_step(batch)

    engine = Engine(Environment(env_flow), Trainer(trainer_flow))
    synchronizer = ScriptedSynchronizer(script)
    engine.set_parameter_sync(trainer, policy, synchronizer)
    engine.set_dataset(make_prompts(model_dir))
    history = engine.learn()
    assert len(history) == len(script)
    outcomes = {step: (status, detail) for step, status, detail in synchronizer.outcomes}
    assert [s for s, _, _ in synchronizer.outcomes] == script
    for step in (None,):
        status, stats = outcomes[step]
        assert status == "ok" and stats["probe_max_gap"] < FP32_PROBE_ATOL, stats
    assert synchronizer.outcomes[-1][1] == "ok"  # clean again after the faults
    for kind, (name, _) in CORRUPTIONS.items():
        status, message = outcomes[kind]
        assert status == "error" and f"parameter {name} differs on replica 0: the same values" in message, message
    status, message = outcomes["wrong_qkv"]
    assert status == "error" and "probe's outputs on replica 0" in message and "layout table" in message, message
    print("ray engine validation:", [(s, st, d if st == "ok" else d[:80]) for s, st, d in synchronizer.outcomes])


@pytest.mark.slow
def test_vllm_tp2_records_use_global_offsets(assets_root, tmp_path):
    """Real vLLM tensor parallelism (two worker processes): each rank's share, weighted by
    its slice's global rows/columns, merges to the checkpoint's whole-tensor records; a head
    swap across the two ranks' halves of q_proj is named."""
    from safetensors.torch import load_file

    from chatlearn.models.vllm_module import VLLMModule

    assets = ensure_tiny_assets(assets_root, seed=0, arch="qwen2")
    state = load_file(os.path.join(assets.model_dir, "model.safetensors"))
    saved_env = os.environ.copy()
    module = VLLMModule("policy", model_args={"load": str(assets.model_dir), "max_model_len": 128,
                                              "kv_cache_memory_bytes": 32 * 2**20,
                                              "tensor_model_parallel_size": 2})
    try:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        module.setup()
        assert module.tensor_parallel_size == 2 and not module._in_process()
        check_checksums("checkpoint", "policy", vllm_sync.position_checksums(state), [module.parameter_checksums()])
        name = "model.layers.0.self_attn.q_proj.weight"  # heads 1 and 2: one on each rank
        module.load_parameters_from_sync(swap_heads(state, name))
        with pytest.raises(ParamSyncError, match=rf"parameter {name.replace('.', '[.]')} differs on replica 0: "
                                                 rf"the same values"):
            check_checksums("checkpoint", "policy", vllm_sync.position_checksums(state),
                            [module.parameter_checksums()])
        # The probe through the TP-2 engine, against transformers on the corrupted weights.
        from transformers import AutoModelForCausalLM

        from chatlearn.models.torch_module import TorchModule

        hf = TorchModule("trainer")
        hf.model = AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.float32).eval()
        hf.model.load_state_dict(swap_heads(state, name), strict=False)
        tokens = make_probe_tokens(module.probe_vocab_size(), 4, 32, 1234)
        assert float((module.probe_outputs(tokens) - hf.probe_outputs(tokens)).abs().max()) < FP32_PROBE_ATOL
    finally:
        module.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)
