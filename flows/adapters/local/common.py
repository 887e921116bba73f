"""Constants of the local backend and its small helpers: state files, logs, Secret scrubbing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "QUEUEJOB_STATE_DIR"
JOB_UID_ENV = "QUEUEJOB_LOCAL_JOB_UID"
RUN_ENV = "QUEUEJOB_LOCAL_RUN"
POD_ENV = "QUEUEJOB_LOCAL_POD_UID"
LOG_TAIL_LINES = 50
POLL_S = 0.05
SUPERVISOR_START_TIMEOUT_S = 30.0
KILL_WAIT_S = 5.0  # after SIGKILL: how long to wait for the kernel to reap the processes

SUCCESS_REASON = "CompletionsReached"
SUCCESS_MESSAGE = "Reached expected number of succeeded pods"
BACKOFF_REASON = "BackoffLimitExceeded"
BACKOFF_MESSAGE = "Job has reached the specified backoff limit"
DEADLINE_REASON = "DeadlineExceeded"
DEADLINE_MESSAGE = "Job was active longer than specified deadline"
POLICY_REASON = "PodFailurePolicy"
# The DisruptionTarget a pod gets when the backend itself stopped it: its supervisor (the node)
# went away, as the pod garbage collector marks pods of a node that is gone.
LOST_REASON = "DeletionByPodGC"
LOST_MESSAGE = "the supervisor that ran the pod stopped; the pod was stopped with it"

# The environment a pod inherits from the machine; everything else comes from the Job's env, as
# in a container (so a flow's own settings and credentials do not leak into pods).
INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
POD_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the one Kubernetes uses for generateName
SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
FIELD_LABEL = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
SUPPORTED_FIELDS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.podIP",
    "status.hostIP",
)
UNSUPPORTED_JOB_FIELDS = (
    "successPolicy",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
)
PR_SET_PDEATHSIG = 1

# --- small helpers -------------------------------------------------------------------------------


def run_marker(namespace: str, label: str) -> str:
    """The value of the run marker on a Job's processes: a run's Jobs live in one namespace."""
    return f"{namespace}/{label}"


def iso(epoch: float) -> str:
    """A Kubernetes timestamp: RFC 3339, second precision, UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def default_state_dir() -> Path:
    """``$QUEUEJOB_STATE_DIR``, else ``~/.cache/queuejob/local-jobs``."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "queuejob" / "local-jobs"


def mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        path.chmod(0o700)


def write_json(path: Path, obj: Any, *, exclusive: bool = False) -> None:
    """Write JSON atomically with mode 0600: readers see the old or the new file, never half.

    With ``exclusive`` the file must not exist yet (FileExistsError otherwise).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, separators=(",", ":"))
        if exclusive:
            os.link(tmp, path)  # atomic create-if-absent
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def tail_of_file(path: Path, lines: int, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    if lines <= 0:
        return ""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            start = max(0, size - max_bytes)
            fh.seek(start)
            data = fh.read()
    except OSError:
        return ""
    parts = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and parts:
        parts = parts[1:]  # the first line was cut by the byte limit
    return "\n".join(parts[-lines:])


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][-._A-Za-z0-9]*)\)")


def expand(text: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command, args and env values: a variable the
    container defines is replaced, an unknown reference stays as written, ``$$`` is ``$``."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return defined[name] if name in defined else match.group(0)

    return _VAR_REF.sub(sub, text)


def secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """A key of a Secret, from ``stringData`` (which wins, as on the API server) or ``data``."""
    string_data = secret.get("stringData") or {}
    if key in string_data:
        return str(string_data[key])
    data = secret.get("data") or {}
    if key in data:
        try:
            return base64.b64decode(str(data[key]), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def sensitive_strings(secrets: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every Secret value worth scrubbing from logs, and the password inside a URL value."""
    out: set[str] = set()
    for secret in secrets:
        keys = set(secret.get("stringData") or {}) | set(secret.get("data") or {})
        for key in keys:
            value = secret_value(secret, key)
            if not value:
                continue
            out.add(value)
            with contextlib.suppress(ValueError):
                password = urllib.parse.urlsplit(value).password
                if password:
                    out.add(password)
                    out.add(urllib.parse.unquote(password))
    # Very short values would blank out ordinary words; longest first so a URL goes as a whole.
    return sorted((s for s in out if len(s) >= 4), key=len, reverse=True)


def scrub(text: str, sensitive: Sequence[str]) -> str:
    for value in sensitive:
        text = text.replace(value, "<redacted>")
    return text
