"""Turn pydantic validation errors into one readable line for `InvalidInput`/`ConfigError`."""

from __future__ import annotations

from queuejob.flows.core.validation import readable_errors

__all__ = ["readable_errors"]
