"""What per-token log-probs and detokenisation cost vLLM generation, side by side in one run.

    python benchmarks/vllm_generation.py --device gpu                  # Qwen2-0.5B shape, bf16, 256 x 256
    python benchmarks/vllm_generation.py --device cpu --quick          # the tiny model, to try it out

One in-process engine built with the engine arguments the vLLM policy uses
(``engine_kwargs``: processed log-probs, seed, dtype); random prompts of
``--prompt-len`` tokens, ``--new-tokens`` sampled at temperature 1 with
``ignore_eos`` so every request does the same work. The variants differ only
in the request's ``SamplingParams``:

    no logprobs         logprobs=None, text detokenised
    logprobs            logprobs=0 (the sampled token's), as the policy asks
    logprobs, flat      the same in vLLM's flat container (``flat_logprobs``)
    logprobs, no text   logprobs=0, ``detokenize=False``
    flat, no text       both

Rounds alternate the variants (``--repeats`` each) and the table reports the
median generated tokens/s and the ratio to ``no logprobs``. Writes
``benchmarks/results/vllm_generation_<device>.json`` and a RESULTS.md section.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.results_md import command_line, machine_name, save_results, update_results_section  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "no logprobs": dict(logprobs=None),
    "logprobs": dict(logprobs=0),
    "logprobs, flat": dict(logprobs=0, flat_logprobs=True),
    "logprobs, no text": dict(logprobs=0, detokenize=False),
    "flat, no text": dict(logprobs=0, flat_logprobs=True, detokenize=False),
}


def build_engine(model_dir: str, gpu: bool, max_len: int):
    from vllm import LLM

    from chatlearn.models.vllm_module import engine_kwargs

    args: dict[str, Any] = dict(load=model_dir, max_model_len=max_len, seed=0)
    if gpu:
        # The stripped vLLM wheel of the lent machines has no FlashAttention (PLATFORM.md).
        args.update(gpu_memory_utilization=0.5, attention_backend="TRITON_ATTN")
    else:
        args.update(kv_cache_memory_bytes=256 * 2**20)
    return LLM(**engine_kwargs(args, on_gpu=gpu, seed=0))


def timed_generate(llm: Any, prompts: list[list[int]], params: Any) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return seconds, tokens


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--quick", action="store_true", help="the tiny test model, few tokens")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="/tmp/chatlearn-bench")
    args = p.parse_args(argv)
    gpu = args.device == "gpu"
    if gpu:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from vllm import SamplingParams

    if args.quick:
        from chatlearn.utils.tiny_assets import ensure_tiny_assets

        model_dir, name, vocab = str(ensure_tiny_assets(Path(args.work) / "assets", seed=0).model_dir), "tiny llama", 128
        args.prompts, args.new_tokens, args.prompt_len = min(args.prompts, 16), min(args.new_tokens, 16), 8
    else:
        from benchmarks.param_sync import SHAPES, build_model

        model_dir = str(build_model(Path(args.work), "qwen2-0.5b", torch.bfloat16 if gpu else torch.float32))
        name, vocab = "Qwen2-0.5B shape", SHAPES["qwen2-0.5b"]["vocab"]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
    llm = build_engine(model_dir, gpu, args.prompt_len + args.new_tokens + 8)

    probe = SamplingParams()
    variants = {k: v for k, v in VARIANTS.items() if all(hasattr(probe, key) for key in v)}
    skipped = sorted(set(VARIANTS) - set(variants))
    base = dict(temperature=1.0, ignore_eos=True, max_tokens=args.new_tokens, seed=None)
    for extra in variants.values():  # warm-up: compile, graphs, and the log-prob kernels' Triton JIT
        timed_generate(llm, prompts[:8], SamplingParams(**base, **extra))
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for label, extra in variants.items():
            seconds, tokens = timed_generate(llm, prompts, SamplingParams(**base, **extra))
            runs[label].append(tokens / seconds)
    rates = {k: statistics.median(v) for k, v in runs.items()}
    ref = rates["no logprobs"]
    rows = [f"| {label} | {rate:,.0f} | {rate / ref:.2f} |" for label, rate in rates.items()]
    table = "| request | generated tok/s (median) | vs no logprobs |\n|---|---|---|\n" + "\n".join(rows)
    print(table)
    machine = machine_name(args.device)
    result = dict(model=name, device=args.device, machine=machine, prompts=args.prompts, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, repeats=args.repeats, runs=runs, median_tok_s=rates, skipped=skipped)
    tag = args.device + ("_quick" if args.quick else "")
    save_results(f"vllm_generation_{tag}", result)
    cmd = command_line("vllm_generation.py", argv)
    note = f" Not offered by this vLLM: {', '.join(skipped)}." if skipped else ""
    update_results_section(f"vLLM generation: the cost of log-probs and text ({tag})",
                           f"Machine: {machine}. Command: `{cmd}`. {name}, {args.prompts} prompts of "
                           f"{args.prompt_len} tokens x {args.new_tokens} new tokens (ignore EOS, temperature 1), "
                           f"one in-process engine with the policy's engine arguments; {args.repeats} alternating "
                           f"rounds.{note}\n\n{table}\n")
    return result


if __name__ == "__main__":
    main()
