"""Reading a grade out of what a judge model answered: tolerant of how servers wrap JSON, strict on the grade.

Real OpenAI-compatible servers do not all honour ``response_format``: llama.cpp and Ollama (without
``format``) wrap the object in markdown fences or put a sentence before it, small models send the
grade as ``"2"`` or ``2.0`` and add keys of their own. All of those are the answer the prompt asked
for, and rejecting them cost whole weeks of labels. So the parser finds the JSON *object* in the
answer (the whole answer, a fenced block, or the first balanced ``{...}`` that decodes), reads
``grade`` as an integer, an integral float or a numeric string in 0-3, ignores unknown keys, and
takes ``reason`` if it is a string.

Still safe: a grade exists only as the value of a ``grade`` key inside a JSON object; there is no
"find the first digit" over free text, and an answer with two objects that disagree on the grade
is rejected rather than guessed.
"""

from __future__ import annotations

import json
import re

GRADE_VALUES = (0, 1, 2, 3)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


class JudgeAnswerError(ValueError):
    """The model's answer holds no usable ``{"grade": 0-3, ...}`` object; the message says why."""


def _objects(content: str) -> list[dict]:
    """JSON objects in ``content``: the whole text, else fenced blocks, else balanced {...} spans."""
    text = content.strip()
    try:
        whole = json.loads(text)
        return [whole] if isinstance(whole, dict) else []
    except json.JSONDecodeError:
        pass
    found: list[dict] = []
    for block in _FENCE.findall(text):
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    if found:
        return found
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def grade_of(value) -> int:
    """A grade from an int, an integral float or a numeric string; JudgeAnswerError otherwise."""
    if isinstance(value, bool):
        raise JudgeAnswerError(f"grade must be a number 0-3, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise JudgeAnswerError(f"grade must be a number 0-3, got {value!r}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise JudgeAnswerError(f"grade must be a whole number 0-3, got {value!r}")
        value = int(value)
    if not isinstance(value, int) or value not in GRADE_VALUES:
        raise JudgeAnswerError(f"grade must be 0, 1, 2 or 3, got {value!r}")
    return value


def parse_answer(content: str | None) -> tuple[int, str]:
    """``(grade, reason)`` from an answer; JudgeAnswerError with the reason when there is none."""
    if content is None or not content.strip():
        raise JudgeAnswerError("empty answer (expected a JSON object with grade and reason)")
    candidates = [o for o in _objects(content) if "grade" in o]
    if not candidates:
        what = "no JSON object" if not _objects(content) else "a JSON object without a grade key"
        raise JudgeAnswerError(f"answer holds {what}: {content[:80]!r}")
    grades = {grade_of(o["grade"]) for o in candidates}
    if len(grades) > 1:
        raise JudgeAnswerError(f"answer holds objects with different grades {sorted(grades)}")
    obj = candidates[0]
    reason = obj.get("reason")
    reason = reason if isinstance(reason, str) else ""
    return grades.pop(), " ".join(reason.split())[:300]
