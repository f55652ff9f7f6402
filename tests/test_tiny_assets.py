"""Tests of the tiny local assets: task data, tokenizer, model dirs, cache, vLLM."""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

from chatlearn.utils.tiny_assets import (
    BOS_ID,
    EOS_ID,
    MARKER_NAME,
    PAD_ID,
    UNK_ID,
    build_tiny_llama,
    build_tokenizer,
    ensure_tiny_assets,
    make_arithmetic_examples,
    score_answer,
)


@pytest.fixture(scope="module")
def assets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_assets")


@pytest.fixture(scope="module")
def llama_assets(assets_root: Path):
    return ensure_tiny_assets(assets_root, seed=0, arch="llama")


@pytest.fixture(scope="module")
def qwen2_assets(assets_root: Path):
    return ensure_tiny_assets(assets_root, seed=0, arch="qwen2")


# --------------------------------------------------------------------------
# Task data
# --------------------------------------------------------------------------

def test_arithmetic_examples_are_deterministic_and_correct():
    examples = make_arithmetic_examples(200, seed=3, max_operand=20)
    assert examples == make_arithmetic_examples(200, seed=3, max_operand=20)
    assert examples != make_arithmetic_examples(200, seed=4, max_operand=20)
    ops_seen = set()
    for ex in examples:
        prompt, answer = ex["prompt"], ex["answer"]
        assert prompt.endswith("=")
        op = "+" if "+" in prompt else "-"
        ops_seen.add(op)
        a, b = (int(x) for x in prompt[:-1].split(op))
        assert 0 <= a <= 20 and 0 <= b <= 20
        assert int(answer) == (a + b if op == "+" else a - b)
        assert int(answer) >= 0
    assert ops_seen == {"+", "-"}
    assert all("+" in ex["prompt"] for ex in make_arithmetic_examples(20, seed=0, ops=("+",)))


def test_arithmetic_examples_reject_bad_arguments():
    with pytest.raises(ValueError):
        make_arithmetic_examples(3, seed=0, ops=("*",))
    with pytest.raises(ValueError):
        make_arithmetic_examples(-1, seed=0)


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("19", "19", 1.0),
        ("19</s>", "19", 1.0),
        (" 19 and 20", 19, 1.0),
        ("20 19", "19", 0.0),
        ("-3", "-3", 1.0),
        ("3", "-3", 0.0),
        ("no number", "19", 0.0),
        ("", "0", 0.0),
        ("007", "7", 1.0),
    ],
)
def test_score_answer(response, answer, expected):
    assert score_answer(response, answer) == expected


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def test_tokenizer_round_trip_and_matches_sentencepiece(llama_assets):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    for tok_dir in (llama_assets.tokenizer_dir, llama_assets.model_dir):
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        assert len(tok) == sp.get_piece_size()
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
            UNK_ID, BOS_ID, EOS_ID, PAD_ID)
        examples = make_arithmetic_examples(50, seed=11, max_operand=99)
        texts = [ex["prompt"] + ex["answer"] for ex in examples]
        texts += ["the answer is 42.", " 12 + 7 = 19 ", "what is 3-1?", "a\nb  c"]
        for text in texts:
            ids = tok.encode(text)
            assert ids == [BOS_ID] + sp.encode(text), text
            assert tok.decode(ids, skip_special_tokens=True) == text
            assert sp.decode(ids[1:]) == text


def test_tokenizer_splits_digits_and_operators(llama_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_assets.tokenizer_dir))
    pieces = tok.convert_ids_to_tokens(tok.encode("123+45=168", add_special_tokens=False))
    assert pieces == list("123+45=168")
    # A prompt's tokens are a prefix of the prompt-plus-answer's tokens, so a
    # response can be scored and trained on token by token.
    for ex in make_arithmetic_examples(50, seed=5, max_operand=99):
        prompt_ids = tok.encode(ex["prompt"])
        assert tok.encode(ex["prompt"] + ex["answer"])[: len(prompt_ids)] == prompt_ids


def test_tokenizer_maps_unknown_characters_to_unk(llama_assets):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_assets.tokenizer_dir))
    sp = spm.SentencePieceProcessor(model_file=str(llama_assets.tokenizer_dir / "tokenizer.model"))
    ids = tok.encode("€é~ 1", add_special_tokens=False)
    assert ids == sp.encode("€é~ 1")
    assert ids[0] == UNK_ID and ids.count(UNK_ID) == 1  # a run of unknowns is one <unk>


def test_tokenizer_is_deterministic(tmp_path):
    a = build_tokenizer(tmp_path / "a", seed=7)
    b = build_tokenizer(tmp_path / "b", seed=7)
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


# --------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_dir_loads_in_transformers(arch, llama_assets, qwen2_assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = llama_assets if arch == "llama" else qwen2_assets
    files = set(os.listdir(assets.model_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model"} <= files

    tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(assets.model_dir)).eval()
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    # Norms and biases are random, so a weight mapping that mixes them up shows.
    assert not torch.allclose(model.model.norm.weight, torch.ones_like(model.model.norm.weight))

    batch = tok(["12+7=", "3-1="], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_model_is_deterministic_and_seeded(tmp_path, llama_assets):
    from safetensors.torch import load_file

    tok_dir = llama_assets.tokenizer_dir
    a = load_file(build_tiny_llama(tmp_path / "a", tok_dir, seed=1) / "model.safetensors")
    b = load_file(build_tiny_llama(tmp_path / "b", tok_dir, seed=1) / "model.safetensors")
    c = load_file(build_tiny_llama(tmp_path / "c", tok_dir, seed=2) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["model.embed_tokens.weight"] == c["model.embed_tokens.weight"]).all()


def test_tied_embeddings_and_shape_checks(tmp_path, llama_assets):
    from transformers import AutoModelForCausalLM

    out = build_tiny_llama(tmp_path / "tied", llama_assets.tokenizer_dir, seed=0, hidden=64, heads=2,
                           kv_heads=1, ffn=96, layers=1, tie_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_llama(tmp_path / "bad", llama_assets.tokenizer_dir, seed=0, hidden=64, heads=4)


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------

def test_ensure_reuses_complete_build_and_rebuilds_incomplete(tmp_path):
    first = ensure_tiny_assets(tmp_path, seed=0)
    assert first.built
    weights = first.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    second = ensure_tiny_assets(tmp_path, seed=0)
    assert not second.built
    assert second.model_dir == first.model_dir
    assert weights.stat().st_mtime_ns == mtime

    # Different build arguments get their own directory.
    other = ensure_tiny_assets(tmp_path, seed=1)
    assert other.built and other.asset_dir != first.asset_dir

    # A directory without the marker (a build interrupted by hand, an old
    # layout) is never trusted.
    (first.asset_dir / MARKER_NAME).unlink()
    (first.model_dir / "model.safetensors").write_bytes(b"garbage")
    third = ensure_tiny_assets(tmp_path, seed=0)
    assert third.built
    assert (third.asset_dir / MARKER_NAME).exists()
    assert weights.stat().st_size > 1000

    # No temporary build directories are left behind.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([first.asset_dir.name, other.asset_dir.name])


def test_ensure_loses_publish_race_gracefully(tmp_path, monkeypatch):
    import chatlearn.utils.tiny_assets as tiny

    real_build = tiny.build_tiny_llama
    calls = []

    def build_then_get_overtaken(*args, **kwargs):
        calls.append(None)
        out = real_build(*args, **kwargs)
        if len(calls) == 1:  # a competing builder publishes while the first one is busy
            calls.append(tiny.ensure_tiny_assets(tmp_path, seed=0))
        return out

    monkeypatch.setattr(tiny, "build_tiny_llama", build_then_get_overtaken)
    loser = tiny.ensure_tiny_assets(tmp_path, seed=0)
    winner = calls[-1]
    assert winner.built and not loser.built
    assert loser.model_dir == winner.model_dir
    assert [p.name for p in tmp_path.iterdir()] == [loser.asset_dir.name]


def test_ensure_concurrent_builds_publish_one_directory(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: ensure_tiny_assets(tmp_path, seed=0), range(2)))
    assert results[0].model_dir == results[1].model_dir
    assert sum(r.built for r in results) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].asset_dir.name]


def test_ensure_is_fast(tmp_path):
    # Warm the imports first: the budget is for the build itself.
    ensure_tiny_assets(tmp_path / "warm", seed=0)
    start = time.perf_counter()
    ensure_tiny_assets(tmp_path / "cold", seed=0)
    assert time.perf_counter() - start < 15.0


# --------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------

_VLLM_ENV_KEYS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CACHE_ROOT",
                  "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK")


@pytest.fixture
def restore_environ():
    """configure_vllm_cpu_env writes os.environ directly; undo that after the test."""
    saved = os.environ.copy()
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_configure_vllm_cpu_env_keeps_user_values_and_skips_cuda(monkeypatch, restore_environ):
    from chatlearn.utils import vllm_env

    for key in _VLLM_ENV_KEYS:
        os.environ.pop(key, None)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "3"

    monkeypatch.setattr(vllm_env, "cuda_available", lambda: True)
    assert vllm_env.configure_vllm_cpu_env() == {}
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ

    monkeypatch.setattr(vllm_env, "cuda_available", lambda: False)
    applied = vllm_env.configure_vllm_cpu_env()
    assert "VLLM_CPU_KVCACHE_SPACE" not in applied and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert set(applied) == set(_VLLM_ENV_KEYS) - {"VLLM_CPU_KVCACHE_SPACE"}

    del os.environ["VLLM_CPU_KVCACHE_SPACE"]
    vllm_env.configure_vllm_cpu_env(kv_cache_gib=None)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


@pytest.fixture
def vllm_cpu_env(monkeypatch, restore_environ):
    """vLLM's CPU env for this test only; undoes the engine's process-wide changes."""
    import torch

    from chatlearn.utils.vllm_env import configure_vllm_cpu_env

    # The test sizes the KV cache with kv_cache_memory_bytes, which
    # VLLM_CPU_KVCACHE_SPACE would override. VLLM_CACHE_ROOT stays the shared
    # default: a fresh cache dir costs ~10 s per engine start (see vllm_env).
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    configure_vllm_cpu_env(kv_cache_gib=None, force=True)
    # The in-process CPU worker replaces torch.set_num_threads with a no-op and
    # drops torch to one thread; give later tests their torch back.
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)
    yield
    monkeypatch.undo()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_greedy_matches_transformers(arch, vllm_cpu_env, llama_assets, qwen2_assets,
                                          record_property):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = llama_assets if arch == "llama" else qwen2_assets
    start = time.perf_counter()
    # `import vllm` alone is lazy; importing the names does the real work.
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(
        model=str(assets.model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        # 32 MiB instead of VLLM_CPU_KVCACHE_SPACE's 1 GiB: ~2.5 s faster
        # start and ~1 GiB less memory.
        kv_cache_memory_bytes=32 * 2**20,
        seed=0,
    )
    started = time.perf_counter()

    tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
    prompts = [ex["prompt"] for ex in make_arithmetic_examples(4, seed=1)] + ["the answer is"]
    max_new = 32
    params = SamplingParams(temperature=0.0, max_tokens=max_new, logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generated = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outputs):
        prompt_ids = tok(prompt).input_ids
        assert list(out.prompt_token_ids) == prompt_ids, "vLLM tokenized the prompt differently"
        completion = out.outputs[0]

        with torch.no_grad():
            input_ids = torch.tensor([prompt_ids])
            hf = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=PAD_ID)
        hf_ids = hf.sequences[0, len(prompt_ids):].tolist()
        assert hf_ids and list(completion.token_ids) == hf_ids, prompt
        # Rewards are computed on text: vLLM's incremental detokenizer must agree too.
        assert completion.text == tok.decode(hf_ids, skip_special_tokens=True)

        hf_logprobs = [torch.log_softmax(step_logits[0], dim=-1)[token].item()
                       for step_logits, token in zip(hf.logits, hf_ids)]
        vllm_logprobs = [step[token].logprob
                         for step, token in zip(completion.logprobs, completion.token_ids)]
        assert vllm_logprobs == pytest.approx(hf_logprobs, abs=1e-4), prompt

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timings = {"import_vllm_s": round(imported - start, 2), "llm_start_s": round(started - imported, 2),
               "first_generate_s": round(generated - started, 2), "peak_rss_mib": round(peak_rss_mib)}
    record_property("vllm_timings", timings)
    print(f"vLLM {arch}: {timings}")
    del llm
