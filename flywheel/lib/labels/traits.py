"""How to ask one endpoint and model: learned from its errors once, remembered in the label cache.

An endpoint's quirks are properties of (base URL, model), not of a pair: once vLLM has rejected
``json_schema`` or gpt-5 has rejected ``temperature``, every later request (this run and the next
week's) asks the way that works. ``adapt`` returns the next way to ask after an error of a given
cause, or None when there is nothing left to change (the pair then fails with that reason).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flywheel.config import JudgeSettings
from flywheel.lib.labels.endpoint import Cause

FORMATS = ("json_schema", "json_object", "none")
MIN_PROMPT_CHARS = 600  # the rubric, the query and a short passage


@dataclass(frozen=True)
class Traits:
    response_format: str  # json_schema | json_object | none
    send_temperature: bool
    token_param: str  # max_completion_tokens | max_tokens
    max_tokens: int
    prompt_char_cap: int | None = None

    @classmethod
    def initial(cls, settings: JudgeSettings, reasoning: bool, stored: dict | None = None) -> "Traits":
        """Remembered traits if any; else the settings (reasoning models: no temperature, a larger budget)."""
        fmt = FORMATS[0] if settings.response_format == "auto" else settings.response_format
        fresh = cls(fmt, not reasoning, "max_completion_tokens",
                    settings.reasoning_max_tokens if reasoning else settings.max_tokens)
        if not stored:
            return fresh
        try:
            known = cls(**stored)
        except TypeError:  # written by another version: start over
            return fresh
        if settings.response_format != "auto":
            known = dataclasses.replace(known, response_format=settings.response_format)
        return known

    def describe(self) -> str:
        return (f"response_format={self.response_format}, temperature {'sent' if self.send_temperature else 'omitted'}, "
                f"{self.token_param}={self.max_tokens}" + (f", prompt <= {self.prompt_char_cap} chars" if self.prompt_char_cap else ""))

    def as_extra(self) -> dict:
        return {"response_format": self.response_format, "temperature_sent": self.send_temperature,
                "token_param": self.token_param, "max_tokens": self.max_tokens, "prompt_char_cap": self.prompt_char_cap}


def _context_cap(t: Traits, cause: Cause, prompt_chars: int) -> int | None:
    if cause.limit_tokens and cause.prompt_tokens:
        ratio = (cause.limit_tokens - t.max_tokens) / cause.prompt_tokens
    else:  # the server did not say by how much: cut by 40%
        ratio = 0.6
    cap = int(prompt_chars * min(max(ratio, 0.05), 0.95) * 0.9)
    if t.prompt_char_cap and cap >= t.prompt_char_cap:
        cap = int(t.prompt_char_cap * 0.7)
    return cap if cap >= MIN_PROMPT_CHARS else None


def adapt(t: Traits, cause: Cause, prompt_chars: int, settings: JudgeSettings) -> Traits | None:
    """The next way to ask after ``cause``, or None when nothing is left to change."""
    kind = cause.kind
    if kind == "response_format" and settings.response_format == "auto" and t.response_format != FORMATS[-1]:
        return dataclasses.replace(t, response_format=FORMATS[FORMATS.index(t.response_format) + 1])
    if kind == "temperature" and t.send_temperature:
        return dataclasses.replace(t, send_temperature=False)
    if kind == "max_completion_tokens" and t.token_param == "max_completion_tokens":
        return dataclasses.replace(t, token_param="max_tokens")
    if kind == "max_tokens" and t.token_param == "max_tokens":
        return dataclasses.replace(t, token_param="max_completion_tokens")
    if kind == "length" and t.max_tokens < settings.reasoning_max_tokens:
        return dataclasses.replace(t, max_tokens=settings.reasoning_max_tokens)
    if kind == "context_length":
        cap = _context_cap(t, cause, prompt_chars)
        return dataclasses.replace(t, prompt_char_cap=cap) if cap else None
    return None
