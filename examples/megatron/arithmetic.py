"""The embedded default's task: short arithmetic (``"12+7="`` -> ``"19"``), checkable exactly.

Supplies the data the tiny run trains on and the rule reward the YAML names
(``reward_fn: arithmetic:arithmetic_reward``).
"""
from __future__ import annotations

import random
from typing import Iterable

from chatlearn.utils.tiny_assets import make_arithmetic_examples, score_answer

__all__ = ["make_arithmetic_examples", "arithmetic_reward", "preference_records", "sft_records"]


def arithmetic_reward(sample: dict) -> float:
    """1.0 when the response's first integer is the prompt's answer, else 0.0."""
    return score_answer(sample["response_text"], sample["answer"])


def sft_records(examples: Iterable[dict]) -> list[dict]:
    return [{"prompt": ex["prompt"], "response": ex["answer"]} for ex in examples]


def _wrong_answer(answer: int, rng: random.Random) -> str:
    """A plausible mistake: off by a little, a swapped digit order, or a dropped digit."""
    kind = rng.random()
    if kind < 0.6:
        wrong = answer + rng.choice([-2, -1, 1, 2, 10, -10])
    elif kind < 0.8 and answer >= 10:
        wrong = int(str(answer)[::-1])
    else:
        wrong = int(str(answer)[:-1] or "1") if answer >= 10 else answer + 3
    return str(wrong) if wrong >= 0 and wrong != answer else str(answer + 1)


def preference_records(examples: Iterable[dict], seed: int) -> list[dict]:
    """(prompt, chosen = the right answer, rejected = a wrong one) for reward-model fitting."""
    rng = random.Random(seed)
    return [{"prompt": ex["prompt"], "chosen": ex["answer"], "rejected": _wrong_answer(int(ex["answer"]), rng)}
            for ex in examples]
