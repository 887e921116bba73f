"""Item results: what an item's succeeded attempt produced, kept in its outcome record and its
ledger row.

A result is a JSON value. A ``--call`` function's return value is its result (JSON-serialisable;
``bytes`` are taken as a command's file is); a command's result is the text it wrote to the file
named by ``$QUEUEJOB_RESULT_FILE``, exactly as written. Bytes that are not UTF-8 are kept
losslessly as ``{"$base64": "<standard base64 of the bytes>"}`` (`BASE64_KEY`); `decode`
turns that form back into ``bytes``. No result (None returned, an empty or untouched file)
is ``null``.

Each result is bounded (`DEFAULT_MAX_RESULT_BYTES`, the worker's ``--max-result-bytes``): the
size is the compact UTF-8 JSON of a ``--call`` value, the file's bytes for a command. A larger
result fails the item (`ResultError`) with a message naming the limit; nothing is truncated.

`follow_reruns` merges a run's ledger rows with those of its reruns, streamed: per item, the
row of the latest run that reached it.

Pure and on the standard library only: the worker imports this module.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator
from typing import Any

DEFAULT_MAX_RESULT_BYTES = 64 * 1024
# The highest limit a run may set: a record travels through RabbitMQ (whose 4.x default
# max_message_size is 16 MiB; base64 adds a third) and through the flow's memory.
MAX_RESULT_BYTES_CEILING = 8 * 1024 * 1024
BASE64_KEY = "$base64"
RESULT_FILE_ENV = "QUEUEJOB_RESULT_FILE"
# What the table artifact and other short views show of a result.
SHORT_RESULT_CHARS = 80
_LEFT = "left_in_queue"


class ResultError(ValueError):
    """A result that cannot be kept: not JSON-serialisable, or over the limit. The message says
    what was wrong and what to do; the item fails with it."""


def too_large(size: int, limit: int, what: str) -> ResultError:
    """The error for a result of ``size`` bytes over ``limit``: it names the limit and says
    what to do instead."""
    return ResultError(
        f"{what} is {size:,} bytes, over the limit of {limit:,} bytes per item "
        "(--max-result-bytes, the Job template's max_result_bytes); nothing is truncated: store "
        "large outputs elsewhere (an object store, a database) and return a reference to them, "
        "such as their URL or key"
    )


def from_bytes(data: bytes, limit: int, *, what: str = "the result") -> Any:
    """A result from raw bytes (a command's result file, or ``bytes`` a function returned):
    the text when it is UTF-8, else the marked base64 form; None when empty. `ResultError`
    when ``len(data)`` is over ``limit``."""
    if len(data) > limit:
        raise too_large(len(data), limit, what)
    if not data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {BASE64_KEY: base64.b64encode(data).decode("ascii")}


def from_call(value: Any, limit: int) -> Any:
    """A ``--call`` function's return value as a result: the value itself when it is JSON
    (checked by encoding it: compact, UTF-8, no NaN or infinity), ``bytes`` as `from_bytes`
    takes them. `ResultError` when it is neither, or over ``limit``."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return from_bytes(bytes(value), limit, what="the returned bytes")
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ResultError(
            f"the function returned a {type(value).__name__}, which is not JSON-serialisable "
            f"({exc}); return None, a JSON value (str, int, float, bool, list, dict with str "
            "keys) or bytes, e.g. a dict of the fields you need"
        ) from None
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ResultError(
                "the function returned text that is not valid Unicode (a lone surrogate, as "
                "from bytes decoded with errors='surrogateescape'); return the bytes themselves "
                "instead, which are kept as they are"
            ) from None
    if size > limit:
        raise too_large(size, limit, "the returned value (as JSON)")
    return value


def decode(value: Any) -> Any:
    """A stored result as Python: the marked base64 form back to ``bytes``; anything else as
    it is."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(value.get(BASE64_KEY), str):
        try:
            return base64.b64decode(value[BASE64_KEY], validate=True)
        except (binascii.Error, ValueError):
            return value
    return value


def as_text(value: Any) -> str:
    """A result as one cell of text: a string as it is, None as nothing, anything else as
    compact JSON (the base64 form included, so it stays marked)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def short(value: Any, width: int = SHORT_RESULT_CHARS) -> str:
    """`as_text` on one line, cut to ``width`` characters with "..." (for tables)."""
    text = as_text(value).replace("\r", " ").replace("\n", " | ")
    return text if len(text) <= width else text[: width - 3] + "..."


# --- a run and its reruns ---------------------------------------------------------------------

Tagged = tuple[float, str, dict[str, Any]]  # (when the run ended, its id, one ledger row)


def follow_reruns(rows: Iterable[Tagged], reruns: Iterable[Iterable[Tagged]]) -> Iterator[Tagged]:
    """Per item of ``rows`` (one run's ledger, in item order), the row of the latest run that
    reached it, among that run and ``reruns`` (each already merged with its own reruns).

    A rerun's items are a subsequence of its earlier run's, in the same order (a rerun takes
    them from that run's ledger, in order, and its own ledger keeps that order), so each rerun
    is read alongside, one row ahead, in flat memory. "Reached" means a fate other than
    ``left_in_queue``: an item a rerun never got to keeps the earlier run's row. The merged
    row keeps the earlier run's ``index`` and ``body`` (a rerun numbers its items anew) and
    takes ``status`` and ``result`` from the run that reached the item last; the run's id
    is the tuple's second element. Rows of a rerun that match no earlier row (a damaged
    ledger) come last, as they are.
    """
    heads: list[Iterator[Tagged]] = [iter(r) for r in reruns]
    ahead: list[Tagged | None] = [next(h, None) for h in heads]
    for when, run_id, row in rows:
        best: Tagged = (when, run_id, row)
        reached = row.get("status") != _LEFT
        item_id = row.get("item_id")
        for k, head in enumerate(ahead):
            if head is None or head[2].get("item_id") != item_id:
                continue
            ahead[k] = next(heads[k], None)
            if head[2].get("status") == _LEFT:
                continue
            if not reached or head[0] >= best[0]:
                best, reached = head, True
        if best[2] is row:
            yield best
        else:
            merged = {**best[2], "index": row.get("index"), "body": row.get("body")}
            yield best[0], best[1], merged
    for k, head in enumerate(ahead):
        while head is not None:
            yield head
            head = next(heads[k], None)


__all__ = [
    "BASE64_KEY",
    "DEFAULT_MAX_RESULT_BYTES",
    "MAX_RESULT_BYTES_CEILING",
    "RESULT_FILE_ENV",
    "ResultError",
    "as_text",
    "decode",
    "follow_reruns",
    "from_bytes",
    "from_call",
    "short",
    "too_large",
]
