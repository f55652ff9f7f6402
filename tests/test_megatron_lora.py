"""LoRA on megatron's TP linears: TP1 vs TP2xPP2 parity, frozen base, merged HF export."""
from __future__ import annotations

import os

import torch

from chatlearn.utils.tiny_assets import ensure_tiny_assets
from chatlearn.utils.launch import spawn
from tests.test_megatron_convert import hf_logits
from tests.test_megatron_module import _data, _hf_weight, _module


def _lora_worker(rank: int, world: int, model_dir: str, out_dir: str) -> None:
    from megatron.core import parallel_state as ps

    runs = {}
    for tp, pp in [(1, 1), (2, 2)]:
        module = _module(model_dir, tp, pp, trainable=True, optimizer="sgd", lr=0.5, clip_grad=1.0, lora_rank=4)
        trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_" in n for n in trainable), sorted(trainable)[:3]
        losses = [module.train_step(_data(1), step) for step in range(3)]
        runs[(tp, pp)] = ([m["loss"] for m in losses if m], module.named_parameters_for_sync())
    (losses1, w1), (losses4, w4) = runs[(1, 1)], runs[(2, 2)]
    if ps.is_pipeline_last_stage():
        assert losses1[-1] < losses1[0], losses1
        assert max(abs(a - b) for a, b in zip(losses1, losses4)) < 1e-5, (losses1, losses4)
    for key in w1:
        assert (w1[key] - w4[key]).abs().max() < 1e-6, key
    # Only the LoRA targets moved; norms and embeddings are the checkpoint's.
    for key in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(w4[key], _hf_weight(model_dir, key)), key
    assert not torch.equal(w4["model.layers.0.mlp.down_proj.weight"],
                           _hf_weight(model_dir, "model.layers.0.mlp.down_proj.weight"))
    # The merged export, saved as a HF checkpoint, must reproduce the LoRA model's outputs.
    module.save_hf_checkpoint(os.path.join(out_dir, "merged"))
    out = module.forward_step({"input_ids": _data(0)[0]["input_ids"]}, 0)
    if module.is_output_rank():
        torch.save(out["logprobs"], os.path.join(out_dir, f"logprobs_rank{rank}.pt"))


def test_lora_tp2pp2_matches_tp1_and_merges_into_hf(tmp_path):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    spawn(_lora_worker, 4, model_dir, str(tmp_path))
    input_ids = _data(0)[0]["input_ids"]
    logits = hf_logits(str(tmp_path / "merged"), input_ids)
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    (file,) = [f for f in os.listdir(tmp_path) if f.startswith("logprobs_rank")]
    got = torch.load(tmp_path / file)
    assert (got[:, 1:] - expected).abs().max() < 2e-5
