"""chatlearn.init / get_args, as in ChatLearn 1.x."""
from __future__ import annotations

import os
import sys

import pytest

import chatlearn
from chatlearn.config import globals as cl_globals

TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "examples", "toy", "configs", "rlhf.yaml")


@pytest.fixture(autouse=True)
def fresh_globals():
    cl_globals._reset()
    yield
    cl_globals._reset()


def test_get_args_before_init_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"get_args\(\) was called before chatlearn.init\(\)"):
        chatlearn.get_args()


def test_init_with_path():
    cfg = chatlearn.init(TOY)
    assert chatlearn.get_args() is cfg
    assert cfg.models["policy"].name == "policy"


def test_init_reads_config_from_argv_and_leaves_other_args(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "3", "-c", TOY, "extra"])
    cfg = chatlearn.init()
    assert cfg.config_path == TOY
    assert sys.argv == ["train.py", "--lr", "3", "-c", TOY, "extra"]
    assert cl_globals.config_path_from_argv(["--config", "x.yaml", "--other"]) == "x.yaml"


def test_init_without_config_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(chatlearn.ConfigError, match="no config given"):
        chatlearn.init()
    assert not cl_globals.is_initialized()


def test_init_with_overrides_and_set_args():
    cfg = chatlearn.init(TOY, overrides=["runtime.num_episode=1"])
    assert cfg.runtime.num_episode == 1
    cl_globals.set_args(cfg)
    assert chatlearn.get_args() is cfg
    with pytest.raises(TypeError):
        cl_globals.set_args({"runtime": {}})
