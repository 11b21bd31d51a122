"""Scorers: does an agent's answer match the gold answer?

``score(item, answer, output)`` dispatches on ``item.kind``:

======  ===========================================================================================
number  numeric exact match on the last number (GSM8K); the output's last number if the answer has none
span    the DROP metric: normalised exact match and bag-of-words F1, numbers must agree, max over golds
yesno   the first yes/no (or true/false) in the answer, else the last one in the output
choice  the letter given (``B``, ``(B)``, ``B.``, ``The answer is B``) or the text of one choice
code    the last ```python block (output, then answer) plus the tests, run in the sandbox: pass@1
======  ===========================================================================================

It never raises: odd input (None, bytes, junk) scores as incorrect with a ``detail``.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import string
from dataclasses import dataclass
from typing import Any

from hera_ray.eval.datasets import SPAN_SEP, Item

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

#: Seconds a program and its tests may run.
CODE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Score:
    """One answer's score. ``correct`` is what accuracy counts (EM, or pass@1 for code)."""

    correct: bool
    em: float  # 0/1
    f1: float  # token F1 (DROP); equal to em for other kinds
    detail: str = ""  # why it is wrong: "timeout", "AssertionError", "no code found", ...
    #: Code only: the network isolation the program ran under (the sandbox's layers), () when none ran.
    isolation: tuple[str, ...] = ()


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


def score(item: Item, answer: Any, output: Any = "") -> Score:
    """Score the agent's final ``answer`` (one line) to ``item``; ``output`` is its final step's text."""
    try:
        scorer = _BY_KIND.get(item.kind)
        if scorer is None:
            return Score(False, 0.0, 0.0, f"no scorer for kind {item.kind!r}")
        return scorer(item, _text(answer), _text(output))
    except Exception as e:  # noqa: BLE001 - a scorer bug must not stop a benchmark run
        return Score(False, 0.0, 0.0, f"scorer error: {type(e).__name__}: {e}")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _binary(correct: bool, detail: str = "") -> Score:
    return Score(correct, float(correct), float(correct), "" if correct else detail)


# -- number ---------------------------------------------------------------------------------------


def score_number(item: Item, answer: str, output: str = "") -> Score:
    """GSM8K: the last number of the answer (of the output if the answer has none) equals the gold."""
    text = answer if last_number(answer) is not None else output
    if last_number(text) is None:
        return _binary(False, "no number")
    return _binary(any(gsm8k_correct(text, gold) for gold in item.all_golds), "wrong number")


# -- span (DROP) ----------------------------------------------------------------------------------
# The official DROP metric (allenai/allennlp-reading-comprehension drop_eval.py), without numpy.

#: Longer answers are cut to this before span scoring (a span is short; this bounds the work).
SPAN_ANSWER_CHARS = 2000
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
#: Ways a one-line answer is cut into spans when the gold has several ("Spain, Italy and France"),
#: from the finest to none; the best scoring one counts. Commas inside numbers ("1,000") never cut.
_COMMA = r"(?<!\d),|,(?!\d)"
_SPAN_SPLITS = tuple(re.compile(rf"\s*(?:{seps})\s*") for seps in (
    rf"\||;|{_COMMA}|\band\b|\n", rf"\||;|{_COMMA}|\n", rf"\||{_COMMA}|\n"))


def drop_metrics(predicted: str | list[str] | tuple[str, ...], gold: str | list[str] | tuple[str, ...]
                 ) -> tuple[float, float]:
    """(EM, F1) of a predicted answer against one gold answer, each a span or a list of spans."""
    pred_spans, pred_bags = _answer_to_bags(predicted)
    gold_spans, gold_bags = _answer_to_bags(gold)
    em = float(set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans))
    return em, round(_aligned_f1(pred_bags, gold_bags), 2)


def score_span(item: Item, answer: str, output: str = "") -> Score:
    """DROP: max EM and max F1 over the golds; for a multi-span gold the answer is cut into spans."""
    if not answer.strip():
        return Score(False, 0.0, 0.0, "empty answer")
    answer = answer[:SPAN_ANSWER_CHARS]
    best_em = best_f1 = 0.0
    for gold in item.all_golds:
        gold_spans = [s.strip() for s in gold.split(SPAN_SEP.strip()) if s.strip()] or [gold]
        for predicted in _span_readings(answer) if len(gold_spans) > 1 else [[answer]]:
            em, f1 = drop_metrics(predicted, gold_spans)
            best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return Score(best_em == 1.0, best_em, best_f1, "" if best_em == 1.0 else "no exact match")


def _span_readings(answer: str) -> list[list[str]]:
    """The answer as a list of spans, once per way of cutting it (and uncut)."""
    readings = [[s for s in split.split(answer) if s.strip()] for split in _SPAN_SPLITS]
    return [r for r in readings if r] + [[answer]]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCTUATION)
    if _is_number(token):
        token = str(float(token))
    return " ".join(_ARTICLES.sub(" ", token).split())


def _normalize_answer(text: str) -> str:
    parts = (_normalize_token(token) for token in re.split(" |-", text))
    return " ".join(p for p in parts if p.strip()).strip()


def _answer_to_bags(answer: str | list[str] | tuple[str, ...]) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else list(answer)
    normalized = [_normalize_answer(s) for s in spans]
    return normalized, [set(s.split()) for s in normalized]


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(gold & predicted)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set[str], predicted: set[str]) -> bool:
    """False when the gold has numbers and the prediction shares none of them."""
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def _aligned_f1(pred_bags: list[set[str]], gold_bags: list[set[str]]) -> float:
    """Mean F1 of the best one-to-one pairing of predicted and gold spans (unpaired ones score 0)."""
    scores = [[_bag_f1(p, g) if _numbers_agree(g, p) else 0.0 for p in pred_bags] for g in gold_bags]
    size = max(len(gold_bags), len(pred_bags))
    return _best_assignment(scores) / size if size else 0.0


def _best_assignment(scores: list[list[float]]) -> float:
    """Largest total of a one-to-one pairing of rows and columns (exact over subsets of the smaller side)."""
    if not scores or not scores[0]:
        return 0.0
    if len(scores) > len(scores[0]):
        scores = [list(col) for col in zip(*scores)]
    rows = len(scores)
    if rows > 12:  # never in DROP (at most 6 gold spans); keep the cost bounded anyway
        return sum(max(row) for row in scores)
    best = {0: 0.0}  # mask of rows used -> best total so far
    for col in range(len(scores[0])):
        for mask, total in list(best.items()):
            for row in range(rows):
                if not mask & (1 << row):
                    key = mask | (1 << row)
                    best[key] = max(best.get(key, 0.0), total + scores[row][col])
    return max(best.values())


# -- yes/no ---------------------------------------------------------------------------------------

_YESNO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def yes_no(text: str, last: bool = False) -> str | None:
    """"yes"/"no" from the first (or last) yes/no/true/false word of ``text``, or None."""
    found = _YESNO.findall(text or "")
    if not found:
        return None
    word = found[-1 if last else 0].lower()
    return "yes" if word in ("yes", "true") else "no"


def score_yesno(item: Item, answer: str, output: str = "") -> Score:
    """The answer's first yes/no word; if it has none, the output's last one."""
    got = yes_no(answer) or yes_no(output, last=True)
    if got is None:
        return _binary(False, "no yes/no")
    return _binary(got in {yes_no(g) for g in item.all_golds}, f"answered {got}")


# -- choice ---------------------------------------------------------------------------------------


def choice_letter(text: str, choices: tuple[str, ...] = (), letters: str = "ABCDE") -> str | None:
    """The choice letter ``text`` gives: "B", "(B)", "B.", "B) text", "The answer is B", or a choice's text."""
    text = (text or "").strip()
    valid = letters[: len(choices)] if choices else letters
    if not text or not valid:
        return None
    cls = f"[{valid}]"
    patterns = (
        rf"^\(?({cls})\)?[.:)]?$",  # B, (B), B., B)
        rf"^\(?({cls})[.:)]\s",  # B. text / (B) text / B) text
        rf"(?i:answer|option|choice)\s*(?i:is|:|=)?\s*(?i:option|choice)?\s*\(?({cls})\b",
        rf"\*\*\(?({cls})\)?[.:)]?\*\*",  # **B**
    )
    for pattern in patterns:
        found = re.findall(pattern, text, re.MULTILINE)
        if found:
            return found[-1]
    if re.fullmatch(rf"\(?([{valid.lower()}])\)?[.:)]?", text):  # a lone lower-case letter
        return text.strip("().:").upper()
    return _letter_of_text(text, choices, valid)


def several_letters(text: str, choices: tuple[str, ...] = (), letters: str = "ABCDE") -> bool:
    """Whether ``text`` names two or more different choice letters as standalone capitals."""
    valid = letters[: len(choices)] if choices else letters
    return len(set(re.findall(rf"(?<![\w'])([{valid}])(?![\w'])", text or ""))) >= 2


def _letter_of_text(text: str, choices: tuple[str, ...], valid: str) -> str | None:
    """The letter of the one choice whose text the answer is (or contains)."""
    said = _normalize_answer(text)
    texts = [_normalize_answer(c) for c in choices]
    exact = [valid[i] for i, c in enumerate(texts) if c and c == said]
    if len(exact) == 1:
        return exact[0]
    inside = [valid[i] for i, c in enumerate(texts) if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", said)]
    return inside[0] if len(inside) == 1 else None


def score_choice(item: Item, answer: str, output: str = "") -> Score:
    """The letter the answer gives (else the output's "answer is X") equals the gold letter. An
    answer that names several letters ("A, B, C, D") picks none: it is wrong, with no fallback."""
    got = choice_letter(answer, item.choices)
    if got is None and several_letters(answer, item.choices):
        return _binary(False, "several choices")
    if got is None and output:
        valid = "ABCDE"[: len(item.choices)] if item.choices else "ABCDE"
        found = re.findall(rf"(?i:answer)\s*(?i:is|:)?\s*\(?([{valid}])\b", output)
        got = found[-1] if found else None
    if got is None:
        return _binary(False, "no choice letter")
    return _binary(got in {g.strip().upper() for g in item.all_golds}, f"answered {got}")


# -- code -----------------------------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_FUTURE = re.compile(r"^from __future__ import [^\n]*\n?", re.MULTILINE)


def extract_code(text: str, entry_point: str = "") -> str | None:
    """The program in ``text``: its last ```python block (preferring one defining ``entry_point``),
    else the text itself if it defines a function; None if there is none."""
    blocks = [body for lang, body in _CODE_BLOCK.findall(text or "")
              if lang.lower() in ("", "python", "py", "python3") and body.strip()]
    if blocks:
        defining = [b for b in blocks if entry_point and _defines(b, entry_point)]
        return (defining or blocks)[-1]
    return _unfenced_code(text or "", entry_point)


def _unfenced_code(text: str, entry_point: str = "") -> str | None:
    """Code written without a fence among prose: from the last top-level ``def`` (of
    ``entry_point`` if there is one; with the imports just above it) to the end of its block."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"def \w", line)]
    if not starts:
        return None
    named = [i for i in starts if entry_point and re.match(rf"def\s+{re.escape(entry_point)}\s*\(", lines[i])]
    start = (named or starts)[-1]
    while start > 0 and re.match(r"(?:import |from \S+ import |@)", lines[start - 1]):
        start -= 1
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][:1].isspace()
                                or re.match(r"(?:def |class |import |from \S+ import |@)", lines[end])):
        end += 1
    return "\n".join(lines[start:end]).rstrip() + "\n"


#: What :func:`sanitize_code` keeps of a program's top level.
_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                ast.AnnAssign)


def sanitize_code(code: str) -> str:
    """The program's definitions without its own top-level test code, as EvalPlus's sanitizer keeps
    them (and the bigcode harness's MBPP stop words cut them): imports, functions, classes and
    global assignments. A model's own asserts, prints and ``if __name__ == "__main__":`` block go:
    they test the model's guess of the behaviour, not the function; the item's tests do that. Code
    that does not parse (a HumanEval body completion, a broken program) is returned as it is."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    lines = code.splitlines(keepends=True)
    kept = []
    for node in tree.body:
        if isinstance(node, _DEFINITIONS):
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))]) - 1
            kept.append("".join(lines[start:node.end_lineno]).rstrip() + "\n")
    return "\n".join(kept) if kept else code


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def build_program(item: Item, code: str) -> str:
    """The file the sandbox runs: prompt (if needed), the model's code, then the tests.

    A HumanEval prompt is valid Python (the function ends at its docstring), so it always goes
    first: a complete function in the answer replaces it, a bare body completes it, and helpers and
    imports from the prompt (``encode_cyclic``, ``List``) stay available.
    """
    parts = [code]
    if item.prompt:
        parts = [item.prompt, code] if _defines(code, item.entry_point) else [item.prompt + code]
    program = "\n\n".join(p.rstrip() for p in parts) + "\n\n" + item.tests.strip() + "\n"
    future = _FUTURE.findall(program)  # must come first in a file
    return "".join(dict.fromkeys(future)) + _FUTURE.sub("", program) if future else program


def score_code(item: Item, answer: str, output: str = "", timeout_s: float = CODE_TIMEOUT_S) -> Score:
    """pass@1: the extracted program's definitions (:func:`sanitize_code`) with the item's tests
    exit 0 in the sandbox."""
    from hera_ray.eval.sandbox import run_code

    code = extract_code(output, item.entry_point) or extract_code(answer, item.entry_point)
    if code is None:
        return _binary(False, "no code found")
    result = run_code(build_program(item, sanitize_code(code)), timeout_s=timeout_s)
    scored = _binary(True) if result.ok else _binary(False, _failure(result))
    return dataclasses.replace(scored, isolation=tuple(result.isolation))


def _failure(result: Any) -> str:
    """A short reason: "timeout", the exception's name ("AssertionError"), or the exit status."""
    if result.timed_out:
        return "timeout"
    lines = result.stderr.strip().splitlines()
    last = re.match(r"^([A-Za-z_][\w.]*)(?::|$)", lines[-1].strip()) if lines else None
    if last:  # a traceback ends with the exception's name
        return last.group(1).rsplit(".", 1)[-1]
    for line in reversed(lines):
        match = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning))\b", line.strip())
        if match:
            return match.group(1).rsplit(".", 1)[-1]
    if result.returncode < 0:
        return f"killed by signal {-result.returncode}"
    return f"exit code {result.returncode}"


_BY_KIND = {"number": score_number, "span": score_span, "yesno": score_yesno, "choice": score_choice,
            "code": score_code}


def _gold_only(kind: str):
    """A ``(answer, gold) -> bool`` scorer for the profiler, which only has the gold string."""
    def correct(answer: str, gold: str) -> bool:
        return score(Item("", "", "", gold, kind=kind), answer).correct

    return correct


#: ``(answer, gold) -> bool`` per data set, for callers without the Item (the profiler).
#: Code sets need the item's tests: use ``score``.
SCORERS = {"gsm8k": gsm8k_correct, "drop": _gold_only("span"), "strategyqa": _gold_only("yesno"),
           "boolq": _gold_only("yesno"), "arc_easy": _gold_only("choice"), "arc_challenge": _gold_only("choice")}
