"""Processes of a local Job: a /proc reader, process-group signals, and stopping what is left."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from queuejob.flows.adapters.local.common import (
    JOB_UID_ENV,
    KILL_WAIT_S,
    POD_ENV,
    POLL_S,
    RUN_ENV,
    read_json,
)

# --- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Proc:
    pid: int
    pgid: int
    start: str  # kernel start time (clock ticks since boot): tells a reused pid apart
    job_uid: str | None
    run: str | None
    pod_uid: str | None


def _proc_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, pgid, start time) of a process from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    if len(rest) < 20:
        return None
    return rest[0], int(rest[2]), rest[19]


_MARKER_KEYS = (JOB_UID_ENV.encode(), RUN_ENV.encode(), POD_ENV.encode())


def _proc_markers(pid: int) -> dict[bytes, str]:
    """Our marker variables in a process's (initial) environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    if b"QUEUEJOB_LOCAL_" not in environ:
        return {}
    found: dict[bytes, str] = {}
    for entry in environ.split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key in _MARKER_KEYS:
            found[key] = value.decode("utf-8", errors="replace")
    return found


def _proc_table() -> dict[int, _Proc] | None:
    """Every live (non-zombie) process we can see, with its markers; None without /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    table: dict[int, _Proc] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        markers = _proc_markers(pid)
        table[pid] = _Proc(
            pid=pid,
            pgid=stat[1],
            start=stat[2],
            job_uid=markers.get(_MARKER_KEYS[0]),
            run=markers.get(_MARKER_KEYS[1]),
            pod_uid=markers.get(_MARKER_KEYS[2]),
        )
    return table


def proc_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[2] if stat else None


def _pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X")
    if Path("/proc/self/stat").exists():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    if pgid <= 1 or pgid == os.getpgrp():
        return  # never our own group (or init's)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_pid(pid: int, sig: int) -> None:
    if pid <= 1 or pid == os.getpid():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass(frozen=True, slots=True)
class Targets:
    """What to stop: processes by marker, and recorded process groups/pids as a fallback."""

    job_uids: frozenset[str] = frozenset()
    run: str | None = None
    pod_uids: frozenset[str] = frozenset()
    groups: tuple[tuple[int, str | None], ...] = ()  # (pgid, leader's start time when known)
    pids: tuple[tuple[int, str | None], ...] = ()  # (pid, start time when known)
    exclude: frozenset[int] = frozenset()

    def resolve(self) -> tuple[set[int], set[int]]:
        """(live pids to wait for, process groups to signal) right now."""
        exclude = self.exclude | {os.getpid()}
        table = _proc_table()
        if table is None:  # no /proc (macOS): trust the recorded ids where they still match
            pids = {p for p, _ in self.pids if p not in exclude and _pid_alive(p)}
            groups: set[int] = set()
            for pgid, _ in self.groups:
                with contextlib.suppress(OSError):
                    if os.getpgid(pgid) == pgid:
                        groups.add(pgid)
            return pids | groups, groups
        marked = {
            p.pid
            for p in table.values()
            if (p.job_uid is not None and p.job_uid in self.job_uids)
            or (self.run is not None and p.run == self.run)
            or (p.pod_uid is not None and p.pod_uid in self.pod_uids)
        }
        for pid, start in self.pids:
            proc = table.get(pid)
            if proc is not None and (start is None or proc.start == start):
                marked.add(pid)
        marked -= exclude
        groups = {table[p].pgid for p in marked}
        for pgid, start in self.groups:
            members = [p for p in table.values() if p.pgid == pgid]
            if not members:
                continue
            leader = table.get(pgid)
            # A recorded group is ours when its leader is the very process we started, or one of
            # its members carries our marker (a pid is not reused while its group has members).
            if (leader is not None and start is not None and leader.start == start) or any(
                p.pid in marked for p in members
            ):
                groups.add(pgid)
        groups.discard(os.getpgrp())
        alive = marked | {p.pid for p in table.values() if p.pgid in groups}
        return alive - exclude, groups


def stop_processes(targets: Targets, *, grace_s: float) -> list[int]:
    """SIGTERM every target group and process, SIGKILL what is left after ``grace_s``.

    Returns the pids still alive at the end (empty unless the kernel could not kill them).
    """
    alive, groups = targets.resolve()
    if not alive and not groups:
        return []
    termed_groups: set[int] = set()
    termed: set[int] = set()
    deadline = time.monotonic() + grace_s
    while True:
        # Each group and process gets one SIGTERM, also those born meanwhile (a pod started just
        # before its supervisor stopped); a second one could cut a graceful shutdown short.
        for pgid in groups - termed_groups:
            signal_group(pgid, signal.SIGTERM)
        for pid in alive - termed:
            _signal_pid(pid, signal.SIGTERM)
        termed_groups |= groups
        termed |= alive
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
        alive, groups = targets.resolve()
        if not alive:
            return []
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        alive, groups = targets.resolve()
        if not alive:
            return []
        for pgid in groups:
            signal_group(pgid, signal.SIGKILL)
        for pid in alive:
            _signal_pid(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            return sorted(alive)
        time.sleep(POLL_S)


def libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


def job_targets(job: Mapping[str, Any], *, exclude: Collection[int] = ()) -> Targets:
    """Every process a Job's state knows of, and its markers."""
    meta = job.get("metadata") or {}
    local = job.get("local") or {}
    uid = str(meta.get("uid") or "")
    groups = [
        (int(p["pgid"]), p.get("procStart"))
        for p in local.get("pods") or []
        if p.get("pgid") and p.get("phase") == "Running"
    ]
    pids: list[tuple[int, str | None]] = []
    sup = local.get("supervisor") or {}
    for key in ("pid", "watchdogPid"):
        if sup.get(key):
            pids.append((int(sup[key]), sup.get(f"{key}Start")))
    return Targets(
        job_uids=frozenset({uid}) if uid else frozenset(),
        groups=tuple(groups),
        pids=tuple(pids),
        exclude=frozenset(exclude),
    )


def watchdog(read_fd: int, job_file: Path, job_uid: str, grace_s: float) -> None:
    """Block until the supervisor's end of the pipe closes (it exited or was killed), then stop
    whatever is left of the Job's processes."""
    while True:
        try:
            chunk = os.read(read_fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            break
    job = read_json(job_file) or {}
    if (job.get("metadata") or {}).get("uid") != job_uid:
        job = {"metadata": {"uid": job_uid}}  # deleted, perhaps re-created: not ours to read
    targets = job_targets(job, exclude={os.getpid()})
    if not targets.job_uids:
        targets = Targets(
            job_uids=frozenset({job_uid}), groups=targets.groups, exclude=targets.exclude
        )
    # The supervisor's own pid is in the targets; it is dead (or a zombie) by now.
    left = stop_processes(targets, grace_s=grace_s)
    if left:
        print(f"watchdog: pids {left} did not exit", file=sys.stderr, flush=True)
