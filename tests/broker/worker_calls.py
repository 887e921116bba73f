"""Functions the worker tests call through ``--call``."""

from __future__ import annotations

import os
import time
from pathlib import Path


def process(body: bytes) -> None:
    """Succeed unless the body is ``poison``."""
    if body == b"poison":
        raise ValueError("cannot process poison")


def slow_item(body: bytes) -> None:
    """Succeed at once, except for the item ``slow``: announce it in the file named by
    ``$MARK``, then take a minute (long enough to be stopped)."""
    if body == b"slow":
        mark = Path(os.environ["MARK"])
        mark.with_suffix(".tmp").write_text("started")
        mark.with_suffix(".tmp").replace(mark)
        time.sleep(60)


def record_done(body: bytes) -> None:
    """Append the item to the file named by ``$DONE`` (what the work did), taking
    ``$ITEM_SLEEP`` seconds (0 by default)."""
    nap = float(os.environ.get("ITEM_SLEEP", "0") or 0)
    if nap:
        time.sleep(nap)
    with open(os.environ["DONE"], "a") as out:
        out.write(body.decode() + "\n")


NOT_UTF8 = b"\xff\xfe raw \x00 bytes"


def result_of(body: bytes) -> object:
    """A return value of the kind the body names: what ``--call`` functions give back."""
    values: dict[bytes, object] = {
        b"int": len(body),
        b"dict": {"item": body.decode(), "parts": [1, None, "ü"]},
        b"bytes": NOT_UTF8,
        b"utf8-bytes": "é".encode(),
        b"none": None,
        b"set": {1, 2},
        b"big": "x" * 200,
    }
    return values[body]
