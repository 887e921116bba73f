"""Item sources: kinds, validation errors that name the file and line, stable ids, streaming."""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pydantic
import pytest

from queuejob.flows.core.errors import ItemError
from queuejob.flows.core.items import (
    DEFAULT_MAX_ITEM_BYTES,
    MAX_ID_BYTES,
    Item,
    ItemSource,
    count_items,
    derived_id,
    iter_items,
)

MiB = 1 << 20


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def items_of(source: ItemSource) -> list[Item]:
    return list(iter_items(source))


class CountingRaw(io.RawIOBase):
    """A raw stream over a file that counts the bytes actually read from it."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int | None:
        n = self._fh.readinto(buffer)
        self.bytes_read += n or 0
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


# --- the kinds --------------------------------------------------------------------------------


def test_inline_list_keeps_order_and_bodies() -> None:
    got = items_of(ItemSource.inline(["a", "b", "c"]))
    assert [i.body for i in got] == [b"a", b"b", b"c"]
    assert [i.index for i in got] == [0, 1, 2]
    assert [i.id for i in got] == [derived_id(n, b) for n, b in enumerate((b"a", b"b", b"c"))]


def test_inline_duplicate_values_get_distinct_ids() -> None:
    got = items_of(ItemSource.inline(["same", "same"]))
    assert got[0].id != got[1].id


@pytest.mark.parametrize(
    ("start", "stop", "step", "expected"),
    [
        pytest.param(0, 3, 1, ["0", "1", "2"], id="zero-to-three"),
        pytest.param(10, 0, -5, ["10", "5"], id="negative-step"),
        pytest.param(1, 8, 3, ["1", "4", "7"], id="step-three"),
    ],
)
def test_range_ids_are_the_values(start: int, stop: int, step: int, expected: list[str]) -> None:
    got = items_of(ItemSource.int_range(start, stop, step))
    assert [i.id for i in got] == expected
    assert [i.body for i in got] == [e.encode() for e in expected]
    assert [i.index for i in got] == list(range(len(expected)))


def test_text_file_skips_blank_lines_and_strips_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path / "items.txt", b"alpha\r\n\n   \nbeta\ngamma")
    got = items_of(ItemSource(kind="text", path=str(path)))
    assert [i.body for i in got] == [b"alpha", b"beta", b"gamma"]
    assert [i.index for i in got] == [0, 1, 2]


def test_jsonl_body_is_the_whole_line_and_given_ids_are_kept(tmp_path: Path) -> None:
    lines = [b'{"id": "frame-1", "x": 1}', b'{"id": 42}', b'{"x": "no id"}']
    path = write(tmp_path / "items.jsonl", b"\n".join(lines) + b"\n")
    got = items_of(ItemSource(kind="jsonl", path=str(path)))
    assert [i.id for i in got] == ["frame-1", "42", derived_id(2, lines[2])]
    assert [i.body for i in got] == lines


def test_stream_argument_is_read_instead_of_the_path(tmp_path: Path) -> None:
    source = ItemSource(kind="text", path=str(tmp_path / "not-there.txt"))
    got = list(iter_items(source, stream=io.BytesIO(b"one\ntwo\n")))
    assert [i.body for i in got] == [b"one", b"two"]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(ItemError, match=r"cannot open item file .*absent\.txt"):
        items_of(ItemSource(kind="text", path=str(path)))


# --- stable ids -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_same_source_twice_gives_same_ids(tmp_path: Path, kind: str) -> None:
    body = b"".join(b'{"n": %d}\n' % n for n in range(50))
    source = ItemSource(kind=kind, path=str(write(tmp_path / f"items.{kind}", body)))
    first = [i.id for i in iter_items(source)]
    second = [i.id for i in iter_items(source)]
    assert first == second
    assert len(set(first)) == 50


def test_blank_lines_do_not_shift_derived_ids(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.txt", b"a\nb\nc\n")
    spaced = write(tmp_path / "spaced.txt", b"\na\n\n\nb\n   \nc\n\n")
    ids = [i.id for i in items_of(ItemSource(kind="text", path=str(plain)))]
    assert ids == [i.id for i in items_of(ItemSource(kind="text", path=str(spaced)))]


def test_derived_id_depends_on_position_and_content() -> None:
    assert derived_id(0, b"x") == derived_id(0, b"x")
    assert derived_id(0, b"x") != derived_id(1, b"x")
    assert derived_id(0, b"x") != derived_id(0, b"y")
    assert derived_id(7, b"x").startswith("7-")


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "data", "line", "fragment"),
    [
        pytest.param(
            "text", b"ok\n\xff\xfebad\n", 2, "not valid UTF-8 (byte 1", id="text-non-utf8"
        ),
        pytest.param(
            "jsonl", b'{"id": 1}\n\n{"x": "\xc3"}\n', 3, "not valid UTF-8", id="jsonl-non-utf8"
        ),
        pytest.param("jsonl", b'{"id": 1}\n{"id": 2,\n', 2, "malformed JSON", id="malformed-json"),
        pytest.param("jsonl", b"[1, 2]\n", 1, "expected a JSON object, got list", id="json-array"),
        pytest.param("jsonl", b'"just a string"\n', 1, "got str", id="json-string"),
        pytest.param(
            "jsonl",
            b'{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n',
            3,
            "duplicate id 'a'",
            id="duplicate-id",
        ),
        pytest.param(
            "jsonl", b'{"id": 7}\n{"id": "7"}\n', 2, "duplicate id '7'", id="duplicate-int-str"
        ),
        pytest.param("jsonl", b'{"id": true}\n', 1, "'id' must be a string or an", id="bool-id"),
        pytest.param("jsonl", b'{"id": 1.5}\n', 1, "'id' must be a string or an", id="float-id"),
        pytest.param("jsonl", b'{"id": ""}\n', 1, "'id' must be 1 to 255 bytes", id="empty-id"),
        pytest.param(
            "jsonl",
            b'{"id": "' + b"i" * (MAX_ID_BYTES + 1) + b'"}\n',
            1,
            "(got 256)",
            id="id-over-255-bytes",
        ),
    ],
)
def test_bad_line_names_file_and_line(
    tmp_path: Path, kind: str, data: bytes, line: int, fragment: str
) -> None:
    path = write(tmp_path / f"bad.{kind}", data)
    with pytest.raises(ItemError) as info:
        items_of(ItemSource(kind=kind, path=str(path)))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert fragment in message


def test_items_before_a_bad_line_are_yielded_first(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", b'{"id": "a"}\n{"id": "b"}\nnot json\n')
    got: list[str] = []
    with pytest.raises(ItemError, match=r":3: malformed JSON"):
        for item in iter_items(ItemSource(kind="jsonl", path=str(path))):
            got.append(item.id)
    assert got == ["a", "b"]


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        pytest.param(ItemSource.inline([]), "no items in inline list of 0 items", id="empty-list"),
        pytest.param(ItemSource.int_range(5, 5), "no items in range(5, 5, 1)", id="empty-range"),
        pytest.param(ItemSource.inline(["a", "  "]), "inline item 1 is empty", id="blank-inline"),
        pytest.param(
            ItemSource(kind="list", values=("x" * 11,), max_item_bytes=10),
            "inline item 0: item is 11 bytes, over the limit of 10",
            id="inline-too-big",
        ),
    ],
)
def test_bad_inline_and_range_sources(source: ItemSource, fragment: str) -> None:
    with pytest.raises(ItemError) as info:
        items_of(source)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        pytest.param("text", b"", id="text-empty-file"),
        pytest.param("text", b"\n  \n\r\n", id="text-only-blank-lines"),
        pytest.param("jsonl", b"", id="jsonl-empty-file"),
    ],
)
def test_empty_file_is_an_error(tmp_path: Path, kind: str, data: bytes) -> None:
    path = write(tmp_path / f"empty.{kind}", data)
    with pytest.raises(ItemError, match=rf"no items in {kind} file .*empty\.{kind}"):
        count_items(ItemSource(kind=kind, path=str(path)))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"kind": "list"}, id="list-without-values"),
        pytest.param({"kind": "text"}, id="text-without-path"),
        pytest.param({"kind": "jsonl", "path": ""}, id="jsonl-empty-path"),
        pytest.param({"kind": "range", "start": 0}, id="range-without-stop"),
        pytest.param({"kind": "range", "stop": 3, "step": 0}, id="range-step-zero"),
        pytest.param({"kind": "csv", "path": "x"}, id="unknown-kind"),
        pytest.param({"kind": "text", "path": "x", "max_item_bytes": 0}, id="limit-zero"),
        pytest.param({"kind": "text", "path": "x", "surprise": 1}, id="unknown-field"),
    ],
)
def test_source_model_rejects_incomplete_kinds(kwargs: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ItemSource(**kwargs)


# --- the size limit ---------------------------------------------------------------------------


def test_default_limit_is_one_mib() -> None:
    assert DEFAULT_MAX_ITEM_BYTES == 1024 * 1024
    assert ItemSource(kind="text", path="x").max_item_bytes == MiB


@pytest.mark.parametrize(
    ("line", "ok"),
    [
        pytest.param(b"x" * 16 + b"\n", True, id="at-limit-lf"),
        pytest.param(b"x" * 16 + b"\r\n", True, id="at-limit-crlf"),
        pytest.param(b"x" * 16, True, id="at-limit-no-newline-at-eof"),
        pytest.param(b"x" * 17 + b"\n", False, id="one-over-lf"),
        pytest.param(b"x" * 17, False, id="one-over-no-newline-at-eof"),
        pytest.param(b"x" * 17 + b"\r\n", False, id="one-over-crlf"),
        pytest.param(b"x" * 400 + b"\n", False, id="far-over"),
    ],
)
@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_configurable_line_limit_boundaries(
    tmp_path: Path, kind: str, line: bytes, ok: bool
) -> None:
    if kind == "jsonl":
        # Same byte lengths, as a JSON object: '{"k":"' + filler + '"}' is 8 bytes of syntax.
        content = line.rstrip(b"\r\n")
        ending = line[len(content) :]
        line = b'{"k":"' + b"y" * (len(content) - 8) + b'"}' + ending
    path = write(tmp_path / f"limit.{kind}", b"first\n" if kind == "text" else b'{"a":1}\n')
    with path.open("ab") as fh:
        fh.write(line)
    source = ItemSource(kind=kind, path=str(path), max_item_bytes=16)
    if ok:
        assert count_items(source) == 2
    else:
        with pytest.raises(ItemError) as info:
            count_items(source)
        assert str(info.value).startswith(f"{path}:2: line is longer than the limit of 16 bytes")
        assert "max_item_bytes" in str(info.value)


def test_over_limit_line_in_the_middle_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "mid.txt", b"a\n\nb\n" + b"z" * 2048 + b"\nc\n")
    with pytest.raises(ItemError, match=r"mid\.txt:4: line is longer than the limit of 1024"):
        count_items(ItemSource(kind="text", path=str(path), max_item_bytes=1024))


# --- streaming in bounded memory --------------------------------------------------------------


@pytest.fixture
def huge_single_line(tmp_path: Path) -> Path:
    """A 200 MB file that is one line (sparse: costs no disk and no time to create)."""
    path = tmp_path / "huge.txt"
    with path.open("wb") as fh:
        fh.write(b"x")
        fh.truncate(200 * 1000 * 1000)
    assert path.stat().st_size == 200_000_000
    return path


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_200mb_single_line_fails_after_reading_about_the_limit(
    huge_single_line: Path, kind: str
) -> None:
    source = ItemSource(kind=kind, path=str(huge_single_line))
    raw = CountingRaw(huge_single_line)
    with io.BufferedReader(raw) as stream:
        with pytest.raises(ItemError, match=r"huge\.txt:1: line is longer than the limit"):
            count_items(source, stream=stream)
        # One limit's worth plus at most a couple of read-ahead buffers, not 200 MB.
        assert raw.bytes_read <= MiB + 2 + 2 * io.DEFAULT_BUFFER_SIZE


def test_200mb_single_line_opened_by_path_peaks_near_the_limit(huge_single_line: Path) -> None:
    source = ItemSource(kind="text", path=str(huge_single_line))
    tracemalloc.start()
    try:
        with pytest.raises(ItemError, match=r":1: line is longer"):
            count_items(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"peak traced memory {peak} bytes for a 200 MB line"


def _write_lines(path: Path, n: int, template: bytes) -> Path:
    with path.open("wb") as fh:
        for start in range(0, n, 10_000):
            fh.write(b"".join(template % i for i in range(start, min(n, start + 10_000))))
    return path


def test_million_short_lines_are_counted_without_holding_them(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "million.txt", 1_000_000, b"item-%07d\n")
    source = ItemSource(kind="text", path=str(path))
    # tracemalloc would slow a million iterations several-fold; the process's high-water mark
    # answers the same question here: holding a million Items would add well over 100 MiB.
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert count_items(source) == 1_000_000
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
    assert grown_kib < 32 * 1024, f"max RSS grew by {grown_kib} KiB while counting"


_TRACED_COUNT = """
import sys, tracemalloc
from queuejob.flows.core.items import ItemSource, count_items
source = ItemSource(kind="text", path=sys.argv[1])
tracemalloc.start()
n = count_items(source)
print(n, tracemalloc.get_traced_memory()[1])
"""


def test_traced_peak_does_not_grow_with_the_number_of_lines(tmp_path: Path) -> None:
    # In a fresh interpreter: tracemalloc counts every thread's allocations, and threads other
    # tests leave behind (Prefect's, logging's) would be measured too.
    peaks = []
    for n in (2_000, 100_000):
        path = _write_lines(tmp_path / f"{n}.txt", n, b"%d\n")
        out = subprocess.run(
            [sys.executable, "-c", _TRACED_COUNT, str(path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
            timeout=120,
        ).stdout.split()
        assert int(out[0]) == n
        peaks.append(int(out[1]))
    assert peaks[1] < 256 * 1024, peaks
    assert peaks[1] < peaks[0] + 64 * 1024, f"peak grew with 50x the lines: {peaks}"


def test_jsonl_duplicate_check_costs_bounded_bytes_per_id(tmp_path: Path) -> None:
    n = 20_000
    path = _write_lines(tmp_path / "ids.jsonl", n, b'{"id": "item-%07d"}\n')
    tracemalloc.start()
    try:
        assert count_items(ItemSource(kind="jsonl", path=str(path))) == n
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Ids are remembered as 8-byte digests in a set: O(n), but a small constant per id (the set
    # table dominates; about 75-175 bytes per id depending on where it last resized).
    assert peak / n < 256, f"{peak / n:.0f} bytes per id"


def test_items_are_json_safe_message_bodies(tmp_path: Path) -> None:
    path = write(tmp_path / "u.jsonl", '{"id": "ü-1", "name": "Zoë"}\n'.encode())
    (item,) = items_of(ItemSource(kind="jsonl", path=str(path)))
    assert item.id == "ü-1"
    assert json.loads(item.body) == {"id": "ü-1", "name": "Zoë"}
