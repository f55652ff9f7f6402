"""One batching path on real megatron-core: every global-batch size, over DP 1 and 2, trains to
the gradient of the whole, unpadded batch's loss (computed independently in transformers)."""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets

MICRO = 2
SIZES = range(1, 3 * MICRO + 1)  # 1 .. 3x the micro-batch: every remainder over DP 2 and MICRO
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# megatron name -> transformers name of the parameters whose gradients are compared
PARAMS = {"decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight",
          "embedding.word_embeddings.weight": "model.embed_tokens.weight"}


def _samples(n: int, seed: int = 0) -> list[dict]:
    """Rows of different lengths, a response part (loss_mask) and a weight per token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i % 4
        prompt = 2 + i % 2
        mask = torch.zeros(length)
        mask[prompt:] = 1
        if i == 3:
            mask[:] = 0  # a sample with no response token: counts as a sequence, adds no token
        out.append({"input_ids": torch.randint(4, 100, (length,), generator=g), "loss_mask": mask,
                    "w": torch.rand(length, generator=g)})
    return out


def _worker(rank: int, world: int, model_dir: str, out: str) -> None:
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from chatlearn.algorithms.core import LossAggregator, sampling_logprobs
    from chatlearn.data.batching import split_global_batch
    from chatlearn.models.megatron.model import unwrap
    from chatlearn.models.megatron.module import MegatronModule, MegatronSettings
    from chatlearn.models.megatron.schedule import vocab_group

    class WeightedNLL(MegatronModule):
        mode = "token-mean"

        def loss_fn(self, logits, micro_batch):
            logp = sampling_logprobs(logits, micro_batch["input_ids"], group=vocab_group())
            agg = LossAggregator(micro_batch, micro_batch["loss_mask"])
            loss = agg.loss(-logp * micro_batch["w"], self.mode)
            return loss, {"loss": loss.detach()}

    module = WeightedNLL("policy")
    module.settings = MegatronSettings(load=model_dir, trainable=True, optimizer="sgd", lr=0.0, clip_grad=0.0)
    module.setup()
    original = load_file(os.path.join(model_dir, "model.safetensors"))
    params = dict(unwrap(module.model).named_parameters())
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    results = {}
    for mode in MODES:
        module.mode = mode
        for n in SIZES:
            module.load_parameters_from_sync(original)
            metrics = module.train_step(split_global_batch(_samples(n), dp, MICRO)[dp_rank], n)
            results[(mode, n)] = ({name: params[name].main_grad.clone() for name in PARAMS}, metrics["loss"])
    if rank == 0:
        torch.save(results, out)


def _reference(model_dir: str, mode: str, n: int) -> tuple[dict[str, torch.Tensor], float]:
    """The loss of the whole batch (no split, no padding rows) and its gradients, in transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    losses, tokens = [], 0.0
    for s in _samples(n):
        ids = s["input_ids"][None]
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        per_token = -logp * s["w"][1:] * s["loss_mask"][1:]
        losses.append((per_token.sum(), s["loss_mask"][1:].sum()))
        tokens += float(s["loss_mask"][1:].sum())
    if mode == "token-mean":
        loss = sum(total for total, _ in losses) / tokens
    elif mode == "seq-mean-token-sum":
        loss = sum(total for total, _ in losses) / n
    else:
        loss = sum(total / max(float(count), 1.0) for total, count in losses) / n
    loss.backward()
    named = dict(model.named_parameters())
    return {m: named[h].grad.clone() for m, h in PARAMS.items()}, float(loss.detach())


@pytest.mark.parametrize("dp", [1, 2])
def test_every_batch_size_trains_to_the_unpadded_gradient(tmp_path, dp):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=3, arch="llama").model_dir)
    out = str(tmp_path / "grads.pt")
    spawn(_worker, dp, model_dir, out)
    results = torch.load(out)
    for mode in MODES:
        for n in SIZES:
            grads, loss = results[(mode, n)]
            want_grads, want_loss = _reference(model_dir, mode, n)
            assert loss == pytest.approx(want_loss, rel=1e-5), (mode, n)
            for name, want in want_grads.items():
                err = (grads[name] - want).abs().max().item()
                assert err <= 1e-4 * want.abs().max().item() + 1e-7, f"{mode} n={n} dp={dp} {name}: {err}"
