"""Shared fixtures: one local Ray for the whole session, and quiet vLLM/torch settings."""
from __future__ import annotations

import os
import sys

import pytest

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The example modules tests import (train_rlhf, arithmetic, standalone from examples/megatron;
# toy_models from examples/toy), found as their scripts find them. Ray workers get the driver's
# sys.path (chatlearn.runtime.startup.worker_env), so they import the same modules, and config strings such as
# ``arithmetic:arithmetic_reward`` resolve there too. examples/megatron comes first: its
# train_rlhf.py is the one tests import (examples/toy's runs only as a subprocess).
for _folder in ("toy", "megatron"):
    _path = os.path.join(ROOT, "examples", _folder)
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than the machine has cores: the toy
    engine places up to a dozen single-slot workers on 2 cores."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def toy_env(tmp_path, monkeypatch):
    """Environment knobs of tests/configs/toy_rlhf.yaml, pointed at a temp dir."""
    monkeypatch.setenv("output_dir", str(tmp_path / "out"))
    monkeypatch.setenv("record_dir", str(tmp_path / "records"))
    return tmp_path


@pytest.fixture(scope="session")
def main_job_dir(tmp_path_factory):
    """One --output-dir for every main-job run of a session: the first run builds the tiny model,
    the task and the SFT warm start, and the others reuse them (main_tiny.py reuses what exists),
    as the README's runs do; each algorithm writes its own run directory in it."""
    return tmp_path_factory.mktemp("main_job")
