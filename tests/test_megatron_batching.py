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
        group_rows_by_length = True  # rows are independent: train_step may regroup them by length

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


def test_group_by_length_sorts_rows_and_cuts_each_micro_batch_to_its_longest_row():
    from chatlearn.models.megatron.schedule import group_by_length

    lengths = [3, 9, 4, 12, 5]  # an odd count: the tail micro-batch has one row
    mbs = []
    for i in range(0, len(lengths), 2):
        part = lengths[i:i + 2]
        width = max(part)
        ids = torch.full((len(part), width), 7)
        mask = torch.zeros(len(part), width)
        for r, n in enumerate(part):
            ids[r, :n] = torch.arange(100 * (i + r), 100 * (i + r) + n)
            mask[r, :n] = 1
        mbs.append({"input_ids": ids, "attention_mask": mask, "total": torch.tensor(5.0)})
    out, order = group_by_length(mbs, pad_id=0)
    assert [mb["input_ids"].shape[1] for mb in out] == [4, 9, 12]  # not 12, 12, 12
    assert order.tolist() == [0, 2, 4, 1, 3]
    rows = [row for mb in out for row in mb["input_ids"]]
    for row, original in zip(rows, order.tolist()):
        n = lengths[original]
        assert row[:n].tolist() == list(range(100 * original, 100 * original + n))
    assert all(float(mb["total"]) == 5.0 for mb in out)  # per-batch values are kept
    assert all(int(mb["seq_lens"].max()) <= mb["input_ids"].shape[1] for mb in out)


def _forward_worker(rank: int, world: int, model_dir: str, out: str) -> None:
    from chatlearn.models.megatron.module import MegatronModule, MegatronSettings

    module = MegatronModule("reference")
    module.settings = MegatronSettings(load=model_dir, forward_micro_batch_size=2)
    module.setup()
    g = torch.Generator().manual_seed(0)
    lengths = [3, 11, 4, 12, 5]
    ids = torch.zeros(len(lengths), 12, dtype=torch.long)
    mask = torch.zeros(len(lengths), 12)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(4, 100, (n,), generator=g)
        mask[r, :n] = 1
    data = {"input_ids": ids, "attention_mask": mask}
    grouped = module.forward_step(data, 0)["logprobs"]
    module.settings.forward_micro_batch_size = 0  # one micro-batch, padded to the longest row
    padded = module.forward_step(data, 1)["logprobs"]
    torch.save({"grouped": grouped, "padded": padded, "mask": mask}, out)


def test_forward_step_grouped_by_length_returns_the_rows_in_order(tmp_path):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=3, arch="llama").model_dir)
    out = str(tmp_path / "logprobs.pt")
    spawn(_forward_worker, 1, model_dir, out)
    r = torch.load(out)
    assert r["grouped"].shape == r["padded"].shape == (5, 12)
    real = r["mask"] > 0
    assert torch.allclose(r["grouped"][real], r["padded"][real], atol=1e-5)
    # The longest row's micro-batch: row 3 (12 tokens) with row 1 (11); row 0 (3 tokens) was cut to 4.
    assert (r["grouped"][0, 4:] == 0).all() and (r["padded"][0, 4:] != 0).any()


def test_the_default_loss_mask_is_built_on_the_device_of_the_micro_batch():
    """Micro-batches reach a loss already on the GPU (``schedule._on_device``); a mask made from a
    host ``arange`` broke the default loss there. The meta device stands in for the GPU on CPU."""
    from chatlearn.models.megatron.module import _token_mask

    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = _token_mask({"input_ids": ids, "seq_lens": torch.tensor([3, 5])})
    assert mask.tolist() == [[False, True, True, False, False], [False, True, True, True, True]]
    on_meta = _token_mask({"input_ids": ids.to("meta"), "seq_lens": torch.tensor([3, 5], device="meta")})
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 5)
