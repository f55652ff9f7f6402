"""ChatLearn 1.x's module helpers, as a mixin of ``BaseModule``.

ChatLearn 1.x model classes call helpers such as ``self.is_last_rank()``,
``self.data_parallel_rank``, ``self.peak_memory()`` or ``self.put(key, data)``;
they exist here with 1.x's meaning (docs/migration.md lists every one). A 1.x
helper that has no counterpart raises an ``AttributeError`` naming what to use
instead (``MISSING_1X_HELPERS``), and a 1.x method that a user class overrides but
nothing here calls is refused when the engine is built (``REPLACED_1X_OVERRIDES``).

Kept apart from ``chatlearn/models/base.py`` so that the module API a new user
reads there is only the hooks and settings this engine is built around.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Environment variables the engine sets in every worker (read by the helpers below).
STORE_ENV = "CHATLEARN_STORE"  # name of the run's key-value actor (put/get)
RESUME_ENV = "CHATLEARN_RESUME_TRAINING"  # "1" when the run resumes from a checkpoint


class ChatLearn1xHelpers:
    """The ChatLearn 1.x helpers of every module (``self.worker``, ``self.module_args`` and
    friends come from ``BaseModule``)."""

    @property
    def replica_id(self) -> int:
        return self.worker.replica_id if self.worker is not None else 0

    @property
    def rank(self) -> int:
        """Rank inside this model's torch.distributed group (its replica's, for inference)."""
        return self.worker.rank if self.worker is not None else 0

    def get_rank(self) -> int:
        return self.rank

    @property
    def world_size(self) -> int:
        return self.worker.world_size if self.worker is not None else 1

    def is_last_rank(self) -> bool:
        """The last rank of this model's group (1.x: of the replica for inference models)."""
        return self.worker is None or self.worker.rank == self.worker.world_size - 1

    @property
    def data_parallel_size(self) -> int:
        return self.worker.dp_size if self.worker is not None else 1

    @property
    def data_parallel_rank(self) -> int:
        return self.worker.dp_rank if self.worker is not None else 0

    def get_data_parallel_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_rank

    def tensor_model_parallel_size(self) -> int:
        return self.worker.tp_size if self.worker is not None else self.module_args.tensor_model_parallel_size

    def pipeline_model_parallel_size(self) -> int:
        return self.worker.pp_size if self.worker is not None else self.module_args.pipeline_model_parallel_size

    def expert_model_parallel_size(self) -> int:
        return 1  # no expert parallelism here

    def tensor_parallel_rank(self) -> int:
        return self.worker.tp_rank if self.worker is not None else 0

    def pipeline_parallel_rank(self) -> int:
        return self.worker.pp_rank if self.worker is not None else 0

    def expert_parallel_rank(self) -> int:
        return 0

    def tensor_and_expert_model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size()

    @property
    def trainable(self) -> bool:
        return self.module_args.trainable

    @property
    def total_gpu(self) -> int:
        return self.module_args.num_gpu

    @property
    def total_cpu(self) -> int:
        return self.module_args.num_cpu

    @property
    def gpu_per_process(self) -> int:
        return self.module_args.gpu_per_process

    @property
    def config_dir(self) -> str:
        """The directory of the main config file (ChatLearn 1.x's ``config_dir``)."""
        return os.path.dirname(self.global_args.config_path)

    @property
    def is_colocate(self) -> bool:
        """Whether this model shares devices with others (a ``runtime.colocation`` group)."""
        return any(self.name in [m.strip() for m in group.split(",")] and "," in group
                   for group in self.runtime_args.colocation)

    @property
    def enable_lora(self) -> bool:
        return self.module_args.lora.enable_lora

    @property
    def parameter_sync_frequency(self) -> int:
        return self.module_args.sync_frequency

    @property
    def resume_training(self) -> bool:
        """True in a run that resumes from a checkpoint (set before ``setup()``): a module that
        saves its own weights (1.x's ``save_checkpoint(iteration)``) reloads them in ``setup()``."""
        return os.environ.get(RESUME_ENV) == "1"

    @property
    def named_parameters(self) -> dict[str, "torch.Tensor"]:
        """``self.model``'s parameters and buffers by name (a list of models: all of them)."""
        named: dict[str, Any] = {}
        for part in _model_parts(getattr(self, "model", None)):
            named.update(part.named_parameters())
            named.update(part.named_buffers())
        return named

    @property
    def parameters(self) -> list["torch.Tensor"]:
        return list(self.named_parameters.values())

    def peak_memory(self) -> float:
        """Peak memory of this process in GiB: CUDA memory allocated on a GPU, else peak RSS."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def empty_cache(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def add_padding_config(self, key: str, padding_value: float = 0.0, padding_type: str = "right") -> None:
        """Pad ``key`` with ``padding_value`` when training samples of different lengths are
        batched (right padding; see chatlearn/data/batching.py)."""
        if padding_type != "right":
            raise ValueError(f"model {self.name!r}: add_padding_config({key!r}, padding_type={padding_type!r}): "
                             f"training batches are right-padded here; pad {key!r} on the left yourself "
                             f"in the stage that produces it")
        self._padding_config[key] = {"padding_value": padding_value, "padding_type": padding_type}

    def padding_config(self) -> dict[str, dict[str, Any]]:
        return dict(getattr(self, "_padding_config", {}))

    def get_and_clear_metrics(self) -> tuple[str, dict[str, float]]:
        """``(_metric_prefix, the mean of each key over _metric_list)``, emptying the list."""
        from chatlearn.utils.metrics import mean_metrics

        records = [{k: _as_float(v) for k, v in r.items()} for r in getattr(self, "_metric_list", None) or []]
        self._metric_list = []
        return getattr(self, "_metric_prefix", ""), mean_metrics(records)

    def put(self, key: str, data: Any) -> None:
        """Share ``data`` under ``key`` with every model of the run (``get``)."""
        _store().put.remote(key, data)

    def get(self, key: str) -> Any:
        """What a model ``put`` under ``key`` (None if nothing was)."""
        import ray

        return ray.get(_store().get.remote(key))

    def check_chatlearn1x_overrides(self) -> None:
        """Raise if this class overrides a ChatLearn 1.x method that nothing here calls
        (``REPLACED_1X_OVERRIDES``), naming what replaces it."""
        problems = []
        for backend, methods in REPLACED_1X_OVERRIDES.items():
            if not any(k.__name__ == backend and k.__module__.split(".")[0] == "chatlearn"
                       for k in type(self).__mro__):
                continue
            for method, replacement in methods.items():
                owner = next((k for k in type(self).__mro__ if method in k.__dict__), None)
                if owner is not None and owner.__module__.split(".")[0] != "chatlearn":
                    problems.append(f"{owner.__qualname__}.{method}(): {replacement}")
        if problems:
            raise NotImplementedError(
                f"model {self.name!r} ({type(self).__name__}) overrides ChatLearn 1.x methods that are not "
                f"called here:\n  " + "\n  ".join(problems) + "\n(docs/migration.md)")

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: ChatLearn 1.x helpers that do not exist here
        # get a message naming the replacement.
        if name == "_logger":  # ChatLearn 1.x's per-module logger
            from chatlearn.utils.logging import get_logger

            return get_logger(f"chatlearn.models.{type(self).__name__}")
        message = MISSING_1X_HELPERS.get(name)
        if message is not None:
            raise AttributeError(f"{type(self).__name__}.{name} (ChatLearn 1.x) does not exist here: {message}")
        if hasattr(type(self), name):  # a property that raised AttributeError: let its own error show
            return object.__getattribute__(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


# ChatLearn 1.x methods a user class may override that nothing here calls: overriding one is an
# error when the engine is built. Keyed by the chatlearn backend class the override applies to.
REPLACED_1X_OVERRIDES: dict[str, dict[str, str]] = {
    "BaseModule": {
        **{m: "free_memory here calls offload() and onload() (weights, gradients and optimizer state "
              "together); override those"
           for m in ("offload_weights", "onload_weights", "offload_optimizer_states", "onload_optimizer_states",
                     "offload_main_weights", "onload_main_weights", "free_grad_buffers", "build_grad_buffers")},
        "build_all_dataset": "build_dataset(prompts, is_eval) is called once per dataset; the engine takes one "
                             "dataset (set_dataset)",
        "save_data_checkpoint": "the engine saves the data position in every checkpoint itself",
    },
    "MegatronModule": {
        "model_provider": "MegatronModule builds a Llama/Qwen2/Qwen3 model from the Hugging Face checkpoint in the "
                          "model's `load` (its model_config_file) and trainers override loss_fn(logits, "
                          "micro_batch); for another architecture subclass TorchModule and build it in setup()",
        "add_extra_args": "megatron-core has no argument parser: put your keys in the model's "
                          "model_config_file and read them from self.model_args",
    },
}

# ChatLearn 1.x helpers with no counterpart: reading one raises AttributeError with this message.
MISSING_1X_HELPERS: dict[str, str] = {
    "megatron_args": "Megatron-LM's global args (megatron.training.get_args()) do not exist with megatron-core; "
                     "read the model's settings from self.model_args (its model_config_file)",
    "megatron_model": "use self.model",
    "generate_vllm": "VLLMModule.generate(data, is_eval) samples a batch (forward_step and eval_forward call it)",
    "timers": "per-method time is logged for you as time/<model>.<method> every episode",
    "data_ckpt_manager": "the engine saves and restores the data position itself",
    "set_src_parameter_model": "pair models with engine.set_parameter_sync(trainer, inference)",
    "src_parameter_model": "pair models with engine.set_parameter_sync(trainer, inference)",
    "num_gpu_per_replica": "a replica holds tensor_model_parallel_size() x pipeline_model_parallel_size() "
                           "devices (an inference model) or all the model's devices (a trainer)",
    "num_layers": "read it from the model's Hugging Face config (MegatronModule: self.hf_config)",
    "tensor_and_expert_parallel_group": "use megatron.core.parallel_state's groups (no expert parallelism here)",
    "set_synchronizer": "give the synchronizer to engine.set_parameter_sync(trainer, inference, synchronizer)",
    "fuse_lora_layer": "the parameter sync and the Hugging Face export merge LoRA weights themselves",
    "unfuse_lora_layer": "the parameter sync and the Hugging Face export merge LoRA weights themselves",
    **{name: "a resumed run restarts the interrupted episode from its checkpoint; stage outputs are not saved"
       for name in ("enable_stage_resume", "get_stage_outputs_path", "load_stage_outputs", "save_stage_outputs")},
    **{name: "the parameter sync moves whole Hugging Face-named state dicts, not pipeline stages"
       for name in ("get_pipeline_stage_layer_num", "get_pipeline_stage_layer_offset")},
}


def _model_parts(model: Any) -> list:
    if model is None:
        return []
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _as_float(value: Any) -> Any:
    """0-d tensors and NumPy scalars as floats (for metrics); anything else unchanged."""
    if callable(getattr(value, "item", None)) and tuple(getattr(value, "shape", (1,))) == ():
        return float(value.item())
    return value


class _KeyValueStore:
    """The run's shared dict behind ``put``/``get`` (a Ray actor made on first use)."""

    def __init__(self):
        self.data: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value

    def get(self, key: str) -> Any:
        return self.data.get(key)


_stores: dict[str, Any] = {}


def _store():
    import ray

    name = os.environ.get(STORE_ENV)
    if not name:
        raise RuntimeError("put()/get() share data between the models of a running engine; call them from a "
                           "model's methods inside engine.learn()")
    if name not in _stores:
        actor = ray.remote(num_cpus=0)(_KeyValueStore)
        _stores[name] = actor.options(name=name, get_if_exists=True).remote()
    return _stores[name]
