"""Megatron training throughput and MFU: a Qwen2-0.5B or 1.5B-shaped model (random init), a few steps.

    python benchmarks/megatron_train.py --device gpu                  # TP1 on 1 GPU (bf16, NCCL)
    python benchmarks/megatron_train.py --device gpu --model qwen2-1.5b --attention sdpa,local
    python benchmarks/megatron_train.py --device gpu --tp 2           # TP2 when 2 GPUs are lent
    python benchmarks/megatron_train.py --device cpu --quick          # the tiny model on CPU (gloo, fp32)

``--attention`` runs each core attention (``attention_backend``) in turn, side
by side in one run. MFU is model FLOPs (6 x matmul parameters per token, plus
the causal attention's 6 x layers x seq x heads x head_dim) over the step time
and the bf16 matmul peak measured on the same GPU just before.

Builds a Hugging Face checkpoint of the shape locally (no downloads), loads it
through chatlearn's HF -> Megatron conversion, and trains with Adam on a fixed
batch of random token ids through ``MegatronModule.train_step`` (megatron's
schedule, DDP, optimizer, grad clipping): the loss must be finite and fall.
Prints a table (step time, tokens/s) and writes
``benchmarks/results/megatron_train_<device>.json`` and a section of
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.results_md import command_line, machine_name, save_results, update_results_section  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)


QWEN2_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
SHAPES = {"qwen2-0.5b": ("Qwen2-0.5B shape", QWEN2_05B), "qwen2-1.5b": ("Qwen2-1.5B shape", QWEN2_15B)}


def build_checkpoint(out_dir: str, shape: dict) -> str:
    """A random-init Qwen2 checkpoint of ``shape`` (bf16 safetensors); reused when present."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    config = Qwen2Config(**shape, use_sliding_window=False, dtype="bfloat16")
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def benchmark_model(workdir: str, quick: bool, model: str = "qwen2-0.5b") -> tuple[str, str]:
    """``(model_dir, name)``: the tiny test model with ``quick``, else a checkpoint of ``SHAPES[model]``."""
    os.makedirs(workdir, exist_ok=True)
    if quick:
        from chatlearn.utils.tiny_assets import ensure_tiny_assets

        return str(ensure_tiny_assets(os.path.join(workdir, "assets"), seed=1, arch="qwen2").model_dir), "tiny qwen2"
    name, shape = SHAPES[model]
    return build_checkpoint(os.path.join(workdir, f"{model}-shape"), shape), name


def bf16_matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul throughput of this GPU (TFLOP/s): the MFU denominator."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def model_flops_per_token(hf_config: dict, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the parameters of every matmul (the LM head once, tied or not;
    no embedding lookup) + causal attention's 6 x layers x seq x heads x head_dim."""
    h, f, v, layers = (hf_config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    heads, kv = hf_config["num_attention_heads"], hf_config.get("num_key_value_heads", hf_config["num_attention_heads"])
    d = hf_config.get("head_dim") or h // heads
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * f
    return 6 * (layers * per_layer + v * h) + 6 * layers * seq_len * heads * d


def _worker(rank: int, world: int, model_dir: str, args: argparse.Namespace, out_file: str) -> None:
    from megatron.core import parallel_state as ps

    from chatlearn.models.megatron import MegatronModule, MegatronSettings
    from chatlearn.utils import platform

    module = MegatronModule("bench")
    module.settings = MegatronSettings(load=model_dir, tp=args.tp, pp=1, trainable=True, optimizer="adam",
                                       lr=args.lr, clip_grad=1.0, use_distributed_optimizer=world > args.tp,
                                       attention_backend=args.attention_backend)
    start = time.perf_counter()
    module.setup()
    setup_s = time.perf_counter() - start
    vocab = module.hf_config["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    batch = [{"input_ids": torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen)}
             for _ in range(args.micro_batches)]
    times, losses = [], []
    for step in range(args.steps):
        if platform.has_gpu():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = module.train_step(batch, step)
        if platform.has_gpu():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if metrics is not None:
            losses.append(float(metrics["loss"]))
    profile = None
    if args.profile and platform.has_gpu():
        # One more step under the profiler: where the step's GPU time goes, by op.
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            module.train_step(batch, args.steps)
            torch.cuda.synchronize()
        profile = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_data_parallel_rank() == 0:
        params = sum(p.numel() for p in module.model.parameters()) * args.tp  # TP shards, same size each
        tokens = args.micro_batch * args.micro_batches * args.seq_len * ps.get_data_parallel_world_size()
        measured = times[args.warmup:]
        step_s = sum(measured) / len(measured)
        result = dict(world=world, tp=args.tp, dp=ps.get_data_parallel_world_size(), params=params,
                      dtype=str(module.config.params_dtype).replace("torch.", ""), seq_len=args.seq_len,
                      tokens_per_step=tokens, setup_s=setup_s, step_s=step_s, tokens_per_s=tokens / step_s,
                      losses=losses, step_times=times, attention_backend=args.attention_backend, profile=profile,
                      flops_per_token=model_flops_per_token(module.hf_config, args.seq_len),
                      memory_gib=torch.cuda.max_memory_allocated() / 2**30 if platform.has_gpu() else None)
        with open(out_file, "w") as f:
            json.dump(result, f)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=0, help="ranks (default: tp); more ranks add data parallelism")
    parser.add_argument("--quick", action="store_true", help="the tiny test model instead of Qwen2-0.5B")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--model", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--attention", default="sdpa",
                        help="comma-separated attention_backend values, run in turn (sdpa, local)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="GPU: profile one extra step and print its N most expensive ops")
    parser.add_argument("--workdir", default="/tmp/chatlearn-bench")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CHATLEARN_FORCE_CPU"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("--device gpu needs a CUDA device")
    nproc = args.nproc or args.tp

    model_dir, shape_name = benchmark_model(args.workdir, args.quick, args.model)
    if args.quick:
        args.seq_len = min(args.seq_len, 128)
    out_file = os.path.join(args.workdir, "megatron_train_result.json")
    peak = bf16_matmul_peak_tflops() if args.device == "gpu" else None

    from chatlearn.utils.launch import spawn

    results, rows, failed = [], [], []
    for backend in args.attention.split(","):
        args.attention_backend = backend
        spawn(_worker, nproc, model_dir, args, out_file, threads_per_rank=max(1, (os.cpu_count() or 2) // nproc))
        with open(out_file) as f:
            result = json.load(f)
        result.update(model=shape_name, device=args.device, machine=machine_name(args.device),
                      peak_bf16_tflops=peak)
        # Model FLOPs per second on one GPU over its measured peak.
        tflops = result["flops_per_token"] * result["tokens_per_s"] / result["world"] / 1e12
        result.update(tflops_per_gpu=tflops, mfu=tflops / peak if peak else None)
        losses = result["losses"]
        ok = all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and losses[-1] < losses[0]
        if not ok:
            failed.append(backend)
        mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "-"
        memory = f"{result['memory_gib']:.1f}" if result["memory_gib"] is not None else "-"
        rows.append(f"| {result['model']} | {result['params'] / 1e6:.0f}M | {result['dtype']} | {backend} | "
                    f"TP{result['tp']} x DP{result['dp']} | {result['seq_len']} | {result['tokens_per_step']} | "
                    f"{result['step_s'] * 1e3:.0f} ms | {result['tokens_per_s']:,.0f} | {tflops:.1f} | {mfu} | "
                    f"{memory} | {losses[0]:.3f} -> {losses[-1]:.3f} ({'falling' if ok else 'NOT falling'}) |")
        results.append(result)
        if result.get("profile"):
            print(f"profile of one step, attention {backend}:\n{result['profile']}")
    table = ("| model | params | dtype | attention | layout | seq | tokens/step | step time | tokens/s | "
             "model TFLOP/s per GPU | MFU | peak GiB | loss first -> last |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    if len(results) > 1:
        base = results[-1]
        table += "\n\n" + "; ".join(f"{r['attention_backend']}: {base['step_s'] / r['step_s']:.2f}x the speed of "
                                     f"{base['attention_backend']}" for r in results[:-1])
    print(table)
    tag = f"{args.device}_tp{args.tp}" + ("_quick" if args.quick else f"_{args.model}")
    save_results(f"megatron_train_{tag}", results)
    cmd = command_line("megatron_train.py", argv)
    peak_text = f"; measured bf16 matmul peak {peak:.0f} TFLOP/s (8192^3)" if peak else ""
    update_results_section(f"Megatron training ({tag})",
                           f"Machine: {results[0]['machine']}. Command: `{cmd}`. Adam, fixed random batch, "
                           f"{args.steps} steps ({args.warmup} warm-up steps left out of the mean); "
                           f"setup (build + HF load) {results[0]['setup_s']:.1f} s{peak_text}.\n\n{table}\n")
    if failed:
        raise SystemExit(f"loss not finite and falling with attention {failed}")
    return results


if __name__ == "__main__":
    main()
