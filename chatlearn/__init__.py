"""chatlearn: a YAML-driven engine for RLHF and online RL of language models.

Public API (imported lazily so that ``import chatlearn`` and the CLI stay fast
and do not pull in torch, Ray or vLLM until they are needed):

    chatlearn.load_config(path, overrides=None)   -> ChatLearnConfig
    chatlearn.init(config_path=None)              parse the config (or -c/--config); engines start Ray
    chatlearn.get_args()                          the config passed to init()
    chatlearn.TorchModule                         base class for plain-PyTorch models
    chatlearn.Engine                              the generic engine (environment, trainer, evaluator flows)
    chatlearn.RLHFEngine, GRPOEngine, OnlineDPOEngine   the RL presets (PPO, GRPO, online DPO)
    chatlearn.Environment, Trainer, Evaluator     flows
    chatlearn.EpisodeRelayBuffer                  relay buffer type for relay_sample_fn
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
    "Engine": "chatlearn.runtime.engine",
    "RLHFEngine": "chatlearn.runtime.rl_engines",
    "GRPOEngine": "chatlearn.runtime.rl_engines",
    "OnlineDPOEngine": "chatlearn.runtime.rl_engines",
    "Environment": "chatlearn.runtime.flow",
    "Trainer": "chatlearn.runtime.flow",
    "Evaluator": "chatlearn.runtime.flow",
    "EpisodeRelayBuffer": "chatlearn.data.relay",
    "StreamDataset": "chatlearn.data.stream_dataset",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
