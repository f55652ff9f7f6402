"""HF <-> Megatron conversion on real megatron-core over gloo (CPU).

One spawned world of 4 processes walks through several TP/PP layouts
(re-creating megatron's parallel state for each), because starting the
processes and importing megatron costs far more than the tiny models.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp); DP fills the rest of the 4-rank world
WORLD = 4


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    return {
        "llama": str(ensure_tiny_assets(root, seed=0, arch="llama").model_dir),
        "qwen2": str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir),
        "llama_tied": str(ensure_tiny_assets(root, seed=2, arch="llama", tie_embeddings=True).model_dir),
        "llama_score": build_score_model(ensure_tiny_assets(root, seed=3, arch="llama").model_dir,
                                         tmp_path_factory.mktemp("score")),
    }


def build_score_model(causal_lm_dir, out_dir) -> str:
    """A reward-model checkpoint (LlamaForSequenceClassification, one label) from a tiny causal LM."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(causal_lm_dir, num_labels=1)
    config.architectures = ["LlamaForSequenceClassification"]
    model = AutoModelForSequenceClassification.from_config(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(0.02 * torch.randn(param.shape, generator=gen) + (1.0 if param.dim() == 1 else 0.0))
    model.save_pretrained(str(out_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        src = os.path.join(causal_lm_dir, name)
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(out_dir, name))
    return str(out_dir)


def hf_logits(model_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits [b, s, V]; for a score model the per-token scores [b, s, labels]."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if AutoConfig.from_pretrained(model_dir).architectures[0].endswith("ForSequenceClassification"):
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            return model.score(model.model(input_ids).last_hidden_state)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def _convert_worker(rank: int, world: int, cases: dict, input_ids: torch.Tensor, out_dir: str) -> None:
    from safetensors.torch import load_file

    from chatlearn.models.megatron.hf_convert import export_hf_state_dict, load_hf_weights, save_hf_checkpoint
    from chatlearn.models.megatron.model import build_gpt_model, load_hf_config, transformer_config_from_hf
    from chatlearn.models.megatron.parallel import initialize_parallel_state
    from chatlearn.models.megatron.schedule import forward_logits

    micro_batches = [{"input_ids": input_ids[:2]}, {"input_ids": input_ids[2:]}]
    for name, (model_dir, expected_logits) in cases.items():
        hf_cfg = load_hf_config(model_dir)
        original = load_file(os.path.join(model_dir, "model.safetensors"))
        for tp, pp in LAYOUTS:
            where = f"{name} tp={tp} pp={pp} rank={rank}"
            initialize_parallel_state(tp, pp, seed=1)
            model = build_gpt_model(hf_cfg, transformer_config_from_hf(hf_cfg, tp, pp))
            load_hf_weights(model, hf_cfg, model_dir)

            logits = forward_logits(model, micro_batches)
            from megatron.core import parallel_state as ps

            if ps.is_pipeline_last_stage():
                err = (logits - expected_logits).abs().max().item()
                assert err < 1e-5, f"{where}: logits differ from transformers by {err}"
            else:
                assert logits is None

            exported = export_hf_state_dict(model, hf_cfg)
            assert sorted(exported) == sorted(original), f"{where}: names {sorted(set(exported) ^ set(original))}"
            for key, tensor in original.items():
                assert torch.equal(exported[key], tensor), f"{where}: {key} changed in the round trip"

            if (tp, pp) == (2, 2):
                save_hf_checkpoint(model, hf_cfg, os.path.join(out_dir, name), source_dir=model_dir)


def test_hf_megatron_logits_and_round_trip(tiny_models, tmp_path):
    input_ids = torch.randint(4, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    cases = {name: (d, hf_logits(d, input_ids)) for name, d in tiny_models.items()}
    spawn(_convert_worker, WORLD, cases, input_ids, str(tmp_path))
    # What save_hf_checkpoint wrote under TP2xPP2 loads in transformers with the same logits.
    for name, (model_dir, expected) in cases.items():
        saved = tmp_path / name
        assert (saved / "tokenizer_config.json").exists()
        got = hf_logits(str(saved), input_ids)
        assert torch.equal(got, expected), f"{name}: saved checkpoint gives different logits"
