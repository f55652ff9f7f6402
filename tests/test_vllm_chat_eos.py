"""What a Llama 3-style checkpoint brings to the vLLM policy, on a real engine.

A copy of the tiny Llama is made to look like Llama 3 Instruct: the tokenizer has no
pad token, its EOS is a special token (``<|eot|>``, the tiny vocabulary's id 3, renamed
from ``<pad>``), it has a chat template that writes the BOS itself, and
``generation_config.json`` lists several EOS ids, one of them a token that only it names
(``second_eos``, picked from what the random model emits greedily, so that stopping on
it is visible). The pure functions run first; then ONE in-process engine serves the
rest (the fixtures of tests/test_vllm_module.py, on this checkpoint).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_vllm_module import MAX_NEW, base_args, engine, policy  # noqa: F401  (fixtures, on `assets` below)

from chatlearn.data.batching import collate, split_batch
from chatlearn.data.prompts import filter_min_prompt_length, rank_by_length, read_jsonl, write_jsonl
from chatlearn.data.rollout_dump import rollout_record
from chatlearn.models.vllm_module import (
    VLLMModule,
    build_rollout_batch,
    eos_token_ids,
    fallback_pad_token_id,
    prompt_token_ids,
)
from chatlearn.roles.policy_inference import PolicyInference
from chatlearn.utils.tiny_assets import BOS_ID, EOS_ID, ensure_tiny_assets, make_arithmetic_examples

EOT_ID = 3  # the tiny vocabulary's "<pad>", renamed "<|eot|>": the copy's EOS and (no pad token) its padding
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
SYSTEM = {"role": "system", "content": "Compute the sum."}


def greedy_continuation(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax tokens with no stop at all (transformers' generate would stop on the config's EOS)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def llama3_like_copy(src: str, dst: str, second_eos: int) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "tokenizer.json")) as f:
        text = f.read()
    with open(os.path.join(dst, "tokenizer.json"), "w") as f:
        f.write(text.replace('"<pad>"', '"<|eot|>"'))
    os.remove(os.path.join(dst, "tokenizer.model"))  # the sentencepiece file still says <pad>
    with open(os.path.join(dst, "tokenizer_config.json")) as f:
        config = json.load(f)
    del config["pad_token"]
    config.update(eos_token="<|eot|>", chat_template=TEMPLATE)
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    for name, eos in (("config.json", EOT_ID), ("generation_config.json", [EOS_ID, EOT_ID, second_eos])):
        with open(os.path.join(dst, name)) as f:
            config = json.load(f)
        config.pop("pad_token_id", None)
        config["eos_token_id"] = eos
        with open(os.path.join(dst, name), "w") as f:
            json.dump(config, f)
    return dst


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The Llama 3-like copy (see the module docstring), the original tiny checkpoint, and
    the greedy continuations of ``prompts`` (plain tokenized arithmetic prompts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    original = str(ensure_tiny_assets(root, seed=0, arch="llama").model_dir)
    tok = AutoTokenizer.from_pretrained(original)
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    prompts = [tok(ex["prompt"]).input_ids for ex in make_arithmetic_examples(8, seed=1)]
    greedy = [greedy_continuation(model, p, MAX_NEW) for p in prompts]
    # The second EOS: the token the model emits most, so that several rows stop on it.
    counts = collections.Counter(t for g in greedy for t in g if t > EOT_ID)
    second_eos = counts.most_common(1)[0][0]
    model_dir = llama3_like_copy(original, str(tmp_path_factory.mktemp("llama3_like") / "model"), second_eos)
    return SimpleNamespace(model_dir=model_dir, original=original, prompts=prompts, greedy=greedy,
                           second_eos=second_eos, stops={EOS_ID, EOT_ID, second_eos})


@pytest.fixture(scope="module")
def chat_tok(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    assert tok.pad_token_id is None and tok.eos_token_id == EOT_ID and tok.chat_template  # what the copy is
    return tok


def template_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


# --------------------------------------------------------------------------
# Without an engine
# --------------------------------------------------------------------------

def test_masks_do_not_depend_on_the_padding_id():
    # The tokenizer has no pad token: rows are padded with the EOS, which also ends row 0.
    completions = [[{"token_ids": [7, EOT_ID], "logprobs": [-0.5, -0.25], "text": "a", "finish_reason": "stop"}],
                   [{"token_ids": [EOT_ID, 9, 9, 9], "logprobs": [-1.0] * 4, "text": "b", "finish_reason": "length"}]]
    out = build_rollout_batch({}, [[BOS_ID, 5], [BOS_ID]], completions, pad_token_id=EOT_ID)
    E = EOT_ID
    assert out["input_ids"].tolist() == [[1, 5, 7, E, E], [1, E, 9, 9, 9]]
    assert out["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert out["old_logprobs"][0].tolist() == [0, 0, -0.5, -0.25, 0]

    # The trainer's side: Megatron pads again with its own id and counts loss_mask, not ids.
    from chatlearn.models.megatron.module import _token_mask
    from chatlearn.models.megatron.schedule import pad_micro_batches

    short = {"input_ids": out["input_ids"][:1, :4], "loss_mask": out["loss_mask"][:1, :4]}
    padded = pad_micro_batches([short, {k: out[k] for k in ("input_ids", "loss_mask")}], pad_id=EOT_ID)
    assert padded[0]["input_ids"].tolist() == [[1, 5, 7, E, E]] and padded[0]["seq_lens"].tolist() == [4]
    assert _token_mask(padded[0]).tolist() == [[0, 0, 1, 1, 0]]
    assert _token_mask(padded[1]).tolist() == out["loss_mask"].tolist()
    # Without a loss_mask (SFT-style), the real tokens after the first, by length.
    assert _token_mask({"input_ids": padded[0]["input_ids"], "seq_lens": torch.tensor([4])}).tolist() == \
        [[False, True, True, True, False]]


def test_eos_ids_and_pad_fallback(assets, chat_tok):
    from transformers import AutoTokenizer, GenerationConfig

    generation = GenerationConfig.from_pretrained(assets.model_dir).to_diff_dict()
    assert eos_token_ids(chat_tok, generation) == [EOT_ID, EOS_ID, assets.second_eos]
    assert fallback_pad_token_id(chat_tok, [EOT_ID]) == EOT_ID  # no pad token: the EOS
    original = AutoTokenizer.from_pretrained(assets.original)
    assert eos_token_ids(original, {"eos_token_id": EOS_ID}) == [EOS_ID]
    assert fallback_pad_token_id(original) == 3  # its own pad token
    assert fallback_pad_token_id(SimpleNamespace(), [9, 8]) == 9 and fallback_pad_token_id(None) == 0


def test_prompt_token_ids_render_conversations(assets, chat_tok):
    tok = chat_tok
    chat = [SYSTEM, {"role": "user", "content": "4+18="}]
    expected_chat = template_ids(tok, chat)
    # Exactly one BOS: the template writes it, and its text is tokenized without adding another
    # (tokenizing the rendered text the plain way would give two).
    assert expected_chat[0] == BOS_ID and expected_chat.count(BOS_ID) == 1
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok(text).input_ids[:2] == [BOS_ID, BOS_ID]
    assert expected_chat == tok(text, add_special_tokens=False).input_ids

    # A batch mixing text and conversations; text stays as before unless apply_chat_template.
    data = {"prompt": ["8-3=", chat, [{"role": "user", "content": "8-3="}]]}
    got = prompt_token_ids(tok, data)
    as_user = template_ids(tok, [{"role": "user", "content": "8-3="}])
    assert got == [tok("8-3=").input_ids, expected_chat, as_user]
    assert got[0] != as_user
    assert prompt_token_ids(tok, data, apply_chat_template=True) == [as_user, expected_chat, as_user]
    # `messages` wins over `prompt` (which stays for the reward); None falls back to the prompt.
    both = {"prompt": ["what the reward reads", "8-3="], "messages": [chat, None]}
    assert prompt_token_ids(tok, both) == [expected_chat, tok("8-3=").input_ids]
    assert prompt_token_ids(tok, {"messages": [chat]}) == [expected_chat]
    # Token ids are taken as they are.
    assert prompt_token_ids(tok, {"prompt_ids": [[1, 9]], "prompt": [chat]}) == [[1, 9]]

    with pytest.raises(ValueError, match=r"'policy': prompt 1 of the batch \(`prompt`\): message 1 must be a dict"):
        prompt_token_ids(tok, {"prompt": ["ok", [SYSTEM, "4+18="]]}, model="policy")
    with pytest.raises(ValueError, match=r"prompt 0 of the batch \(`messages`\): the conversation has no messages"):
        prompt_token_ids(tok, {"messages": [[]]}, model="policy")
    with pytest.raises(ValueError, match=r"prompt 1 of the batch has neither `messages` nor a `prompt`"):
        prompt_token_ids(tok, {"messages": [chat, None], "prompt": ["a", None]}, model="policy")
    with pytest.raises(KeyError, match="needs `prompt_ids`, `prompt` or `messages`"):
        prompt_token_ids(tok, {"text": ["a"]})


def test_missing_chat_template_is_a_clear_error(assets, chat_tok):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(assets.original)  # the tiny tokenizer has no chat template
    d = assets.original
    assert prompt_token_ids(plain, {"prompt": ["8-3="]}) == [plain("8-3=").input_ids]  # not needed: fine
    with pytest.raises(ValueError, match=rf"model 'policy': apply_chat_template is on, but the tokenizer in {d} "
                                         rf"has no chat template.*`chat_template` entry in {d}/tokenizer_config"
                                         rf"\.json.*`apply_chat_template: false`"):
        prompt_token_ids(plain, {"prompt": ["8-3="]}, apply_chat_template=True, model="policy", tokenizer_dir=d)
    with pytest.raises(ValueError, match=rf"prompt 1 of the batch \(a conversation\) needs a chat template, but "
                                         rf"the tokenizer in {d} has no chat template"):
        prompt_token_ids(plain, {"prompt": ["8-3=", [SYSTEM]]}, model="policy", tokenizer_dir=d)

    # The module says so from its args (tokenizer dir: `tokenizer`, else `load`), and its
    # build_dataset before the run starts, naming the record.
    module = PolicyInference("policy", model_args={"load": d, "apply_chat_template": "true", "prompt_key": "q"})
    module.tokenizer = plain
    with pytest.raises(ValueError, match=rf"'policy': apply_chat_template is on, but the tokenizer in {d} "):
        module._check_chat_template()
    with pytest.raises(ValueError, match=rf"'policy': prompt record 1 is a conversation, but the tokenizer in {d} "):
        module.build_dataset([{"q": "8-3="}, {"q": [SYSTEM]}])
    with pytest.raises(ValueError, match=r"'policy': prompt record 2 \(`prompt`\): message 0 must be a dict"):
        module.build_dataset([{"q": "8-3="}, {"q": "1+1="}, {"q": [["user", "hi"]]}])
    module._model_args_override["apply_chat_template"] = "maybe"
    with pytest.raises(ValueError, match="apply_chat_template must be true or false, got 'maybe'"):
        module._check_chat_template()
    module.tokenizer = chat_tok
    samples = module.build_dataset([{"q": "8-3="}, {"messages": [SYSTEM], "q": "sys"}])
    # Records with and without `messages` batch together: the missing key is None.
    assert samples == [{"messages": None, "q": "8-3=", "prompt": "8-3="},
                       {"messages": [SYSTEM], "q": "sys", "prompt": "sys"}]
    assert collate(samples)["messages"] == [None, [SYSTEM]]


# --------------------------------------------------------------------------
# One engine on the Llama 3-like checkpoint
# --------------------------------------------------------------------------

def test_engine_knows_its_eos_ids_and_pads_with_the_eos(policy, assets):
    assert policy.tokenizer.pad_token_id is None
    assert policy.eos_token_ids == [EOT_ID, EOS_ID, assets.second_eos]
    assert policy.pad_token_id == EOT_ID


def test_generation_stops_on_every_eos_id_and_trains_on_it(policy, assets):
    """vLLM stops on each EOS id of generation_config.json (our SamplingParams included), the
    stop token ends the response inside loss_mask, also when it is the padding id."""
    out = policy.forward_step({"prompt_ids": assets.prompts}, 0)
    stopped_on = []
    for row, (prompt, greedy) in enumerate(zip(assets.prompts, assets.greedy)):
        cut = next((i for i, t in enumerate(greedy) if t in assets.stops), None)
        response = out["response_ids"][row]
        assert response == (greedy if cut is None else greedy[:cut + 1]), f"row {row}"
        assert out["finish_reason"][row] == ("length" if cut is None else "stop")
        p, r = len(prompt), len(response)
        assert out["loss_mask"][row].tolist() == [0] * p + [1] * r + [0] * (out["loss_mask"].shape[1] - p - r)
        assert out["attention_mask"][row].sum() == p + r
        assert torch.all(out["input_ids"][row, p + r:] == EOT_ID)  # the padding: the EOS
        assert out["response_text"][row] == policy.tokenizer.decode(response, skip_special_tokens=True)
        if cut is not None:
            stopped_on.append(response[-1])
            assert out["input_ids"][row, p + r - 1] == response[-1]
    # Otherwise the checkpoint no longer exercises what this test is about: pick other prompts.
    assert assets.second_eos in stopped_on, "no row stopped on the id only generation_config.json names"
    assert EOT_ID in stopped_on, "no row ended with the EOS that is also the padding"

    # ignore_eos ignores all of them: every row runs to max_new_tokens, through the stop ids.
    policy._model_args_override = {**policy.model_args, "ignore_eos": True}
    out = policy.forward_step({"prompt_ids": assets.prompts}, 0)
    assert out["response_ids"] == assets.greedy
    assert set(out["finish_reason"]) == {"length"} and out["loss_mask"].sum() == MAX_NEW * len(assets.prompts)
    inner = [t for g in out["response_ids"] for t in g[:-1]]
    assert assets.second_eos in inner and EOT_ID in inner


def test_chat_prompts_from_a_data_file_to_the_reward(policy, chat_tok, tmp_path):
    """jsonl -> build_dataset -> min_prompt_length / ranking -> collate -> generate -> what the
    reward and the rollout dump see."""
    chat = [SYSTEM, {"role": "user", "content": "4+18="}]
    records = [{"prompt": "8-3=", "answer": "5"},                        # text
               {"prompt": chat, "answer": "22"},                         # a conversation as the prompt
               {"messages": [{"role": "user", "content": "15-14="}], "answer": "1"},  # under `messages`
               {"prompt": "1=", "answer": "1"}]                          # shorter than min_prompt_length
    path = write_jsonl(str(tmp_path / "prompts.jsonl"), records)
    samples = policy.build_dataset(read_jsonl(path))
    samples = rank_by_length(filter_min_prompt_length(samples, 3))  # characters of the contents: 4, 21, 6
    assert [s["answer"] for s in samples] == ["5", "1", "22"]
    batch = collate(samples)
    out = policy.forward_step(batch, 0)

    expected = [chat_tok("8-3=").input_ids, template_ids(chat_tok, records[2]["messages"]),
                template_ids(chat_tok, chat)]
    assert out["prompt_ids"] == expected
    # Generated from exactly those ids.
    assert policy.forward_step({"prompt_ids": expected}, 0)["response_ids"] == out["response_ids"]
    # The reward gets the record's fields as written (split_batch is what RewardInference hands it).
    seen = split_batch({k: v for k, v in out.items() if k in ("prompt", "messages", "answer", "response_text")})
    assert [s["prompt"] for s in seen] == ["8-3=", None, chat]
    assert [s["messages"] for s in seen] == [None, records[2]["messages"], None]
    dumped = [json.loads(json.dumps(rollout_record(s, i, 0, 0))) for i, s in enumerate(split_batch(out))]
    assert [d["prompt"] for d in dumped] == ["8-3=", records[2]["messages"], chat]
    assert [d["prompt_ids"] for d in dumped] == expected

    # apply_chat_template: a text prompt becomes one user message; conversations are unchanged.
    policy._model_args_override = {**policy.model_args, "apply_chat_template": True}
    out = policy.forward_step(batch, 0)
    assert out["prompt_ids"] == [template_ids(chat_tok, [{"role": "user", "content": "8-3="}])] + expected[1:]
    policy._check_chat_template()  # this tokenizer has one
