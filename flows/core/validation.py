"""Turn pydantic validation errors into one readable line (for `InvalidInput`/`ConfigError`).

Pydantic's own text spans several lines, repeats the model's name, echoes every input and ends
with a link to its documentation: fine for a developer, noise in a CLI error or a run's message.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

_MAX_INPUT_REPR = 60


def readable_errors(
    exc: ValidationError,
    *,
    show_input: bool,
    prefix: str = "",
    names: Mapping[str, str] | None = None,
) -> str:
    """``field: message (got value)`` per error, joined by '; '.

    ``show_input`` is False for models holding secrets: pydantic's own message quotes each failing
    input, which for a credential field would be the credential itself. ``prefix`` is put before
    each field's path (``job`` gives ``job.parallelism``); ``names`` renames a path for the
    reader (the CLI shows ``--parallelism`` for ``job.parallelism``).
    """
    parts: list[str] = []
    for err in exc.errors(include_url=False):
        # Pydantic prefixes messages of custom validators with "Value error, ".
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a model-level check: its message says it all
            parts.append(msg)
            continue
        where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if names is not None:
            where = names.get(where, where)
        text = f"{where}: {msg}"
        if show_input:
            shown = repr(err.get("input"))
            if len(shown) > _MAX_INPUT_REPR:
                shown = shown[: _MAX_INPUT_REPR - 3] + "..."
            if shown not in msg:  # a validator may already quote the value
                text += f" (got {shown})"
        parts.append(text)
    return "; ".join(parts)
