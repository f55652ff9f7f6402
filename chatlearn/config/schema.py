"""The typed schema of a chatlearn YAML config.

A config has three top-level sections, as in ChatLearn 1.x:

    runtime_env:   how Ray workers are started (env vars, working dir, cluster address)
    models:        one entry per model role (policy, reference, reward, ...)
    runtime:       the episode loop: sizes, batching, relay, checkpoints, output

Every field below has a default, so a YAML file only names what it changes.
The loader (``chatlearn.config.loader``) reads YAML, resolves ``${name:default}``
values and ``includes``, and validates against these dataclasses; the validator
(``chatlearn.config.validate``) adds the cross-field checks.

The contents of a model's ``model_config_file`` are free-form backend arguments
(Megatron's and vLLM's own); they land in ``ModelConfig.args_dict`` untouched,
except that the vLLM sampling/engine keys listed in ``VLLMArgs`` are type-checked
when present.
"""
from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional

# ChatLearn 1.x's default lora_layer (its chatlearn.utils.constant.LORA_LAYER).
LORA_LAYER = "ColumnParallelLinear,Embedding,LinearLayer,RowParallelLinear,VocabParallelEmbedding"


@dataclass
class LoraConfig:
    enable_lora: bool = False
    lora_dim: int = 8
    # Comma-separated layer types that become LoRA layers (1.x's default).
    lora_layer: str = LORA_LAYER
    lora_dropout: float = 0.0
    # Only adapt the fused qkv projection among the column-parallel layers.
    column_only_qkv: bool = False
    lora_scaling: float = 1.0


@dataclass
class BatchGenerationConfig:
    # Sort an episode's prompts by length before batching, to cut padding.
    ranking: bool = False
    # Prompts shorter than this are dropped (tokens if samples carry ids, else characters).
    min_prompt_length: int = 0


@dataclass
class ModelConfig:
    """One entry of ``models:``."""

    # Relative paths are resolved from the directory of the file that names it;
    # after loading this holds the absolute path.
    model_config_file: str = ""
    num_gpu: int = 0
    # Device slots used on a CPU-only run (each slot is one process).
    num_cpu: int = 0
    gpu_per_process: int = 1
    trainable: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Per-replica batch for forward_step; -1 takes runtime.generation_batch_size.
    generation_batch_size: int = -1
    # Sync weights from this model's trainer every N episodes.
    sync_frequency: int = 1
    # Offload weights/optimizer/grad buffers (vLLM: sleep) while the model is idle (GPU runs).
    free_memory: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    batch_generation: BatchGenerationConfig = field(default_factory=BatchGenerationConfig)
    # Free-form backend arguments read from model_config_file (and any
    # keys given inline under ``args_dict:``).
    args_dict: dict[str, Any] = field(default_factory=dict)
    # The model's key under ``models:``; set by the loader, not read from YAML
    # (fields with metadata internal=True are not config keys).
    name: str = field(default="", metadata={"internal": True})


@dataclass
class RuntimeConfig:
    """The ``runtime:`` section."""

    # Each entry is a comma-separated group of model names sharing devices.
    colocation: list[str] = field(default_factory=list)
    # Defaults are ChatLearn 1.x's (a 1.x config that leaves a key out means the same here).
    num_episode: int = 5000
    sample_per_episode: int = 1000
    num_training_epoch: int = 1
    generation_batch_size: int = 2
    train_micro_batch_size: int = 2
    # None (1.x's default): train_micro_batch_size; filled in when the config is made.
    train_global_batch_size: Optional[int] = None
    stream_data_loader_type: str = "fixed"
    # Relay buffers: keep the last N episodes (0 off, -1 all).
    max_relay_episode: int = 0
    # Relay starts after this many episodes.
    relay_episode_offset: int = 0
    # Fixed-lag asynchronous training: episode t trains on the rollouts sampled by policy version
    # t - policy_lag (0: synchronous). Generation runs policy_lag episodes ahead of training.
    policy_lag: int = 0
    # How a policy_lag > 0 run hands rollouts to training: "fixed" (episode t trains on exactly
    # episode t-k's generation: reproducible) or "streaming" (generation batches launched
    # continuously; each episode trains on the oldest finished ones, none more than policy_lag
    # versions old; chatlearn/runtime/streaming.py).
    policy_lag_mode: str = "fixed"
    # Save data state and models every N episodes (0 off).
    save_episode_interval: int = 0
    # Evaluate every N episodes (0 off).
    eval_episode_interval: int = 0
    # Evaluate once before the first episode too (when evaluating at all).
    enable_eval_before_training: bool = False
    # Must exist when non-empty; a relative path is resolved from the directory
    # of the file that names it (the loaded config holds the absolute path).
    data_path: Optional[str] = None
    # Use only the first N prompts of data_path (-1 or 0: all). A 1.x example key.
    training_data_num_limit: int = -1
    # Visit data_path's prompts in a seeded shuffled order each pass (false: file order).
    data_shuffle: bool = True
    # The field of each data_path record that holds the prompt text (null: records as they are).
    query_key: Optional[str] = None
    eval_data_path: Optional[str] = None
    # Use only the first N evaluation prompts (null, 0 or -1: all). A 1.x example key.
    eval_data_num_limit: Optional[int] = None
    # Where checkpoints go; empty means ``<output_dir>/<exp_name>/checkpoints``.
    data_checkpoint_path: Optional[str] = None
    output_dir: str = "./"
    exp_name: str = "CHATLEARN"
    enable_resume_training: bool = True
    adaptive_parallel_strategy_on_checkpoint: bool = False
    validate_param_sync: bool = False
    # DEBUG logging everywhere, every metric on the console, dependencies' messages unfiltered.
    debug: bool = False
    # Output not on a terminal: while an episode runs longer than this, a line this often says
    # which phase it is in (0: none). On a terminal, a progress bar.
    progress_interval_s: float = 60.0
    seed: int = 1234
    # Parameter sync transport bucket size.
    coalesced_buffer_mb: int = 100
    # How weights travel from a trainer to its inference model: auto (CUDA IPC on a shared GPU,
    # else /dev/shm on one node, else Ray's object store), shm, object_store, cuda_ipc, or
    # collective (a broadcast over a gloo/NCCL group made for the pair). docs/vllm.md.
    param_sync_transport: str = "auto"
    # A remote call that takes longer than this is reported as stuck.
    actor_timeout_s: float = 1800.0
    # Address of an existing Ray cluster; empty starts a local one.
    ray_address: Optional[str] = None
    # Keep the newest N checkpoints, delete older ones (None or 0: keep all). ChatLearn 1.x's name.
    max_data_ckpt_nums: Optional[int] = 3
    # Resume from the checkpoint of this episode (1-based, as logged) instead of the newest one.
    load_data_checkpoint_iteration: Optional[int] = None
    # Write each episode's rollouts to <dir>/episode_<N>.jsonl (prompt, response, logprobs, reward, ...).
    rollout_dump_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.train_global_batch_size is None:  # ChatLearn 1.x: one micro-batch per step
            self.train_global_batch_size = self.train_micro_batch_size

    def get(self, key: str, default: Any = None) -> Any:
        """ChatLearn 1.x's ``runtime_args.get(key)``: the value of ``key``, or ``default``."""
        return getattr(self, key, default)

    @property
    def _args_dict(self) -> Mapping[str, Any]:
        """ChatLearn 1.x's ``runtime_args._args_dict``: every key by name, read-only."""
        return _read_only_fields(self)

    @property
    def run_dir(self) -> str:
        """Where a run writes metrics, checkpoints and exports: ``output_dir/exp_name``, or
        ``output_dir`` itself when it already ends with ``exp_name`` (ChatLearn 1.x's rule:
        its run scripts pass ``output_dir=.../<exp_name>``)."""
        last = os.path.basename(os.path.normpath(self.output_dir)) if self.output_dir else ""
        return self.output_dir if last == self.exp_name else os.path.join(self.output_dir, self.exp_name)


@dataclass
class RuntimeEnvConfig:
    """The ``runtime_env:`` section: how Ray workers start."""

    platform: str = ""
    env_vars: dict[str, str] = field(default_factory=dict)
    working_dir: Optional[str] = None
    excludes: list[str] = field(default_factory=list)
    pip: list[str] = field(default_factory=list)
    py_modules: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        """ChatLearn 1.x's ``env_args.get(key)``: the value of ``key``, or ``default``."""
        return getattr(self, key, default)

    @property
    def _args_dict(self) -> Mapping[str, Any]:
        """ChatLearn 1.x's ``env_args._args_dict``: every key by name, read-only."""
        return _read_only_fields(self)


def _read_only_fields(section: Any) -> Mapping[str, Any]:
    return MappingProxyType({f.name: getattr(section, f.name) for f in fields(section)})


@dataclass
class ChatLearnConfig:
    runtime_env: RuntimeEnvConfig = field(default_factory=RuntimeEnvConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # Absolute path of the YAML file the config was loaded from; set by the loader.
    config_path: str = field(default="", metadata={"internal": True})
    # What the loader warned about (1.x keys without effect, unset variables, duplicate keys, ...).
    warnings: list[str] = field(default_factory=list, metadata={"internal": True})

    @property
    def runtime_args(self) -> RuntimeConfig:
        """ChatLearn 1.x's name for ``runtime``, so 1.x scripts run unchanged."""
        return self.runtime

    @property
    def env_args(self) -> RuntimeEnvConfig:
        """ChatLearn 1.x's name for ``runtime_env``."""
        return self.runtime_env


WEIGHT_LOADERS = ("auto", "reload_weights", "load_weights")


@dataclass
class VLLMArgs:
    """vLLM sampling and engine keys, with ChatLearn's names.

    These live in a generation model's ``model_config_file``; when present they
    are type-checked, and the vLLM module maps them to ``SamplingParams`` and
    ``LLM(...)`` arguments.
    """

    n: int = 1
    ignore_eos: bool = False
    top_p: float = 1.0
    top_k: int = -1
    temperature: float = 1.0
    use_beam_search: bool = False
    eval_temperature: float = 1.0  # ChatLearn 1.x: evaluation samples at temperature 1 unless told
    eval_top_k: int = -1
    eval_top_p: float = 1.0
    # Responses per prompt in evaluation (greedy decoding allows only 1).
    eval_n: int = 1
    # Semicolon-separated stop strings.
    stop_token_list: Optional[str] = None
    # Token ids that end a response (besides EOS): vLLM's stop_token_ids.
    stop_token_ids: Optional[list[int]] = None
    # Cap generation at max_new_tokens (else at the model's max length).
    new_token_limit: bool = False
    max_new_tokens: int = 64
    prompt_logprobs: Optional[int] = None
    max_num_batched_tokens: int = 8192
    max_paddings: int = 256
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    tokenizer: Optional[str] = None
    # How a weight sync enters the engine: vLLM's reload_weights (re-runs the loader's
    # post-processing: needed on CPU, where weights are repacked, and for quantized models)
    # or the model's load_weights (copies in place, faster); auto: load_weights on GPU.
    weight_loader: str = "auto"
    # Seed every sampling request from (runtime.seed, episode, sample index), so that a resumed
    # run samples exactly what the uninterrupted one did (cost measured on an H200: none visible,
    # benchmarks/RESULTS.md).
    request_seeds: bool = True
    # Render each plain-text prompt as one user message with the tokenizer's chat template
    # (conversation prompts are always rendered with it).
    apply_chat_template: bool = False
    # The engine as a vLLM server process (chatlearn/models/vllm_server.py, docs/vllm.md):
    # started by the role's actor (vllm_server), or already running at vllm_server_url
    # (`chatlearn serve`). Its token comes from CHATLEARN_SERVER_TOKEN, never from a file.
    vllm_server: bool = False
    vllm_server_url: Optional[str] = None
    vllm_server_host: str = "127.0.0.1"  # a started server binds here; beyond localhost it needs the token set
    vllm_server_port: int = 0  # 0: any free port


def config_to_dict(cfg: ChatLearnConfig, internal: bool = False) -> dict:
    """``cfg`` as plain dicts/lists, in YAML key order (for printing or saving).

    ``internal=True`` keeps the fields the loader fills in (``config_path``,
    each model's ``name``), which are not config keys.
    """

    def convert(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if internal or not f.metadata.get("internal")}
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [convert(v) for v in obj]
        return obj

    return convert(cfg)
