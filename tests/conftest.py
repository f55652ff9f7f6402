"""Shared fixtures: one local Ray for the whole session, and quiet vLLM/torch settings."""
from __future__ import annotations

import os

import pytest

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


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
