"""The item runner: a ``--call`` function called in the worker's process, or a command run as one
process per item by one long-lived thread (`Executor`); and `Item`, what the worker knows of a
delivered message, which turns an outcome into its `OutcomeRecord`.

An item's result (`queuejob.flows.core.results`) is a ``--call`` function's return value, or
what a command wrote to its result file (``$QUEUEJOB_RESULT_FILE``, made empty for each item);
one that cannot be kept (not JSON, over ``--max-result-bytes``) fails the item."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from queuejob.flows.adapters.broker import (
    HEADER_DELIVERY_COUNT,
    HEADER_FAILURES,
    HEADER_INDEX,
    HEADER_RUN_ID,
)
from queuejob.flows.core import results
from queuejob.flows.core.ledger import SUCCEEDED, OutcomeRecord
from queuejob.flows.worker.options import EXIT_TIMED_OUT

TAIL_LINES = 20
TAIL_CHARS = 2000
_TICK_S = 0.25  # how often the feeder looks whether the command has exited
_PIPE_CHUNK = 65536
_ORPHAN_PIPE_S = 2.0  # after the command exits, how long a grandchild may hold its pipes


def _stderr_tail(data: bytes | str) -> str:
    """The last lines of an item's stderr, for its outcome record."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return "".join(text.splitlines(keepends=True)[-TAIL_LINES:])[-TAIL_CHARS:]


@dataclass(frozen=True)
class Result:
    """How one item ended: its exit code (0 for success), the end of its stderr, and its result
    (a JSON value, None for none); a command stopped at the item timeout has exit code 124 and
    ``timed_out``."""

    exit_code: int
    tail: str = ""
    result: Any = None
    timed_out: bool = False


def timeout_note(timeout_s: float, what: str) -> str:
    """The line a timed-out item's record ends with (and the pod's log shows)."""
    return f"queuejob worker: timed out after {timeout_s:g} s: {what}\n"


def _result_failed(exc: results.ResultError, tail: str = "") -> Result:
    """The item fails for its result: exit code 1, the reason in the pod's log and the record."""
    text = f"queuejob worker: item failed: {exc}\n"
    sys.stderr.write(text)
    return Result(1, _stderr_tail(tail + text))


def call_item(fn: Callable[[bytes], Any], body: bytes, max_result_bytes: int) -> Result:
    """Call a ``--call`` function with one item's body; its return value is the result."""
    try:
        value = fn(body)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return Result(code, f"SystemExit({exc.code!r})\n" if code else "")
    except BaseException:
        text = traceback.format_exc()
        sys.stderr.write(text)
        return Result(1, _stderr_tail(text))
    if value is None:  # the common case: nothing to check
        return Result(0)
    try:
        return Result(0, "", results.from_call(value, max_result_bytes))
    except results.ResultError as exc:
        return _result_failed(exc)


def read_result_file(path: str, max_result_bytes: int) -> Any:
    """A command's result: the file's bytes (`results.from_bytes`), read only when within the
    limit. `ResultError` when over it; None when the file is empty or gone."""
    try:
        # Non-blocking: a FIFO put in the file's place must not hang the worker.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise results.ResultError(
                f"$QUEUEJOB_RESULT_FILE ({path}) is no longer a regular file; write the result "
                'into that file (e.g. > "$QUEUEJOB_RESULT_FILE"), do not replace it'
            )
        size = info.st_size
        if size > max_result_bytes:
            raise results.too_large(size, max_result_bytes, "the result file")
        chunks = []
        left = max_result_bytes + 1  # a file still growing is caught too
        while left > 0:
            chunk = os.read(fd, min(left, _PIPE_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return results.from_bytes(b"".join(chunks), max_result_bytes, what="the result file")
    finally:
        os.close(fd)


class Executor:
    """One thread for the worker's whole life that runs the commands, one at a time.

    The main thread owns the broker connection: while a command runs it keeps serving
    heartbeats, deliveries and publisher confirms, however long the command takes, and it
    notices signals. Each command is one process, fed and read by this thread with a selector;
    nothing else is started per item. With ``timeout_s``, a command still running after that
    long gets SIGTERM (its process group), then SIGKILL after ``grace_s``, and its item ends
    with exit code 124 (`Result.timed_out`).
    """

    def __init__(
        self,
        *,
        argv: list[str],
        max_result_bytes: int,
        timeout_s: float | None = None,
        grace_s: float = 10.0,
    ) -> None:
        self._argv = argv
        self._max_result_bytes = max_result_bytes
        self._timeout_s = timeout_s
        self._grace_s = grace_s
        self._jobs: queue.SimpleQueue[tuple[bytes, dict[str, str], str | None]] = (
            queue.SimpleQueue()
        )
        self._results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._proc: subprocess.Popen[bytes] | None = None
        self.busy = False
        threading.Thread(target=self._serve, name="queuejob-items", daemon=True).start()

    def submit(self, body: bytes, env: dict[str, str], result_file: str | None = None) -> None:
        """Start one item; `result` returns its outcome. ``result_file``: the (empty) file the
        command may write its result to; read once it exits 0, then removed."""
        self.busy = True
        self._jobs.put((body, env, result_file))

    def result(self, timeout_s: float) -> Result | None:
        """The running item's outcome, or None if it is still running after ``timeout_s``."""
        try:
            res = self._results.get(timeout=timeout_s)
        except queue.Empty:
            return None
        self.busy = False
        return res

    def stop(self, grace_s: float) -> None:
        """Stop the running command (SIGTERM to its process group, SIGKILL after ``grace_s``).
        A Python function cannot be stopped: the process exits without waiting for it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)

    def _serve(self) -> None:
        while True:
            body, env, result_file = self._jobs.get()
            try:
                res = self._run(body, env)
                if res.exit_code == 0 and result_file is not None:
                    try:
                        value = read_result_file(result_file, self._max_result_bytes)
                        res = Result(0, res.tail, value)
                    except results.ResultError as exc:
                        res = _result_failed(exc, res.tail)
            except BaseException as exc:  # never leave the main thread waiting
                res = Result(1, f"queuejob worker: {type(exc).__name__}: {exc}\n")
            finally:
                if result_file is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(result_file)
            self._results.put(res)

    def _run(self, body: bytes, env: dict[str, str]) -> Result:
        try:
            # Its own process group, so a stop reaches the command's children too.
            proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            tail = f"cannot run {self._argv[0]!r}: {exc.strerror or exc}\n"
            sys.stderr.write(tail)
            return Result(127 if isinstance(exc, FileNotFoundError) else 126, tail)
        self._proc = proc
        try:
            stopped = _Deadline(proc, self._timeout_s, self._grace_s)
            tail = _stderr_tail(self._pump(proc, body, stopped))
            if stopped.fired:
                note = timeout_note(
                    float(self._timeout_s or 0),
                    f"the command was stopped (SIGTERM, then SIGKILL after {self._grace_s:g} s); "
                    f"it ended with {_describe_exit(proc.returncode)}",
                )
                sys.stderr.write(note)
                return Result(EXIT_TIMED_OUT, _stderr_tail(tail + note), timed_out=True)
            return Result(proc.returncode, tail)
        finally:
            self._proc = None

    @staticmethod
    def _pump(proc: subprocess.Popen[bytes], body: bytes, deadline: _Deadline) -> bytes:
        """Feed ``body`` to the command's stdin and copy its stderr to ours until it exits
        (stopping it at the ``deadline``); return the end of its stderr."""
        assert proc.stdin is not None and proc.stderr is not None
        stdin, stderr = proc.stdin, proc.stderr
        out = getattr(sys.stderr, "buffer", None)
        kept = bytearray()
        pending = memoryview(body)
        exited_at: float | None = None
        with selectors.DefaultSelector() as sel:
            sel.register(stderr, selectors.EVENT_READ)
            if pending:
                os.set_blocking(stdin.fileno(), False)
                sel.register(stdin, selectors.EVENT_WRITE)
            else:
                stdin.close()
            while sel.get_map():
                for key, _events in sel.select(timeout=_TICK_S):
                    if key.fileobj is stdin:
                        try:
                            pending = pending[os.write(stdin.fileno(), pending[:_PIPE_CHUNK]) :]
                        except BlockingIOError:
                            continue
                        except OSError:  # a command that does not read stdin: not a failure
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(stdin)
                            with contextlib.suppress(OSError):
                                stdin.close()
                        continue
                    chunk = os.read(stderr.fileno(), _PIPE_CHUNK)
                    if not chunk:
                        sel.unregister(stderr)
                        continue
                    kept += chunk
                    del kept[: -4 * TAIL_CHARS]
                    if out is not None:
                        with contextlib.suppress(OSError, ValueError):
                            out.write(chunk)
                            out.flush()
                if exited_at is None and proc.poll() is not None:
                    exited_at = time.monotonic()
                if exited_at is None:
                    deadline.check()
                # A background grandchild may keep a pipe open: do not wait for it forever.
                if exited_at is not None and time.monotonic() - exited_at > _ORPHAN_PIPE_S:
                    break
        for pipe in (stdin, stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        proc.wait()
        return bytes(kept)


class _Deadline:
    """The item timeout of one command: SIGTERM to its group once it passed, SIGKILL after the
    grace period."""

    def __init__(
        self, proc: subprocess.Popen[bytes], timeout_s: float | None, grace_s: float
    ) -> None:
        self._proc = proc
        self._at = None if timeout_s is None else time.monotonic() + timeout_s
        self._grace_s = grace_s
        self._kill_at: float | None = None
        self.fired = False

    def check(self) -> None:
        if self._at is None:
            return
        now = time.monotonic()
        if not self.fired and now >= self._at:
            self.fired = True
            self._kill_at = now + self._grace_s
            _signal_group(self._proc.pid, signal.SIGTERM)
        elif self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            _signal_group(self._proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {-code}"
    return f"exit code {code}"


@dataclass(frozen=True)
class Item:
    """What the worker knows of one delivered message."""

    item_id: str
    index: int | None
    attempt: int
    failures: int
    run_id: str
    pod: str
    headers: dict[str, Any]

    @classmethod
    def of(cls, props: Any, body: bytes, run_id: str, pod: str) -> Item:
        headers: dict[str, Any] = dict(props.headers or {})
        index = headers.get(HEADER_INDEX)
        failures = _int(headers.get(HEADER_FAILURES))
        return cls(
            item_id=props.message_id or f"msg-{hashlib.blake2b(body, digest_size=6).hexdigest()}",
            index=index if isinstance(index, int) and not isinstance(index, bool) else None,
            attempt=_int(headers.get(HEADER_DELIVERY_COUNT)) + failures + 1,
            failures=failures,
            run_id=_text(headers.get(HEADER_RUN_ID)) or run_id,
            pod=pod,
            headers=headers,
        )

    def record(
        self, status: str, res: Result | None, duration_s: float, note: str = ""
    ) -> OutcomeRecord:
        """The outcome record of this attempt; a succeeded one carries the item's result."""
        return OutcomeRecord(
            run_id=self.run_id,
            status=status,
            item_id=self.item_id,
            index=self.index,
            attempt=self.attempt,
            pod=self.pod,
            exit_code=res.exit_code if res is not None else None,
            duration_s=round(duration_s, 3),
            stderr_tail=res.tail if res is not None else note,
            ts=time.time(),
            result=res.result if res is not None and status == SUCCEEDED else None,
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None
