"""A rule-based math reward: 1 when the response's final number equals the sample's answer.

The default reward function of ``chatlearn.roles.MathReward``, the ``math_reward`` model
in ChatLearn 1.x-style GRPO configs (``grpo_math_vllm.yaml``,
``examples/megatron/train_grpo_math.py``): like 1.x's rule-based math reward model, it
reads the LAST number of the response (the final answer of a worked solution), compares
it with the record's ``answer`` numerically (``12``, ``12.0`` and ``24/2`` are equal),
and scores 1.0 or 0.0. Records whose ``eval_func`` names another checker (1.x's data
marks math records ``math_rule``) score 0.0 here.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional

__all__ = ["math_reward", "final_number", "same_number"]

# An integer, a decimal or a fraction, with an optional sign; thousands separators allowed.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")


def _value(text: str) -> Optional[Fraction]:
    text = text.replace(",", "").replace(" ", "")
    try:
        if "/" in text:
            num, den = text.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> Optional[Fraction]:
    """The last number written in ``text`` (None when there is none)."""
    found = _NUMBER.findall(text or "")
    return _value(found[-1]) if found else None


def same_number(a: Optional[Fraction], b: Optional[Fraction], rel_tol: float = 1e-4) -> bool:
    if a is None or b is None:
        return False
    return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-9)


def math_reward(sample: dict) -> float:
    """1.0 when the last number of ``response_text`` equals ``answer``, else 0.0."""
    if sample.get("eval_func") not in (None, "math_rule"):
        return 0.0
    answer = sample.get("answer")
    if answer is None:
        return 0.0
    expected = final_number(str(answer)) if not isinstance(answer, (int, float)) else Fraction(answer)
    return 1.0 if same_number(final_number(str(sample.get("response_text", ""))), expected) else 0.0
