"""chatlearn: a YAML-driven engine for RLHF and online RL of language models.

Public API (imported lazily so that ``import chatlearn`` and the CLI stay fast
and do not pull in torch, Ray or vLLM until they are needed):

    chatlearn.load_config(path, overrides=None)   -> ChatLearnConfig
    chatlearn.init(config_path=None)              parse the config (or -c/--config); engines start Ray
    chatlearn.get_args()                          the config passed to init()
    chatlearn.BaseModule, TorchModule             base classes for models (plain PyTorch, rule-based)
    chatlearn.MegatronModule, VLLMModule          the megatron-core and vLLM backends
    chatlearn.Engine                              the generic engine (environment, trainer, evaluator flows)
    chatlearn.RLHFEngine, GRPOEngine, RLOOEngine, ReinforcePPEngine, OnlineDPOEngine
                                                  the RL presets (PPO, GRPO, RLOO, REINFORCE++, online DPO)
    chatlearn.DPOEngine, GRPOMathEngine, EvalEngine     ChatLearn 1.x's other presets
    chatlearn.Environment, Trainer, Evaluator     flows
    chatlearn.EpisodeRelayBuffer                  relay buffer type for relay_sample_fn
    chatlearn.PolicyInference, PolicyReference, RewardInference, MathReward, ValueInference,
      PolicyTrainer, GRPOTrainer, RLOOTrainer, ReinforcePPTrainer, DPOTrainer, ValueTrainer
                                                  the library's roles (chatlearn.roles): vLLM sampling,
                                                  Megatron reference, reward, value and trainers

ChatLearn 1.x's names are here too (docs/migration.md); the ones that have no
counterpart raise ImportError with a message naming the replacement.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "chatlearn.config.loader",
    "ConfigError": "chatlearn.config.errors",
    "init": "chatlearn.config.globals",
    "get_args": "chatlearn.config.globals",
    "BaseModule": "chatlearn.models.base",
    "TorchModule": "chatlearn.models.torch_module",
    "MegatronModule": "chatlearn.models.megatron",
    "VLLMModule": "chatlearn.models.vllm_module",
    "Engine": "chatlearn.runtime.engine",
    "EvalEngine": "chatlearn.runtime.engine",
    "RLHFEngine": "chatlearn.runtime.rl_engines",
    "GRPOEngine": "chatlearn.runtime.rl_engines",
    "RLOOEngine": "chatlearn.runtime.rl_engines",
    "ReinforcePPEngine": "chatlearn.runtime.rl_engines",
    "OnlineDPOEngine": "chatlearn.runtime.rl_engines",
    "DPOEngine": "chatlearn.runtime.rl_engines",
    "GRPOMathEngine": "chatlearn.runtime.rl_engines",
    "Environment": "chatlearn.runtime.flow",
    "Trainer": "chatlearn.runtime.flow",
    "Evaluator": "chatlearn.runtime.flow",
    "EpisodeRelayBuffer": "chatlearn.data.relay",
    "StreamDataset": "chatlearn.data.stream_dataset",
    "PolicyInference": "chatlearn.roles",
    "PolicyReference": "chatlearn.roles",
    "RewardInference": "chatlearn.roles",
    "MathReward": "chatlearn.roles",
    "ValueInference": "chatlearn.roles",
    "PolicyTrainer": "chatlearn.roles",
    "GRPOTrainer": "chatlearn.roles",
    "RLOOTrainer": "chatlearn.roles",
    "ReinforcePPTrainer": "chatlearn.roles",
    "DPOTrainer": "chatlearn.roles",
    "ValueTrainer": "chatlearn.roles",
}

# ChatLearn 1.x names for the classes above (1.x kept the RLHF* names as deprecated aliases).
_ALIASES_1X = {
    "RLHFModule": "BaseModule",
    "RLHFTorchModule": "TorchModule",
    "RLHFMegatronModule": "MegatronModule",
    "RLHFVLLMModule": "VLLMModule",
    "VLLMModuleV2": "VLLMModule",
}

# ChatLearn 1.x names with no counterpart: importing one raises ImportError with this message.
_REFUSED_1X = {
    "DeepSpeedModule": "DeepSpeed is not supported; train with MegatronModule (megatron-core) or TorchModule",
    "FSDPModule": "FSDP is not supported; train with MegatronModule (megatron-core data/tensor/pipeline "
                  "parallelism) or TorchModule",
    "ControlDependencies": "flows here run each stage as soon as its inputs exist, with no control dependencies "
                           "to declare; order two stages by passing one's output to the other",
    "get": "flows here return futures that the engine resolves; read results in an evaluator's post-process, "
           "a rollout processor, or the rollout dump (runtime.rollout_dump_dir)",
    "hooks": "ChatLearn 1.x patched Megatron-LM and vLLM at import; nothing here needs patches",
}

__all__ = sorted(_EXPORTS) + sorted(_ALIASES_1X) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name == "logger":  # ChatLearn 1.x's chatlearn.logger
        from chatlearn.utils.logging import get_logger

        return get_logger("chatlearn")
    if name in _REFUSED_1X:
        # ImportError (not AttributeError): `from chatlearn import X` shows this message as it is.
        raise ImportError(f"chatlearn.{name} (ChatLearn 1.x) does not exist here: {_REFUSED_1X[name]} "
                          f"(docs/migration.md)")
    module = _EXPORTS.get(_ALIASES_1X.get(name, name))
    if module is None:
        raise AttributeError(f"module 'chatlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES_1X.get(name, name))
    globals()[name] = value
    return value
