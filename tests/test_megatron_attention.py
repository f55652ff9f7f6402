"""SDPAttention (torch SDPA, the core attention chatlearn builds) against megatron-core's own
DotProductAttention: the same logits and gradients in fp32, under TP1 and TP2, with GQA."""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets


def _worker(rank: int, world: int, model_dirs: list, input_ids: torch.Tensor, results: dict) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from chatlearn.models.megatron import cpu_compat
    from chatlearn.models.megatron.attention import SDPAttention
    from chatlearn.models.megatron.hf_convert import load_hf_weights
    from chatlearn.models.megatron.model import build_gpt_model, load_hf_config, transformer_config_from_hf
    from chatlearn.models.megatron.parallel import initialize_parallel_state

    for tp in (1, 2):
        initialize_parallel_state(tp, 1, seed=1)
        for model_dir in model_dirs:
            hf_cfg = load_hf_config(model_dir)
            outputs = {}
            for backend, attention in (("sdpa", SDPAttention), ("local", DotProductAttention)):
                model = build_gpt_model(hf_cfg, transformer_config_from_hf(hf_cfg, tp, 1), attention_backend=backend)
                load_hf_weights(model, hf_cfg, model_dir)
                layer = model.decoder.layers[0].self_attention
                assert isinstance(layer.core_attention, attention)
                # [b, s] ids -> [b, s, V / TP] logits (this rank's vocabulary slice: parallel_output=True)
                with cpu_compat.cpu_device_mode():  # megatron's own attention allocates "cuda" buffers
                    logits = model(input_ids, position_ids=None, attention_mask=None)
                    loss = (logits.float().log_softmax(-1)[..., 5]).mean()
                    loss.backward()
                outputs[attention.__name__] = (logits.detach(), layer.linear_qkv.weight.grad.detach().clone())
            (a, ga), (b, gb) = outputs["SDPAttention"], outputs["DotProductAttention"]
            if rank == 0:
                results[f"{os.path.basename(os.path.dirname(model_dir))} tp{tp}"] = (
                    (a - b).abs().max().item(), ((ga - gb).abs().max() / gb.abs().max()).item())
            assert ps.get_tensor_model_parallel_world_size() == tp


def test_sdpa_matches_megatron_dot_product_attention(tmp_path):
    import multiprocessing

    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dirs = [str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir),  # 4 heads, 2 kv groups
                  str(ensure_tiny_assets(root, seed=2, arch="qwen3", heads=8, kv_heads=2, head_dim=32,
                                         init_std=0.06).model_dir)]
    input_ids = torch.randint(4, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    with multiprocessing.Manager() as manager:
        results = manager.dict()
        spawn(_worker, 2, model_dirs, input_ids, results)
        results = dict(results)
    print("max |logits diff|, relative max |grad diff|:", results)
    assert len(results) == 4
    for case, (logits_err, grad_err) in results.items():
        assert logits_err < 1e-5, f"{case}: logits differ by {logits_err}"
        assert grad_err < 1e-5, f"{case}: linear_qkv gradients differ by {grad_err} (relative)"


def test_sdpa_refuses_what_it_does_not_implement():
    pytest.importorskip("megatron.core")
    from chatlearn.models.megatron.attention import SDPAttention

    attention = SDPAttention.__new__(SDPAttention)
    torch.nn.Module.__init__(attention)
    attention.softmax_scale, attention.dropout_p = 1.0, 0.0
    q = torch.zeros(3, 1, 2, 4)
    with pytest.raises(ValueError, match="causal only"):
        attention(q, q, q, attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))
