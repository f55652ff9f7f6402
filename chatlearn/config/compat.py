"""ChatLearn 1.x config keys and meanings, kept as data.

A ChatLearn 1.x YAML file must load here unchanged, or fail with a message that
says what to change. Every key that 1.x's argument classes define
(``RuntimeEnvConfig``, ``RuntimeConfig``, ``ModelConfig``, ``LoraConfig``,
``BatchGenerationConfig``) is therefore one of:

* a schema field with 1.x's meaning (``chatlearn.config.schema``);
* a 1.x name for one of ours (``ALIASES``), accepted with a warning;
* accepted but inert (``INERT_KEYS``): one warning saying why it has no effect;
* renamed in 1.x itself (``RENAMED``): an error naming the new key.

Nothing here imports anything but the schema; ``validate`` reads these tables.
docs/migration_config.md lists the same tables (a test keeps them in step).
"""
from __future__ import annotations

from typing import Any

from chatlearn.config.schema import (
    BatchGenerationConfig,
    ChatLearnConfig,
    LoraConfig,
    ModelConfig,
    RuntimeConfig,
    RuntimeEnvConfig,
)

__all__ = ["INERT_KEYS", "ALIASES", "RENAMED", "NONE_MEANS_DEFAULT", "NEEDS_VALUE", "MODEL_FILE_SIZES",
           "SECTION_NAMES", "vllm_top_p", "vllm_top_k"]

# The section names the docs and messages use for each schema class.
SECTION_NAMES = {
    ChatLearnConfig: "top level",
    RuntimeEnvConfig: "runtime_env",
    RuntimeConfig: "runtime",
    ModelConfig: "models.<name>",
    LoraConfig: "models.<name>.lora",
    BatchGenerationConfig: "models.<name>.batch_generation",
}

# ChatLearn 1.x keys accepted without effect: key -> why it has none here.
# Any value is accepted (1.x's own types are not checked), with one warning per use.
INERT_KEYS: dict[type, dict[str, str]] = {
    RuntimeEnvConfig: {},
    RuntimeConfig: {
        "max_iteration_per_sample": "multi-iteration (MCTS-style) sampling is not implemented; each prompt is "
                                    "sampled once per visit",
        "log_interval": "metrics are logged once per episode",
        "data_ratio": "mixing several datasets is not implemented: data_path is one file",
        "data_rerank": "samples are not reranked across data-parallel ranks; each trainer splits its global "
                       "batches itself",
        "nsys": "no NVTX ranges are emitted; run the job under nsys to profile it",
        "profiler_dir": "no torch.profiler traces are written",
        "coalesce_param": "parameters are always coalesced into runtime.coalesced_buffer_mb buckets",
        "concurrent_comm": "weight sync runs one trainer-to-inference pair at a time",
        "param_sync_comm_type": "weights travel in buckets through /dev/shm, Ray's object store or CUDA IPC, "
                                "not NCCL broadcast or p2p",
        "param_sync_max_workers": "every receiving replica loads the buckets itself; there is no worker pool",
        "routed_expert_regrouping_comm_type": "mixture-of-experts models are not supported",
        "training_shuffle_mode": "epoch 0 trains in arrival order, later epochs on a seeded shuffle of all "
                                 "samples (like 1.x's 'sample')",
        "consumed_samples": "a resumed run restores the data position from its checkpoint",
        "concurrent_setup": "the engine sets the models up itself; there is no switch",
        "bucket_size_mb_in_memory_manager": "free_memory moves whole tensors, not buckets",
        "free_sync_collective_group": "weight sync creates no NCCL collective group to free",
        "cpu_schedule_strategy": "every device slot is reserved in one Ray placement group (strategy PACK)",
        "policy_to_regroup_queue": "the driver regroups data itself; there is no regroup queue",
        "log_config_file": "TensorBoard/W&B are not configured from a file; metrics go to the run directory "
                           "(output_dir/exp_name)",
        "log_args_dict": "1.x filled it from log_config_file, which has no effect here either",
        "mini_data": "no part of ChatLearn 1.x or of this engine reads it (a key of 1.x's GPT example)",
    },
    ModelConfig: {
        "cpu_per_process": "each CPU slot is one process here (1.x's cpu_per_process: 1)",
        "num_replica": "computed from the device count and TP x PP (1.x overwrote it too)",
        "expert_model_parallel_size": "expert parallelism (MoE) is not supported (and 1.x read it from "
                                      "model_config_file, not from here)",
        "zero_size": "DeepSpeed ZeRO is not supported; trainers use Megatron's distributed optimizer",
        "fsdp_size": "FSDP is not supported; trainers use Megatron data parallelism",
        "sp_size": "sequence (Ulysses) parallelism is not supported",
        "config_dir": "1.x's loader set it; relative paths here resolve from the file that names them",
        "model_type": "informational in 1.x; the model's class decides its backend",
        "offload_weights": "offload is all or nothing here: free_memory moves weights, gradients and "
                           "optimizer state together",
        "offload_optimizer_states": "offload is all or nothing here: free_memory moves weights, gradients and "
                                    "optimizer state together",
        "free_grad_buffers": "offload is all or nothing here: free_memory moves weights, gradients and "
                             "optimizer state together",
        "force_free_memory": "free_memory here offloads whether or not the model is colocated, which is what "
                             "force_free_memory added in 1.x",
    },
    LoraConfig: {
        "part_module_name": "LoRA layers are chosen by lora_layer (and column_only_qkv) only",
    },
    BatchGenerationConfig: {},
    ChatLearnConfig: {},
}

# 1.x names for our keys: old name -> our name (a warning; the old name loses if both are given).
ALIASES: dict[type, dict[str, str]] = {
    ModelConfig: {"num_device": "num_gpu"},
    ChatLearnConfig: {"rlhf": "runtime"},
}

# Keys that ChatLearn 1.x itself refused, with what to write instead.
RENAMED: dict[type, dict[str, str]] = {
    RuntimeConfig: {"save_interval": "save_episode_interval"},
}

# Keys whose 1.x default is None ("not set"): a null value (written, or from an unset
# ${name}) takes our default, which means the same.
NONE_MEANS_DEFAULT: dict[type, set[str]] = {
    ModelConfig: {"model_config_file", "gpu_per_process", "tensor_model_parallel_size",
                  "pipeline_model_parallel_size", "generation_batch_size", "args_dict", "lora",
                  "batch_generation"},
    RuntimeConfig: {"save_episode_interval"},
}

# Keys that need a value when they are written as ${name} and name is unset (1.x
# would give None and fail later, or silently run without): an error naming the variable.
NEEDS_VALUE: dict[type, set[str]] = {
    ModelConfig: {"model_config_file"},
    RuntimeConfig: {"data_path"},
}

# Parallel sizes that 1.x reads from a model's model_config_file (args_dict), where
# they win over the models.<name> entry.
MODEL_FILE_SIZES = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


# ------------------------------------------------------------------ 1.x meanings
def vllm_top_p(value: Any) -> float:
    """A ``top_p`` / ``eval_top_p`` as vLLM wants it: 1.x's ``0`` ("no limit") is ``1.0``."""
    value = 1.0 if value is None else float(value)
    return 1.0 if value == 0 else value


def vllm_top_k(value: Any) -> int:
    """A ``top_k`` / ``eval_top_k`` as vLLM wants it: ``-1`` and ``0`` ("no limit") are ``0``."""
    value = -1 if value is None else int(value)
    return 0 if value in (-1, 0) else value
