"""Bad input to the megatron backend fails early, with errors that name the file or key."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from chatlearn.models.megatron.model import load_hf_config, transformer_config_from_hf
from chatlearn.models.megatron.module import MegatronModule, MegatronSettings
from chatlearn.utils.tiny_assets import ensure_tiny_assets
from chatlearn.utils.launch import spawn


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    return {"llama": str(ensure_tiny_assets(root, seed=0, arch="llama").model_dir),
            "qwen2": str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)}


def _variant(src: str, dst, config_changes: dict = None, weights_from: str = None) -> str:
    """A copy of checkpoint ``src`` with edited config.json and/or another checkpoint's weights."""
    shutil.copytree(src, dst)
    if weights_from:
        shutil.copy2(os.path.join(weights_from, "model.safetensors"), os.path.join(dst, "model.safetensors"))
    if config_changes:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        cfg.update(config_changes)
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


@pytest.mark.parametrize("tp,message", [(4, "num_key_value_heads=2"), (3, "num_attention_heads=4")])
def test_tp_must_divide_heads_and_kv_groups(models, tp, message):
    with pytest.raises(ValueError, match=f"tensor parallel size {tp} does not divide.*{message}"):
        transformer_config_from_hf(load_hf_config(models["llama"]), tp=tp, pp=1)


def test_pp_must_divide_layers(models):
    with pytest.raises(ValueError, match="pipeline parallel size 3 does not divide num_hidden_layers=2"):
        transformer_config_from_hf(load_hf_config(models["llama"]), tp=1, pp=3)


def test_missing_checkpoint_fails_in_setup_before_distributed(tmp_path):
    module = MegatronModule("policy")
    module.settings = MegatronSettings(load=str(tmp_path / "nope"), trainable=True)
    with pytest.raises(FileNotFoundError, match="nope"):
        module.setup()


def test_other_architecture_config(models, tmp_path):
    bad = _variant(models["llama"], tmp_path / "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    module = MegatronModule("policy")
    module.settings = MegatronSettings(load=bad)
    with pytest.raises(ValueError, match="unsupported HF model_type 'gpt2'.*GPT2LMHeadModel"):
        module.setup()


def _weights_worker(rank: int, world: int, cases: dict) -> None:
    for name, (model_dir, exc, pattern) in cases.items():
        module = MegatronModule("policy")
        module.settings = MegatronSettings(load=model_dir, trainable=True)
        if exc is None:  # loads fine, to the same weights as the safetensors original
            module.setup()
            original = torch.load(os.path.join(model_dir, "pytorch_model.bin"), weights_only=True)
            exported = module.named_parameters_for_sync()
            assert sorted(exported) == sorted(original)
            assert all(torch.equal(exported[k], original[k]) for k in original)
            continue
        with pytest.raises(exc, match=pattern):
            module.setup()
        assert module.model is None and module.optimizer is None, name  # failed before training was set up


def test_weights_that_do_not_fit_the_config(models, tmp_path):
    from safetensors.torch import load_file

    llama, qwen2 = models["llama"], models["qwen2"]
    bin_dir = _variant(llama, tmp_path / "as_bin")
    os.remove(os.path.join(bin_dir, "model.safetensors"))
    torch.save(load_file(os.path.join(llama, "model.safetensors")), os.path.join(bin_dir, "pytorch_model.bin"))
    no_weights = _variant(llama, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    cases = {
        # A Qwen2 config over Llama weights: the qkv biases are missing.
        "qwen2_cfg_llama_weights": (_variant(qwen2, tmp_path / "a", weights_from=llama), KeyError,
                                    r"model.layers.0.self_attn.q_proj.bias.*not found in HF checkpoint .*/a"),
        # A Llama config over Qwen2 weights: the biases are left over.
        "llama_cfg_qwen2_weights": (_variant(llama, tmp_path / "b", weights_from=qwen2), ValueError,
                                    r"/b/model.safetensors has tensors a llama model does not use.*bias"),
        "wrong_shape": (_variant(llama, tmp_path / "c", {"intermediate_size": 512}), ValueError,
                        r"gate_proj.weight' in .*/c/model.safetensors has shape \(256, 128\).*\(512, 128\)"),
        "no_weights": (no_weights, FileNotFoundError, "no weights in .*no_weights"),
        "torch_bin_loads": (bin_dir, None, None),
    }
    spawn(_weights_worker, 1, cases)


def test_settings_from_model_config(models):
    from chatlearn.config.schema import ModelConfig

    entry = ModelConfig(trainable=True, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    settings = MegatronSettings.from_args(entry, {"load": models["llama"], "lr": 3e-4, "vllm_only_key": 1})
    assert (settings.tp, settings.pp, settings.trainable, settings.lr) == (2, 2, True, 3e-4)
    with pytest.raises(ValueError, match="need 'load'"):
        MegatronSettings.from_args(entry, {"lr": 1.0})

    entry.lora.enable_lora, entry.lora.lora_dim, entry.lora.column_only_qkv = True, 4, True
    settings = MegatronSettings.from_args(entry, {"load": models["llama"]})
    assert settings.lora_rank == 4 and settings.lora_targets == ("linear_qkv", "linear_proj", "linear_fc2")


def test_adaptive_checkpoint_setting_follows_runtime_config(models, monkeypatch):
    from chatlearn.config import globals as cl_globals
    from chatlearn.config.schema import ChatLearnConfig, ModelConfig, RuntimeConfig

    entry = ModelConfig(trainable=True)
    assert not MegatronSettings.from_args(entry, {"load": models["llama"]}).adaptive_checkpoint
    assert MegatronSettings.from_args(entry, {"load": models["llama"]}, adaptive_checkpoint=True).adaptive_checkpoint
    # An explicit model arg wins over the runtime default.
    assert not MegatronSettings.from_args(entry, {"load": models["llama"], "adaptive_checkpoint": False},
                                          adaptive_checkpoint=True).adaptive_checkpoint

    # The module hands the run's runtime setting to its settings.
    class Stop(Exception):
        pass

    seen = {}

    def from_args(cls, *args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(MegatronSettings, "from_args", classmethod(from_args))
    previous = cl_globals.get_args() if cl_globals.is_initialized() else None
    try:
        cl_globals._reset()
        cl_globals.set_args(ChatLearnConfig(models={"policy": ModelConfig(trainable=True)},
                                            runtime=RuntimeConfig(adaptive_parallel_strategy_on_checkpoint=True)))
        with pytest.raises(Stop):
            MegatronModule("policy").setup()
        assert seen["adaptive_checkpoint"] is True
    finally:
        cl_globals._reset()
        if previous is not None:
            cl_globals.set_args(previous)


def _checkpoint_errors_worker(rank: int, world: int, llama: str, qwen2: str, root: str) -> None:
    def build(model_dir: str, **kw) -> MegatronModule:
        module = MegatronModule("policy")
        module.settings = MegatronSettings(load=model_dir, adaptive_checkpoint=True, **kw)
        module.setup()
        return module

    saved = os.path.join(root, "llama_ckpt")
    build(llama).save_checkpoint(saved)
    assert sorted(os.listdir(saved))  # written before save_checkpoint returned

    other = build(qwen2)
    before = other.named_parameters_for_sync()
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {saved} is for another model architecture: "
                                                   "model_type='llama' in the checkpoint, 'qwen2' here")):
        other.load_checkpoint(saved)
    after = other.named_parameters_for_sync()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was loaded

    # Resuming training needs the optimizer state; this checkpoint was saved for inference.
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {saved} has no optimizer state")):
        build(llama, trainable=True).load_checkpoint(saved)

    # A trainer saved before its first step (no Adam state yet) still round-trips.
    fresh = os.path.join(root, "fresh_ckpt")
    build(llama, trainable=True, use_distributed_optimizer=True).save_checkpoint(fresh)
    build(llama, trainable=True, use_distributed_optimizer=True).load_checkpoint(fresh)

    missing = os.path.join(root, "no_such_ckpt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        other.load_checkpoint(missing)


def test_checkpoint_of_another_model_or_missing_fails_clearly(models, tmp_path):
    spawn(_checkpoint_errors_worker, 1, models["llama"], models["qwen2"], str(tmp_path))


def test_score_checkpoint_from_causal_lm_keeps_the_backbone(models, tmp_path):
    """make_score_checkpoint: a reward/value model that transformers loads, same hidden states."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from chatlearn.models.megatron.hf_convert import make_score_checkpoint
    from chatlearn.models.megatron.model import hf_arch

    out = make_score_checkpoint(models["qwen2"], tmp_path / "score", seed=3)
    assert hf_arch(load_hf_config(out)).num_labels == 1
    causal = AutoModelForCausalLM.from_pretrained(models["qwen2"], dtype=torch.float32)
    score = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        assert torch.equal(causal.model(ids).last_hidden_state, score.model(ids).last_hidden_state)
        assert score(ids).logits.shape == (1, 1)


LLAMA31 = {"model_type": "llama", "vocab_size": 128, "hidden_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 512,
           "max_position_embeddings": 131072, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


def test_rope_scaling_is_read_in_both_spellings():
    from chatlearn.models.megatron.model import hf_arch

    old = hf_arch(LLAMA31)  # transformers 4: rope_scaling + top-level rope_theta
    new_params = {**LLAMA31["rope_scaling"], "rope_theta": 500000.0}
    new = hf_arch(_with({k: v for k, v in LLAMA31.items() if k not in ("rope_scaling", "rope_theta")},
                        rope_parameters=new_params))  # transformers 5
    assert old == new and old.rope.rope_type == "llama3" and old.rope.factor == 8.0 and old.rope_theta == 500000.0
    yarn = hf_arch(_with(LLAMA31, rope_scaling={"type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 32768}))
    assert (yarn.rope.rope_type, yarn.rope.factor, yarn.rope.original_max_position_embeddings) == ("yarn", 4.0, 32768)
    assert yarn.rope.mscale is None  # transformers' default attention factor, 0.1 ln(factor) + 1


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, r"rope_scaling: low_freq_factor = 2.0 .*fixes it at 1"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 4096}, r"original_max_position_embeddings = 4096 .*fixes it at 8192"),
    ({"rope_type": "dynamic", "factor": 2.0}, r"'dynamic' \(dynamic NTK\) is not supported"),
    ({"rope_type": "longrope", "factor": 2.0}, r"rope_type 'longrope' is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.2}, r"attention_factor is not supported with "
                                                                     r"rope_type 'yarn'"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 8}, r"beta_fast is not supported with rope_type 'linear'"),
    ({"rope_type": "linear"}, r"rope_type 'linear' needs a factor"),
])
def test_rope_fields_megatron_cannot_express_are_refused_by_name(rope, message):
    from chatlearn.models.megatron.model import hf_arch

    with pytest.raises(ValueError, match=message):
        hf_arch(_with(LLAMA31, rope_scaling=rope))


@pytest.mark.parametrize("changes,message", [
    ({"attention_bias": True}, r"attention_bias without mlp_bias is not supported"),
    ({"mlp_bias": True}, r"mlp_bias without attention_bias is not supported"),
    ({"model_type": "qwen3", "attention_bias": True}, r"attention_bias without MLP biases"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"sliding-window attention"),
])
def test_biases_and_attention_megatron_cannot_express_are_refused(changes, message):
    from chatlearn.models.megatron.model import hf_arch

    with pytest.raises(ValueError, match=message):
        hf_arch(_with(LLAMA31, **changes))
    both = hf_arch(_with(LLAMA31, attention_bias=True, mlp_bias=True))
    assert both.qkv_bias and both.linear_bias


def test_unsupported_rope_names_the_config_file(models, tmp_path):
    bad = _variant(models["llama"], tmp_path / "dyn", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    module = MegatronModule("policy")
    module.settings = MegatronSettings(load=bad)
    with pytest.raises(ValueError, match=re.escape(os.path.join(bad, "config.json")) + ".*dynamic"):
        module.setup()


def test_qwen2_head_dim_apart_from_hidden_over_heads_is_refused():
    """vLLM's Qwen2 ignores head_dim: its engine would compute another model."""
    from chatlearn.models.megatron.model import hf_arch

    qwen2 = {**LLAMA31, "model_type": "qwen2", "rope_scaling": None, "num_attention_heads": 28,
             "num_key_value_heads": 4, "hidden_size": 256}
    with pytest.raises(ValueError, match=r"head_dim = 128 differs from hidden_size / num_attention_heads = 9"):
        hf_arch({**qwen2, "head_dim": 128})
    assert hf_arch({**qwen2, "hidden_size": 3584, "head_dim": 128}).head_dim == 128
    assert hf_arch({**qwen2, "model_type": "qwen3", "head_dim": 128}).head_dim == 128
