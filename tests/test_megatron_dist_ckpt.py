"""dist_checkpointing: save under TP2xPP2 after a training step, load under TP1 (4 gloo ranks)."""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.utils.tiny_assets import ensure_tiny_assets
from tests.test_megatron_convert import spawn
from tests.test_megatron_module import _data, _module


def _worker(rank: int, world: int, model_dir: str, path: str) -> None:
    trained = _module(model_dir, 2, 2, trainable=True, optimizer="sgd", lr=0.05, clip_grad=0.0)
    trained.train_step(_data(1), 0)
    weights = trained.named_parameters_for_sync()
    trained.save_distributed_checkpoint(path)

    reloaded = _module(model_dir, 1, 1, trainable=False)  # DP4: every rank loads the full model
    before = reloaded.named_parameters_for_sync()
    assert not torch.equal(before["model.norm.weight"], weights["model.norm.weight"])
    reloaded.load_distributed_checkpoint(path)
    after = reloaded.named_parameters_for_sync()
    assert sorted(after) == sorted(weights)
    for key, tensor in weights.items():
        assert torch.equal(after[key], tensor), f"rank {rank}: {key} differs after TP2xPP2 -> TP1 reload"


def test_dist_checkpoint_tp2pp2_to_tp1(tmp_path):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    spawn(_worker, 4, model_dir, str(tmp_path / "ckpt"))


def _resume_worker(rank: int, world: int, model_dir: str, path: str, optim: dict) -> None:
    module = _module(model_dir, 2, 1, trainable=True, **optim)  # TP2 x DP2
    module.train_step(_data(1), 0)
    module.save_checkpoint(path)
    module.train_step(_data(2), 1)
    expected = module.named_parameters_for_sync()

    resumed = _module(model_dir, 2, 1, trainable=True, **optim)
    resumed.load_checkpoint(path)
    resumed.train_step(_data(2), 1)
    got = resumed.named_parameters_for_sync()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), f"rank {rank}: {key} differs after resuming"



@pytest.mark.parametrize("optim", [dict(optimizer="adam", lr=1e-3),
                                   dict(optimizer="adam", lr=1e-3, use_distributed_optimizer=True)],
                         ids=["adam", "adam-distopt"])
def test_per_rank_checkpoint_resumes_adam_exactly(tmp_path, optim):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    spawn(_resume_worker, 4, model_dir, str(tmp_path / "ckpt"), optim)
