"""ChatLearn 1.x YAML files load unchanged, with 1.x's meanings (or fail saying what to change).

The configs under tests/data/configs/chatlearn1x/{llama2,gpt} are our own copies of
ChatLearn 1.x's example configs (same keys, same ${...} usages, same layout). Each is
checked with the environment that 1.x's run script (examples/megatron/scripts/*.sh)
exports, and the parallel sizes must come from the model files, as in 1.x.
"""
from __future__ import annotations

import os
import re
import textwrap

import pytest

from chatlearn.config import compat
from chatlearn.config.errors import ConfigError
from chatlearn.config.loader import load_config, type_env_value
from chatlearn.config.placement import plan_placement
from chatlearn.config.schema import LoraConfig, ModelConfig, RuntimeConfig, RuntimeEnvConfig
from test_config_loader import write  # tests/ is on sys.path under pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "configs", "chatlearn1x")
PROMPTS = os.path.join(DATA, "prompts.jsonl")
DOCS = os.path.join(os.path.dirname(HERE), "docs")


# ------------------------------------------------------- the 1.x run scripts' environment
def base_env(model_size: str) -> dict[str, str]:
    """What 1.x's scripts/base_env.sh exports (one node of 8 GPUs)."""
    env = {"WORLD_SIZE": "1", "GPUS_PER_NODE": "8", "RANK": "0", "MASTER_ADDR": "localhost",
           "num_gpu": "8", "transformer_impl": "local", "use_legacy_models": "True"}
    env.update({f"num_gpu_{m}": "8" for m in ("policy", "ref", "reward", "value", "ppo_policy", "ppo_value")})
    sizes = {"llama2-7B": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
                               ffn_hidden_size=11008),
             "gpt-7B": dict(num_layers=32, hidden_size=4096, num_attention_heads=32)}[model_size]
    for role in ("policy", "reward"):
        env.update({f"{role}_{k}": str(v) for k, v in sizes.items()})
    if model_size == "llama2-7B":
        env["max_position_embedding"] = "2048"
    return env


def run_vars(**extra: str) -> dict[str, str]:
    """The variables a run script passes on the python command line (user inputs filled in)."""
    env = {"policy_inference_load": "/ckpt/llama2-7b-sft", "reward_load": "/ckpt/llama2-7b-rm",
           "reward_load_iteration": "1000", "tokenizer_model": "/ckpt/tokenizer.model", "num_gpu": "8",
           "data_path": PROMPTS, "eval_data_path": "", "sample_per_episode": "1024"}
    env.update(extra)
    return env


def output_vars(engine: str, model_size: str = "llama2-7B") -> dict[str, str]:
    exp = f"2025-01-01-{model_size}-{engine}"
    out = f"/work/chatlearn/output//{exp}"
    return {"exp_name": exp, "output_dir": out, "data_checkpoint_path": f"{out}/data_checkpoint"}


def rlhf_llama_env(backend: str) -> dict[str, str]:
    """scripts/train_rlhf_llama.sh (llama2-7B) with backend megatron or vllm."""
    env = {**base_env("llama2-7B"), **output_vars("rlhf"), "trainer_engine": "rlhf",
           "tokenizer_load": "/ckpt/llama2-7b-hf",
           "policy_tp": "4", "policy_pp": "1", "ppo_policy_tp": "4", "ppo_policy_pp": "1", "reward_tp": "4",
           "ppo_value_pp": "1", "train_global_batch_size": "128",
           "generation_batch_size": "256" if backend == "megatron" else "512",
           "ref_generation_batch_size": "64", "value_generation_batch_size": "64",
           "reward_generation_batch_size": "64", "train_micro_batch_size": "16", "max_num_batched_tokens": "65536",
           "gpu_memory_utilization": "0.9", "num_gpu_ref": "4", "num_gpu_value": "4", "num_gpu_ppo_policy": "4",
           "num_gpu_ppo_value": "4", "free_memory_reward": "True", "free_memory_ppo_policy": "True",
           "free_memory_ppo_value": "True"}
    if backend == "vllm":
        env["ENABLE_VLLM"] = "True"
    return {**env, **run_vars()}


def dpo_llama_env() -> dict[str, str]:
    """scripts/train_dpo_llama.sh (llama2-7B)."""
    env = {**base_env("llama2-7B"), **output_vars("dpo"), "trainer_engine": "dpo", "clip_grad": "5.0",
           "attention_dropout": "0.0", "hidden_dropout": "0.0", "retro_encoder_hidden_dropout": "0.0",
           "retro_encoder_attention_dropout": "0.0", "policy_tp": "8", "policy_pp": "1", "ppo_policy_tp": "8",
           "ppo_policy_pp": "1", "train_global_batch_size": "128", "ref_generation_batch_size": "16",
           "train_micro_batch_size": "8"}
    extra = run_vars()
    for name in ("reward_load", "reward_load_iteration", "eval_data_path"):  # not passed by this script
        del extra[name]
    return {**env, **extra}


def online_dpo_llama_env(backend: str) -> dict[str, str]:
    """scripts/train_online_dpo_llama.sh (llama2-7B) with backend megatron or vllm."""
    env = {**base_env("llama2-7B"), **output_vars("online_dpo"), "trainer_engine": "online_dpo",
           "train_to_compare_num_responses": "8", "num_inference_per_prompt": "8",
           "policy_tp": "8", "policy_pp": "1", "ppo_policy_tp": "8", "ppo_policy_pp": "1", "reward_tp": "8",
           "ppo_value_pp": "1", "train_global_batch_size": "128", "generation_batch_size": "128",
           "ref_generation_batch_size": "16", "train_micro_batch_size": "8", "gpu_memory_utilization": "0.9"}
    if backend == "vllm":
        env.update(ENABLE_VLLM="True", tokenizer_load="/ckpt/llama2-7b-hf")
    return {**env, **run_vars()}


def grpo_math_llama_env() -> dict[str, str]:
    """scripts/train_grpo_math_llama.sh (llama2-7B); it sets no policy_pp."""
    env = {**base_env("llama2-7B"), **output_vars("online_dpo"), "train_to_compare_num_responses": "8",
           "num_inference_per_prompt": "8", "ENABLE_VLLM": "True", "tokenizer_load": "/ckpt/llama2-7b-hf",
           "prompt_key": "prompt", "policy_tp": "8", "ppo_policy_pp": "1", "reward_tp": "8", "ppo_value_pp": "1"}
    return {**env, **run_vars(trainer_engine="grpo", train_global_batch_size="128", generation_batch_size="128",
                              ref_generation_batch_size="16", train_micro_batch_size="8")}


def rlhf_gpt_env() -> dict[str, str]:
    """scripts/train_rlhf_gpt.sh (gpt-7B)."""
    out = output_vars("", "gpt-7B")
    data_dir = "/work/chatlearn/output//gpt/"
    env = {**base_env("gpt-7B"), **out, "max_new_tokens": "512", "max_seq_len": "1024", "lora": "False",
           "policy_tp": "8", "ppo_policy_pp": "1", "reward_tp": "8", "ppo_value_pp": "1",
           "batch_generation_min_prompt_length": "32", "num_gpu_ref": "8", "num_gpu_value": "8",
           "policy_generation_batch_size": "256", "ref_generation_bs": "32", "value_generation_bs": "32",
           "reward_generation_bs": "32", "train_micro_batch_size": "8", "train_global_batch_size": "512"}
    return {**env, "data_path": PROMPTS, "vocab_file": f"{data_dir}/gpt2-vocab.json",
            "merge_file": f"{data_dir}/gpt2-merges.txt", "enable_lora_value": "False", "enable_lora_policy": "False"}


def set_env(monkeypatch, env: dict[str, str]) -> None:
    """Exactly ``env`` for the config's variables: every other variable a 1.x config may name is unset."""
    for name in list(os.environ):
        if re.fullmatch(r"[a-z_][a-z0-9_]*", name):  # the configs' knobs are lower case
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# config file -> (environment, expected (TP, PP, replicas, DP) per model on a GPU run)
EXAMPLES = {
    "llama2/rlhf.yaml": (lambda: rlhf_llama_env("megatron"), {
        "policy": (4, 1, 2, 1), "reference": (4, 1, 1, 1), "reward": (4, 1, 2, 1), "value": (4, 1, 1, 1),
        "ppo_policy": (4, 1, 1, 1), "ppo_value": (4, 1, 1, 1)}),
    "llama2/vllm_rlhf.yaml": (lambda: rlhf_llama_env("vllm"), {
        "policy": (4, 1, 2, 1), "reference": (4, 1, 1, 1), "reward": (4, 1, 2, 1), "value": (4, 1, 1, 1),
        "ppo_policy": (4, 1, 1, 1), "ppo_value": (4, 1, 1, 1)}),
    "llama2/dpo.yaml": (dpo_llama_env, {"reference": (8, 1, 1, 1), "ppo_policy": (8, 1, 1, 1)}),
    "llama2/online_dpo.yaml": (lambda: online_dpo_llama_env("megatron"), {
        "policy": (8, 1, 1, 1), "reference": (8, 1, 1, 1), "reward": (8, 1, 1, 1), "ppo_policy": (8, 1, 1, 1)}),
    "llama2/online_dpo_vllm.yaml": (lambda: online_dpo_llama_env("vllm"), {
        "policy": (8, 1, 1, 1), "reference": (8, 1, 1, 1), "reward": (8, 1, 1, 1), "ppo_policy": (8, 1, 1, 1)}),
    "llama2/grpo_math_vllm.yaml": (grpo_math_llama_env, {
        "policy": (8, 1, 1, 1), "reference": (8, 1, 1, 1), "reward": (8, 1, 1, 1),
        "math_reward": (1, 1, 2, 1), "ppo_policy": (8, 1, 1, 1)}),
    "gpt/rlhf.yaml": (rlhf_gpt_env, {
        "policy": (8, 1, 1, 1), "reference": (8, 1, 1, 1), "reward": (8, 1, 1, 1), "value": (8, 1, 1, 1),
        "ppo_policy": (8, 1, 1, 1), "ppo_value": (8, 1, 1, 1)}),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_chatlearn_1x_example_validates_with_its_run_script_env(name, monkeypatch):
    make_env, expected = EXAMPLES[name]
    set_env(monkeypatch, make_env())
    cfg = load_config(os.path.join(DATA, name))
    plan = plan_placement(cfg, "gpu")
    got = {n: (mp.tp, mp.pp, mp.num_replicas, mp.dp_size) for n, mp in plan.models.items()}
    assert got == expected
    # The sizes come from the model files (no models.<name> entry sets them).
    for model in cfg.models.values():
        assert model.tensor_model_parallel_size == expected[model.name][0]
    assert cfg.runtime.data_path == PROMPTS
    assert cfg.runtime.sample_per_episode == 1024
    # A 1.x key without effect here gives one warning each, never an error.
    for warning in cfg.warnings:
        assert "error" not in warning.lower()


def test_llama2_rlhf_values_follow_1x(monkeypatch):
    set_env(monkeypatch, rlhf_llama_env("megatron"))
    cfg = load_config(os.path.join(DATA, "llama2", "rlhf.yaml"))
    policy = cfg.models["policy"].args_dict
    assert policy["tokenizer_model"] == "/ckpt/tokenizer.model"  # key: ${key} is the environment value
    assert policy["load"] == "/ckpt/llama2-7b-sft" and policy["load_iteration"] is None
    assert (policy["top_k"], policy["eval_top_p"]) == (0, 0)  # 1.x's "no limit"
    assert cfg.models["reward"].args_dict["load_iteration"] == 1000
    ppo = cfg.models["ppo_policy"].args_dict
    assert ppo["recompute_granularity"] is None  # the second of the two (${...:None})
    assert ppo["lr"] == 2.4e-7 and ppo["min_lr"] == 1e-9
    rt = cfg.runtime
    assert (rt.training_data_num_limit, rt.eval_data_num_limit) == (-1, 128)
    assert rt.train_global_batch_size == 128 and rt.generation_batch_size == 256
    assert rt.eval_data_path == "" and rt.output_dir.endswith("/2025-01-01-llama2-7B-rlhf")
    assert cfg.models["ppo_policy"].free_memory is True and cfg.models["policy"].free_memory is False
    warnings = "\n".join(cfg.warnings)
    assert "ppo_policy.yaml: recompute_granularity: given twice in one mapping" in warnings
    assert "policy_shared.yaml: models.policy.args_dict.load_iteration: environment variable " \
           "'policy_load_iteration' not set and no default given" in warnings
    assert "rlhf.yaml: models.policy.force_free_memory: a ChatLearn 1.x key that has no effect here" in warnings
    assert "rlhf.yaml: runtime.free_sync_collective_group: a ChatLearn 1.x key that has no effect here" in warnings


def test_vllm_policy_file_values_follow_1x(monkeypatch):
    set_env(monkeypatch, grpo_math_llama_env())
    cfg = load_config(os.path.join(DATA, "llama2", "grpo_math_vllm.yaml"))
    args = cfg.models["policy"].args_dict
    assert args["preemption_mode"] == "recompute"  # ${preemption_mode:'recompute'}: quotes gone
    assert args["stop_token_list"] == "<EOS>;</s>"
    assert args["prompt_logprobs"] is None and args["sliding_window"] is None
    assert args["prompt_key"] == "prompt" and args["apply_replica_id_to_seed"] is True
    assert args["pipeline_model_parallel_size"] is None  # ${policy_pp} unset: PP 1, as in 1.x
    assert cfg.models["policy"].pipeline_model_parallel_size == 1
    warnings = "\n".join(cfg.warnings)
    assert "vllm_policy_inference.yaml: apply_replica_id_to_seed: given twice in one mapping" in warnings
    # math_reward (num_gpu: 0) includes reward_shared.yaml's TP 8, which 1.x does not apply to CPU models
    assert "reward_shared.yaml: models.math_reward.args_dict.tensor_model_parallel_size: " \
           "tensor_model_parallel_size 8 is not used" in warnings


def test_gpt_rlhf_values_follow_1x(monkeypatch):
    set_env(monkeypatch, rlhf_gpt_env())
    cfg = load_config(os.path.join(DATA, "gpt", "rlhf.yaml"))
    assert cfg.runtime.query_key == "query" and cfg.runtime.eval_data_num_limit == 20
    assert cfg.models["policy"].args_dict["vocab_file"].endswith("/gpt2-vocab.json")
    assert cfg.models["policy"].args_dict["max_new_tokens"] == 512
    assert cfg.models["ppo_policy"].args_dict["lr"] == 8e-08
    warnings = "\n".join(cfg.warnings)
    for key in ("nsys", "mini_data", "free_sync_collective_group", "param_sync_comm_type"):
        assert f"rlhf.yaml: runtime.{key}: a ChatLearn 1.x key that has no effect here" in warnings
    # evaluation is off (eval_episode_interval 0), so the placeholder eval path is only a warning
    assert "runtime.eval_data_path: path not found: '/path/to/eval_data'" in warnings


def test_missing_run_script_variable_names_the_variable(monkeypatch):
    env = rlhf_gpt_env()
    del env["num_gpu_policy"], env["vocab_file"]
    set_env(monkeypatch, env)
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(DATA, "gpt", "rlhf.yaml"))
    issues = [(os.path.relpath(i.file, DATA), i.key, i.message) for i in err.value.issues]
    assert issues == [("gpt/rlhf.yaml", "models.policy.num_gpu", "needs a value, but environment variable "
                       "'num_gpu_policy' is not set (set it, or write ${num_gpu_policy:default} to give a default)")]
    # vocab_file is a free-form backend argument: None, with a warning
    assert any("base.yaml: models.policy.args_dict.vocab_file: environment variable 'vocab_file' not set" in w
               for w in err.value.warnings)


# --------------------------------------------------------------------- one rule each
def config(tmp_path, models: str, runtime: str = "", files: dict | None = None) -> str:
    for name, text in (files or {}).items():
        write(tmp_path, name, text)
    text = "models:\n" + textwrap.indent(textwrap.dedent(models), "  ")
    text += "runtime:\n  sample_per_episode: 16\n  train_global_batch_size: 4\n" \
        + textwrap.indent(textwrap.dedent(runtime), "  ")
    return write(tmp_path, "rlhf.yaml", text)


def problems(path: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return [str(i).replace(os.path.dirname(path) + os.sep, "") for i in err.value.issues]


def warnings_of(cfg) -> list[str]:
    return [w.replace(os.path.dirname(cfg.config_path) + os.sep, "") for w in cfg.warnings]


def test_duplicate_key_last_wins_with_warning(tmp_path):
    path = config(tmp_path, """\
        policy:
          num_cpu: 1
          model_config_file: m.yaml
        """, files={"m.yaml": "a: 1\nnested:\n  b: 1\n  b: 2\na: 3\n"})
    cfg = load_config(path)
    assert cfg.models["policy"].args_dict == {"a": 3, "nested": {"b": 2}}
    assert warnings_of(cfg) == [
        "m.yaml: nested.b: given twice in one mapping (lines 3 and 4); the value of line 4 is used, "
        "as in ChatLearn 1.x",
        "m.yaml: a: given twice in one mapping (lines 1 and 5); the value of line 5 is used, as in ChatLearn 1.x",
    ]


def test_unset_variable_is_none_with_warning_and_an_error_only_where_needed(tmp_path, monkeypatch):
    for name in ("ckpt_iter", "nlayers", "n_cpu", "prompts", "gen_tokens", "policy_pp"):
        monkeypatch.delenv(name, raising=False)
    path = config(tmp_path, """\
        policy:
          num_cpu: 2
          model_config_file: m.yaml
          generation_batch_size: ${n_cpu}
        """, runtime="save_episode_interval: ${ckpt_iter}\n", files={"m.yaml": """\
        load_iteration: ${ckpt_iter}
        num_layers: ${nlayers}
        pipeline_model_parallel_size: ${policy_pp}
        """})
    cfg = load_config(path)  # nothing here needs a value: 1.x's "not set" means our default
    assert cfg.models["policy"].args_dict == {"load_iteration": None, "num_layers": None,
                                              "pipeline_model_parallel_size": None}
    assert cfg.models["policy"].generation_batch_size == -1 and cfg.runtime.save_episode_interval == 0
    assert cfg.models["policy"].pipeline_model_parallel_size == 1
    assert "m.yaml: models.policy.args_dict.load_iteration: environment variable 'ckpt_iter' not set and no " \
           "default given: the value is None (null), as in ChatLearn 1.x" in warnings_of(cfg)
    assert len(cfg.warnings) == 5
    # A size, a path we must read, a required vLLM size: errors naming file, key and variable.
    path = config(tmp_path, """\
        policy:
          num_cpu: ${n_cpu}
          model_config_file: m.yaml
        """, runtime="data_path: ${prompts}\n", files={"m.yaml": "max_new_tokens: ${gen_tokens}\n"})
    hint = "to give a default)"
    assert problems(path) == [
        f"rlhf.yaml: models.policy.num_cpu: needs a value, but environment variable 'n_cpu' is not set "
        f"(set it, or write ${{n_cpu:default}} {hint}",
        f"m.yaml: models.policy.args_dict.max_new_tokens: needs a value, but environment variable 'gen_tokens' "
        f"is not set (set it, or write ${{gen_tokens:default}} {hint}",
        f"rlhf.yaml: runtime.data_path: needs a value, but environment variable 'prompts' is not set "
        f"(set it, or write ${{prompts:default}} {hint}",
    ]


def test_top_k_and_top_p_zero_mean_no_limit(tmp_path):
    path = config(tmp_path, "policy:\n  num_cpu: 1\n  model_config_file: m.yaml\n",
                  files={"m.yaml": "top_k: 0\ntop_p: 0\neval_top_k: -1\neval_top_p: 0\n"})
    args = load_config(path).models["policy"].args_dict
    assert args == {"top_k": 0, "top_p": 0, "eval_top_k": -1, "eval_top_p": 0}  # as written
    assert [compat.vllm_top_p(args[k]) for k in ("top_p", "eval_top_p")] == [1.0, 1.0]
    assert compat.vllm_top_p(0.9) == 0.9 and compat.vllm_top_k(0) == 0 and compat.vllm_top_k(-1) == 0
    assert compat.vllm_top_k(5) == 5


@pytest.mark.parametrize("text, expected", [
    ("'recompute'", "recompute"), ('"a b"', "a b"), ("[1, 2]", [1, 2]), ("(1, 2)", [1, 2]),
    ("{'a': 1}", {"a": 1}), ("1_000", 1000), ("5e-6", 5e-6), ("null", None), ("None", None), ("true", True),
    ("<EOS>;</s>", "<EOS>;</s>"), ("{1, 2}", "{1, 2}"), ("b'x'", "b'x'"), ("inf", "inf"),
])
def test_env_values_are_typed_as_1x_types_them(text, expected):
    value = type_env_value(text)
    assert value == expected and type(value) is type(expected)


def test_quoted_defaults_lose_their_quotes(tmp_path, monkeypatch):
    monkeypatch.delenv("mode", raising=False)
    monkeypatch.setenv("exp", "'quoted'")
    path = config(tmp_path, "policy:\n  num_cpu: 1\n  model_config_file: m.yaml\n",
                  runtime="exp_name: ${exp:x}\noutput_dir: ${out:'out dir'}\n",
                  files={"m.yaml": "preemption_mode: ${mode:'recompute'}\nstop: ${mode:\"</s>\"}\n"})
    cfg = load_config(path)
    assert cfg.models["policy"].args_dict == {"preemption_mode": "recompute", "stop": "</s>"}
    assert (cfg.runtime.exp_name, cfg.runtime.output_dir) == ("quoted", "out dir")


def test_parallel_sizes_come_from_the_model_file(tmp_path):
    files = {"m.yaml": "includes: [shared.yaml]\npipeline_model_parallel_size: 2\n",
             "shared.yaml": "tensor_model_parallel_size: 2\n"}
    path = config(tmp_path, "policy:\n  num_cpu: 8\n  model_config_file: m.yaml\n"
                            "  tensor_model_parallel_size: 2\n", files=files)
    cfg = load_config(path)
    policy = cfg.models["policy"]
    assert (policy.tensor_model_parallel_size, policy.pipeline_model_parallel_size) == (2, 2)
    mp = plan_placement(cfg, "cpu").models["policy"]
    assert (mp.tp, mp.pp, mp.num_replicas) == (2, 2, 2)
    # and validation plans with them: 6 slots do not divide into TP 2 x PP 2
    path = config(tmp_path, "policy:\n  num_cpu: 6\n  model_config_file: m.yaml\n", files=files)
    assert problems(path) == ["rlhf.yaml: models.policy.num_cpu: expected a multiple of tensor_model_parallel_size "
                              "× pipeline_model_parallel_size = 2 × 2 = 4, got 6"]


def test_top_level_size_disagreeing_with_model_file_names_both_files(tmp_path):
    path = config(tmp_path, "policy:\n  num_cpu: 8\n  model_config_file: m.yaml\n  tensor_model_parallel_size: 4\n",
                  files={"m.yaml": "includes: [shared.yaml]\n", "shared.yaml": "tensor_model_parallel_size: 2\n"})
    assert problems(path) == [
        "rlhf.yaml: models.policy.tensor_model_parallel_size: 4 disagrees with tensor_model_parallel_size: 2 in "
        "shared.yaml (included by the model_config_file m.yaml); ChatLearn 1.x takes the model file's value: "
        "give it in one place, or make them agree"]
    path = config(tmp_path, "policy:\n  num_cpu: 8\n  model_config_file: m.yaml\n  pipeline_model_parallel_size: 1\n",
                  files={"m.yaml": "pipeline_model_parallel_size: 2\n"})
    assert problems(path) == [
        "rlhf.yaml: models.policy.pipeline_model_parallel_size: 1 disagrees with pipeline_model_parallel_size: 2 in "
        "m.yaml (the model_config_file); ChatLearn 1.x takes the model file's value: give it in one place, or make "
        "them agree"]


def test_inert_1x_key_gives_one_warning(tmp_path):
    path = config(tmp_path, "policy:\n  num_cpu: 1\n  zero_size: 1\n  lora:\n    part_module_name: encoder\n",
                  runtime="nsys: true\n")
    assert warnings_of(load_config(path)) == [
        "rlhf.yaml: models.policy.zero_size: a ChatLearn 1.x key that has no effect here: DeepSpeed ZeRO is not "
        "supported; trainers use Megatron's distributed optimizer",
        "rlhf.yaml: models.policy.lora.part_module_name: a ChatLearn 1.x key that has no effect here: LoRA layers "
        "are chosen by lora_layer (and column_only_qkv) only",
        "rlhf.yaml: runtime.nsys: a ChatLearn 1.x key that has no effect here: no NVTX ranges are emitted; run the "
        "job under nsys to profile it",
    ]


def test_misspelled_key_is_an_error_with_did_you_mean(tmp_path):
    path = config(tmp_path, "policy:\n  num_cpu: 1\n  free_memmory: true\n",
                  runtime="training_data_num_limt: 10\nsave_interval: 5\n")
    assert problems(path) == [
        "rlhf.yaml: models.policy.free_memmory: unknown key 'free_memmory'; did you mean 'free_memory'?",
        "rlhf.yaml: runtime.training_data_num_limt: unknown key 'training_data_num_limt'; "
        "did you mean 'training_data_num_limit'?",
        "rlhf.yaml: runtime.save_interval: 'save_interval' was replaced by 'save_episode_interval' "
        "(ChatLearn 1.x refuses it too): write save_episode_interval",
    ]


def test_old_names_num_device_and_rlhf_section(tmp_path):
    path = write(tmp_path, "rlhf.yaml", """\
        models:
          policy:
            num_device: 2
          reward:
            num_device: 1
            num_gpu: 3
        rlhf:
          sample_per_episode: 12
        """)
    cfg = load_config(path)
    assert (cfg.models["policy"].num_gpu, cfg.models["reward"].num_gpu) == (2, 3)
    assert cfg.runtime.sample_per_episode == 12
    assert warnings_of(cfg) == [
        "rlhf.yaml: rlhf: ChatLearn 1.x's old name for 'runtime'; read as 'runtime' (rename it)",
        "rlhf.yaml: models.policy.num_device: ChatLearn 1.x's old name for 'num_gpu'; read as 'num_gpu' (rename it)",
        "rlhf.yaml: models.reward.num_device: ChatLearn 1.x's old name for 'num_gpu'; ignored, since 'num_gpu' is "
        "given too (as in 1.x)",
    ]


def test_includes_fall_back_to_the_main_config_folder(tmp_path):
    # 1.x resolves includes and model files from the main config's folder.
    path = config(tmp_path, "policy:\n  num_cpu: 1\n  model_config_file: models/policy.yaml\n",
                  files={"models/policy.yaml": "includes: [models/base.yaml]\nown: 1\n",
                         "models/base.yaml": "base: 2\n"})
    assert load_config(path).models["policy"].args_dict == {"base": 2, "own": 1}


def test_1x_defaults(tmp_path):
    rt, env, lora = RuntimeConfig(), RuntimeEnvConfig(), LoraConfig()
    assert (rt.num_episode, rt.sample_per_episode, rt.generation_batch_size, rt.train_micro_batch_size) == \
        (5000, 1000, 2, 2)
    assert rt.train_global_batch_size == 2  # None in 1.x: one micro-batch
    assert RuntimeConfig(train_micro_batch_size=8).train_global_batch_size == 8
    assert (rt.exp_name, rt.output_dir, env.platform) == ("CHATLEARN", "./", "")
    assert rt.data_shuffle is True and rt.enable_eval_before_training is False
    assert rt.get("training_data_num_limit") == -1 and rt.get("no_such_key") is None
    assert lora.lora_layer == "ColumnParallelLinear,Embedding,LinearLayer,RowParallelLinear,VocabParallelEmbedding"
    cfg = load_config(write(tmp_path, "rlhf.yaml", "models:\n  policy:\n    num_gpu: 1\n    trainable: true\n"))
    assert cfg.runtime.train_global_batch_size == 2
    # a 1.x default that cannot work with data parallelism says so
    assert problems(write(tmp_path, "rlhf.yaml", "models:\n  policy:\n    num_gpu: 2\n    trainable: true\n")) == [
        "rlhf.yaml: runtime.train_global_batch_size: expected a multiple of train_micro_batch_size × data-parallel "
        "size of trainable model 'policy' = 2 × 2 = 4 (DP = num_gpu 2 / (TP 1 × PP 1)), got 2 (not set: "
        "ChatLearn 1.x's default is train_micro_batch_size; set it)"]


def test_every_1x_key_is_known():
    """Every key of 1.x's argument classes is a schema key, an alias, a renamed key or an inert key."""
    keys_1x = {
        RuntimeEnvConfig: "pip py_modules working_dir platform excludes",
        RuntimeConfig: "num_episode sample_per_episode num_training_epoch max_iteration_per_sample "
                       "generation_batch_size train_micro_batch_size train_global_batch_size save_episode_interval "
                       "log_interval data_path data_ratio data_shuffle data_rerank colocation eval_episode_interval "
                       "enable_resume_training data_checkpoint_path max_data_ckpt_nums "
                       "load_data_checkpoint_iteration stream_data_loader_type debug nsys profiler_dir "
                       "coalesce_param coalesced_buffer_mb concurrent_comm param_sync_comm_type "
                       "param_sync_max_workers routed_expert_regrouping_comm_type max_relay_episode "
                       "relay_episode_offset training_shuffle_mode consumed_samples concurrent_setup "
                       "bucket_size_mb_in_memory_manager free_sync_collective_group cpu_schedule_strategy exp_name "
                       "output_dir validate_param_sync enable_eval_before_training policy_to_regroup_queue "
                       "log_config_file log_args_dict "
                       # keys of 1.x's example configs, read by its example scripts
                       "eval_data_path training_data_num_limit eval_data_num_limit query_key mini_data",
        ModelConfig: "num_device num_gpu num_cpu gpu_per_process cpu_per_process num_replica trainable "
                     "tensor_model_parallel_size pipeline_model_parallel_size expert_model_parallel_size zero_size "
                     "fsdp_size sp_size model_config_file config_dir model_type args_dict generation_batch_size lora "
                     "batch_generation offload_optimizer_states sync_frequency offload_weights free_grad_buffers "
                     "free_memory force_free_memory",
        LoraConfig: "enable_lora part_module_name lora_dim lora_dropout lora_scaling lora_layer column_only_qkv",
    }
    from chatlearn.config.validate import config_keys

    for cls, names in keys_1x.items():
        known = set(config_keys(cls)) | set(compat.INERT_KEYS[cls]) | set(compat.ALIASES.get(cls, {})) \
            | set(compat.RENAMED.get(cls, {}))
        assert set(names.split()) - known == set(), cls.__name__
        assert not set(compat.INERT_KEYS[cls]) & set(config_keys(cls)), cls.__name__


def test_migration_doc_lists_every_inert_key_with_its_reason():
    with open(os.path.join(DOCS, "migration_config.md")) as f:
        text = f.read()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.+?) \|$", text, re.M))
    for cls, table in compat.INERT_KEYS.items():
        section = compat.SECTION_NAMES[cls]
        for key, reason in table.items():
            assert rows.get(f"{section}.{key}") == reason, f"{section}.{key}"


def test_prompt_helpers_for_1x_data_keys():
    from chatlearn.data.prompts import limit_prompts, with_prompt_field  # imports torch: kept out of the module

    records = [{"query": "a", "answer": 1}, {"query": "b", "answer": 2}, {"query": "c", "answer": 3}]
    assert limit_prompts(records, -1) == records and limit_prompts(records, 0) == records
    assert limit_prompts(records, None) == records and limit_prompts(records, 2) == records[:2]
    assert [r["prompt"] for r in with_prompt_field(records, "query")] == ["a", "b", "c"]
    assert with_prompt_field(records, "query")[0]["answer"] == 1 and with_prompt_field(records, None) == records
    with pytest.raises(KeyError, match="prompt record 0 has no field 'prompt'"):
        with_prompt_field(records, "prompt")


def test_run_dir_follows_1x_when_output_dir_ends_with_exp_name():
    from chatlearn.config.schema import RuntimeConfig

    assert RuntimeConfig(output_dir="out/ppo", exp_name="ppo").run_dir == "out/ppo"
    assert RuntimeConfig(output_dir="out/toy_tests", exp_name="toy").run_dir == "out/toy_tests/toy"
