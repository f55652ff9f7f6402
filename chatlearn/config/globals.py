"""The process-wide config: ``chatlearn.init()`` sets it, ``chatlearn.get_args()`` reads it.

As in ChatLearn 1.x, a training script starts with ``chatlearn.init()`` and
any code (driver or worker) reads the config with ``chatlearn.get_args()``.
Ray workers receive the driver's config and call ``set_args`` with it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence, Union

from chatlearn.config.errors import ConfigError
from chatlearn.config.loader import Overrides, load_config
from chatlearn.config.schema import ChatLearnConfig

__all__ = ["init", "get_args", "set_args", "is_initialized", "config_path_from_argv"]

_args: Optional[ChatLearnConfig] = None


def config_path_from_argv(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """The value of ``-c/--config`` in ``argv`` (default ``sys.argv[1:]``); other arguments are left alone."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return known.config


def init(config_path: Union[str, os.PathLike, None] = None, overrides: Overrides = None) -> ChatLearnConfig:
    """Load and validate the config, and make it what ``get_args()`` returns.

    ``config_path`` None takes ``-c/--config`` from the command line
    (``sys.argv``), leaving the script's other arguments for its own parser.
    Raises ``ConfigError`` if there is no config or it has problems.
    """
    if config_path is None:
        config_path = config_path_from_argv()
        if config_path is None:
            raise ConfigError("chatlearn.init(): no config given: pass chatlearn.init(config_path) "
                              "or run the script with -c/--config CONFIG.yaml")
    cfg = load_config(config_path, overrides)
    set_args(cfg)
    # Runtime start-up (Ray, placement groups) is not done here: the engine
    # does it when it is built. A start-up hook, if one is added, belongs here,
    # after the config is known to be valid.
    return cfg


def set_args(cfg: ChatLearnConfig) -> None:
    """Install ``cfg`` as the process-wide config (Ray workers use this with the driver's config)."""
    global _args
    if not isinstance(cfg, ChatLearnConfig):
        raise TypeError(f"set_args() expects a ChatLearnConfig, got {type(cfg).__name__}")
    _args = cfg


def get_args() -> ChatLearnConfig:
    """The config given to ``chatlearn.init()``."""
    if _args is None:
        raise RuntimeError("chatlearn.get_args() was called before chatlearn.init(): "
                           "call chatlearn.init(config_path) (or run with -c CONFIG.yaml) first")
    return _args


def is_initialized() -> bool:
    return _args is not None


def _reset() -> None:
    """Forget the config (for tests)."""
    global _args
    _args = None
