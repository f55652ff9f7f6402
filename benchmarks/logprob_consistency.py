#!/usr/bin/env python
"""How far the trainer's log-probs are from the sampler's, and what per-request seeds cost.

Starts a Megatron model and a vLLM policy from the same Hugging Face checkpoint as Ray
actors (the engine's own placement and workers, as benchmarks/param_sync.py does; bf16 on
GPU, fp32 on CPU) and, for each sampling setting (temperature, top-p):

* generates a batch with vLLM (log-probs of the distribution sampled from, its rows
  carrying their settings), then scores the same tokens with the Megatron model under
  the same settings: the gap |trainer - sampler| over the response tokens (mean, max,
  99th percentile, k3 KL), which decides ``recompute_old_logprobs`` (docs/algorithms.md);
* times generation with and without per-request seeds (``request_seeds``), alternating
  the two, same prompts: the cost of reproducible sampling.

It prints a table and writes ``benchmarks/results/logprob_consistency_<device>.json`` and
a section of ``benchmarks/RESULTS.md``.

    python benchmarks/logprob_consistency.py --device cpu --quick
    python benchmarks/logprob_consistency.py --device gpu                 # Qwen2-0.5B shape, bf16
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.param_sync import Runtime, build_model, machine  # noqa: E402
from benchmarks.results_md import update_results_section  # noqa: E402

SETTINGS = [(1.0, 1.0), (0.7, 0.9)]


def _set_args(module, overrides: dict) -> None:
    module._model_args_override = {**module.model_args, **overrides}


def _timings(module) -> dict[str, float]:
    return dict(module.timings)


def generate(rt: Runtime, prompts: list[list[int]], overrides: dict, seeds: bool) -> tuple[dict, float]:
    policy = rt.dist["policy"]
    rt.tracker.get([policy.run_on_worker(w, "args", _set_args, {**overrides, "request_seeds": str(seeds).lower()})
                    for w in policy.workers])
    data = {"prompt_ids": prompts, "request_seed": list(range(1000, 1000 + len(prompts)))}
    (out,) = rt.tracker.get([policy.round_robin("forward_step", data).ref])
    seconds = rt.tracker.get([policy.run_on_worker(policy.workers[0], "timings", _timings)])[0]["generate_s"]
    return out, seconds


def gap(rt: Runtime, batch: dict, rows: int = 32) -> dict[str, float]:
    """Score the batch with the trainer, ``rows`` at a time (the logits are large)."""
    trainer = rt.dist["trainer"]
    keys = ("input_ids", "loss_mask", "sampling_temperature", "sampling_top_k", "sampling_top_p")
    scored = []
    for start in range(0, len(batch["input_ids"]), rows):
        part = {k: batch[k][start:start + rows] for k in keys}
        (out,) = rt.tracker.get([trainer.round_robin("forward_step", part).ref])
        scored.append(out["logprobs"])
    mask = batch["loss_mask"].bool()
    diff = (torch.cat(scored)[mask].double() - batch["old_logprobs"][mask].double())
    absdiff = diff.abs()
    return {"tokens": int(mask.sum()), "mean": float(absdiff.mean()), "max": float(absdiff.max()),
            "p99": float(torch.quantile(absdiff.float(), 0.99)),
            "k3_kl": float((torch.exp(-diff) + diff - 1).mean()),
            "sampler_logprob_mean": float(batch["old_logprobs"][mask].mean())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model", default=None, help="a shape of benchmarks/param_sync.py (default: by device)")
    p.add_argument("--quick", action="store_true", help="fewer prompts and tokens")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per seeding choice")
    p.add_argument("--work", default=None)
    args = p.parse_args(argv)
    gpu = args.device == "gpu"
    name = args.model or ("qwen2-0.5b" if gpu else "llama-100m")
    n_prompts = args.prompts or (16 if args.quick else (256 if gpu else 32))
    new_tokens = args.new_tokens or (16 if args.quick else (256 if gpu else 32))
    work = Path(args.work or tempfile.mkdtemp(prefix="logprob_consistency_"))
    model_dir = build_model(work / "models", name, torch.bfloat16 if gpu else torch.float32)
    rt = Runtime(args.device, model_dir, work, "megatron", bucket_mb=100, new_tokens=new_tokens, prompt_len=32,
                 enforce_eager=not gpu)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 1000, (n_prompts, 32), generator=g).tolist()
    results: dict[str, Any] = {"model": name, "prompts": n_prompts, "new_tokens": new_tokens, "settings": []}
    rt.start()
    try:
        generate(rt, prompts[:2], {"temperature": 1.0, "ignore_eos": True}, seeds=False)  # warm-up
        for temperature, top_p in SETTINGS:
            overrides = {"temperature": temperature, "top_p": top_p, "ignore_eos": True}
            batch, _ = generate(rt, prompts, overrides, seeds=True)
            entry: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "gap": gap(rt, batch)}
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for seeds in (False, True):
                    out, seconds = generate(rt, prompts, overrides, seeds)
                    times[seeds].append(int(out["response_len"].sum()) / seconds)
            entry["tok_s_unseeded"] = statistics.median(times[False])
            entry["tok_s_seeded"] = statistics.median(times[True])
            entry["tok_s_runs"] = {"unseeded": times[False], "seeded": times[True]}
            results["settings"].append(entry)
            print(json.dumps(entry), flush=True)
    finally:
        rt.stop()
    results["machine"] = machine(args.device)
    results["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["command"] = "python benchmarks/logprob_consistency.py " + " ".join(argv or sys.argv[1:])
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"logprob_consistency_{args.device}.json").write_text(json.dumps(results, indent=2))
    report(results, args.device)
    return results


def report(results: dict[str, Any], device: str) -> None:
    rows = [("T", "top_p", "tokens", "mean |gap|", "p99 |gap|", "max |gap|", "k3 KL", "tok/s unseeded",
             "tok/s seeded", "seeded / unseeded")]
    for e in results["settings"]:
        gp = e["gap"]
        rows.append((e["temperature"], e["top_p"], gp["tokens"], f"{gp['mean']:.2e}", f"{gp['p99']:.2e}",
                     f"{gp['max']:.2e}", f"{gp['k3_kl']:.2e}", f"{e['tok_s_unseeded']:.0f}",
                     f"{e['tok_s_seeded']:.0f}", f"{e['tok_s_seeded'] / e['tok_s_unseeded']:.2f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    table = "\n".join(lines)
    print(table)
    m = results["machine"]
    where = f"{m.get('gpu', '')} ({m.get('gpu_count', 0)} GPU); " if device == "gpu" else ""
    precision = "bf16" if device == "gpu" else "fp32"
    body = "\n".join([
        f"Machine: {where}{m['cpu']}, {m['cores']} cores; torch {m['torch']}, vLLM {m['vllm']}, "
        f"megatron-core {m['megatron.core']}. Date: {results['date']}. Command: `{results['command']}`.",
        "",
        f"{results['model']} shape, random init, {precision} on both sides, the same checkpoint loaded by vLLM and by "
        f"a Megatron model. {results['prompts']} prompts x {results['new_tokens']} new tokens (ignore EOS). "
        "Gap = |trainer log-prob - vLLM log-prob| of each sampled token, both of the sampling distribution "
        "(temperature, top-p). Generation tokens/s: the median of alternating runs with and without "
        "per-request seeds (`request_seeds`), same prompts.",
        "",
        table,
        "",
        f"Raw numbers: `benchmarks/results/logprob_consistency_{device}.json`.",
    ])
    update_results_section(f"Trainer vs sampler log-probs and seeded sampling, {device.upper()}", body)


if __name__ == "__main__":
    main()
