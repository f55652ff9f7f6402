"""Megatron training throughput: a Qwen2-0.5B-shaped model (random init) for a few steps.

    python benchmarks/megatron_train.py --device gpu                  # TP1 on 1 GPU (bf16, NCCL)
    python benchmarks/megatron_train.py --device gpu --tp 2           # TP2 when 2 GPUs are lent
    python benchmarks/megatron_train.py --device cpu --quick          # the tiny model on CPU (gloo, fp32)

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

from benchmarks.results_md import machine_name, update_results_section  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)


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


def benchmark_model(workdir: str, quick: bool) -> tuple[str, str]:
    """``(model_dir, name)``: the tiny test model with ``quick``, else a Qwen2-0.5B-shaped checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    if quick:
        from chatlearn.utils.tiny_assets import ensure_tiny_assets

        return str(ensure_tiny_assets(os.path.join(workdir, "assets"), seed=1, arch="qwen2").model_dir), "tiny qwen2"
    return build_checkpoint(os.path.join(workdir, "qwen2-0.5b-shape"), QWEN2_05B), "Qwen2-0.5B shape"


def _worker(rank: int, world: int, model_dir: str, args: argparse.Namespace, out_file: str) -> None:
    from megatron.core import parallel_state as ps

    from chatlearn.models.megatron import MegatronModule, MegatronSettings
    from chatlearn.utils import platform

    module = MegatronModule("bench")
    module.settings = MegatronSettings(load=model_dir, tp=args.tp, pp=1, trainable=True, optimizer="adam",
                                       lr=args.lr, clip_grad=1.0, use_distributed_optimizer=world > args.tp)
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
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_data_parallel_rank() == 0:
        params = sum(p.numel() for p in module.model.parameters()) * args.tp  # TP shards, same size each
        tokens = args.micro_batch * args.micro_batches * args.seq_len * ps.get_data_parallel_world_size()
        measured = times[args.warmup:]
        step_s = sum(measured) / len(measured)
        result = dict(world=world, tp=args.tp, dp=ps.get_data_parallel_world_size(), params=params,
                      dtype=str(module.config.params_dtype).replace("torch.", ""), seq_len=args.seq_len,
                      tokens_per_step=tokens, setup_s=setup_s, step_s=step_s, tokens_per_s=tokens / step_s,
                      losses=losses, step_times=times,
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
    parser.add_argument("--workdir", default="/tmp/chatlearn-bench")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CHATLEARN_FORCE_CPU"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("--device gpu needs a CUDA device")
    nproc = args.nproc or args.tp

    model_dir, shape_name = benchmark_model(args.workdir, args.quick)
    if args.quick:
        args.seq_len = min(args.seq_len, 128)
    out_file = os.path.join(args.workdir, "megatron_train_result.json")

    from chatlearn.utils.launch import spawn

    spawn(_worker, nproc, model_dir, args, out_file, threads_per_rank=max(1, (os.cpu_count() or 2) // nproc))
    with open(out_file) as f:
        result = json.load(f)
    result.update(model=shape_name, device=args.device, machine=machine_name(args.device))

    losses = result["losses"]
    ok = all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and losses[-1] < losses[0]
    rows = [f"| {result['model']} | {result['params'] / 1e6:.0f}M | {result['dtype']} | TP{result['tp']} x "
            f"DP{result['dp']} | {result['seq_len']} | {result['tokens_per_step']} | {result['step_s'] * 1e3:.0f} ms "
            f"| {result['tokens_per_s']:,.0f} | {losses[0]:.3f} -> {losses[-1]:.3f} ({'falling' if ok else 'NOT falling'}) |"]
    table = ("| model | params | dtype | layout | seq | tokens/step | step time | tokens/s | loss first -> last |\n"
             "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(table)
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    tag = f"{args.device}_tp{args.tp}" + ("_quick" if args.quick else "")
    with open(os.path.join(ROOT, "benchmarks", "results", f"megatron_train_{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    cmd = "python benchmarks/megatron_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    update_results_section(f"Megatron training ({tag})",
                           f"Machine: {result['machine']}. Command: `{cmd}`. Adam, fixed random batch, "
                           f"{args.steps} steps ({args.warmup} warm-up steps left out of the mean); "
                           f"setup (build + HF load) {result['setup_s']:.1f} s.\n\n{table}\n")
    if not ok:
        raise SystemExit(f"loss not finite and falling: {losses}")
    return result


if __name__ == "__main__":
    main()
