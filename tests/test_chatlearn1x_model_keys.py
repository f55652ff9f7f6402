"""ChatLearn 1.x model-file keys (Megatron-LM, vLLM, 1.x example keys): used, checked or inert.

The table is ``chatlearn.models.chatlearn1x_args.KEYS``. A shape key that disagrees
with the Hugging Face checkpoint stops the model with a message naming the file, the
key and both values; a key without effect warns once; a 1.x name for one of our
settings takes effect. No model is built here: the checkpoint is a config.json.
"""
from __future__ import annotations

import json
import logging
import os
import re
import textwrap

import pytest

from chatlearn.algorithms.core import config_from_args
from chatlearn.algorithms.ppo import PPOConfig
from chatlearn.config.schema import ChatLearnConfig, ModelConfig, RuntimeConfig
from chatlearn.models import chatlearn1x_args as cl1x
from chatlearn.models.megatron.module import MegatronSettings
from chatlearn.models.vllm_module import engine_kwargs, sampling_kwargs

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")

# The tiny Llama of chatlearn.utils.tiny_assets, as its config.json says.
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 128,
             "intermediate_size": 256, "max_position_embeddings": 256, "num_attention_heads": 4,
             "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
             "vocab_size": 128}


@pytest.fixture
def logs(caplog):
    """caplog for chatlearn's logger (which does not propagate to the root logger)."""
    logger = logging.getLogger("chatlearn")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def warnings_of(logs) -> list[str]:
    return [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    return str(path)


def model_file(tmp_path, text: str, base: str = "") -> str:
    """A 1.x-style model file (with an included base.yaml when ``base`` is given)."""
    if base:
        (tmp_path / "base.yaml").write_text(textwrap.dedent(base))
        text = "includes:\n  - base.yaml\n" + textwrap.dedent(text)
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def entry(path: str, args: dict, trainable: bool = True) -> ModelConfig:
    return ModelConfig(model_config_file=path, trainable=trainable, args_dict=dict(args), name="ppo_policy")


def test_shape_key_that_disagrees_with_the_checkpoint_names_file_key_and_both_values(tmp_path, checkpoint):
    path = model_file(tmp_path, f"load: {checkpoint}\nnum_layers: 32\n", base="hidden_size: 4096\n")
    args = {"load": checkpoint, "num_layers": 32, "hidden_size": 4096}
    with pytest.raises(ValueError) as err:
        MegatronSettings.from_args(entry(path, args), args, name="ppo_policy")
    lines = str(err.value).splitlines()
    assert len(lines) == 2  # every disagreement at once
    assert re.search(r"policy\.yaml: num_layers: 32 disagrees with the Hugging Face checkpoint .*hf/config\.json: "
                     r"num_hidden_layers = 2", lines[0]), lines[0]
    assert re.search(r"base\.yaml: hidden_size: 4096 disagrees .*: hidden_size = 128", lines[1]), lines[1]
    # Agreeing keys pass; use_checkpoint_args: true lets the checkpoint win, as in Megatron-LM.
    ok = {"load": checkpoint, "num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "ffn_hidden_size": 256,
          "group_query_attention": True, "num_query_groups": 2, "max_position_embeddings": 256, "seq_length": 64,
          "untie_embeddings_and_output_weights": True, "swiglu": True, "normalization": "RMSNorm",
          "add_bias_linear": False, "add_position_embedding": False, "use_rotary_position_embeddings": True}
    MegatronSettings.from_args(entry(path, ok), ok)
    trusting = {**args, "use_checkpoint_args": True}
    MegatronSettings.from_args(entry(path, trusting), trusting)


def test_group_query_attention_and_lengths_follow_megatron_lm_rules(tmp_path, checkpoint):
    path = model_file(tmp_path, "x: 1\n")
    # group_query_attention False: Megatron-LM builds as many kv heads as heads (num_query_groups unused).
    args = {"load": checkpoint, "group_query_attention": False, "num_query_groups": 4}
    with pytest.raises(ValueError, match=r"group_query_attention: False disagrees .*config\.json: a llama "
                                         r"checkpoint means group_query_attention: True \(true when the checkpoint "
                                         r"has fewer key/value heads"):
        MegatronSettings.from_args(entry(path, args), args)
    args = {"load": checkpoint, "group_query_attention": True, "num_query_groups": 4}
    with pytest.raises(ValueError, match=r"num_query_groups: 4 disagrees .*num_key_value_heads = 2"):
        MegatronSettings.from_args(entry(path, args), args)
    # A shorter position limit than the checkpoint's is fine (RoPE); a longer one is not.
    args = {"load": checkpoint, "max_position_embeddings": 128, "seq_length": 512}
    with pytest.raises(ValueError, match=r"seq_length: 512 exceeds the Hugging Face checkpoint .*"
                                         r"max_position_embeddings = 256"):
        MegatronSettings.from_args(entry(path, args), args)


def test_inert_megatron_lm_key_warns_once(tmp_path, checkpoint, logs):
    path = model_file(tmp_path, "load_iteration: 1000\n", base="build_path: build\nmasked_softmax_fusion: False\n")
    args = {"load": checkpoint, "build_path": "build", "masked_softmax_fusion": False, "load_iteration": 1000}
    MegatronSettings.from_args(entry(path, args), args, name="ppo_policy", log_warnings=True)
    records = warnings_of(logs)
    assert len(records) == 1  # one record for the model, one line per key
    text = records[0]
    assert text.count("build_path") == 1 and text.count("load_iteration") == 1
    assert re.search(r"base\.yaml: build_path: a Megatron-LM key that has no effect here: no fused kernels", text)
    assert re.search(r"policy\.yaml: load_iteration: .*Hugging Face checkpoint, which has no iterations", text)
    # A key this backend always honours (masked_softmax_fusion: False) is not warned about; another value is.
    assert "masked_softmax_fusion" not in text
    review = cl1x.review_model_args({"masked_softmax_fusion": True}, cl1x.MEGATRON)
    assert review.warnings == ["model args: masked_softmax_fusion: True: a Megatron-LM key that has no effect "
                               "here: the attention softmax is not fused"]
    # Training keys of a frozen model had no effect in 1.x either: not its business.
    assert cl1x.review_model_args({"log_num_zeros_in_grad": True}, cl1x.MEGATRON, trainable=False).warnings == []
    logs.clear()
    MegatronSettings.from_args(entry(path, args), args, name="ppo_policy")  # another rank: silent
    assert not warnings_of(logs)


def test_mapped_megatron_lm_keys_take_effect(tmp_path, checkpoint):
    path = model_file(tmp_path, "x: 1\n")
    args = {"load": checkpoint, "lr": 2e-4, "min_lr": 1e-6, "lr_decay_style": "cosine", "lr_warmup_iters": 50,
            "lr_decay_iters": 1000, "hidden_dropout": 0.1, "attention_dropout": 0.05, "bf16": True,
            "recompute_activations": True, "clip_grad": 0.5, "adam_beta2": 0.95, "use_distributed_optimizer": True}
    s = MegatronSettings.from_args(entry(path, args), args)
    assert (s.lr, s.min_lr, s.lr_decay_style, s.lr_warmup_steps, s.lr_decay_steps) == (2e-4, 1e-6, "cosine", 50, 1000)
    assert (s.hidden_dropout, s.attention_dropout, s.params_dtype) == (0.1, 0.05, "bfloat16")
    assert (s.recompute_granularity, s.clip_grad, s.adam_beta2, s.use_distributed_optimizer) == \
        ("selective", 0.5, 0.95, True)
    overrides = s.transformer_overrides()
    assert (overrides["hidden_dropout"], overrides["attention_dropout"]) == (0.1, 0.05)
    # Megatron-LM's defaults: decay over train_iters, warm-up as a fraction of it.
    args = {"load": checkpoint, "train_iters": 400, "lr_warmup_fraction": 0.25}
    s = MegatronSettings.from_args(entry(path, args), args)
    assert (s.lr_decay_steps, s.lr_warmup_steps) == (400, 100)
    # Our own name given too, with another value: an error naming both.
    args = {"load": checkpoint, "lr_warmup_iters": 50, "lr_warmup_steps": 10}
    with pytest.raises(ValueError, match=r"lr_warmup_iters: 50 means lr_warmup_steps: 50, but lr_warmup_steps is "
                                         r"also given as 10"):
        MegatronSettings.from_args(entry(path, args), args)
    args = {"load": checkpoint, "bf16": True, "fp16": True}
    with pytest.raises(ValueError, match="bf16 and fp16 are both true"):
        MegatronSettings.from_args(entry(path, args), args)


def test_megatron_lm_checkpoint_in_load_says_what_to_do(tmp_path):
    ckpt = tmp_path / "megatron_ckpt"
    (ckpt / "iter_0001000" / "mp_rank_00").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1000")
    path = model_file(tmp_path, f"load: {ckpt}\n")
    args = {"load": str(ckpt)}
    with pytest.raises(ValueError, match=r"policy\.yaml: load: .*megatron_ckpt is a Megatron-LM checkpoint .*convert "
                                         r"it to Hugging Face format first .*convert_megatron_to_hf\.sh"):
        MegatronSettings.from_args(entry(path, args), args)
    with pytest.raises(ValueError, match="is a Megatron-LM checkpoint"):
        engine_kwargs(args)


def test_vllm_keys_of_a_1x_policy_file(checkpoint, logs):
    args = {"load": checkpoint, "tokenizer": checkpoint, "seq_length": 64, "bf16": True, "seed": 7,
            "apply_replica_id_to_seed": True, "block_size": 16, "max_paddings": 512, "swap_space": 16,
            "preemption_mode": "recompute", "num_scheduler_steps": 1, "min_p": 0.0, "skip_special_tokens": False,
            "num_layers": 2, "lr": 1e-5}
    cpu = engine_kwargs(args, replica_id=1, log_warnings=True, name="policy")
    assert (cpu["max_model_len"], cpu["dtype"], cpu["seed"], cpu["block_size"]) == (64, "float32", 8, 32)
    text = "\n".join(warnings_of(logs))
    for key in ("max_paddings", "swap_space", "block_size: 16 is 32 on CPU", "bf16: True: has no effect on a CPU"):
        assert key in text, key
    # honoured values (preemption_mode recompute, one scheduler step, min_p 0) and keys the 1.x vLLM
    # module never read (lr) are not warned about
    for key in ("preemption_mode", "num_scheduler_steps", "min_p", "lr:"):
        assert key not in text, key
    gpu = engine_kwargs({**args, "apply_replica_id_to_seed": False}, on_gpu=True, replica_id=1)
    assert (gpu["dtype"], gpu["seed"], gpu["block_size"]) == ("bfloat16", 7, 16)
    assert sampling_kwargs(args)["skip_special_tokens"] is False
    with pytest.raises(ValueError, match=r"min_p: 0.05 is not supported \(only 0.0 is accepted\): trainers and the "
                                         r"reference score tokens under temperature, top-k and top-p only"):
        engine_kwargs({**args, "min_p": 0.05})
    with pytest.raises(ValueError, match=r"num_layers: 4 disagrees .*num_hidden_layers = 2"):
        engine_kwargs({**args, "num_layers": 4})


def _config(tmp_path, trainer_args: dict, policy_args: dict, sample_per_episode: int = 16) -> ChatLearnConfig:
    base = tmp_path / "base.yaml"
    base.write_text("ngram_coef: 1\ncliprange_value: 0.1\n")
    trainer = tmp_path / "ppo_policy.yaml"
    trainer.write_text("includes:\n  - base.yaml\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("includes:\n  - base.yaml\n")
    return ChatLearnConfig(
        models={"policy": ModelConfig(model_config_file=str(policy), args_dict=policy_args, name="policy",
                                      generation_batch_size=8),
                "ppo_policy": ModelConfig(model_config_file=str(trainer), trainable=True, args_dict=trainer_args,
                                          name="ppo_policy")},
        runtime=RuntimeConfig(sample_per_episode=sample_per_episode, generation_batch_size=8))


def test_driver_keys_of_1x_example_roles(tmp_path):
    shared = {"ngram_coef": 1, "cliprange_value": 0.1}
    config = _config(tmp_path, {**shared, "cliprange": 0.3, "fix_kl_coef": False, "target": 5, "horizon": 8000,
                                "cliprange_reward": 50, "init_kl_coef": 0.02},
                     {**shared, "num_inference_per_prompt": 4, "n": 1})
    warnings = cl1x.apply_driver_keys(config, sampler="policy")
    # ngram_coef in the shared base file: one warning, not one per model
    assert [w for w in warnings if "ngram_coef" in w] == [
        f"{tmp_path / 'base.yaml'}: ngram_coef: 1: a ChatLearn 1.x example key that has no effect "
        f"here: the n-gram repetition reward is not implemented"]
    ppo = config_from_args(PPOConfig, config.models["ppo_policy"].args_dict)
    assert (ppo.clip_eps, ppo.value_clip_eps, ppo.adaptive_kl, ppo.kl_target, ppo.kl_horizon, ppo.score_clip,
            ppo.init_kl_coef) == (0.3, 0.1, True, 5.0, 8000, 50.0, 0.02)
    # 1.x: 4 responses per prompt, and sample_per_episode / generation batches count responses
    assert config.models["policy"].args_dict["n"] == 4
    assert (config.runtime.sample_per_episode, config.runtime.generation_batch_size,
            config.models["policy"].generation_batch_size) == (4, 2, 2)
    assert config.runtime.stream_data_loader_type == "dynamic"
    assert cl1x.apply_driver_keys(config, sampler="policy") == [] and config.runtime.sample_per_episode == 4
    with pytest.raises(ValueError, match=r"num_inference_per_prompt: 4 responses per prompt: "
                                         r"runtime.sample_per_episode \(10, .*\) must be a multiple of it"):
        cl1x.apply_driver_keys(_config(tmp_path, {}, {"num_inference_per_prompt": 4}, sample_per_episode=10))


def test_migration_doc_lists_every_key_of_the_table():
    with open(os.path.join(DOCS, "migration_config.md")) as f:
        text = f.read()
    section = text[text.index("## Model files"):].splitlines()
    for reader, rows in cl1x.doc_rows().items():
        for row in rows:
            assert row in section, row
    assert sum(map(len, cl1x.doc_rows().values())) == len(cl1x.KEYS)


def test_rope_scaling_and_qk_norm_keys_are_checked_against_the_checkpoint(tmp_path):
    """Megatron-LM's RoPE-scaling and qk-layernorm keys must say what the checkpoint's config says."""
    path = tmp_path / "hf31"
    path.mkdir()
    llama31 = {**HF_CONFIG, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192}}
    (path / "config.json").write_text(json.dumps(llama31))
    good = {"load": str(path), "use_rope_scaling": True, "rope_scaling_factor": 8.0, "qk_layernorm": False,
            "rotary_base": 500000}
    MegatronSettings.from_args(entry(model_file(tmp_path, f"load: {path}\n"), good), good, name="ppo_policy")
    bad = {**good, "rope_scaling_factor": 32.0, "qk_layernorm": True}
    with pytest.raises(ValueError) as err:
        MegatronSettings.from_args(entry(model_file(tmp_path, f"load: {path}\n"), bad), bad, name="ppo_policy")
    text = str(err.value)
    assert re.search(r"rope_scaling_factor: 32.0 disagrees .*: a llama checkpoint means rope_scaling_factor: 8.0", text)
    assert re.search(r"qk_layernorm: True disagrees .*means qk_layernorm: False", text)
    plain = {"load": str(tmp_path / "hf_plain"), "use_rope_scaling": True}
    os.makedirs(plain["load"])
    with open(os.path.join(plain["load"], "config.json"), "w") as f:
        json.dump(HF_CONFIG, f)
    with pytest.raises(ValueError, match=r"use_rope_scaling: True disagrees"):
        MegatronSettings.from_args(entry(model_file(tmp_path, "x: 1\n"), plain), plain, name="ppo_policy")
