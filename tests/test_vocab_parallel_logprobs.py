"""Vocab-parallel, chunked token log-probs and entropy (chatlearn.algorithms.vocab_parallel and the
core helpers on it) against the plain full-vocabulary formulas: values and gradients w.r.t. the
logits at TP1 and TP2 (two gloo processes), fp32 and bf16, temperature and top-k/top-p, awkward
sizes; then through a real tiny Megatron GPTModel, TP2 against TP1."""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.algorithms.core import (entropy_from_logits, nucleus_mask, sampling_logprobs,
                                       sampling_logprobs_and_entropy)
from chatlearn.algorithms.vocab_parallel import chunk_rows, vocab_parallel_logprobs_entropy
from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets

FP32_TOL = 1e-5
BF16_TOL = 2e-2  # bf16 logits upcast chunk by chunk vs upcast at once: only the gradient's rounding differs


# --- the full-vocabulary formulas (what sampling_logprobs / entropy_from_logits computed before) ------------
def reference_logprobs(logits, input_ids, temperature=None, top_k=None, top_p=None, mask=None):
    """log_softmax(z / T) gathered at the next token; at the filtered positions the log-prob
    renormalised over vLLM's top-k/top-p set (plus the target). [b, s], position 0 is 0."""
    b = logits.shape[0]
    t = torch.ones(b) if temperature is None else temperature.float()
    z = logits[:, :-1].float() / t[:, None, None]
    targets = input_ids[:, 1:]
    logp = torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)
    vocab = logits.shape[-1]
    filtered = torch.zeros(b, dtype=torch.bool)
    if top_k is not None:
        filtered |= (top_k > 0) & (top_k < vocab)
    if top_p is not None:
        filtered |= top_p < 1.0
    where = filtered[:, None].expand_as(targets) & (torch.ones_like(targets, dtype=torch.bool) if mask is None
                                                    else mask[:, 1:] > 0)
    out = []
    for i in range(b):
        row = []
        for j in range(targets.shape[1]):
            if where[i, j]:
                with torch.no_grad():
                    keep = nucleus_mask(z[i, j][None], None if top_k is None else top_k[i:i + 1],
                                        None if top_p is None else top_p[i:i + 1])[0]
                    keep[targets[i, j]] = True
                row.append(z[i, j, targets[i, j]] - torch.logsumexp(z[i, j].masked_fill(~keep, float("-inf")), -1))
            else:
                row.append(logp[i, j])
        out.append(torch.stack(row))
    return torch.nn.functional.pad(torch.stack(out), (1, 0))


def reference_entropy(logits, temperature=None):
    t = torch.ones(logits.shape[0]) if temperature is None else temperature.float()
    logp = torch.log_softmax(logits[:, :-1].float() / t[:, None, None], -1)
    return torch.nn.functional.pad(-(logp.exp() * logp).sum(-1), (1, 0))


# --- cases ------------------------------------------------------------------------------------------------
def _case(b: int, s: int, vocab: int, seed: int, scale: float = 3.0, sampling: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    case = {"logits": torch.randn(b, s, vocab, generator=g) * scale,
            "input_ids": torch.randint(0, vocab, (b, s), generator=g),
            "mask": (torch.rand(b, s, generator=g) > 0.3).float(),
            "w_logp": torch.randn(b, s, generator=g), "w_ent": torch.randn(b, s, generator=g)}
    if sampling:
        case["temperature"] = torch.linspace(0.6, 1.4, b)
        case["top_k"] = torch.tensor([7, 0, vocab, 3, 0][:b] + [0] * max(0, b - 5))  # vocab: off
        case["top_p"] = torch.tensor([0.9, 1.0, 0.5, 1.0, 0.8][:b] + [1.0] * max(0, b - 5))
    return case


CASES = {
    "batch1_odd_seq": _case(1, 7, 34, 0),
    "odd_sizes": _case(3, 5, 50, 1),
    "five_rows_large_logits": _case(5, 4, 64, 2, scale=20.0),
    "no_sampling_settings": _case(2, 9, 46, 3, sampling=False),
}


def _sampling(case: dict) -> dict:
    return {k: case[k] for k in ("temperature", "top_k", "top_p") if k in case}


def _outputs(case: dict, logits: torch.Tensor, group=None, vocab_slice=None):
    """Log-probs, entropy and the gradient of a weighted sum of both w.r.t. ``logits``."""
    logits = logits.detach().requires_grad_(True)
    logp, entropy = sampling_logprobs_and_entropy(logits, case["input_ids"], **_sampling(case), mask=case["mask"],
                                                  group=group)
    # The one-output helpers are its halves.
    assert torch.equal(sampling_logprobs(logits, case["input_ids"], **_sampling(case), mask=case["mask"], group=group),
                       logp)
    assert torch.equal(entropy_from_logits(logits, case.get("temperature"), group=group), entropy)
    ((logp * case["w_logp"]).sum() + (entropy * case["w_ent"]).sum()).backward()
    return logp.detach(), entropy.detach(), logits.grad


def _expected(case: dict, dtype: torch.dtype = torch.float32):
    logits = case["logits"].to(dtype).detach().requires_grad_(True)
    logp = reference_logprobs(logits, case["input_ids"], **_sampling(case), mask=case["mask"])
    entropy = reference_entropy(logits, case.get("temperature"))
    ((logp * case["w_logp"]).sum() + (entropy * case["w_ent"]).sum()).backward()
    return logp.detach(), entropy.detach(), logits.grad.float()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _scaled(tol: float, want: torch.Tensor) -> float:
    """``tol`` relative to the largest magnitude when that is above 1 (fp32 rounding scales with it)."""
    return tol * max(1.0, want.abs().max().item())


# --- TP1 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_full_vocabulary_formulas_fp32(name):
    case = CASES[name]
    got, want = _outputs(case, case["logits"]), _expected(case)
    for what, a, b in zip(("logprobs", "entropy", "grad"), got, want):
        assert _err(a, b) < _scaled(FP32_TOL, b), f"{name} {what}: {_err(a, b)}"
    assert got[2].dtype == torch.float32
    if "top_p" in case:  # the nucleus path was taken, and changed the result
        plain = sampling_logprobs(case["logits"], case["input_ids"], case["temperature"])
        assert _err(plain, got[0]) > 1e-3


def test_matches_full_vocabulary_formulas_bf16():
    case = CASES["odd_sizes"]
    logits = case["logits"].bfloat16()
    got, want = _outputs(case, logits), _expected(case, torch.bfloat16)
    assert got[2].dtype == torch.bfloat16  # the gradient comes back in the logits' dtype
    for what, a, b in zip(("logprobs", "entropy", "grad"), got, want):
        tol = FP32_TOL if what != "grad" else BF16_TOL * b.abs().max().item()
        assert _err(a, b) < tol, f"{what}: {_err(a, b)}"


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 4 * 50, 7 * 4 * 50, 1 << 30])
def test_chunking_changes_nothing(chunk_bytes):
    """Chunks of one row (a budget below one row), 3 and 7 rows (15 rows: the last chunk is
    short), and everything at once give the same values and gradients."""
    case = CASES["odd_sizes"]  # 3 x 5 positions, vocab 50
    assert (chunk_rows(50, 1), chunk_rows(50, 600), chunk_rows(50, 1400), chunk_rows(50, 1 << 30)) == (1, 3, 7, 5368709)
    logits = case["logits"].clone().requires_grad_(True)
    t = case["temperature"][:, None]
    logp, entropy = vocab_parallel_logprobs_entropy(logits, case["input_ids"], t, chunk_bytes=chunk_bytes)
    ((logp * case["w_logp"]).sum() + (entropy * case["w_ent"]).sum()).backward()
    z = case["logits"].clone().requires_grad_(True)
    log_softmax = torch.log_softmax(z / t[..., None], -1)
    want_logp = log_softmax.gather(-1, case["input_ids"][..., None]).squeeze(-1)
    want_entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    ((want_logp * case["w_logp"]).sum() + (want_entropy * case["w_ent"]).sum()).backward()
    assert _err(logp, want_logp) < FP32_TOL and _err(entropy, want_entropy) < FP32_TOL
    assert _err(logits.grad, z.grad) < FP32_TOL


def test_gradient_of_one_output_alone():
    """Only the log-probs (or only the entropy) in the loss: the other output's gradient is None."""
    case = CASES["batch1_odd_seq"]
    for which in (0, 1):
        logits = case["logits"].clone().requires_grad_(True)
        out = vocab_parallel_logprobs_entropy(logits, case["input_ids"])[which]
        out.sum().backward()
        z = case["logits"].clone().requires_grad_(True)
        ls = torch.log_softmax(z, -1)
        want = ls.gather(-1, case["input_ids"][..., None]).squeeze(-1) if which == 0 else -(ls.exp() * ls).sum(-1)
        want.sum().backward()
        assert _err(logits.grad, z.grad) < FP32_TOL


def test_a_vocab_shard_without_its_group_is_refused():
    logits = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="tensor-parallel group"):
        sampling_logprobs(logits, torch.tensor([[1, 2, 9, 3]]))


# --- TP2: each of two gloo ranks holds half the vocabulary ---------------------------------------------------
def _tp2_worker(rank: int, world: int, results: dict) -> None:
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    for name, case in CASES.items():
        for dtype in (torch.float32, torch.bfloat16):
            vocab = case["logits"].shape[-1]
            width = vocab // world
            shard = case["logits"].to(dtype)[..., rank * width:(rank + 1) * width]
            logp, entropy, grad = _outputs(case, shard.contiguous(), group=group)
            results[(name, str(dtype), rank)] = (logp, entropy, grad.float())
    # Chunks smaller than one row at TP2 too
    case = CASES["odd_sizes"]
    shard = case["logits"][..., rank * 25:(rank + 1) * 25].contiguous().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs_entropy(shard, case["input_ids"], case["temperature"][:, None], group,
                                                    chunk_bytes=1)
    ((logp * case["w_logp"]).sum() + (entropy * case["w_ent"]).sum()).backward()
    results[("chunk1", rank)] = (logp.detach(), entropy.detach(), shard.grad)


def test_tp2_matches_full_vocabulary_formulas():
    import multiprocessing

    with multiprocessing.Manager() as manager:
        results = manager.dict()
        spawn(_tp2_worker, 2, results)
        results = dict(results)
    for name, case in CASES.items():
        for dtype in (torch.float32, torch.bfloat16):
            want_logp, want_entropy, want_grad = _expected(case, dtype)
            width = case["logits"].shape[-1] // 2
            for rank in (0, 1):
                logp, entropy, grad = results[(name, str(dtype), rank)]
                where = f"{name} {dtype} rank {rank}"
                # every rank computes the same (whole-vocabulary) values ...
                assert _err(logp, want_logp) < _scaled(FP32_TOL, want_logp), \
                    f"{where} logprobs: {_err(logp, want_logp)}"
                assert _err(entropy, want_entropy) < _scaled(FP32_TOL, want_entropy), \
                    f"{where} entropy: {_err(entropy, want_entropy)}"
                # ... and the gradient of its own vocabulary slice
                want = want_grad[..., rank * width:(rank + 1) * width]
                tol = _scaled(FP32_TOL, want) if dtype == torch.float32 else BF16_TOL * want_grad.abs().max().item()
                assert _err(grad, want) < tol, f"{where} grad: {_err(grad, want)}"
    case = CASES["odd_sizes"]
    t = case["temperature"][:, None, None]
    z = case["logits"].clone().requires_grad_(True)
    ls = torch.log_softmax(z / t, -1)
    want_logp = ls.gather(-1, case["input_ids"][..., None]).squeeze(-1)
    want_entropy = -(ls.exp() * ls).sum(-1)
    ((want_logp * case["w_logp"]).sum() + (want_entropy * case["w_ent"]).sum()).backward()
    for rank in (0, 1):
        logp, entropy, grad = results[("chunk1", rank)]
        assert _err(logp, want_logp) < FP32_TOL and _err(entropy, want_entropy) < FP32_TOL
        assert _err(grad, z.grad[..., rank * 25:(rank + 1) * 25]) < FP32_TOL


# --- a real tiny Megatron GPTModel: TP2 against TP1 ---------------------------------------------------------
def _rollout_batch(vocab: int) -> dict:
    """A PPO micro-batch: two rows with their own temperature, one with top-k and top-p."""
    g = torch.Generator().manual_seed(7)
    b, s = 2, 9
    mask = torch.zeros(b, s)
    mask[:, 4:] = 1
    return {"input_ids": torch.randint(4, vocab, (b, s), generator=g), "loss_mask": mask,
            "old_logprobs": -torch.rand(b, s, generator=g) * mask, "advantages": torch.randn(b, s, generator=g) * mask,
            "sampling_temperature": torch.tensor([0.7, 1.3]), "sampling_top_k": torch.tensor([0, 20]),
            "sampling_top_p": torch.tensor([1.0, 0.8])}


# megatron parameter -> the dimension its TP shards are split along (None: replicated)
GRAD_PARAMS = {"decoder.final_layernorm.weight": None, "output_layer.weight": 0,
               "embedding.word_embeddings.weight": 0}


def _megatron_worker(rank: int, world: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from chatlearn.algorithms.ppo import PPOConfig
    from chatlearn.models.megatron.model import unwrap
    from chatlearn.models.megatron.module import MegatronModule, MegatronSettings
    from chatlearn.models.megatron.schedule import forward_logits
    from chatlearn.roles.policy_trainer import PolicyTrainer

    class Trainer(PolicyTrainer):
        """The PPO role's loss_fn (log-probs of the sampling distribution and an entropy bonus)."""

        def setup(self) -> None:
            MegatronModule.setup(self)
            self.cfg = PPOConfig(entropy_coef=0.1, whiten_advantages=False)
            self._check_consistency, self._consistency = False, []
            self._recompute, self._old_in_loss, self._steps_this_episode = False, False, 0

        def loss_fn(self, logits, micro_batch):
            self.logits_width = logits.shape[-1]
            return super().loss_fn(logits, micro_batch)

    for tp in (1, 2):  # TP1 runs as DP2 on the same data: the DP-averaged gradient is the single one
        module = Trainer("policy")
        module.settings = MegatronSettings(load=model_dir, tp=tp, trainable=True, optimizer="sgd", lr=0.0,
                                           clip_grad=0.0)
        module.setup()
        vocab = int(unwrap(module.model).vocab_size)
        batch = _rollout_batch(vocab)
        logprobs = MegatronModule.forward_step(module, batch, 0)["logprobs"]  # not the recompute stage's keys
        logits = forward_logits(module.model, [{"input_ids": batch["input_ids"]}])
        metrics = module.train_step([batch], 0)
        params = dict(unwrap(module.model).named_parameters())
        grads = {}
        for name, dim in GRAD_PARAMS.items():
            grad = params[name].main_grad
            if dim is not None and tp > 1:  # a vocab-parallel weight: gather the TP slices
                parts = [torch.empty_like(grad) for _ in range(tp)]
                dist.all_gather(parts, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
                grad = torch.cat(parts, dim)
            grads[name] = grad.clone()
        if rank == 0:
            torch.save({"logprobs": logprobs, "logits": logits, "loss": metrics["loss/policy"],
                        "entropy": metrics["entropy"], "grads": grads, "width": module.logits_width},
                       os.path.join(out_dir, f"tp{tp}.pt"))


@pytest.mark.slow  # ~75 s on 2 cores; the function-level TP2 tests above run by default
def test_megatron_tp2_logprobs_and_loss_gradient_equal_tp1(tmp_path):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=3, arch="llama").model_dir)
    spawn(_megatron_worker, 2, model_dir, str(tmp_path))
    tp1, tp2 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    print({k: _err(tp1[k], tp2[k]) for k in ("logprobs", "logits")},
          {k: _err(tp1["grads"][k], tp2["grads"][k]) / tp1["grads"][k].abs().max().item() for k in GRAD_PARAMS})
    vocab = tp1["logits"].shape[-1]
    assert (tp1["width"], tp2["width"]) == (vocab, vocab // 2)  # loss_fn gets this rank's vocabulary slice
    assert tp2["logits"].shape == tp1["logits"].shape  # forward_logits gathers the full vocabulary
    assert _err(tp1["logits"], tp2["logits"]) < 1e-4
    assert _err(tp1["logprobs"], tp2["logprobs"]) < 2e-5
    assert float(tp1["entropy"]) == pytest.approx(float(tp2["entropy"]), rel=1e-5)
    assert float(tp1["loss"]) == pytest.approx(float(tp2["loss"]), rel=1e-5, abs=1e-7)
    # The TP1 numbers are the full-vocabulary formulas' (within fp32 rounding).
    batch = _rollout_batch(tp1["logits"].shape[-1])
    want = reference_logprobs(tp1["logits"], batch["input_ids"], batch["sampling_temperature"],
                              batch["sampling_top_k"], batch["sampling_top_p"], batch["loss_mask"])
    assert _err(tp1["logprobs"], want) < FP32_TOL
    for name in GRAD_PARAMS:
        a, b = tp1["grads"][name], tp2["grads"][name]
        assert a.abs().max() > 0, name
        assert _err(a, b) <= 1e-4 * a.abs().max().item(), f"{name}: {_err(a, b)}"
