"""The learning-rate schedule of MegatronModule: warm-up, decay, and its place in checkpoints."""
from __future__ import annotations

import math
import os

import pytest
import torch

from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 2, 6


def expected_lr(step: int) -> float:
    """Linear warm-up from 0, then cosine from LR to MIN_LR at step DECAY (megatron's formulas)."""
    if step < WARMUP:
        return LR * step / WARMUP
    if step >= DECAY:
        return MIN_LR
    ratio = (step - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def _module(model_dir: str):
    from chatlearn.models.megatron.module import MegatronModule, MegatronSettings

    module = MegatronModule("policy")
    module.settings = MegatronSettings(load=model_dir, trainable=True, lr=LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP,
                                       lr_decay_steps=DECAY, lr_decay_style="cosine")
    module.setup()
    return module


def _worker(rank: int, world: int, model_dir: str, ckpt: str) -> None:
    batch = [{"input_ids": torch.randint(4, 100, (2, 8), generator=torch.Generator().manual_seed(0))}]
    module = _module(model_dir)
    lrs = [module.train_step(batch, step)["lr"] for step in range(4)]
    assert lrs == pytest.approx([expected_lr(s) for s in range(4)], rel=1e-6), lrs
    module.save_checkpoint(ckpt)
    resumed = _module(model_dir)
    resumed.load_checkpoint(ckpt)
    # The resumed schedule continues where the saved one stopped, to the floor and beyond.
    lrs = [resumed.train_step(batch, step)["lr"] for step in range(4, 8)]
    assert lrs == pytest.approx([expected_lr(s) for s in range(4, 8)], rel=1e-6), lrs


def test_lr_warmup_cosine_decay_and_resume(tmp_path):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=0, arch="llama").model_dir)
    spawn(_worker, 1, model_dir, str(tmp_path / "ckpt"))
