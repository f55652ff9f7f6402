"""The checkpoints RL users start from: Llama 3.1 / 3.2, Qwen2.5 and Qwen3 shapes, exact in and out.

Each shape keeps what changes the numbers (head_dim, heads and kv heads, RoPE
base and scaling, RMSNorm epsilon, qk-norm, biases, tied embeddings) and
shrinks what only makes it big (2 layers, a narrow hidden and MLP width, the
tiny tokenizer's vocabulary). Random float32 weights, built locally.

Checked for every shape, on real megatron-core over gloo, transformers and vLLM:
- HF -> Megatron TP2 -> HF is bit-identical (and under PP2);
- Megatron TP2 (and PP2) logits match transformers within 1e-4 on sequences long enough
  that a model built without the RoPE scaling, or without qk-norm, misses that
  bound (the check is shown to fail then);
- weights synced from the TP2 trainer into a vLLM engine started from other
  weights make vLLM's greedy output equal transformers' (the VARIANTS: YaRN,
  linear RoPE scaling, Llama with biases on every linear, in the slow suite).
The PPO step on each shape is in test_hf_architectures_ppo.py (slow).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets
from tests.test_vllm_module import _Side, hf_greedy, in_process_vllm_env


def llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


# Real values from each model's config.json; hidden_size, intermediate_size,
# num_hidden_layers and the vocabulary are reduced (REDUCED, the tiny tokenizer).
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(arch="llama", heads=32, kv_heads=8, head_dim=128, tie_embeddings=False,
                         max_pos=131072, config_overrides=dict(rope_theta=500000.0, rms_norm_eps=1e-5,
                                                               rope_scaling=llama3_rope(8.0))),
    "llama-3.2-1b": dict(arch="llama", heads=32, kv_heads=8, head_dim=64, tie_embeddings=True,
                         max_pos=131072, config_overrides=dict(rope_theta=500000.0, rms_norm_eps=1e-5,
                                                               rope_scaling=llama3_rope(32.0))),
    # 28 heads and 4 kv heads halved (the GQA ratio kept): vLLM's Qwen2 takes head_dim as
    # hidden_size / heads, so the hidden size cannot shrink below heads x 128 (and the init
    # narrows with it, to keep the logits' scale, hence their float32 rounding, like the others').
    "qwen2.5-7b": dict(arch="qwen2", heads=14, kv_heads=2, head_dim=128, hidden=14 * 128, init_std=0.025,
                       tie_embeddings=False,
                       max_pos=32768, config_overrides=dict(rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen3-8b": dict(arch="qwen3", heads=32, kv_heads=8, head_dim=128, tie_embeddings=False,
                     max_pos=40960, config_overrides=dict(rope_theta=1000000.0, rms_norm_eps=1e-6)),
    # Qwen3-0.6B .. 4B tie their embeddings.
    "qwen3-0.6b": dict(arch="qwen3", heads=16, kv_heads=8, head_dim=128, tie_embeddings=True,
                       max_pos=40960, config_overrides=dict(rope_theta=1000000.0, rms_norm_eps=1e-6)),
}
# What else megatron-core and vLLM both express: the two other RoPE scalings (Qwen2.5's
# model cards suggest this YaRN section for long inputs), and Llama's biases on every linear.
VARIANTS: dict[str, dict] = {
    "qwen2.5-7b-yarn": dict(SHAPES["qwen2.5-7b"], config_overrides=dict(
        SHAPES["qwen2.5-7b"]["config_overrides"],
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})),
    "llama-3.1-8b-linear": dict(SHAPES["llama-3.1-8b"], config_overrides=dict(
        SHAPES["llama-3.1-8b"]["config_overrides"], rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-3.1-8b-biases": dict(SHAPES["llama-3.1-8b"], config_overrides=dict(
        SHAPES["llama-3.1-8b"]["config_overrides"], attention_bias=True, mlp_bias=True)),
}
REDUCED = dict(hidden=256, ffn=512, layers=2)
# Wide enough init that attention is far from uniform: RoPE then shapes the logits.
INIT_STD = 0.06
SEQ_LEN = 512
LOGITS_TOL = 1e-4
VLLM_PROMPT_LEN, VLLM_NEW = 480, 8


def build_shape(root: str, name: str, seed: int = 0) -> str:
    spec = {**SHAPES, **VARIANTS}[name]
    return str(ensure_tiny_assets(root, seed=seed, **{"init_std": INIT_STD, **REDUCED, **spec}).model_dir)


@pytest.fixture(scope="module")
def shape_dirs(tmp_path_factory):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    return {name: build_shape(root, name) for name in [*SHAPES, *VARIANTS]}


def hf_logits(model_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def without_rope_scaling(hf_cfg: dict) -> dict:
    cfg = copy.deepcopy(hf_cfg)
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key):
            cfg[key] = {k: v for k, v in cfg[key].items() if k == "rope_theta"} | {"rope_type": "default"}
    return cfg


def _tp2_worker(rank: int, world: int, cases: dict, input_ids: torch.Tensor, errors: dict, out_dir: str) -> None:
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file, save_file

    from chatlearn.models.megatron.hf_convert import export_hf_state_dict, load_hf_weights
    from chatlearn.models.megatron.model import (build_gpt_model, hf_arch, load_hf_config,
                                                 transformer_config_from_hf)
    from chatlearn.models.megatron.parallel import initialize_parallel_state
    from chatlearn.models.megatron.schedule import forward_logits

    initialize_parallel_state(2, 1, seed=1)
    assert ps.get_tensor_model_parallel_world_size() == 2
    micro_batches = [{"input_ids": input_ids}]

    def max_error(hf_cfg: dict, model_dir: str, expected: torch.Tensor, strict: bool = True, **overrides) -> float:
        model = build_gpt_model(hf_cfg, transformer_config_from_hf(hf_cfg, 2, 1, **overrides))
        load_hf_weights(model, hf_cfg, model_dir, strict=strict)
        return (forward_logits(model, micro_batches) - expected).abs().max().item()

    for name, (model_dir, expected) in cases.items():
        hf_cfg = load_hf_config(model_dir)
        model = build_gpt_model(hf_cfg, transformer_config_from_hf(hf_cfg, 2, 1))
        load_hf_weights(model, hf_cfg, model_dir)
        original = load_file(os.path.join(model_dir, "model.safetensors"))
        exported = export_hf_state_dict(model, hf_cfg)  # what the weight sync sends
        assert sorted(exported) == sorted(original), f"{name}: names {sorted(set(exported) ^ set(original))}"
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), f"{name}: {key} changed in the round trip"
        result = {"tp2": (forward_logits(model, micro_batches) - expected).abs().max().item()}
        arch = hf_arch(hf_cfg)
        if arch.rope.rope_type != "default":
            result["no_rope_scaling"] = max_error(without_rope_scaling(hf_cfg), model_dir, expected)
        if arch.qk_norm:
            result["no_qk_norm"] = max_error(hf_cfg, model_dir, expected, strict=False, qk_layernorm=False)
        if rank == 0:
            errors[name] = result
            save_file(exported, os.path.join(out_dir, f"{name}.safetensors"))

    # Pipeline parallel: one layer per stage.
    initialize_parallel_state(1, 2, seed=1)
    for name, (model_dir, expected) in cases.items():
        hf_cfg = load_hf_config(model_dir)
        model = build_gpt_model(hf_cfg, transformer_config_from_hf(hf_cfg, 1, 2))
        load_hf_weights(model, hf_cfg, model_dir)
        exported = export_hf_state_dict(model, hf_cfg)
        original = load_file(os.path.join(model_dir, "model.safetensors"))
        assert sorted(exported) == sorted(original) and all(torch.equal(exported[k], t) for k, t in original.items())
        logits = forward_logits(model, micro_batches)
        if ps.is_pipeline_last_stage():
            errors[name] = {**errors[name], "pp2": (logits - expected).abs().max().item()}


@pytest.fixture(scope="module")
def tp2_results(shape_dirs, tmp_path_factory):
    """Each shape through Megatron TP2 (one spawned world for all): logits errors, exported weights."""
    import multiprocessing

    input_ids = torch.randint(4, 128, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    cases = {name: (d, hf_logits(d, input_ids)) for name, d in shape_dirs.items()}
    out_dir = str(tmp_path_factory.mktemp("exported"))
    with multiprocessing.Manager() as manager:
        errors = manager.dict()
        spawn(_tp2_worker, 2, cases, input_ids, errors, out_dir)
        errors = dict(errors)
    return errors, out_dir


def test_tp2_round_trip_and_logits_match_transformers(tp2_results):
    """Bit-identical round trip (in the worker), logits within 1e-4; without the scaling or the
    qk-norm they are not."""
    errors, _ = tp2_results
    print("max |logits - transformers|:", errors)
    assert sorted(errors) == sorted([*SHAPES, *VARIANTS])
    for name, result in errors.items():
        for layout in ("tp2", "pp2"):
            assert result[layout] < LOGITS_TOL, f"{name}: {layout} logits differ from transformers by {result[layout]}"
        for dropped in ("no_rope_scaling", "no_qk_norm"):
            if dropped in result:
                assert result[dropped] > 10 * LOGITS_TOL, f"{name}: {dropped} goes unnoticed ({result[dropped]})"
    assert {n for n, r in errors.items() if "no_rope_scaling" in r} == {
        "llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b-yarn", "llama-3.1-8b-linear", "llama-3.1-8b-biases"}
    assert {n for n, r in errors.items() if "no_qk_norm" in r} == {"qwen3-8b", "qwen3-0.6b"}


@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm")
    with in_process_vllm_env():
        yield


@pytest.mark.parametrize("name", [*SHAPES, *(pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS)])
def test_sync_into_vllm_then_greedy_equals_transformers(name, tp2_results, shape_dirs, vllm_env, tmp_path_factory):
    """vLLM starts from other weights (another seed); the Megatron TP2 export, bucketed as the
    synchronizer sends it, makes its greedy tokens and log-probs on a long prompt those of
    transformers, and the engine's checksums validate."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from chatlearn.models.vllm_module import VLLMModule
    from chatlearn.synchronizer import buckets, vllm_sync
    from chatlearn.synchronizer.base import ParameterSynchronizer

    _, exported_dir = tp2_results
    state = load_file(os.path.join(exported_dir, f"{name}.safetensors"))
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("other"))
    start_from = build_shape(root, name, seed=1)
    prompt = torch.randint(4, 128, (VLLM_PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    module = VLLMModule("policy", model_args=dict(load=start_from, max_model_len=VLLM_PROMPT_LEN + VLLM_NEW,
                                                  kv_cache_memory_bytes=32 * 2**20, seed=0, temperature=0.0,
                                                  new_token_limit=True, max_new_tokens=VLLM_NEW))
    module.setup()
    try:
        before = module.forward_step({"prompt_ids": [prompt]}, 0)
        manifest = buckets.write_buckets(state, 2**20, buckets.SHM, channel=f"test-{name}")
        try:
            module.load_parameters_from_buckets(manifest)
        finally:
            buckets.close_pools()
        after = module.forward_step({"prompt_ids": [prompt]}, 0)
        ParameterSynchronizer().validate(_Side("trainer", lambda: vllm_sync.checksums(state)),
                                         _Side("policy", module.parameter_checksums))
    finally:
        module.shutdown()

    model = AutoModelForCausalLM.from_pretrained(shape_dirs[name], dtype=torch.float32).eval()
    want, want_logprobs = hf_greedy(model, prompt, VLLM_NEW)
    got = after["response_ids"][0]
    assert got == want and len(got) >= 1, f"{name}: vLLM {got} != transformers {want}"
    got_logprobs = after["old_logprobs"][0, len(prompt):len(prompt) + len(got)].tolist()
    assert got_logprobs == pytest.approx(want_logprobs, abs=1e-4)
    before_logprobs = before["old_logprobs"][0, len(prompt):len(prompt) + len(before["response_ids"][0])]
    assert before["response_ids"][0] != got or before_logprobs.tolist() != pytest.approx(got_logprobs, abs=1e-3)

