"""Checkpoints of MegatronModule on real megatron-core over gloo (4 ranks).

Adaptive checkpoints (megatron dist_checkpointing) saved under TP2xPP2 load
under TP1 (DP4) and TP2xPP1 with the same weights, and the optimizer state
comes along: the next training step gives the saving run's own next step.
Per-rank checkpoints resume exactly under their own layout and refuse others.
"""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.models.megatron.module import MegatronModule, MegatronSettings
from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets
from tests.test_megatron_convert import build_score_model
from tests.test_megatron_module import _data, _module

OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=1e-3),
    "adam-distopt": dict(optimizer="adam", lr=1e-3, use_distributed_optimizer=True),
}
LOAD_LAYOUTS = [(1, 1), (2, 1)]  # (tp, pp); DP fills the 4-rank world


def _assert_same(got: dict, expected: dict, where: str, rtol: float = 0.0) -> None:
    """Per tensor: ||got - expected|| <= rtol * ||expected|| (rtol 0: equal)."""
    assert sorted(got) == sorted(expected), where
    for key, tensor in expected.items():
        # The k bias's true gradient is 0 (softmax ignores a shift shared by all keys),
        # so Adam's m / sqrt(v) scales pure fp32 summation noise up to lr-sized steps:
        # measured 3e-6 between TP1 and TP2 after resuming (a fresh optimizer: 5e-2).
        tol = rtol * 100 if key.endswith("k_proj.bias") else rtol
        err = (got[key] - tensor).norm().item()
        assert err <= tol * tensor.norm().item(), f"{where}: {key} differs by {err} (norm)"


def _resume_elsewhere(rank: int, saver, path: str, model_dir: str, steps: int, **kw) -> None:
    """Save ``saver`` adaptively; reload under each of LOAD_LAYOUTS: same weights, same next step."""
    saver.save_checkpoint(path)
    saved = saver.named_parameters_for_sync()
    saver.train_step(_data(steps + 1), steps)
    expected_next = saver.named_parameters_for_sync()
    for tp, pp in LOAD_LAYOUTS:
        where = f"{os.path.basename(path)} tp2pp2 -> tp{tp}pp{pp} rank {rank}"
        resumed = _module(model_dir, tp, pp, trainable=True, adaptive_checkpoint=True, **kw)
        resumed.load_checkpoint(path)
        _assert_same(resumed.named_parameters_for_sync(), saved, where)  # bit for bit (fp32)
        resumed.train_step(_data(steps + 1), steps)
        # Not bit for bit: TP1 and TP2 sum the gradients in a different order.
        _assert_same(resumed.named_parameters_for_sync(), expected_next, f"{where}, next step", rtol=1e-6)


def _adaptive_worker(rank: int, world: int, model_dir: str, score_dir: str, root: str) -> None:
    for name, optim in OPTIMIZERS.items():
        saver = _module(model_dir, 2, 2, trainable=True, adaptive_checkpoint=True, **optim)
        for step in range(2):
            saver.train_step(_data(step), step)
        _resume_elsewhere(rank, saver, os.path.join(root, name), model_dir, steps=2, **optim)

    # LoRA with the distributed optimizer (fc1's factor B has the gated [gate; up] row layout of fc1).
    lora = dict(optimizer="adam", lr=1e-2, lora_rank=4, use_distributed_optimizer=True)
    saver = _module(model_dir, 2, 2, trainable=True, adaptive_checkpoint=True, **lora)
    saver.train_step(_data(0), 0)
    _resume_elsewhere(rank, saver, os.path.join(root, "lora"), model_dir, steps=1, **lora)

    # A value model's score head, trained and saved with its optimizer, loaded for inference.
    value = _ValueModule("value")
    value.settings = MegatronSettings(load=score_dir, tp=2, pp=2, trainable=True, adaptive_checkpoint=True, lr=1e-2)
    value.setup()
    value.train_step(_data(0), 0)
    value.save_checkpoint(os.path.join(root, "value"))
    saved = value.named_parameters_for_sync()
    reloaded = _module(score_dir, 1, 1, trainable=False)
    assert not torch.equal(reloaded.named_parameters_for_sync()["score.weight"], saved["score.weight"])
    reloaded.load_checkpoint(os.path.join(root, "value"))
    _assert_same(reloaded.named_parameters_for_sync(), saved, f"value model tp2pp2 -> tp1 rank {rank}")


class _ValueModule(MegatronModule):
    def loss_fn(self, logits: torch.Tensor, micro_batch: dict):
        loss = (logits.float() - 1.0).pow(2).mean()  # any loss that moves the score head
        return loss, {"loss": loss.detach()}


def test_adaptive_checkpoint_tp2pp2_resumes_under_tp1_and_tp2pp1(tmp_path):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir
    score_dir = build_score_model(ensure_tiny_assets(root, seed=3, arch="llama").model_dir, tmp_path / "score")
    spawn(_adaptive_worker, 4, str(model_dir), score_dir, str(tmp_path / "ckpt"))


def _per_rank_worker(rank: int, world: int, model_dir: str, path: str, optim: dict) -> None:
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

    # Under another layout a per-rank checkpoint fails on every rank, pointing at the flag.
    other = _module(model_dir, 1, 1, trainable=True, **optim)
    with pytest.raises(ValueError, match=f"{path}.*tp=2 pp=1 dp=2.*tp=1 pp=1 dp=4.*"
                                         "adaptive_parallel_strategy_on_checkpoint"):
        other.load_checkpoint(path)


@pytest.mark.parametrize("optim", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_per_rank_checkpoint_resumes_adam_exactly(tmp_path, optim):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    spawn(_per_rank_worker, 4, model_dir, str(tmp_path / "ckpt"), optim)
