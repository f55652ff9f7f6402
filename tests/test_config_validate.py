"""Validation: every class of bad input gives a message naming file, key path and expectation."""
from __future__ import annotations

import os
import textwrap

import pytest

from chatlearn.config.errors import ConfigError
from chatlearn.config.loader import load_config
from chatlearn.config.schema import ChatLearnConfig, ModelConfig, RuntimeConfig
from chatlearn.config.validate import validate_config


def load_yaml(tmp_path, text: str, files: dict | None = None, overrides=None) -> ChatLearnConfig:
    for name, content in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(content))
    path = tmp_path / "rlhf.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, overrides)


def problems(tmp_path, text: str, files: dict | None = None, overrides=None) -> list[str]:
    """The problem lines, with the tmp dir cut off the file names."""
    with pytest.raises(ConfigError) as err:
        load_yaml(tmp_path, text, files, overrides)
    lines = str(err.value).splitlines()
    assert len(lines) == len(err.value.issues)
    return [line.replace(f"{tmp_path}{os.sep}", "") for line in lines]


OK_MODELS = """\
models:
  policy:
    num_cpu: 2
  ppo_policy:
    num_cpu: 1
    trainable: true
"""


def test_valid_minimal(tmp_path):
    cfg = load_yaml(tmp_path, OK_MODELS)
    assert cfg.models["ppo_policy"].trainable is True
    assert cfg.runtime == RuntimeConfig()


# ------------------------------------------------------------------ unknown keys
def test_unknown_keys_everywhere_with_suggestions(tmp_path):
    lines = problems(tmp_path, """\
        runtime_env:
          env_var: {}
        models:
          policy:
            num_cpus: 2
            num_cpu: 2
            lora:
              lora_dimm: 4
            batch_generation:
              rankin: true
            hidden_size: 4096
        runtime:
          num_episodes: 3
        runtimes: {}
        """)
    assert lines == [
        "rlhf.yaml: runtime_env.env_var: unknown key 'env_var'; did you mean 'env_vars'?",
        "rlhf.yaml: models.policy.num_cpus: unknown key 'num_cpus'; did you mean 'num_cpu'?",
        "rlhf.yaml: models.policy.lora.lora_dimm: unknown key 'lora_dimm'; did you mean 'lora_dim'?",
        "rlhf.yaml: models.policy.batch_generation.rankin: unknown key 'rankin'; did you mean 'ranking'?",
        "rlhf.yaml: models.policy.hidden_size: unknown key 'hidden_size'; valid keys: model_config_file, num_gpu, "
        "num_cpu, gpu_per_process, trainable, tensor_model_parallel_size, pipeline_model_parallel_size, "
        "generation_batch_size, sync_frequency, free_memory, lora, batch_generation, args_dict; "
        "backend arguments go in model_config_file or under args_dict",
        "rlhf.yaml: runtime.num_episodes: unknown key 'num_episodes'; did you mean 'num_episode'?",
        "rlhf.yaml: runtimes: unknown key 'runtimes'; did you mean 'runtime'?",
    ]


def test_internal_fields_are_not_keys(tmp_path):
    lines = problems(tmp_path, OK_MODELS.replace("    num_cpu: 2\n  ppo", "    num_cpu: 2\n    name: x\n  ppo")
                     + "config_path: x\n")
    assert lines[0].startswith("rlhf.yaml: models.policy.name: unknown key 'name'")
    assert lines[1].startswith("rlhf.yaml: config_path: unknown key 'config_path'")


# ------------------------------------------------------------------------ types
def test_wrong_types(tmp_path):
    lines = problems(tmp_path, """\
        runtime_env:
          excludes: "*.pt"
          env_vars:
            A: 1
            B: [x]
        models:
          policy:
            num_cpu: "3"
            trainable: 1
            free_memory: "False"
            tensor_model_parallel_size: 1.0
            lora: true
          ppo_policy:
            num_cpu: true
            trainable: true
        runtime:
          num_episode: abc
          actor_timeout_s: "10"
          colocation: policy,ppo_policy
          data_path: 3
          debug: null
        """)
    assert lines == [
        "rlhf.yaml: runtime_env.excludes: expected list of str, got '*.pt' (str)",
        "rlhf.yaml: runtime_env.env_vars.B: expected str, got ['x'] (list)",
        "rlhf.yaml: models.policy.num_cpu: expected int, got '3' (str)",
        "rlhf.yaml: models.policy.trainable: expected bool, got 1 (int)",
        "rlhf.yaml: models.policy.free_memory: expected bool, got 'False' (str)",
        "rlhf.yaml: models.policy.tensor_model_parallel_size: expected int, got 1.0 (float)",
        "rlhf.yaml: models.policy.lora: expected a mapping, got True (bool)",
        "rlhf.yaml: models.ppo_policy.num_cpu: expected int, got True (bool)",
        "rlhf.yaml: runtime.num_episode: expected int, got 'abc' (str)",
        "rlhf.yaml: runtime.actor_timeout_s: expected float, got '10' (str)",
        "rlhf.yaml: runtime.colocation: expected list of str, got 'policy,ppo_policy' (str)",
        "rlhf.yaml: runtime.data_path: expected str or null, got 3 (int)",
        "rlhf.yaml: runtime.debug: expected bool, got None (NoneType)",
    ]


def test_typed_env_values_pass_where_quoted_strings_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("NCPU", "2")
    cfg = load_yaml(tmp_path, "models:\n  policy:\n    num_cpu: ${NCPU:1}\n    trainable: ${TRAIN:false}\n")
    assert cfg.models["policy"].num_cpu == 2 and cfg.models["policy"].trainable is False


def test_env_typed_values_keep_their_text_where_a_string_is_expected(tmp_path, monkeypatch):
    # An environment variable cannot be quoted: exp_name=2024 must still give the string "2024".
    for name in ("EXP", "OUT", "CKPT", "TOK", "STOP", "NCPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXP", "2024")
    monkeypatch.setenv("TOK", "7")
    monkeypatch.setenv("NCPU", "2")
    files = {"gen.yaml": "tokenizer: ${TOK:gpt2}\nstop_token_list: ${STOP:12}\nseq_length: ${NCPU:1}\n"}
    text = OK_MODELS.replace("num_cpu: 2\n  ppo", "num_cpu: ${NCPU:1}\n    model_config_file: gen.yaml\n  ppo")
    text += "runtime:\n  exp_name: ${EXP:run}\n  output_dir: ${OUT:1.5}\n  data_checkpoint_path: ${CKPT:true}\n"
    cfg = load_yaml(tmp_path, text, files)
    assert cfg.runtime.exp_name == "2024" and cfg.runtime.output_dir == "1.5"
    assert cfg.runtime.data_checkpoint_path == "true"
    policy = cfg.models["policy"]
    assert policy.num_cpu == 2  # where the schema wants an int, it stays an int
    # vLLM string keys take the text; free-form backend keys stay typed.
    assert policy.args_dict == {"tokenizer": "7", "stop_token_list": "12", "seq_length": 2}

    # Numbers written literally are still errors, in the main file and inline over a model file.
    text = OK_MODELS.replace("num_cpu: 2\n  ppo", "num_cpu: 2\n    model_config_file: gen.yaml\n"
                                                  "    args_dict:\n      tokenizer: 7\n  ppo")
    assert problems(tmp_path, text + "runtime:\n  exp_name: 2024\n", files) == [
        "rlhf.yaml: models.policy.args_dict.tokenizer: expected str or null, got 7 (int)",
        "rlhf.yaml: runtime.exp_name: expected str, got 2024 (int)",
    ]


def test_env_vars_values_become_strings_and_floats_accept_ints(tmp_path):
    cfg = load_yaml(tmp_path, OK_MODELS + "runtime_env:\n  env_vars:\n    N: 1\n    F: true\n"
                    "runtime:\n  actor_timeout_s: 30\n")
    assert cfg.runtime_env.env_vars == {"N": "1", "F": "True"}
    assert cfg.runtime.actor_timeout_s == 30.0 and isinstance(cfg.runtime.actor_timeout_s, float)


def test_vllm_keys_are_checked_and_left_untouched(tmp_path):
    files = {"gen.yaml": """\
        n: "2"
        top_p: -0.1
        top_k: -2
        temperature: -0.5
        eval_top_p: 1.5
        gpu_memory_utilization: 0
        prompt_logprobs: null
        use_beam_search: 1
        max_new_tokens: 0
        weight_loader: load_weight
        apply_chat_template: "yes"
        my_megatron_arg: anything
        """}
    text = OK_MODELS.replace("num_cpu: 2\n  ppo", "num_cpu: 2\n    model_config_file: gen.yaml\n  ppo")
    lines = problems(tmp_path, text, files)
    key = "gen.yaml: models.policy.args_dict"
    assert lines == [
        f"{key}.n: expected int, got '2' (str)",
        f"{key}.top_p: expected a value in [0, 1] (0 or 1: no limit), got -0.1",
        f"{key}.top_k: expected -1 or 0 (no limit) or a positive int, got -2",
        f"{key}.temperature: expected >= 0, got -0.5",
        f"{key}.eval_top_p: expected a value in [0, 1] (0 or 1: no limit), got 1.5",
        f"{key}.gpu_memory_utilization: expected a value in (0, 1], got 0",
        f"{key}.use_beam_search: expected bool, got 1 (int)",
        f"{key}.max_new_tokens: expected >= 1, got 0",
        f"{key}.weight_loader: expected one of 'auto', 'reload_weights', 'load_weights', got 'load_weight'",
        f"{key}.apply_chat_template: expected bool, got 'yes' (str)",
    ]
    (tmp_path / "gen.yaml").write_text("top_p: 1\ntemperature: 0\nmy_arg: x\napply_chat_template: true\n")
    cfg = load_config(tmp_path / "rlhf.yaml")
    assert cfg.models["policy"].args_dict == {"top_p": 1, "temperature": 0, "my_arg": "x",
                                              "apply_chat_template": True}  # as written


# ------------------------------------------------------------------------ ranges
def test_out_of_range_values(tmp_path):
    lines = problems(tmp_path, """\
        models:
          policy:
            num_gpu: -1
            num_cpu: 1
            gpu_per_process: 0
            generation_batch_size: 0
            sync_frequency: 0
            lora:
              lora_dim: 0
              lora_dropout: 1.0
        runtime:
          stream_data_loader_type: static
          max_relay_episode: -2
          sample_per_episode: 0
          num_episode: -1
          seed: -5
          actor_timeout_s: 0
          exp_name: ""
        """)
    assert lines == [
        "rlhf.yaml: models.policy.num_gpu: expected >= 0, got -1",
        "rlhf.yaml: models.policy.gpu_per_process: expected >= 1, got 0",
        "rlhf.yaml: models.policy.generation_batch_size: expected -1 (use runtime.generation_batch_size) "
        "or a positive int, got 0",
        "rlhf.yaml: models.policy.sync_frequency: expected >= 1, got 0",
        "rlhf.yaml: models.policy.lora.lora_dim: expected >= 1, got 0",
        "rlhf.yaml: models.policy.lora.lora_dropout: expected a value in [0, 1), got 1.0",
        "rlhf.yaml: runtime.stream_data_loader_type: expected one of 'fixed', 'dynamic', got 'static'",
        "rlhf.yaml: runtime.max_relay_episode: expected >= -1, got -2",
        "rlhf.yaml: runtime.sample_per_episode: expected >= 1, got 0",
        "rlhf.yaml: runtime.num_episode: expected >= 0, got -1",
        "rlhf.yaml: runtime.seed: expected a value in [0, 4294967295], got -5",
        "rlhf.yaml: runtime.actor_timeout_s: expected > 0, got 0",
        "rlhf.yaml: runtime.exp_name: expected a non-empty string, got ''",
    ]


def test_max_relay_episode_minus_one_is_fine(tmp_path):
    assert load_yaml(tmp_path, OK_MODELS + "runtime:\n  max_relay_episode: -1\n").runtime.max_relay_episode == -1


# ------------------------------------------------------------------------ files
def test_missing_files(tmp_path):
    lines = problems(tmp_path, """\
        models:
          policy:
            num_cpu: 1
            model_config_file: models/policy.yaml
        runtime:
          data_path: data/train.jsonl
          eval_data_path: ""
        """)
    assert lines == [
        "rlhf.yaml: models.policy.model_config_file: model_config_file not found: 'models/policy.yaml' "
        "(looked for models/policy.yaml)",
        "rlhf.yaml: runtime.data_path: path not found: 'data/train.jsonl' (looked for data/train.jsonl)",
    ]


def test_missing_file_in_an_include_is_relative_to_the_include(tmp_path):
    lines = problems(tmp_path, "includes: [sub/models.yaml]\n",
                     {"sub/models.yaml": "models:\n  policy:\n    num_cpu: 1\n    model_config_file: p.yaml\n"})
    assert lines == ["sub/models.yaml: models.policy.model_config_file: model_config_file not found: 'p.yaml' "
                     "(looked for sub/p.yaml)"]


# ------------------------------------------------------------------------- sizes
def test_model_without_devices(tmp_path):
    lines = problems(tmp_path, "models:\n  policy:\n    trainable: false\n")
    assert lines == ["rlhf.yaml: models.policy: expected num_gpu or num_cpu > 0 (the model needs devices), "
                     "got num_gpu=0, num_cpu=0"]


def test_no_models_and_bad_model_names(tmp_path):
    assert problems(tmp_path, "runtime: {}\n") == ["rlhf.yaml: models: expected at least one model"]
    lines = problems(tmp_path, "models:\n  'a,b':\n    num_cpu: 1\n  ok:\n    num_cpu: 1\n")
    assert lines == ["rlhf.yaml: models.a,b: expected a model name matching [A-Za-z_][A-Za-z0-9_-]* "
                     "(names appear in colocation lists and key paths), got 'a,b' (str)"]


def test_parallel_sizes_must_divide_devices(tmp_path):
    lines = problems(tmp_path, """\
        models:
          policy:
            num_gpu: 6
            tensor_model_parallel_size: 4
          reward:
            num_cpu: 3
            tensor_model_parallel_size: 2
          ref:
            num_gpu: 3
            gpu_per_process: 2
        """)
    assert lines == [
        "rlhf.yaml: models.ref.num_gpu: expected a multiple of gpu_per_process (2), got 3",
        "rlhf.yaml: models.policy.num_gpu: expected a multiple of tensor_model_parallel_size × "
        "pipeline_model_parallel_size = 4 × 1 = 4, got 6",
        "rlhf.yaml: models.reward.num_cpu: expected a multiple of tensor_model_parallel_size × "
        "pipeline_model_parallel_size = 2 × 1 = 2, got 3",
    ]


def test_cpu_counts_are_checked_too(tmp_path):
    # num_gpu fits TP×PP but num_cpu (used on CPU runs) does not.
    lines = problems(tmp_path, "models:\n  policy:\n    num_gpu: 4\n    num_cpu: 3\n"
                               "    tensor_model_parallel_size: 2\n    pipeline_model_parallel_size: 2\n")
    assert lines == ["rlhf.yaml: models.policy.num_cpu: expected a multiple of tensor_model_parallel_size × "
                     "pipeline_model_parallel_size = 2 × 2 = 4, got 3"]


def test_replicas_times_generation_batch_size(tmp_path):
    lines = problems(tmp_path, """\
        models:
          policy:
            num_cpu: 4
            generation_batch_size: 4
          reward:
            num_cpu: 2
        runtime:
          sample_per_episode: 8
          generation_batch_size: 8
          train_global_batch_size: 8
        """)
    assert lines == [
        "rlhf.yaml: models.policy: 4 replica(s) (num_cpu=4 / (TP 1 × PP 1)) × generation_batch_size 4 = 16 "
        "exceeds runtime.sample_per_episode = 8: some replicas would get no data; lower the replicas or the batch size",
        "rlhf.yaml: models.reward: 2 replica(s) (num_cpu=2 / (TP 1 × PP 1)) × generation_batch_size 8 = 16 "
        "exceeds runtime.sample_per_episode = 8: some replicas would get no data; lower the replicas or the batch size",
    ]


def test_train_global_batch_size_and_data_parallel(tmp_path):
    lines = problems(tmp_path, """\
        models:
          ppo_policy:
            num_gpu: 8
            num_cpu: 2
            tensor_model_parallel_size: 2
            trainable: true
        runtime:
          train_micro_batch_size: 2
          train_global_batch_size: 4
          sample_per_episode: 16
        """)
    # GPU run: DP = 8 / 2 = 4 -> needs a multiple of 8. The CPU run (DP 1) fits.
    assert lines == [
        "rlhf.yaml: runtime.train_global_batch_size: expected a multiple of train_micro_batch_size × "
        "data-parallel size of trainable model 'ppo_policy' = 2 × 4 = 8 (DP = num_gpu 8 / (TP 2 × PP 1)), got 4",
    ]


def test_fixed_mode_needs_whole_global_batches(tmp_path):
    text = OK_MODELS + "runtime:\n  sample_per_episode: 12\n  train_global_batch_size: 8\n" \
                       "  train_micro_batch_size: 2\n  stream_data_loader_type: {mode}\n"
    assert problems(tmp_path, text.format(mode="fixed")) == [
        "rlhf.yaml: runtime.sample_per_episode: expected a multiple of runtime.train_global_batch_size (8) "
        "when stream_data_loader_type is 'fixed', got 12"]
    assert load_yaml(tmp_path, text.format(mode="dynamic")).runtime.sample_per_episode == 12


# -------------------------------------------------------------------- colocation
def test_colocation_problems(tmp_path):
    lines = problems(tmp_path, OK_MODELS + textwrap.dedent("""\
          reward:
            num_cpu: 1
        runtime:
          colocation:
            - policy,ppo_polcy
            - ppo_policy,policy
            - reward,reward
            - policy,,reward
        """))
    assert lines == [
        "rlhf.yaml: runtime.colocation[0]: unknown model 'ppo_polcy' in colocation group; did you mean 'ppo_policy'?",
        "rlhf.yaml: runtime.colocation[1]: model 'policy' appears in two colocation groups "
        "(runtime.colocation[0] and [1]); a model can be in one group only",
        "rlhf.yaml: runtime.colocation[2]: model 'reward' appears twice in this group; "
        "a model can be in one group only",
        "rlhf.yaml: runtime.colocation[3]: expected comma-separated model names, got 'policy,,reward'",
        "rlhf.yaml: runtime.colocation[3]: model 'policy' appears in two colocation groups "
        "(runtime.colocation[0] and [3]); a model can be in one group only",
        "rlhf.yaml: runtime.colocation[3]: model 'reward' appears in two colocation groups "
        "(runtime.colocation[2] and [3]); a model can be in one group only",
    ]


def test_colocation_flow_list_pitfall(tmp_path):
    # YAML reads [policy,ppo_policy] as two one-model groups: no colocation at all.
    lines = problems(tmp_path, OK_MODELS + "runtime:\n  colocation: [policy,ppo_policy]\n")
    assert lines[0] == ("rlhf.yaml: runtime.colocation[0]: expected a group of two or more comma-separated model "
                        "names, got 'policy' (write `- policy,ppo_policy` on its own line, "
                        "or quote it in a [...] list)")
    assert len(lines) == 2
    cfg = load_yaml(tmp_path, OK_MODELS + "runtime:\n  colocation: ['policy,ppo_policy']\n")
    assert cfg.runtime.colocation == ["policy,ppo_policy"]


# ---------------------------------------------------------------- many at once
def test_all_problems_at_once_across_files(tmp_path, monkeypatch):
    monkeypatch.delenv("UNSET_FOR_TEST", raising=False)
    lines = problems(tmp_path, """\
        models:
          policy:
            model_config_file: policy.yaml
            num_cpu: "2"
            trainable: yes-please
          ppo_policy:
            num_cpu: 3
            trainable: true
            tensor_model_parallel_size: 2
        runtime:
          num_episode: abc
          output_dir: ${UNSET_FOR_TEST}
          colocation: ["policy,ghost"]
        """, {"policy.yaml": "includes: [base.yaml]\ntop_p: 2\n", "base.yaml": "temperature: hot\n"},
        overrides=["runtime.seed=-1"])
    assert lines == [
        "rlhf.yaml: models.policy.num_cpu: expected int, got '2' (str)",
        "rlhf.yaml: models.policy.trainable: expected bool, got 'yes-please' (str)",
        "base.yaml: models.policy.args_dict.temperature: expected float, got 'hot' (str)",
        "policy.yaml: models.policy.args_dict.top_p: expected a value in [0, 1] (0 or 1: no limit), got 2",
        "rlhf.yaml: runtime.num_episode: expected int, got 'abc' (str)",
        "rlhf.yaml: runtime.output_dir: needs a value, but environment variable 'UNSET_FOR_TEST' is not set "
        "(set it, or write ${UNSET_FOR_TEST:default} to give a default)",
        "<overrides>: runtime.seed: expected a value in [0, 4294967295], got -1",
        "rlhf.yaml: runtime.colocation[0]: unknown model 'ghost' in colocation group; models are: policy, ppo_policy",
        "rlhf.yaml: models.ppo_policy.num_cpu: expected a multiple of tensor_model_parallel_size × "
        "pipeline_model_parallel_size = 2 × 1 = 2, got 3",
    ]


# ------------------------------------------------------------ Python-built configs
def test_validate_config_for_python_built_configs():
    cfg = ChatLearnConfig(models={"policy": ModelConfig(num_cpu=2)})
    checked = validate_config(cfg)
    assert checked.models["policy"].name == "policy"
    cfg.runtime.stream_data_loader_type = "nope"
    cfg.models["policy"].num_cpu = -1
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value).splitlines() == [
        "models.policy.num_cpu: expected >= 0, got -1",
        "runtime.stream_data_loader_type: expected one of 'fixed', 'dynamic', got 'nope'",
    ]
