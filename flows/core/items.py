"""Work items and where they come from.

An item source is one of: an inline list of strings, a text file (one item per line, blank lines
skipped), a JSON Lines file (one object per line, optional ``id`` field; the whole object is the
message body), an integer range, or an earlier run's ledger (its items of the given fates, with
their ids and bodies, for a rerun; the caller reads the rows). Sources are streamed: a file of a
million lines is read line by line and never held in memory at once.

Every item gets a stable id: the one given (JSON Lines ``id``, range value), or one derived from
its position and content, so a repeated fill of the same source names the same items the same way.

Errors name the source and, for files, the 1-based line number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from queuejob.flows.core.errors import ItemError

DEFAULT_MAX_ITEM_BYTES = 1024 * 1024
MAX_ID_BYTES = 255  # AMQP shortstr: the id travels as the message_id


@dataclass(frozen=True, slots=True)
class Item:
    """One unit of work: its stable id, its 0-based position in the source and its body."""

    id: str
    index: int
    body: bytes


class ItemSource(BaseModel):
    """Where the items come from. Exactly one of the kinds' fields is used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["list", "text", "jsonl", "range", "ledger"] = Field(
        description="list: inline values; text: a file, one item per line; jsonl: a JSON Lines "
        "file, one object per line with an optional 'id'; range: integers start..stop-1; "
        "ledger: an earlier run's items of the given fates (a rerun)."
    )
    values: tuple[str, ...] | None = Field(default=None, description="The items, for kind 'list'.")
    path: str | None = Field(default=None, description="The file, for kinds 'text' and 'jsonl'.")
    start: int = Field(default=0, description="First integer, for kind 'range'.")
    stop: int | None = Field(default=None, description="End (exclusive), for kind 'range'.")
    step: int = Field(default=1, description="Step, for kind 'range'; not 0.")
    run_id: str | None = Field(
        default=None, description="The earlier flow run whose items to rerun, for kind 'ledger'."
    )
    fates: tuple[Literal["succeeded", "failed", "dead_lettered", "left"], ...] = Field(
        default=("failed", "dead_lettered", "left"),
        description="Which of its items, for kind 'ledger': succeeded, failed, dead_lettered, "
        "left (never finished: still queued or lost in flight).",
    )
    ledger_storage: str | None = Field(
        default=None,
        description="Where that run's ledger is, for kind 'ledger': a LocalFileSystem or "
        "RemoteFileSystem block name (default: the local ledger directory).",
    )
    max_item_bytes: int = Field(
        default=DEFAULT_MAX_ITEM_BYTES,
        ge=1,
        le=128 * 1024 * 1024,
        description="Largest item body accepted, in bytes (default 1 MiB).",
    )

    @model_validator(mode="after")
    def _check_kind_fields(self) -> ItemSource:
        if self.kind == "list" and self.values is None:
            raise ValueError("kind 'list' needs 'values': the items as a list of strings")
        if self.kind in ("text", "jsonl") and not self.path:
            raise ValueError(f"kind {self.kind!r} needs 'path': the file to read items from")
        if self.kind == "range":
            if self.stop is None:
                raise ValueError("kind 'range' needs 'stop' (exclusive end)")
            if self.step == 0:
                raise ValueError("range step must not be 0")
        if self.kind == "ledger":
            if not self.run_id or not self.run_id.strip():
                raise ValueError(
                    "kind 'ledger' needs 'run_id': the flow run whose items to run again"
                )
            if not self.fates:
                raise ValueError(
                    "kind 'ledger' needs at least one fate: succeeded, failed, dead_lettered, left"
                )
        return self

    @classmethod
    def ledger(
        cls,
        run_id: str,
        fates: Iterable[str] = ("failed", "dead_lettered", "left"),
        ledger_storage: str | None = None,
    ) -> ItemSource:
        """An earlier run's items of the given fates, read back from its ledger."""
        return cls.model_validate(
            {
                "kind": "ledger",
                "run_id": run_id,
                "fates": tuple(fates),
                "ledger_storage": ledger_storage,
            }
        )

    @classmethod
    def inline(cls, values: list[str] | tuple[str, ...]) -> ItemSource:
        """An inline list of items."""
        return cls(kind="list", values=tuple(values))

    @classmethod
    def int_range(cls, start: int, stop: int, step: int = 1) -> ItemSource:
        """The integers start, start+step, ... before stop."""
        return cls(kind="range", start=start, stop=stop, step=step)

    def describe(self) -> str:
        """A short human description, for logs and errors."""
        if self.kind == "list":
            return f"inline list of {len(self.values or ())} items"
        if self.kind == "range":
            return f"range({self.start}, {self.stop}, {self.step})"
        if self.kind == "ledger":
            return f"the {', '.join(self.fates)} items of run {self.run_id}"
        return f"{self.kind} file {self.path}"


def derived_id(index: int, body: bytes) -> str:
    """The id of an item that was not given one: its position and a digest of its content."""
    return f"{index}-{hashlib.blake2b(body, digest_size=4).hexdigest()}"


def iter_items(
    source: ItemSource,
    *,
    stream: BinaryIO | None = None,
    rows: Iterable[Mapping[str, Any]] | None = None,
) -> Iterator[Item]:
    """Yield the source's items in order, validating as it goes.

    For file kinds the caller may pass an open binary ``stream`` (the file is opened from
    ``source.path`` otherwise). For kind ``ledger`` the caller passes the earlier run's ledger
    ``rows`` of the source's fates (this module does no I/O to storage). Raises `ItemError` on
    the first bad item; an empty source is an error too, raised once the end is reached with
    nothing yielded.
    """
    if source.kind == "ledger":
        if rows is None:
            raise ItemError(
                f"{source.describe()}: the ledger's rows must be read by the caller "
                "(queuejob.flows.tasks.source_items does)"
            )
        yield from _nonempty(_iter_ledger(source, rows), source)
    elif source.kind == "list":
        yield from _nonempty(_iter_list(source), source)
    elif source.kind == "range":
        yield from _nonempty(_iter_range(source), source)
    else:
        if stream is not None:
            yield from _nonempty(_iter_file(source, stream), source)
            return
        assert source.path is not None
        try:
            fh = open(source.path, "rb")  # noqa: SIM115 - closed below, generator-safe
        except OSError as exc:
            raise ItemError(
                f"cannot open item file {source.path}: {exc.strerror or exc}; "
                "check the path (it is read by the flow run's process)"
            ) from exc
        with fh:
            yield from _nonempty(_iter_file(source, fh), source)


def count_items(source: ItemSource, *, stream: BinaryIO | None = None) -> int:
    """Validate the whole source without keeping it, and return how many items it holds."""
    n = 0
    for _ in iter_items(source, stream=stream):
        n += 1
    return n


def _nonempty(items: Iterator[Item], source: ItemSource) -> Iterator[Item]:
    seen = False
    for item in items:
        seen = True
        yield item
    if not seen:
        if source.kind == "ledger":
            raise ItemError(
                f"nothing to rerun: run {source.run_id} has no {' or '.join(source.fates)} "
                "items in its ledger"
            )
        raise ItemError(f"no items in {source.describe()}: give at least one item")


def _iter_ledger(source: ItemSource, rows: Iterable[Mapping[str, Any]]) -> Iterator[Item]:
    """The ledger rows as items: their original ids and bodies, numbered in the new run."""
    for index, row in enumerate(rows):
        item_id = row.get("item_id")
        body_text = row.get("body")
        where = f"ledger of run {source.run_id}, row {index + 1}"
        if not isinstance(item_id, str) or not item_id:
            raise ItemError(f"{where}: no item id; the ledger is damaged, run the items again")
        if not isinstance(body_text, str):
            raise ItemError(
                f"{where} (item {item_id!r}): the ledger does not hold the item's body (it was "
                "written by a queuejob from before reruns): run the items again with "
                "`queuejob run` from their source"
            )
        body = body_text.encode("utf-8")
        _check_size(body, source, f"{where} (item {item_id!r})")
        yield Item(id=item_id, index=index, body=body)


def _check_size(body: bytes, source: ItemSource, where: str) -> None:
    if len(body) > source.max_item_bytes:
        raise ItemError(
            f"{where}: item is {len(body)} bytes, over the limit of {source.max_item_bytes} "
            "bytes; put large payloads in object storage and queue their names, or raise "
            "max_item_bytes"
        )


def _iter_list(source: ItemSource) -> Iterator[Item]:
    for index, value in enumerate(source.values or ()):
        body = value.encode("utf-8")
        where = f"inline item {index}"
        _check_size(body, source, where)
        if not body.strip():
            raise ItemError(f"{where} is empty; remove it or give it content")
        yield Item(id=derived_id(index, body), index=index, body=body)


def _iter_range(source: ItemSource) -> Iterator[Item]:
    assert source.stop is not None
    for index, n in enumerate(range(source.start, source.stop, source.step)):
        text = str(n)
        yield Item(id=text, index=index, body=text.encode())


def _read_lines(source: ItemSource, fh: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, content without line ending); bounded memory whatever the line."""
    limit = source.max_item_bytes
    lineno = 0
    while True:
        # Read at most limit + 2 bytes (content plus "\r\n"): a 200 MB line costs 1 MiB here.
        raw = fh.readline(limit + 2)
        if not raw:
            return
        lineno += 1
        content = raw.rstrip(b"\r\n")
        if len(content) > limit or (len(raw) == limit + 2 and not raw.endswith(b"\n")):
            raise ItemError(
                f"{source.path}:{lineno}: line is longer than the limit of {limit} bytes; "
                "put large payloads in object storage and queue their names, or raise "
                "max_item_bytes"
            )
        yield lineno, content


def _iter_file(source: ItemSource, fh: BinaryIO) -> Iterator[Item]:
    seen_ids: set[bytes] = set()
    index = 0
    for lineno, content in _read_lines(source, fh):
        if not content.strip():
            continue
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ItemError(
                f"{source.path}:{lineno}: not valid UTF-8 (byte {exc.start + 1} of the line); "
                "re-encode the file as UTF-8"
            ) from exc
        if source.kind == "text":
            yield Item(id=derived_id(index, content), index=index, body=content)
        else:
            item_id = _jsonl_id(text, source, lineno)
            if item_id is None:
                item_id = derived_id(index, content)
            else:
                # 8-byte digests keep the duplicate check near 80 bytes per item (given ids only).
                key = hashlib.blake2b(item_id.encode(), digest_size=8).digest()
                if key in seen_ids:
                    raise ItemError(
                        f"{source.path}:{lineno}: duplicate id {item_id!r} (an earlier line has "
                        "it); ids must be unique within a run"
                    )
                seen_ids.add(key)
            yield Item(id=item_id, index=index, body=content)
        index += 1


def _jsonl_id(text: str, source: ItemSource, lineno: int) -> str | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ItemError(
            f"{source.path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
            "each line must be one JSON object"
        ) from exc
    if not isinstance(obj, dict):
        raise ItemError(
            f"{source.path}:{lineno}: expected a JSON object, got {type(obj).__name__}; "
            'write each item as {"id": ..., ...}'
        )
    raw = obj.get("id")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise ItemError(f"{source.path}:{lineno}: 'id' must be a string or an integer")
    item_id = str(raw)
    if not item_id or len(item_id.encode()) > MAX_ID_BYTES:
        raise ItemError(
            f"{source.path}:{lineno}: 'id' must be 1 to {MAX_ID_BYTES} bytes long "
            f"(got {len(item_id.encode())})"
        )
    return item_id
