"""Loading: ${name:default} typing, omegaconf interpolation, includes, relative paths, overrides."""
from __future__ import annotations

import os
import textwrap

import pytest

import chatlearn
from chatlearn.config.errors import ConfigError
from chatlearn.config.loader import config_to_dict, load_config, substitute_env, type_env_value
from chatlearn.config.schema import ChatLearnConfig, ModelConfig

DATA = os.path.join(os.path.dirname(__file__), "data", "configs")


def write(directory, name: str, text: str) -> str:
    path = os.path.join(str(directory), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def one_model(tmp_path, runtime: str = "", model: str = "", model_file: str = "", extra: str = "") -> str:
    """A minimal valid config (one CPU model) with extra lines in its sections."""
    if model_file:
        write(tmp_path, "model.yaml", model_file)
    text = "models:\n  policy:\n    num_cpu: 1\n"
    if model_file:
        text += "    model_config_file: model.yaml\n"
    text += textwrap.indent(textwrap.dedent(model), "    ")
    text += "runtime:\n  sample_per_episode: 16\n" + textwrap.indent(textwrap.dedent(runtime), "  ")
    return write(tmp_path, "rlhf.yaml", text + textwrap.dedent(extra))


# ------------------------------------------------------------ env value typing
@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("-2", -2), ("+7", 7), ("0.5", 0.5), ("1e-5", 1e-5), ("2.5E3", 2500.0), (".5", 0.5), ("1.", 1.0),
    ("e5", "e5"), (".", "."),
    ("True", True), ("true", True), ("False", False), ("false", False),
    ("None", None), ("null", None),
    ("", ""), ("abc", "abc"), ("1.0.2", "1.0.2"), ("/a/b-c.d", "/a/b-c.d"), ("TRUE", "TRUE"), ("yes", "yes"),
])
def test_type_env_value(text, expected):
    value = type_env_value(text)
    assert value == expected and type(value) is type(expected)


def test_defaults_are_typed_when_whole_value(tmp_path, monkeypatch):
    for name in ("n_ep", "timeout", "dbg", "ckpt", "exp", "gbs"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(one_model(tmp_path, runtime="""
        num_episode: ${n_ep:5}
        actor_timeout_s: ${timeout:12.5}
        debug: ${dbg:True}
        data_checkpoint_path: ${ckpt:None}
        exp_name: ${exp:my-exp.v1}
        output_dir: ${out_root:/tmp/x}/run-${n_ep:5}
    """))
    rt = cfg.runtime
    assert rt.num_episode == 5 and isinstance(rt.num_episode, int)
    assert rt.actor_timeout_s == 12.5
    assert rt.debug is True
    assert rt.data_checkpoint_path is None
    assert rt.exp_name == "my-exp.v1"
    assert rt.output_dir == "/tmp/x/run-5"  # embedded: substituted as text


def test_env_values_are_typed_the_same_way(tmp_path, monkeypatch):
    monkeypatch.setenv("n_ep", "7")
    monkeypatch.setenv("timeout", "1e2")
    monkeypatch.setenv("dbg", "false")
    monkeypatch.setenv("ckpt", "null")
    monkeypatch.setenv("exp", "from-env")
    monkeypatch.setenv("out_root", "/data")
    cfg = load_config(one_model(tmp_path, runtime="""
        num_episode: ${n_ep:5}
        actor_timeout_s: ${timeout:12.5}
        debug: ${dbg:True}
        data_checkpoint_path: ${ckpt:/somewhere}
        exp_name: ${exp:x}
        output_dir: ${out_root:/tmp/x}/run-${n_ep:5}
    """))
    rt = cfg.runtime
    assert rt.num_episode == 7 and isinstance(rt.num_episode, int)
    assert rt.actor_timeout_s == 100.0
    assert rt.debug is False
    assert rt.data_checkpoint_path is None
    assert rt.exp_name == "from-env"
    assert rt.output_dir == "/data/run-7"


def test_empty_default_is_empty_string(tmp_path, monkeypatch):
    monkeypatch.delenv("eval_data_path", raising=False)
    cfg = load_config(one_model(tmp_path, runtime="eval_data_path: ${eval_data_path:}\n"))
    assert cfg.runtime.eval_data_path == ""


def test_env_only_syntax(tmp_path, monkeypatch):
    path = one_model(tmp_path, runtime="exp_name: ${MY_EXP_NAME}\n")
    monkeypatch.setenv("MY_EXP_NAME", "run42")
    assert load_config(path).runtime.exp_name == "run42"
    monkeypatch.delenv("MY_EXP_NAME")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    # ChatLearn 1.x's rule: an unset ${name} is None; exp_name needs a value, so it is an error.
    assert "rlhf.yaml: runtime.exp_name: needs a value, but environment variable 'MY_EXP_NAME' is not set" in msg
    assert "${MY_EXP_NAME:default}" in msg


def test_env_value_is_not_interpolated_again(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIRD", "a${runtime.seed}b")
    cfg = load_config(one_model(tmp_path, runtime="exp_name: ${WEIRD:x}\noutput_dir: pre/${WEIRD:x}\n"))
    assert cfg.runtime.exp_name == "a${runtime.seed}b"
    assert cfg.runtime.output_dir == "pre/a${runtime.seed}b"


# ------------------------------------------------ coexistence with omegaconf
def test_omegaconf_interpolation_coexists(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_TEST_HOME", "/home/test")
    monkeypatch.delenv("out", raising=False)
    cfg = load_config(one_model(tmp_path, runtime="""
        num_episode: ${n_ep:4}
        save_episode_interval: ${runtime.num_episode}
        eval_episode_interval: ${.num_episode}
        output_dir: ${oc.env:CL_TEST_HOME}/out
        exp_name: ${out:${runtime.output_dir}/exp}
        data_checkpoint_path: \\${literal}
    """))
    rt = cfg.runtime
    assert rt.save_episode_interval == 4 and isinstance(rt.save_episode_interval, int)
    assert rt.eval_episode_interval == 4
    assert rt.output_dir == "/home/test/out"
    assert rt.exp_name == "/home/test/out/exp"  # a default may hold an omegaconf interpolation
    assert rt.data_checkpoint_path == "${literal}"  # omegaconf's escape


def test_registered_resolver_is_left_to_omegaconf(tmp_path):
    from omegaconf import OmegaConf

    # register_resolver is omegaconf 2.4's name; 2.3 (the GPU stack) has register_new_resolver.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register("cl_test_twice", lambda x: 2 * int(x), replace=True)
    try:
        cfg = load_config(one_model(tmp_path, runtime="num_episode: ${cl_test_twice:3}\n"))
    finally:
        OmegaConf.clear_resolver("cl_test_twice")
    assert cfg.runtime.num_episode == 6


def test_bare_name_is_an_environment_value_even_where_it_is_a_key(tmp_path, monkeypatch):
    # ChatLearn 1.x: every ${name} is an environment value (model files say
    # `tokenizer_model: ${tokenizer_model}`); ${.name} is omegaconf's sibling interpolation.
    monkeypatch.setenv("hidden_size", "999")
    monkeypatch.delenv("seq_length", raising=False)
    cfg = load_config(one_model(tmp_path, model_file="""
        hidden_size: 64
        ffn_hidden_size: ${hidden_size}
        kv_channels: ${.hidden_size}
        seq_length: ${seq_length:128}
        max_position_embeddings: ${seq_length}
    """))
    args = cfg.models["policy"].args_dict
    assert args == {"hidden_size": 64, "ffn_hidden_size": 999, "kv_channels": 64, "seq_length": 128,
                    "max_position_embeddings": None}
    assert any("model.yaml: models.policy.args_dict.max_position_embeddings: environment variable 'seq_length' "
               "not set" in w for w in cfg.warnings)


def test_bad_interpolation_names_file_and_key(tmp_path):
    path = one_model(tmp_path, runtime="num_episode: ${runtime.nope}\nexp_name: ${oops\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert any(line.endswith("rlhf.yaml: runtime.num_episode: cannot resolve '${runtime.nope}': "
                             "Interpolation key 'runtime.nope' not found") for line in lines)
    assert any("runtime.exp_name: invalid interpolation '${oops'" in line for line in lines)
    assert len(lines) == 2  # no follow-on type errors for the broken keys


def test_substitute_env_helper():
    tree = {"a": "${X:1}", "b": "p-${X:1}", "c": ["${Y:true}"], "d": "${a}", "e": "${oc.env:HOME}"}
    assert substitute_env(tree, environ={"X": "5"}) == {
        "a": 5, "b": "p-5", "c": [True], "d": None, "e": "${oc.env:HOME}"}


# ------------------------------------------------------------------- includes
def test_include_precedence_and_nesting():
    cfg = load_config(os.path.join(DATA, "includes", "rlhf.yaml"))
    args = cfg.models["policy"].args_dict
    assert args["own"] == "model"
    assert args["shared_by_all"] == "model"  # the including file wins over its includes
    assert args["shared_by_includes"] == "second"  # a later include wins (over first, and over its own include)
    assert args["only_first"] == "first"
    assert args["only_deep"] == "deep" and args["only_leaf"] == "leaf"  # nested, relative to each file
    assert args["nested"] == {"x": "first", "y": "second"}  # mappings merge key by key
    assert "includes" not in args


def test_include_cycle_is_an_error():
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(DATA, "cycle", "rlhf.yaml"))
    msg = str(err.value)
    assert "b.yaml: includes[0]: include cycle:" in msg
    assert "a.yaml -> " in msg and msg.rstrip().endswith("a.yaml")


def test_missing_include_names_including_file(tmp_path):
    path = one_model(tmp_path, model_file="includes:\n  - base.yaml\n  - nothere.yaml\n")
    write(tmp_path, "base.yaml", "x: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.yaml: includes[1]: include file not found: 'nothere.yaml'" in str(err.value)


def test_main_config_may_use_includes(tmp_path):
    write(tmp_path, "common.yaml", "runtime:\n  num_episode: 9\n  seed: 5\n")
    path = one_model(tmp_path, runtime="seed: 6\n", extra="includes:\n  - common.yaml\n")
    cfg = load_config(path)
    assert (cfg.runtime.num_episode, cfg.runtime.seed) == (9, 6)


def test_errors_name_the_include_that_set_the_key(tmp_path):
    write(tmp_path, "base_inference.yaml", "top_p: 5.0\ntemperature: 1.0\n")
    path = one_model(tmp_path, model_file="includes: [base_inference.yaml]\nn: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{tmp_path}/base_inference.yaml: models.policy.args_dict.top_p: "
                              "expected a value in [0, 1] (0 or 1: no limit), got 5.0")


# ------------------------------------------------------- relative model files
def test_model_config_file_is_relative_to_the_naming_file(tmp_path, monkeypatch):
    write(tmp_path, "cfg/models/policy.yaml", "includes: [shared.yaml]\nlr: 0.1\n")
    write(tmp_path, "cfg/models/shared.yaml", "hidden_size: 8\n")
    write(tmp_path, "cfg/data/prompts.jsonl", "{}\n")
    write(tmp_path, "cfg/rlhf.yaml", """\
        models:
          policy:
            model_config_file: models/policy.yaml
            num_cpu: 1
        runtime:
          data_path: data/prompts.jsonl
        """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.join("..", "cfg", "rlhf.yaml"))
    policy = cfg.models["policy"]
    assert policy.args_dict == {"hidden_size": 8, "lr": 0.1}
    assert policy.model_config_file == str(tmp_path / "cfg" / "models" / "policy.yaml")
    assert cfg.runtime.data_path == str(tmp_path / "cfg" / "data" / "prompts.jsonl")
    assert cfg.config_path == str(tmp_path / "cfg" / "rlhf.yaml")


def test_model_config_file_in_an_include_is_relative_to_that_include(tmp_path):
    write(tmp_path, "shared/models.yaml", "models:\n  policy:\n    model_config_file: p.yaml\n    num_cpu: 1\n")
    write(tmp_path, "shared/p.yaml", "from_shared: true\n")
    path = write(tmp_path, "exp/rlhf.yaml", "includes: [../shared/models.yaml]\n")
    assert load_config(path).models["policy"].args_dict == {"from_shared": True}


def test_inline_args_dict_wins_over_model_file(tmp_path):
    path = one_model(tmp_path, model_file="a: 1\nb: 2\n", model="args_dict:\n  b: 3\n  c: ${runtime.seed}\n",
                     runtime="seed: 11\n")
    assert load_config(path).models["policy"].args_dict == {"a": 1, "b": 3, "c": 11}


# ------------------------------------------------------------------ overrides
def test_overrides_dotlist_and_dict(tmp_path, monkeypatch):
    monkeypatch.setenv("EP", "8")
    path = one_model(tmp_path, model_file="hidden: 4\n")
    cfg = load_config(path, ["runtime.num_episode=${EP:2}", "models.policy.num_cpu=2",
                             "runtime.colocation=[]", "runtime.exp_name='007'",
                             "models.policy.args_dict.hidden=16", "runtime.eval_data_path="])
    assert cfg.runtime.num_episode == 8
    assert cfg.models["policy"].num_cpu == 2
    assert cfg.runtime.colocation == []
    assert cfg.runtime.exp_name == "007"
    assert cfg.models["policy"].args_dict == {"hidden": 16}
    assert cfg.runtime.eval_data_path == ""
    cfg = load_config(path, {"runtime.num_episode": 3, "runtime": {"seed": 9}})
    assert (cfg.runtime.num_episode, cfg.runtime.seed) == (3, 9)


def test_override_errors_name_overrides(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(one_model(tmp_path), ["runtime.num_episode=abc", "no_equals_sign"])
    lines = str(err.value).splitlines()
    assert "<overrides>: no_equals_sign: expected an override of the form key.path=value" in lines
    assert "<overrides>: runtime.num_episode: expected int, got 'abc' (str)" in lines


# --------------------------------------------------------- the returned object
def test_returns_dataclasses_with_names(tmp_path):
    cfg = chatlearn.load_config(one_model(tmp_path))
    assert isinstance(cfg, ChatLearnConfig)
    assert isinstance(cfg.models["policy"], ModelConfig)
    assert cfg.models["policy"].name == "policy"
    assert "name" not in config_to_dict(cfg)["models"]["policy"]
    assert config_to_dict(cfg, internal=True)["models"]["policy"]["name"] == "policy"


def test_yaml_details(tmp_path):
    path = one_model(tmp_path, model_file="lr: 1e-5\nday: 2024-01-02\nbase: &b {x: 1, y: 2}\nother: {<<: *b, y: 3}\n")
    args = load_config(path).models["policy"].args_dict
    # floats without a dot; dates stay strings; anchors and merge keys work
    assert args == {"lr": 1e-5, "day": "2024-01-02", "base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3}}
    dup = write(tmp_path, "dup.yaml", "models:\n  p:\n    num_cpu: 1\nruntime:\n  seed: 1\n  seed: 2\n")
    cfg = load_config(dup)  # ChatLearn 1.x's rule: the last value wins, with a warning
    assert cfg.runtime.seed == 2
    assert cfg.warnings == [f"{dup}: runtime.seed: given twice in one mapping (lines 5 and 6); "
                            "the value of line 6 is used, as in ChatLearn 1.x"]
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nothing.yaml")


# --------------------------------------------- a ChatLearn 1.x-style config
def test_chatlearn_1x_config_with_env_overrides_and_includes(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("num_gpu", "policy_", "ppo_", "lr", "sample_per", "train_global")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("num_gpu_policy", "16")
    monkeypatch.setenv("policy_tp", "8")
    monkeypatch.setenv("policy_inference_load", "/ckpt/sft")
    monkeypatch.setenv("max_seq_len", "4096")
    monkeypatch.setenv("exp_name", "ppo-7b")
    monkeypatch.setenv("output_dir", "/out")
    monkeypatch.delenv("eval_data_path", raising=False)
    monkeypatch.delenv("save_dir", raising=False)
    cfg = load_config(os.path.join(DATA, "chatlearn1x", "rlhf.yaml"))
    policy = cfg.models["policy"]
    assert (policy.num_gpu, policy.tensor_model_parallel_size, policy.trainable) == (16, 8, False)
    # policy_shared.yaml (a later include) wins over base_inference.yaml's base.yaml for `load`
    assert policy.args_dict["load"] == "/ckpt/sft"
    assert policy.args_dict["seq_length"] == 4096 and policy.args_dict["top_p"] == 0.9
    ppo = cfg.models["ppo_policy"]
    assert ppo.args_dict["lr"] == 2e-6  # the including file wins over base_train.yaml
    assert ppo.args_dict["min_lr"] == 1e-9
    assert ppo.args_dict["save"] == "/policy"
    assert ppo.lora.lora_dim == 64 and ppo.lora.lora_dropout == 0.05
    assert cfg.runtime.output_dir == "/out/ppo-7b" and cfg.runtime.exp_name == "ppo-7b"
    assert cfg.runtime.eval_data_path == "" and cfg.runtime.data_checkpoint_path == ""
    assert cfg.runtime.data_path == os.path.join(DATA, "chatlearn1x", "prompts.jsonl")
    assert cfg.runtime.colocation == ["policy,ppo_policy,reward,reference,value,ppo_value"]
    assert cfg.runtime_env.platform == "DLC"


def test_example_configs_load(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("num_episode", "sample_per_episode", "data_path", "num_cpu_policy", "policy_tp"):
        monkeypatch.delenv(name, raising=False)
    toy_path = os.path.join(root, "examples", "toy", "configs", "rlhf.yaml")
    toy = load_config(toy_path)
    assert list(toy.models) == ["policy", "reference", "reward", "value", "ppo_policy", "ppo_value"]
    assert toy.runtime.num_episode == 6
    assert all(m.num_cpu in (1, 2) and m.num_gpu == 0 for m in toy.models.values())
    assert toy.runtime.sample_per_episode <= 16
    monkeypatch.setenv("num_episode", "1")
    assert load_config(toy_path).runtime.num_episode == 1
    example = load_config(os.path.join(root, "configs", "example.yaml"))
    assert example.models["policy"].args_dict["ffn_hidden_size"] == example.models["policy"].args_dict["hidden_size"]
