"""Turn pydantic validation errors into one readable line for `InvalidInput`/`ConfigError`."""

from __future__ import annotations

from pydantic import ValidationError

_MAX_INPUT_REPR = 60


def readable_errors(exc: ValidationError, *, show_input: bool) -> str:
    """``field: message (got value)`` per error, joined by '; '.

    ``show_input`` is False for models holding secrets: pydantic's own message quotes each failing
    input, which for a credential field would be the credential itself.
    """
    parts: list[str] = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        # Pydantic prefixes messages of custom validators with "Value error, ".
        msg = err["msg"].removeprefix("Value error, ")
        text = f"{where}: {msg}" if where else msg
        if show_input and where:
            shown = repr(err.get("input"))
            if len(shown) > _MAX_INPUT_REPR:
                shown = shown[: _MAX_INPUT_REPR - 3] + "..."
            if shown not in msg:  # a validator may already quote the value
                text += f" (got {shown})"
        parts.append(text)
    return "; ".join(parts)
