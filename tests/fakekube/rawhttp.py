"""Plain-HTTP helpers for tests: send a request exactly as written, record a watch stream.

The kubernetes client shapes requests its own way (and refuses malformed ones); contract tests
need to send the recorded requests byte for byte, and to see the raw chunked watch stream.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

USER_AGENT = "OpenAPI-Generator/37.0.2/python"
_DEFAULT = object()


@dataclass
class Reply:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.raw)

    @property
    def text(self) -> str:
        """The body as text."""
        return self.raw.decode()

    @property
    def chunked(self) -> bool:
        """True when the body came with ``Transfer-Encoding: chunked``."""
        return self.headers.get("Transfer-Encoding", "").lower() == "chunked"


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)


def call(
    url: str,
    method: str,
    path: str,
    *,
    token: str | None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """Send one request; ``body`` may be a dict (sent as JSON), a str/bytes (sent as is) or None.

    ``token=None`` sends no Authorization header.
    """
    conn = _connection(url, timeout)
    try:
        hdrs = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data: bytes | None = None
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        elif isinstance(body, str):
            data = body.encode()
        elif isinstance(body, bytes):
            data = body
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        return Reply(resp.status, dict(resp.getheaders()), raw)
    finally:
        conn.close()


@dataclass
class WatchRecord:
    """What a watch stream delivered."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (t, event)
    clean_end: bool | None = None  # True: final chunk; False: dropped; None: still open/stopped
    body: bytes = b""  # a non-streamed answer (e.g. 403)
    started: float = 0.0
    ended: float | None = None
    error: str | None = None

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        """Events of the given types (all events when none given)."""
        return [e for _t, e in self.events if not types or e["type"] in types]


class WatchRecorder(threading.Thread):
    """Runs one watch request in a thread and records its events until the stream ends."""

    def __init__(self, url: str, path: str, *, token: str | None, timeout: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.path = path
        self.token = token
        self.timeout = timeout
        self.record = WatchRecord()
        self._conn: http.client.HTTPConnection | None = None
        self._opened = threading.Event()

    def run(self) -> None:
        """Read the stream line by line."""
        rec = self.record
        rec.started = time.monotonic()
        conn = _connection(self.url, self.timeout)
        self._conn = conn
        try:
            headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
            if self.token is not None:
                headers["Authorization"] = f"Bearer {self.token}"
            conn.request("GET", self.path, headers=headers)
            resp = conn.getresponse()
            rec.status = resp.status
            rec.headers = dict(resp.getheaders())
            self._opened.set()
            if not resp.chunked:
                rec.body = resp.read()
                rec.clean_end = True
                return
            while True:
                try:
                    line = resp.readline()
                except http.client.IncompleteRead:
                    rec.clean_end = False
                    return
                if not line:
                    # http.client reads the final zero-length chunk as EOF; a dropped socket
                    # without it surfaces as IncompleteRead above (or an OSError below).
                    rec.clean_end = True
                    return
                if line.strip():
                    rec.events.append((time.monotonic() - rec.started, json.loads(line)))
        except (OSError, http.client.HTTPException) as exc:
            rec.clean_end = False
            rec.error = repr(exc)
        finally:
            rec.ended = time.monotonic() - rec.started
            self._opened.set()
            conn.close()

    def wait_open(self, timeout: float = 5.0) -> None:
        """Block until the response headers arrived."""
        if not self._opened.wait(timeout):
            raise TimeoutError(f"watch {self.path} did not open within {timeout} s")

    def stop(self) -> WatchRecord:
        """Close the connection (if still open) and return the record."""
        if self._conn is not None and self._conn.sock is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(2)
        self.join(timeout=5)
        return self.record

    def wait_for(self, predicate: Any, timeout: float) -> dict[str, Any]:
        """Block until an event satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            events = self.record.events
            for _t, event in events[seen:]:
                if predicate(event):
                    return event
            seen = len(events)
            if not self.is_alive():
                break
            time.sleep(0.01)
        raise TimeoutError(f"no matching event on {self.path} within {timeout} s")


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
