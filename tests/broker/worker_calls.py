"""Functions the worker tests call through ``--call``."""

from __future__ import annotations


def process(body: bytes) -> None:
    """Succeed unless the body is ``poison``."""
    if body == b"poison":
        raise ValueError("cannot process poison")
