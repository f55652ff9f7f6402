"""The prompt source of the episode loop.

``PromptDataset`` hands out prompts episode by episode. It walks the prompt list
in *passes*: pass ``p`` visits every prompt once, in the order
``seeded_permutation(len(prompts), seed, p)`` (or file order when
``shuffle=False``). An episode that needs more prompts than the current pass has
left continues into the next pass, so every prompt is used equally often.

The state is two integers (pass number, position in the pass), so a resumed run
sees exactly the prompts an uninterrupted run would have seen.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from chatlearn.data.batching import seeded_permutation

# Keys checked, in order, by ``default_prompt_length`` for already-tokenized prompts.
TOKEN_KEYS = ("input_ids", "prompt_token_ids", "prompt_ids", "tokens")


class PromptDataset:
    """Deterministic, resumable, cycling iterator over a list of prompts."""

    def __init__(self, prompts: Sequence[Any], seed: int = 1234, shuffle: bool = True) -> None:
        if len(prompts) == 0:
            raise ValueError("PromptDataset needs at least one prompt")
        self._prompts = list(prompts)
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._pass = 0
        self._pos = 0
        self._consumed = 0
        self._order = self._order_for_pass(0)

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def prompts(self) -> list[Any]:
        """All prompts in file order (e.g. for a one-shot evaluation set)."""
        return list(self._prompts)

    @property
    def consumed(self) -> int:
        """Prompts handed out so far, over all passes."""
        return self._consumed

    @property
    def pass_number(self) -> int:
        return self._pass

    def _order_for_pass(self, pass_number: int) -> list[int]:
        if not self._shuffle:
            return list(range(len(self._prompts)))
        return seeded_permutation(len(self._prompts), self._seed, pass_number)

    def next_episode(self, n: int) -> list[Any]:
        """The next ``n`` prompts; ``n`` may exceed the dataset size."""
        if n < 0:
            raise ValueError(f"next_episode: n must be >= 0, got {n}")
        out: list[Any] = []
        while len(out) < n:
            if self._pos == len(self._order):
                self._pass += 1
                self._pos = 0
                self._order = self._order_for_pass(self._pass)
            take = min(n - len(out), len(self._order) - self._pos)
            out.extend(self._prompts[i] for i in self._order[self._pos : self._pos + take])
            self._pos += take
        self._consumed += n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self._consumed,
            "pass": self._pass,
            "pos": self._pos,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "num_prompts": len(self._prompts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by ``state_dict``.

        The checkpoint's seed and shuffle flag win over the constructor's, since
        the order of the pass in progress depends on them.
        """
        if state["num_prompts"] != len(self._prompts):
            raise ValueError(
                f"PromptDataset checkpoint was written for {state['num_prompts']} prompts, "
                f"but the dataset has {len(self._prompts)}; the prompt order cannot be resumed"
            )
        self._seed = int(state["seed"])
        self._shuffle = bool(state["shuffle"])
        self._pass = int(state["pass"])
        self._pos = int(state["pos"])
        self._consumed = int(state["consumed"])
        self._order = self._order_for_pass(self._pass)


# The field of a prompt record that holds a conversation (a list of chat messages).
MESSAGES_KEY = "messages"


def is_conversation(value: Any) -> bool:
    """Whether a prompt is given as chat messages: a list (or tuple) of dicts.

    Only the shape is looked at; ``check_conversation`` says what is wrong with one.
    """
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def check_conversation(value: Any, where: str) -> list[dict[str, str]]:
    """``value`` as a list of ``{"role": str, "content": str}`` messages, or a ValueError that
    names ``where`` (e.g. ``"prompt record 3"``) and the message at fault."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: a conversation must be a list of {{'role': ..., 'content': ...}} messages, "
                         f"got {type(value).__name__}")
    if not value:
        raise ValueError(f"{where}: the conversation has no messages")
    messages = []
    for j, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            shown = repr(message)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            hint = " (token ids go in `prompt_ids`)" if isinstance(message, int) else ""
            raise ValueError(f"{where}: message {j} must be a dict with string 'role' and 'content', got "
                             f"{shown}{hint}")
        messages.append(dict(message))
    return messages


def conversation_length(messages: Sequence[Mapping[str, Any]]) -> int:
    """Characters of a conversation's message contents (roles and template markup not counted):
    the same measure as a plain-text prompt's, known without a tokenizer."""
    return sum(len(str(m.get("content", ""))) for m in messages)


def default_prompt_length(prompt: Any) -> int:
    """Length of a prompt: token count when tokenized, else character count.

    Strings, lists, tuples and 1-D tensors use ``len``; a conversation (a list of
    message dicts) counts the characters of its contents (``conversation_length``).
    Dicts use the first of ``TOKEN_KEYS`` present, then a ``"messages"``
    conversation, then ``"prompt"`` (text or conversation): the order in which the
    vLLM policy picks the prompt it generates from.
    """
    if isinstance(prompt, Mapping):
        for key in TOKEN_KEYS:
            if key in prompt:
                return _len(prompt[key])
        if prompt.get(MESSAGES_KEY) is not None:
            return _len(prompt[MESSAGES_KEY])
        if "prompt" in prompt:
            return _len(prompt["prompt"])
        raise TypeError(
            f"cannot tell the length of a prompt with keys {sorted(prompt)}; pass length_fn"
        )
    return _len(prompt)


def _len(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.shape[-1]) if value.dim() else 1
    if is_conversation(value):
        return conversation_length(value)
    return len(value)


def rank_by_length(
    prompts: Sequence[Any],
    length_fn: Optional[Callable[[Any], int]] = None,
    descending: bool = False,
) -> list[Any]:
    """Prompts sorted by length; ties keep their input order (stable)."""
    length_fn = length_fn or default_prompt_length
    return sorted(prompts, key=length_fn, reverse=descending)


def filter_min_prompt_length(
    prompts: Sequence[Any],
    min_prompt_length: int,
    length_fn: Optional[Callable[[Any], int]] = None,
) -> list[Any]:
    """Drop prompts shorter than ``min_prompt_length`` (0 or less keeps all)."""
    if min_prompt_length <= 0:
        return list(prompts)
    length_fn = length_fn or default_prompt_length
    return [p for p in prompts if length_fn(p) >= min_prompt_length]


def read_jsonl(path: str) -> list[dict]:
    """One JSON object per line (blank lines skipped), e.g. ``runtime.data_path``'s prompts.
    Errors name the file and line."""
    import json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def write_jsonl(path: str, records: Iterable[dict]) -> str:
    """Write ``records`` one per line, atomically (a reader never sees half a file)."""
    import json

    from chatlearn.utils.atomic import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return path


def limit_prompts(prompts: Sequence[Any], num_limit: Optional[int]) -> list[Any]:
    """The first ``num_limit`` prompts (``runtime.training_data_num_limit`` /
    ``eval_data_num_limit``, ChatLearn 1.x's keys); None, 0 or a negative limit keeps all."""
    if num_limit is None or num_limit <= 0:
        return list(prompts)
    return list(prompts[:num_limit])


def with_prompt_field(records: Sequence[Mapping[str, Any]], query_key: Optional[str]) -> list[Any]:
    """Each record with ``prompt`` taken from its ``query_key`` field (``runtime.query_key``, a
    ChatLearn 1.x key), its other fields kept; None leaves the records as they are. A record
    without the field is an error naming its position."""
    if not query_key:
        return list(records)
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or query_key not in record:
            fields = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise KeyError(f"prompt record {i} has no field {query_key!r} (runtime.query_key); it has {fields}")
        out.append({**record, "prompt": record[query_key]})
    return out
