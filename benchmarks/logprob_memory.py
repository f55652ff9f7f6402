"""Peak host memory of one training micro-batch's loss + backward, at a large vocabulary:
the full-vocabulary log-softmax the loss code used before against the vocab-parallel, chunked
kernel (``chatlearn.algorithms.vocab_parallel``). CPU, fp32, TP1.

    python benchmarks/logprob_memory.py                        # Qwen2's vocabulary, 2 x 512 tokens
    python benchmarks/logprob_memory.py --batch 1 --seq 128     # quicker

The "model" is an embedding and an LM head (hidden 256), so the logits and their gradient are
most of the memory; the loss is a PPO-like mean over the tokens of -advantage * log-prob minus
0.01 x entropy, at temperature 0.7. Each variant runs in its own process; the number reported is
the growth of the process's peak RSS (ru_maxrss) over the loss + backward, beyond what the
model and its input took before.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _full_vocabulary(logits: torch.Tensor, ids: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formulas before the vocab-parallel kernel (sampling_logprobs and entropy_from_logits of
    commit dc49fe8, no top-k/top-p): fp32 log-softmax of the logits, kept by autograd."""
    logp_all = torch.log_softmax(logits[:, :-1].float() / t[:, None, None], dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    logp2 = torch.log_softmax(logits[:, :-1].float() / t[:, None, None], dim=-1)  # entropy_from_logits' own
    entropy = -(logp2.exp() * logp2).sum(-1)
    return logp, entropy


def _vocab_parallel(logits: torch.Tensor, ids: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from chatlearn.algorithms.core import sampling_logprobs_and_entropy

    logp, entropy = sampling_logprobs_and_entropy(logits, ids, t)  # what the policy trainer's loss calls
    return logp[:, 1:], entropy[:, 1:]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_variant(name: str, batch: int, seq: int, vocab: int, hidden: int) -> dict:
    torch.manual_seed(0)
    embed, head = torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab, bias=False)
    ids = torch.randint(0, vocab, (batch, seq))
    advantages = torch.randn(batch, seq - 1)
    t = torch.full((batch,), 0.7)
    fn = {"full_vocabulary": _full_vocabulary, "vocab_parallel": _vocab_parallel}[name]
    before = _peak_mib()
    start = time.perf_counter()
    logits = head(embed(ids))  # [b, s, V] fp32: the model's output, the same in both variants
    logp, entropy = fn(logits, ids, t)
    loss = -(advantages * logp).mean() - 0.01 * entropy.mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return {"variant": name, "peak_growth_mib": round(_peak_mib() - before), "seconds": round(seconds, 2),
            "loss": float(loss), "head_grad_norm": float(head.weight.grad.norm()),
            "logits_mib": round(logits.numel() * 4 / 2**20)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936)  # Qwen2
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    args = p.parse_args(argv)
    sizes = (args.batch, args.seq, args.vocab, args.hidden)
    if args.variant:
        print(json.dumps(run_variant(args.variant, *sizes)))
        return []
    results = []
    for name in ("full_vocabulary", "vocab_parallel"):
        out = subprocess.run([sys.executable, __file__, "--variant", name, "--batch", str(args.batch), "--seq",
                              str(args.seq), "--vocab", str(args.vocab), "--hidden", str(args.hidden)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(results[-1])
    return results


if __name__ == "__main__":
    main()
