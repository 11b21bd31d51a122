"""Scorers: does an agent's answer match the gold answer?"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (commas and a leading $ allowed), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def gsm8k_correct(answer: str, gold: str) -> bool:
    """Numeric exact match on the last number of the answer."""
    got, want = last_number(answer), last_number(gold)
    return got is not None and want is not None and abs(got - want) < 1e-6


SCORERS = {"gsm8k": gsm8k_correct}
