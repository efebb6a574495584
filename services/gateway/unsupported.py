"""OpenAI request fields this server cannot honour: each is refused with a 400 naming it, never
silently ignored, unless its value asks for nothing (`tools: []`, `response_format: {"type": "text"}`).

Fields that are neither served nor listed here are ignored and logged, as vLLM does: a client
sending an extension some other server understands still gets its answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from .errors import unsupported

log = logging.getLogger("nitsum.gateway")


def _only(*harmless: Any) -> Callable[[Any], bool]:
    """True for null and for a value equal to one of `harmless` *and of its type* (so `true` is not 1)."""
    return lambda v: v is None or any(type(v) is type(h) and v == h for h in harmless)


# field -> (is this value harmless?, what the field asks for that this server does not do)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (_only({"type": "text"}), "structured output (json_object / json_schema)"),
    "tools": (_only([]), "tool calling"),
    "tool_choice": (_only("none"), "tool calling"),
    "parallel_tool_calls": (_only(False), "tool calling"),
    "functions": (_only([]), "function calling"),
    "function_call": (_only("none"), "function calling"),
    "logprobs": (_only(False, 0), "log probabilities"),
    "top_logprobs": (_only(0), "log probabilities"),
    "echo": (_only(False), "echoing the prompt"),
    "best_of": (_only(1), "best-of sampling"),
    "suffix": (_only(""), "text after the completion (insertion)"),
    "logit_bias": (_only({}), "logit bias"),
    "presence_penalty": (_only(0, 0.0), "presence penalties"),
    "frequency_penalty": (_only(0, 0.0), "frequency penalties"),
    "audio": (_only(), "audio output"),
    "modalities": (_only(["text"]), "output modalities other than text"),
    "prediction": (_only(), "predicted outputs"),
}


def refuse_unsupported(doc: dict[str, Any]) -> None:
    """400 (`unsupported_parameter`) for the first field of `doc` that asks for what is not served."""
    for name, value in doc.items():
        entry = UNSUPPORTED.get(name)
        if entry is not None and not entry[0](value):
            raise unsupported(name, f"'{name}' is not supported by this server ({entry[1]}); "
                                    "leave it out of the request")


def note_unknown(doc: dict[str, Any], known: Iterable[str]) -> None:
    unknown = set(doc) - set(known) - set(UNSUPPORTED)
    if unknown:
        log.info("ignoring request fields this server does not know: %s", ", ".join(sorted(unknown)[:20]))
