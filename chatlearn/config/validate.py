"""Check a config tree against the schema and build the ``ChatLearnConfig``.

Two passes, both collecting problems instead of stopping at the first:

1. ``build_config``: every key is known (else the closest valid key is
   suggested), every value has the schema's type, every value is in range.
   Types are strict: ``"3"`` is not an int and ``1`` is not a bool, because a
   quoted number in YAML is usually a mistake worth hearing about. (Values from
   ``${name:default}`` arrive already typed, so they pass.) An int is accepted
   where a float is expected.
2. ``check_consistency``: the sizes fit together (parallel sizes divide the
   device counts, batches divide each other, colocation names real models, ...).
   The device-count checks run for each kind of run the config can make (GPU
   counts and CPU counts); a key that already failed pass 1 is skipped, so one
   mistake gives one message.

ChatLearn 1.x's keys (``chatlearn.config.compat``): its old names are read as
ours, its keys without effect here are accepted with a warning, a null where 1.x
meant "not set" takes our default, and a model's parallel sizes come from its
``model_config_file`` as in 1.x.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, Callable, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from chatlearn.config import compat
from chatlearn.config.errors import IssueCollector, display_path, unset_env_message
from chatlearn.config.placement import CPU, GPU, device_count, parse_colocation
from chatlearn.config.schema import (
    BatchGenerationConfig,
    ChatLearnConfig,
    LoraConfig,
    ModelConfig,
    RuntimeConfig,
    RuntimeEnvConfig,
    WEIGHT_LOADERS,
    VLLMArgs,
    config_to_dict,
)

__all__ = ["build_config", "check_consistency", "validate_config", "describe_type", "config_keys",
           "STREAM_DATA_LOADER_TYPES", "MODEL_NAME_PATTERN"]

STREAM_DATA_LOADER_TYPES = ("fixed", "dynamic")
POLICY_LAG_MODES = ("fixed", "streaming")
MODEL_NAME_PATTERN = "[A-Za-z_][A-Za-z0-9_-]*"

_INVALID = object()  # a value that failed its check; the field keeps its default


# ------------------------------------------------------------------ range rules
# A rule returns None when the value is fine, else what was expected.
Rule = Callable[[Any], Optional[str]]


def _at_least(n: float) -> Rule:
    return lambda v: None if v >= n else f">= {n}"


def _greater_than(n: float) -> Rule:
    return lambda v: None if v > n else f"> {n}"


def _within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def rule(v: Any) -> Optional[str]:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"a value in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return rule


def _minus_one_or_positive(what: str) -> Rule:
    return lambda v: None if v == -1 or v >= 1 else f"-1 ({what}) or a positive int"


def _one_of(*choices: str) -> Rule:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


def _non_empty(v: Any) -> Optional[str]:
    return None if v else "a non-empty string"


def _top_p(v: Any) -> Optional[str]:
    # 0 is ChatLearn 1.x's "no limit" (as 1.0 is): compat.vllm_top_p maps it for vLLM.
    return None if 0 <= v <= 1 else "a value in [0, 1] (0 or 1: no limit)"


def _top_k(v: Any) -> Optional[str]:
    return None if v >= -1 else "-1 or 0 (no limit) or a positive int"


_RULES: dict[type, dict[str, list[Rule]]] = {
    ModelConfig: {
        "num_gpu": [_at_least(0)],
        "num_cpu": [_at_least(0)],
        "gpu_per_process": [_at_least(1)],
        "tensor_model_parallel_size": [_at_least(1)],
        "pipeline_model_parallel_size": [_at_least(1)],
        "generation_batch_size": [_minus_one_or_positive("use runtime.generation_batch_size")],
        "sync_frequency": [_at_least(1)],
    },
    LoraConfig: {
        "lora_dim": [_at_least(1)],
        "lora_layer": [_non_empty],
        "lora_dropout": [_within(0, 1, hi_open=True)],
        "lora_scaling": [_greater_than(0)],
    },
    BatchGenerationConfig: {
        "min_prompt_length": [_at_least(0)],
    },
    RuntimeConfig: {
        "num_episode": [_at_least(0)],
        "progress_interval_s": [_at_least(0)],
        "sample_per_episode": [_at_least(1)],
        "num_training_epoch": [_at_least(1)],
        "generation_batch_size": [_at_least(1)],
        "train_micro_batch_size": [_at_least(1)],
        "train_global_batch_size": [_at_least(1)],
        "stream_data_loader_type": [_one_of(*STREAM_DATA_LOADER_TYPES)],
        "max_relay_episode": [_at_least(-1)],
        "policy_lag": [_at_least(0)],
        "policy_lag_mode": [_one_of(*POLICY_LAG_MODES)],
        "relay_episode_offset": [_at_least(0)],
        "save_episode_interval": [_at_least(0)],
        "eval_episode_interval": [_at_least(0)],
        "output_dir": [_non_empty],
        "exp_name": [_non_empty],
        "seed": [_within(0, 2**32 - 1)],
        "coalesced_buffer_mb": [_at_least(1)],
        "param_sync_transport": [_one_of("auto", "shm", "object_store", "cuda_ipc", "collective")],
        "actor_timeout_s": [_greater_than(0)],
        "max_data_ckpt_nums": [_at_least(0)],
        "load_data_checkpoint_iteration": [_at_least(1)],
        "training_data_num_limit": [_at_least(-1)],
        "eval_data_num_limit": [_at_least(-1)],
        "query_key": [_non_empty],
    },
    RuntimeEnvConfig: {},
    VLLMArgs: {
        "n": [_at_least(1)],
        "top_p": [_top_p],
        "top_k": [_top_k],
        "temperature": [_at_least(0)],
        "eval_temperature": [_at_least(0)],
        "eval_top_k": [_top_k],
        "eval_top_p": [_top_p],
        "eval_n": [_at_least(1)],
        "max_new_tokens": [_at_least(1)],
        "prompt_logprobs": [_at_least(0)],
        "max_num_batched_tokens": [_at_least(1)],
        "max_paddings": [_at_least(0)],
        "block_size": [_at_least(1)],
        "gpu_memory_utilization": [_within(0, 1, lo_open=True)],
        "weight_loader": [_one_of(*WEIGHT_LOADERS)],
    },
}

# Environment variables are strings anyway: accept `N: 1` and store "1".
_STRINGIFIED = {(RuntimeEnvConfig, "env_vars")}


# ------------------------------------------------------------------ type checks
def config_keys(cls: type) -> list[str]:
    """The YAML keys of a schema dataclass (fields the loader fills in are not keys)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def describe_type(tp: Any) -> str:
    """A schema type in words, as error messages and docs/configuration.md show it."""
    origin = get_origin(tp)
    if tp is Any:
        return "any"
    if origin is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(describe_type(a) for a in inner) + " or null"
    if origin is list:
        return f"list of {describe_type(get_args(tp)[0])}"
    if origin is dict:
        value = get_args(tp)[1]
        if value is Any:
            return "map"
        if value is ModelConfig:
            return "map of model name to model"
        return f"map of str to {describe_type(value)}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return tp.__name__


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_type(tp: Any, value: Any, path: tuple, issues: IssueCollector, stringify: bool = False) -> Any:
    """``value`` checked (and copied) against ``tp``; ``_INVALID`` after recording a problem."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None:
            return None
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        if _matches_scalar(inner, value) or not _is_scalar_type(inner) or _env_text(inner, value, path, issues):
            return _check_type(inner, value, path, issues)
        issues.add(path, f"expected {describe_type(tp)}, got {_got(value)}")
        return _INVALID
    if origin is list:
        if not isinstance(value, list):
            issues.add(path, f"expected {describe_type(tp)}, got {_got(value)}")
            return _INVALID
        items = [_check_type(get_args(tp)[0], v, path + (i,), issues) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            issues.add(path, f"expected {describe_type(tp)}, got {_got(value)}")
            return _INVALID
        value_tp = get_args(tp)[1]
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                issues.add(path + (k,), f"expected a str key, got {_got(k)}")
                continue
            if stringify and isinstance(v, (bool, int, float)):
                v = str(v)
            checked = _check_type(value_tp, v, path + (k,), issues)
            if checked is not _INVALID:
                out[k] = checked
        return out
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, path, issues)
    if _matches_scalar(tp, value):
        return float(value) if tp is float else value
    text = _env_text(tp, value, path, issues)
    if text is not None:
        return text
    issues.add(path, f"expected {describe_type(tp)}, got {_got(value)}")
    return _INVALID


def _env_text(tp: Any, value: Any, path: tuple, issues: IssueCollector) -> Optional[str]:
    """For a str field: the text a number or bool was typed from by ``${name:default}``, else None.
    (An environment variable cannot be quoted: ``exp_name=2024`` must give the string "2024".)"""
    if tp is not str or not isinstance(value, (bool, int, float, list, dict)):
        return None
    return issues.text_from_env(path, value)


def _is_scalar_type(tp: Any) -> bool:
    return tp in (int, float, bool, str)


def _is_optional(tp: Any) -> bool:
    return tp is Any or (get_origin(tp) is Union and type(None) in get_args(tp))


def _matches_scalar(tp: Any, value: Any) -> bool:
    # bool is a subclass of int in Python; in a config they never stand in for each other.
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return False


def _unknown_key_message(key: Any, valid: list[str], hint: str = "") -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}; valid keys: {', '.join(valid)}{hint}"


def _build_section(cls: type, value: Any, path: tuple, issues: IssueCollector) -> Any:
    """A schema dataclass from a mapping: unknown keys, types and ranges checked."""
    if value is None:  # `lora:` with nothing under it
        value = {}
    if not isinstance(value, dict):
        issues.add(path, f"expected a mapping, got {_got(value)}")
        return _INVALID
    hints = get_type_hints(cls)
    valid = config_keys(cls)
    hint = "; backend arguments go in model_config_file or under args_dict" if cls is ModelConfig else ""
    value = _read_aliases(cls, value, path, issues)
    kwargs = {}
    for key, raw in value.items():
        key_path = path + (key,)
        if key not in valid:
            _unknown_key(cls, key, key_path, valid, hint, issues)
            continue
        if issues.is_bad(key_path):  # already reported
            continue
        if raw is None and _null_value(cls, key, hints[key], key_path, issues):
            continue  # the default (1.x's "not set"), or a problem recorded
        if key == "models" and cls is ChatLearnConfig:
            checked = _build_models(raw, key_path, issues)
        else:
            checked = _check_type(hints[key], raw, key_path, issues, stringify=(cls, key) in _STRINGIFIED)
        if checked is _INVALID:
            continue
        if _check_rules(cls, key, checked, key_path, issues, written=raw):
            kwargs[key] = checked
    return cls(**kwargs)


def _unknown_key(cls: type, key: Any, path: tuple, valid: list[str], hint: str, issues: IssueCollector) -> None:
    """A key the schema does not have: a ChatLearn 1.x key (renamed, or without effect here) or a mistake."""
    renamed = compat.RENAMED.get(cls, {}).get(key)
    reason = compat.INERT_KEYS.get(cls, {}).get(key)
    if renamed is not None:
        issues.add(path, f"{key!r} was replaced by {renamed!r} (ChatLearn 1.x refuses it too): write {renamed}")
    elif reason is not None:
        issues.warn(path, f"a ChatLearn 1.x key that has no effect here: {reason}")
    else:
        issues.add(path, _unknown_key_message(key, valid, hint))


def _read_aliases(cls: type, value: dict, path: tuple, issues: IssueCollector) -> dict:
    """``value`` with ChatLearn 1.x's old key names (``compat.ALIASES``) read as ours, in place."""
    aliases = compat.ALIASES.get(cls, {})
    if not any(old in value for old in aliases):
        return value
    out = {}
    for key, raw in value.items():
        new = aliases.get(key)
        if new is None:
            out[key] = raw
        elif new in value:
            issues.warn(path + (key,), f"ChatLearn 1.x's old name for {new!r}; ignored, since {new!r} is given too "
                                       f"(as in 1.x)")
        else:
            issues.warn(path + (key,), f"ChatLearn 1.x's old name for {new!r}; read as {new!r} (rename it)")
            out[new] = raw
            old_path, new_path = path + (key,), path + (new,)
            for p in [p for p in issues.sources if p[:len(old_path)] == old_path]:
                issues.sources[new_path + p[len(old_path):]] = issues.sources[p]
            for table in (issues.env_text, issues.unset_env):
                for p in [p for p in table if p[:len(old_path)] == old_path]:
                    table[new_path + p[len(old_path):]] = table.pop(p)
    return out


def _null_value(cls: type, key: str, tp: Any, path: tuple, issues: IssueCollector) -> bool:
    """For a null ``cls.key``: True if it is settled (a problem recorded, or the default stands)."""
    unset = issues.unset_env.get(tuple(path))
    none_is_default = key in compat.NONE_MEANS_DEFAULT.get(cls, ())
    if unset and (key in compat.NEEDS_VALUE.get(cls, ()) or not (_is_optional(tp) or none_is_default)):
        issues.add(path, f"needs a value, but {unset_env_message(unset)}")
        return True
    return none_is_default


def _check_rules(cls: type, key: str, value: Any, path: tuple, issues: IssueCollector,
                 written: Any = None) -> bool:
    """Range rules of ``cls.key``; ``written`` is the value as the file gave it, for the message."""
    if value is None:
        return True
    for rule in _RULES.get(cls, {}).get(key, []):
        expected = rule(value)
        if expected is not None:
            issues.add(path, f"expected {expected}, got {value if written is None else written!r}")
            return False
    return True


def _build_models(value: Any, path: tuple, issues: IssueCollector) -> Any:
    if value is None:
        return {}
    if not isinstance(value, dict):
        issues.add(path, f"expected a mapping of model name to model, got {_got(value)}")
        return _INVALID
    models = {}
    for name, entry in value.items():
        model_path = path + (name,)
        if not isinstance(name, str) or not re.fullmatch(MODEL_NAME_PATTERN, name):
            issues.add(model_path, f"expected a model name matching {MODEL_NAME_PATTERN} "
                                   f"(names appear in colocation lists and key paths), got {_got(name)}")
            continue
        model = _build_section(ModelConfig, entry, model_path, issues)
        if model is _INVALID:
            continue
        model.name = name
        _check_vllm_args(model, model_path + ("args_dict",), issues)
        models[name] = model
    _read_model_file_sizes(models, value, path, issues)
    return models


def _read_model_file_sizes(models: dict[str, ModelConfig], entries: dict, path: tuple,
                           issues: IssueCollector) -> None:
    """Parallel sizes given in a model's ``model_config_file`` (its args_dict) are the model's, as in
    ChatLearn 1.x. Given in both places they must agree. A null there (an unset ``${policy_pp}``)
    means "not set", as in 1.x. In a config whose models use GPUs, a model with ``num_gpu: 0`` runs as
    ``num_cpu`` one-process replicas (1.x's CPU models): its file's sizes are not used."""
    gpu_config = any(m.num_gpu > 0 for m in models.values())
    for name, model in models.items():
        entry = entries.get(name) if isinstance(entries.get(name), dict) else {}
        for key in compat.MODEL_FILE_SIZES:
            arg_path = path + (name, "args_dict", key)
            value = model.args_dict.get(key)
            if value is None or issues.is_bad(arg_path):
                continue
            if not _matches_scalar(int, value) or value < 1:
                issues.add(arg_path, f"expected an int >= 1, got {_got(value)}")
                continue
            file = display_path(issues.file_for(arg_path))
            if gpu_config and model.num_gpu == 0 and model.num_cpu > 0:
                if value != 1 and entry.get(key) is None:
                    issues.warn(arg_path, f"{key} {value} is not used: model {name!r} has num_gpu: 0 in a config "
                                          f"whose other models use GPUs, so it runs as num_cpu one-process replicas "
                                          f"(as in ChatLearn 1.x); set models.{name}.{key} to change that")
                continue
            top_path = path + (name, key)
            if entry.get(key) is not None:
                if issues.is_bad(top_path) or getattr(model, key) == value:
                    continue
                model_file = display_path(model.model_config_file)
                where = "the model_config_file" if file == model_file else \
                    f"included by the model_config_file {model_file}"
                issues.add(top_path, f"{getattr(model, key)} disagrees with {key}: {value} in {file} ({where}); "
                                     f"ChatLearn 1.x takes the model file's value: give it in one place, or make "
                                     f"them agree")
                continue
            setattr(model, key, value)


def _check_vllm_args(model: ModelConfig, path: tuple, issues: IssueCollector) -> None:
    """Type-check the vLLM keys of args_dict; the dict itself stays as written."""
    hints = get_type_hints(VLLMArgs)
    vllm_keys = set(config_keys(VLLMArgs))
    for key, value in model.args_dict.items():
        if key not in vllm_keys or issues.is_bad(path + (key,)):
            continue
        unset = issues.unset_env.get(path + (key,))
        if value is None and unset and not _is_optional(hints[key]):
            issues.add(path + (key,), f"needs a value, but {unset_env_message(unset)}")
            continue
        checked = _check_type(hints[key], value, path + (key,), issues)
        if checked is not _INVALID:
            if isinstance(checked, str) and not isinstance(value, str):
                model.args_dict[key] = checked  # a str key typed from ${name:default}: keep its text
            _check_rules(VLLMArgs, key, checked, path + (key,), issues, written=value)
    _check_vllm_server(model.args_dict, path, issues)


def _check_vllm_server(args: Mapping[str, Any], path: tuple, issues: IssueCollector) -> None:
    """A served engine: one way to reach it, a URL that is one, and no server reachable
    beyond localhost without the token (its routes can replace the weights)."""
    from chatlearn.models.server_auth import SERVER_TOKEN_ENV
    from chatlearn.models.vllm_server import is_loopback, url_host

    url, start = args.get("vllm_server_url"), args.get("vllm_server")
    if any(issues.is_bad(path + (k,)) for k in ("vllm_server_url", "vllm_server", "vllm_server_host")):
        return
    if url and start is True:
        issues.add(path + ("vllm_server",), "expected one of vllm_server (chatlearn starts the server) and "
                                            "vllm_server_url (a server already running), got both")
    if url and not str(url).startswith(("http://", "https://")):
        issues.add(path + ("vllm_server_url",), f"expected an http:// or https:// URL, got {url!r}")
        return
    host = url_host(str(url)) if url else (str(args.get("vllm_server_host") or "127.0.0.1") if start else None)
    if host and not is_loopback(host) and not os.environ.get(SERVER_TOKEN_ENV):
        key = "vllm_server_url" if url else "vllm_server_host"
        issues.add(path + (key,), f"{host} is beyond localhost: set {SERVER_TOKEN_ENV} (the server's routes can "
                                  f"replace the policy's weights, so they require its token)")


# ------------------------------------------------------------- cross-field checks
def check_consistency(cfg: ChatLearnConfig, issues: IssueCollector) -> None:
    """Checks that involve several keys. Keys that already failed are skipped."""
    if not cfg.models and not issues.is_bad(("models",)):
        issues.add(("models",), "expected at least one model")
    for name, m in cfg.models.items():
        p = ("models", name)
        if not issues.is_bad(p + ("num_gpu",), p + ("num_cpu",)) and m.num_gpu <= 0 and m.num_cpu <= 0:
            issues.add(p, f"expected num_gpu or num_cpu > 0 (the model needs devices), "
                          f"got num_gpu={m.num_gpu}, num_cpu={m.num_cpu}")
        if m.num_gpu > 0 and not issues.is_bad(p + ("num_gpu",), p + ("gpu_per_process",)) \
                and m.num_gpu % m.gpu_per_process:
            issues.add(p + ("num_gpu",), f"expected a multiple of gpu_per_process ({m.gpu_per_process}), "
                                         f"got {m.num_gpu}")
        _check_model_file(m, p + ("model_config_file",), issues)
    _check_colocation(cfg, issues)
    # A config runs on GPUs (num_gpu counts) or CPUs (num_cpu counts, or num_gpu
    # where num_cpu is 0); the sizes must fit for each kind it can run on.
    kinds = [GPU, CPU] if any(m.num_gpu > 0 for m in cfg.models.values()) else [CPU]
    for kind in kinds:
        _check_sizes(cfg, kind, issues)
    _check_batch_sizes(cfg, issues)
    _check_streaming(cfg, issues)
    _check_data_paths(cfg, issues)


def _check_model_file(m: ModelConfig, path: tuple, issues: IssueCollector) -> None:
    if not m.model_config_file or issues.is_bad(path):
        return
    target = os.path.join(issues.base_dir_for(path), os.path.expanduser(m.model_config_file))
    if not os.path.isfile(target):
        issues.add(path, f"model_config_file not found: {m.model_config_file!r} "
                         f"(looked for {display_path(os.path.abspath(target))})")


def _check_colocation(cfg: ChatLearnConfig, issues: IssueCollector) -> None:
    path = ("runtime", "colocation")
    if issues.is_bad(path):
        return
    group_of: dict[str, int] = {}
    for i, members in enumerate(parse_colocation(cfg.runtime.colocation)):
        item = path + (i,)
        if len(members) != len(cfg.runtime.colocation[i].split(",")):
            issues.add(item, f"expected comma-separated model names, got {cfg.runtime.colocation[i]!r}")
        elif len(members) < 2:
            # Usually `colocation: [policy,ppo_policy]`, which YAML reads as two groups of one.
            issues.add(item, f"expected a group of two or more comma-separated model names, got "
                             f"{cfg.runtime.colocation[i]!r} (write `- policy,ppo_policy` on its own line, "
                             f"or quote it in a [...] list)")
        for name in members:
            if name not in cfg.models:
                close = difflib.get_close_matches(name, list(cfg.models), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f"; models are: {', '.join(cfg.models)}"
                issues.add(item, f"unknown model {name!r} in colocation group{hint}")
            elif name in group_of:
                where = "twice in this group" if group_of[name] == i else \
                    f"in two colocation groups (runtime.colocation[{group_of[name]}] and [{i}])"
                issues.add(item, f"model {name!r} appears {where}; a model can be in one group only")
            else:
                group_of[name] = i


def _check_sizes(cfg: ChatLearnConfig, kind: str, issues: IssueCollector) -> None:
    rt = cfg.runtime
    for name, m in cfg.models.items():
        p = ("models", name)
        _, count, key = device_count(m, kind)
        tp_key, pp_key = p + ("tensor_model_parallel_size",), p + ("pipeline_model_parallel_size",)
        if count <= 0 or issues.is_bad(p + (key,), tp_key, pp_key):
            continue
        tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
        sizes = f"tensor_model_parallel_size × pipeline_model_parallel_size = {tp} × {pp} = {tp * pp}"
        if count % (tp * pp):
            issues.add(p + (key,), f"expected a multiple of {sizes}, got {count}")
            continue
        if m.trainable:
            replicas, dp = 1, count // (tp * pp)
        else:
            replicas, dp = count // (tp * pp), 1
        gbs_key = p + ("generation_batch_size",) if m.generation_batch_size > 0 \
            else ("runtime", "generation_batch_size")
        gbs = m.generation_batch_size if m.generation_batch_size > 0 else rt.generation_batch_size
        if not issues.is_bad(gbs_key, ("runtime", "sample_per_episode")) and replicas * gbs > rt.sample_per_episode:
            issues.add(p, f"{replicas} replica(s) ({key}={count} / (TP {tp} × PP {pp})) × generation_batch_size "
                          f"{gbs} = {replicas * gbs} exceeds runtime.sample_per_episode = {rt.sample_per_episode}: "
                          f"some replicas would get no data; lower the replicas or the batch size")
        micro_key, global_key = ("runtime", "train_micro_batch_size"), ("runtime", "train_global_batch_size")
        if m.trainable and not issues.is_bad(micro_key, global_key):
            step = rt.train_micro_batch_size * dp
            if rt.train_global_batch_size % step:
                unset = "" if global_key in issues.sources or not issues.sources else \
                    " (not set: ChatLearn 1.x's default is train_micro_batch_size; set it)"
                issues.add(global_key, f"expected a multiple of train_micro_batch_size × data-parallel size of "
                                       f"trainable model {name!r} = {rt.train_micro_batch_size} × {dp} = {step} "
                                       f"(DP = {key} {count} / (TP {tp} × PP {pp})), "
                                       f"got {rt.train_global_batch_size}{unset}")


def _check_batch_sizes(cfg: ChatLearnConfig, issues: IssueCollector) -> None:
    rt = cfg.runtime
    keys = [("runtime", k) for k in ("sample_per_episode", "train_global_batch_size", "stream_data_loader_type")]
    if issues.is_bad(*keys) or not any(m.trainable for m in cfg.models.values()):
        return
    if rt.stream_data_loader_type == "fixed" and rt.sample_per_episode % rt.train_global_batch_size:
        issues.add(("runtime", "sample_per_episode"),
                   f"expected a multiple of runtime.train_global_batch_size ({rt.train_global_batch_size}) "
                   f"when stream_data_loader_type is 'fixed', got {rt.sample_per_episode}")


def _check_streaming(cfg: ChatLearnConfig, issues: IssueCollector) -> None:
    rt, path = cfg.runtime, ("runtime", "policy_lag_mode")
    if issues.is_bad(path, ("runtime", "policy_lag")) or rt.policy_lag_mode != "streaming":
        return
    if rt.policy_lag < 1:
        issues.add(path, f"'streaming' needs runtime.policy_lag >= 1 (how many versions old a trained sample may "
                         f"be), got {rt.policy_lag}")
    colocated = sorted(name for name, m in cfg.models.items() if m.free_memory)
    if colocated:
        issues.add(path, f"'streaming' keeps generation running while training, but {', '.join(colocated)} set "
                         f"free_memory (colocated roles take turns): use policy_lag_mode 'fixed'")


def _check_data_paths(cfg: ChatLearnConfig, issues: IssueCollector) -> None:
    """Data paths must exist when given; relative ones are made absolute from their file's directory."""
    for key in ("data_path", "eval_data_path"):
        path = ("runtime", key)
        value = getattr(cfg.runtime, key)
        if not value or issues.is_bad(path):
            continue
        target = os.path.abspath(os.path.join(issues.base_dir_for(path), os.path.expanduser(value)))
        if not os.path.exists(target):
            message = f"path not found: {value!r} (looked for {display_path(target)})"
            if key == "eval_data_path" and cfg.runtime.eval_episode_interval == 0 \
                    and not issues.is_bad(("runtime", "eval_episode_interval")):
                # ChatLearn 1.x reads the evaluation data only when it evaluates.
                issues.warn(path, f"{message}; not read, since eval_episode_interval is 0")
            else:
                issues.add(path, message)
        else:
            setattr(cfg.runtime, key, target)


# ------------------------------------------------------------------ entry points
def build_config(tree: dict, issues: IssueCollector) -> ChatLearnConfig:
    """The checked ``ChatLearnConfig`` from a resolved tree; problems go to ``issues``."""
    cfg = _build_section(ChatLearnConfig, tree, (), issues)
    if cfg is _INVALID:
        cfg = ChatLearnConfig()
    check_consistency(cfg, issues)
    return cfg


def validate_config(cfg: ChatLearnConfig) -> ChatLearnConfig:
    """Check a ``ChatLearnConfig`` made in Python (not loaded from YAML).

    Returns a checked copy (relative data paths made absolute, model names
    set); raises ``ConfigError`` listing every problem.
    """
    issues = IssueCollector(cfg.config_path)
    checked = build_config(config_to_dict(cfg), issues)
    issues.raise_if_any()
    checked.config_path = cfg.config_path
    return checked
