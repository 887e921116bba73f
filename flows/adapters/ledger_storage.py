"""Where a run's ledger is kept: a Prefect filesystem block, any fsspec URL.

The storage is a `LocalFileSystem` block, a `RemoteFileSystem` block (``s3://``, ``gs://``,
``az://``, ``file://``, ``memory://``, ... through fsspec), or, when no block is named, a local
directory: ``QUEUEJOB_LEDGER_DIR``, else ``~/.cache/queuejob/ledgers``.

Layout, relative to the storage's base path, one directory per flow run::

    <run_id>/segments/records-00000001-<w>.jsonl   checkpoints: outcome records, batch by batch
    <run_id>/ledger.jsonl                          final: one JSON row per item, in item order
    <run_id>/report.json                           final: the run's report, its parameters and
                                                   where the ledger is
    <run_id>/reruns/<rerun_id>.json                a rerun of this run ended: when, and where
                                                   its own ledger is

Each row of ``ledger.jsonl`` has the item's ``result`` (see `queuejob.flows.core.results`):
what its succeeded attempt returned, or null.

A segment holds one batch of outcome records (one compact JSON record per line) and ends with
a trailer line ``{"end": N}`` giving how many records it holds. ``<w>`` names the process that
wrote it (each flow attempt has its own), so two attempts of a run that overlap (a pod thought
lost that still runs) never overwrite each other's segments. The flow writes a segment before
it acknowledges the records in it, so a flow run retried in a fresh pod rebuilds its ledger from
the segments. A segment cut short by a crash has no valid trailer and is ignored: its records
were never acknowledged, so the broker delivers them again.

On a local directory, segments and the final files are written to a temporary name, flushed to
disk and renamed into place; object stores make a whole-object write visible at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from queuejob.flows.core.errors import InvalidInput, LedgerNotFound, LedgerStorageError

LEDGER_DIR_ENV = "QUEUEJOB_LEDGER_DIR"
LEDGER_FILE = "ledger.jsonl"
REPORT_FILE = "report.json"
SEGMENTS_DIR = "segments"
RERUNS_DIR = "reruns"
_SEGMENT_RE = re.compile(r"records-(\d{8})(-[0-9a-z]+)?\.jsonl$")

# Fate names: what the ledger rows carry, and what users may type (`left` for left_in_queue).
FATES = ("succeeded", "failed", "dead_lettered", "left_in_queue")
FATE_ALIASES = {"left": "left_in_queue"}


def default_ledger_dir() -> Path:
    """The default storage: ``QUEUEJOB_LEDGER_DIR``, else ``~/.cache/queuejob/ledgers``."""
    base = os.environ.get(LEDGER_DIR_ENV)
    return Path(base).expanduser() if base else Path.home() / ".cache" / "queuejob" / "ledgers"


def normalize_fates(fates: Collection[str] | None) -> frozenset[str] | None:
    """The fates asked for, as ledger row statuses (``left`` -> ``left_in_queue``); None = all.
    An unknown name raises `InvalidInput` listing the valid ones."""
    if fates is None:
        return None
    out = set()
    for fate in fates:
        name = FATE_ALIASES.get(fate, fate)
        if name not in FATES:
            raise InvalidInput(
                f"unknown fate {fate!r}: use one of succeeded, failed, dead_lettered, left"
            )
        out.add(name)
    return frozenset(out)


class LedgerStorage:
    """A run ledger's storage: one directory per run under a base path, through fsspec.

    Build it with `queuejob.flows.storage.open_storage` (a block by name) or `local_storage`.
    Paths given to the methods are relative to the run's directory.
    """

    def __init__(self, fs: Any, base: str, *, local: bool, source: str) -> None:
        self.fs = fs
        self.base = base.rstrip("/") or "/"
        self.local = local  # a local directory: atomic renames and fsync
        self.source = source  # how it was chosen, for messages ("block 'x'", "default")

    # --- names ---------------------------------------------------------------------------

    def location(self, run_id: str) -> str:
        """Where that run's ledger lives (a directory path or URL, shown to users)."""
        return self._join(_check_run_id(run_id))

    def path(self, run_id: str, name: str) -> str:
        """The full path (or URL) of a file of the run."""
        return self._join(_check_run_id(run_id), name)

    def _join(self, *parts: str) -> str:
        return (
            "/".join([self.base.rstrip("/"), *parts]) if self.base != "/" else "/" + "/".join(parts)
        )

    def describe(self) -> str:
        """The base location and where it came from, for messages."""
        return f"{self.base} ({self.source})"

    # --- writing -------------------------------------------------------------------------

    def check_writable(self, run_id: str) -> None:
        """Write and remove a probe file under the run's directory; raise `LedgerStorageError`
        naming the location when that fails (read-only directory, missing bucket, no rights)."""
        probe = self.path(run_id, f".probe-{uuid.uuid4().hex[:8]}")
        try:
            self._write_bytes(probe, b"queuejob ledger storage probe\n")
            self.fs.rm(probe)
            if self.local:  # leave no empty run directory behind a run rejected later
                with contextlib.suppress(OSError):
                    Path(_strip_file_scheme(self.location(run_id))).rmdir()
        except Exception as exc:
            raise LedgerStorageError(
                f"cannot write the ledger to {self.location(run_id)} ({self.source}): "
                f"{_describe_exc(exc)}; make the location writable, or pass another "
                "ledger_storage block (--ledger-storage)"
            ) from exc

    def write_segment(
        self, run_id: str, seq: int, lines: Iterable[bytes], *, writer: str = ""
    ) -> str:
        """Write checkpoint segment `seq` of `writer` (one JSON record per line, no newlines
        inside) with its trailer, durably; return its path. Raises `LedgerStorageError`."""
        if writer and not writer.isalnum():
            raise ValueError(f"segment writer must be letters and digits, got {writer!r}")
        buf = io.BytesIO()
        n = 0
        for line in lines:
            buf.write(line)
            buf.write(b"\n")
            n += 1
        buf.write(json.dumps({"end": n}).encode() + b"\n")
        suffix = f"-{writer.lower()}" if writer else ""
        path = self.path(run_id, f"{SEGMENTS_DIR}/records-{seq:08d}{suffix}.jsonl")
        try:
            self._write_bytes(path, buf.getvalue())
        except Exception as exc:
            raise LedgerStorageError(
                f"cannot write ledger checkpoint {path}: {_describe_exc(exc)}"
            ) from exc
        return path

    def _list_names(self, run_id: str, folder_name: str, what: str) -> list[str]:
        """The names of the files in one of the run's folders (none when it does not exist)."""
        folder = self.path(run_id, folder_name)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise LedgerStorageError(
                f"cannot list {what} in {folder}: {_describe_exc(exc)}"
            ) from exc
        return [str(name).rstrip("/").rsplit("/", 1)[-1] for name in names]

    def segment_numbers(self, run_id: str) -> list[int]:
        """The numbers of the run's segments present (complete or not), ascending."""
        return sorted({seq for seq, _ in self._segment_names(run_id)})

    def _segment_names(self, run_id: str) -> list[tuple[int, str]]:
        """(number, file name) of the run's segments, in order."""
        found = []
        for base in self._list_names(run_id, SEGMENTS_DIR, "ledger checkpoints"):
            m = _SEGMENT_RE.fullmatch(base)
            if m:
                found.append((int(m.group(1)), base))
        return sorted(found)

    def iter_segments(self, run_id: str) -> Iterator[tuple[int, list[bytes]]]:
        """(number, record lines) of each complete segment, in order. Segments cut short (no
        valid trailer, or a count that does not match) are skipped."""
        for seq, name in self._segment_names(run_id):
            path = self.path(run_id, f"{SEGMENTS_DIR}/{name}")
            try:
                with self.fs.open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                continue
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            if not lines:
                continue
            try:
                trailer = json.loads(lines[-1])
            except ValueError:
                continue
            if not isinstance(trailer, dict) or trailer.get("end") != len(lines) - 1:
                continue
            yield seq, lines[:-1]

    def write_rows(self, run_id: str, rows: Iterable[dict[str, Any]]) -> str:
        """Stream the final ledger (one JSON row per item) into ``<run_id>/ledger.jsonl``."""
        path = self.path(run_id, LEDGER_FILE)
        try:
            with self._open_for_write(path) as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
        except Exception as exc:
            raise LedgerStorageError(
                f"cannot write the ledger {path}: {_describe_exc(exc)}"
            ) from exc
        return path

    def write_report(self, run_id: str, report: dict[str, Any]) -> str:
        """Write ``<run_id>/report.json``."""
        path = self.path(run_id, REPORT_FILE)
        data = json.dumps(report, indent=2, default=str).encode()
        try:
            self._write_bytes(path, data)
        except Exception as exc:
            raise LedgerStorageError(
                f"cannot write the report {path}: {_describe_exc(exc)}"
            ) from exc
        return path

    def write_rerun_link(self, run_id: str, rerun_id: str, link: dict[str, Any]) -> str:
        """Note in run ``run_id``'s directory that ``rerun_id`` reran some of its items
        (``<run_id>/reruns/<rerun_id>.json``, holding ``link``); writing it again replaces it."""
        path = self.path(run_id, f"{RERUNS_DIR}/{_check_run_id(rerun_id)}.json")
        try:
            self._write_bytes(path, json.dumps(link).encode())
        except Exception as exc:
            raise LedgerStorageError(
                f"cannot write the rerun link {path}: {_describe_exc(exc)}"
            ) from exc
        return path

    def rerun_links(self, run_id: str) -> list[dict[str, Any]]:
        """The links `write_rerun_link` left in the run's directory (unreadable ones skipped),
        oldest rerun first (by ``finished_at``)."""
        links = []
        for name in sorted(self._list_names(run_id, RERUNS_DIR, "the reruns")):
            if not name.endswith(".json") or name.startswith("."):
                continue  # a link being written (a temporary name) is not one yet
            try:
                with self.fs.open(self.path(run_id, f"{RERUNS_DIR}/{name}"), "rb") as fh:
                    link = json.loads(fh.read())
            except (OSError, ValueError):
                continue
            if isinstance(link, dict) and isinstance(link.get("run_id"), str):
                links.append(link)
        return sorted(links, key=lambda x: float(x.get("finished_at") or 0.0))

    # --- reading -------------------------------------------------------------------------

    def has_ledger(self, run_id: str) -> bool:
        """Whether the run's final ledger and report are stored."""
        return bool(self.fs.exists(self.path(run_id, REPORT_FILE)))

    def read_report(self, run_id: str) -> dict[str, Any]:
        """The run's final report; `LedgerNotFound` when the run has no stored ledger."""
        path = self.path(run_id, REPORT_FILE)
        try:
            with self.fs.open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise self._not_found(run_id) from None
        except Exception as exc:
            raise LedgerStorageError(f"cannot read {path}: {_describe_exc(exc)}") from exc
        return cast(dict[str, Any], json.loads(data))

    def iter_rows(
        self, run_id: str, fates: Collection[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Stream the final ledger's rows (bounded memory), only those of the given fates
        (``left`` and ``left_in_queue`` both name items left in the queue); `LedgerNotFound`
        when the run has no stored ledger."""
        wanted = normalize_fates(fates)
        path = self.path(run_id, LEDGER_FILE)
        try:
            fh = cast(BinaryIO, self.fs.open(path, "rb"))
        except FileNotFoundError:
            raise self._not_found(run_id) from None
        except Exception as exc:
            raise LedgerStorageError(f"cannot read {path}: {_describe_exc(exc)}") from exc
        with fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                if wanted is None or row.get("status") in wanted:
                    yield row

    def _not_found(self, run_id: str) -> LedgerNotFound:
        return LedgerNotFound(
            f"no ledger for run {run_id} at {self.location(run_id)} ({self.source}): the run "
            "has not finished, its id is wrong, or its ledger is kept elsewhere (pass the "
            "run's --ledger-storage block)"
        )

    # --- low-level writes ----------------------------------------------------------------

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self._open_for_write(path) as fh:
            fh.write(data)

    @contextlib.contextmanager
    def _open_for_write(self, path: str) -> Iterator[BinaryIO]:
        """A file to write `path` through: on a local directory a temporary file that is
        flushed to disk and renamed over `path` once complete; elsewhere the object itself."""
        if self.local:
            target = Path(_strip_file_scheme(path))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as fh:
                    yield cast(BinaryIO, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            with contextlib.suppress(OSError):  # the rename itself, durable too
                dirfd = os.open(target.parent, os.O_RDONLY)
                try:
                    os.fsync(dirfd)
                finally:
                    os.close(dirfd)
            return
        parent = path.rsplit("/", 1)[0]
        with contextlib.suppress(Exception):  # object stores have no directories
            self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(path, "wb") as fh:
            yield cast(BinaryIO, fh)


def _strip_file_scheme(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _check_run_id(run_id: str) -> str:
    if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
        raise InvalidInput(f"invalid run id {run_id!r}: give a flow run id such as 'a1b2c3d4-...'")
    return run_id


def _describe_exc(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def local_storage(base: Path, source: str) -> LedgerStorage:
    import fsspec

    return LedgerStorage(
        fsspec.filesystem("file"), str(base.expanduser().resolve()), local=True, source=source
    )


__all__ = [
    "FATES",
    "LEDGER_DIR_ENV",
    "LEDGER_FILE",
    "REPORT_FILE",
    "LedgerNotFound",
    "LedgerStorage",
    "LedgerStorageError",
    "default_ledger_dir",
    "local_storage",
    "normalize_fates",
]
