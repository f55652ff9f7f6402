"""chatlearn's YAML config: schema, loader, validation and placement plan.

    from chatlearn.config import load_config, plan_placement
    cfg = load_config("examples/toy/configs/rlhf.yaml", ["runtime.num_episode=1"])
    cfg.models["policy"].num_cpu
    plan = plan_placement(cfg, device="cpu")

Importing this package does not import torch, Ray or vLLM.
"""
from chatlearn.config.errors import ConfigError, ConfigIssue
from chatlearn.config.globals import get_args, init, set_args
from chatlearn.config.loader import config_to_dict, load_config
from chatlearn.config.placement import ModelPlacement, Placement, detect_device, format_placement, plan_placement
from chatlearn.config.schema import (
    BatchGenerationConfig,
    ChatLearnConfig,
    LoraConfig,
    ModelConfig,
    RuntimeConfig,
    RuntimeEnvConfig,
    VLLMArgs,
)
from chatlearn.config.validate import validate_config

__all__ = [
    "ConfigError", "ConfigIssue", "load_config", "config_to_dict", "validate_config",
    "init", "get_args", "set_args",
    "plan_placement", "detect_device", "format_placement", "Placement", "ModelPlacement",
    "ChatLearnConfig", "ModelConfig", "LoraConfig", "BatchGenerationConfig", "RuntimeConfig",
    "RuntimeEnvConfig", "VLLMArgs",
]
