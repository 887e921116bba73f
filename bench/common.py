"""What every benchmark shares: results, targets, the broker, child processes, the machine.

A figure measures one or more `Series` (one value per run, the baseline measured in the same
rounds as queuejob, interleaved so drift in the machine's load hits both alike), derives ratios
from their medians, and checks `Target`s. Nothing here talks to Prefect.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
BROKER_ENV = "QUEUEJOB_TEST_BROKER_URL"
MIN_RUNS = 3


class BenchError(Exception):
    """A benchmark could not be measured (not a missed target: the figure has no value)."""


# --- results -----------------------------------------------------------------------------------


@dataclass
class Series:
    """One measured quantity: a value per run; the figure reports the median."""

    key: str
    label: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""

    def add(self, value: float) -> None:
        """Record one run's value."""
        self.values.append(float(value))

    @property
    def median(self) -> float | None:
        """The median over runs (None before the first run)."""
        return statistics.median(self.values) if self.values else None

    def as_dict(self) -> dict[str, Any]:
        """For results.json."""
        return {
            "key": self.key,
            "label": self.label,
            "unit": self.unit,
            "values": [round(v, 6) for v in self.values],
            "median": None if self.median is None else round(self.median, 6),
            "min": round(min(self.values), 6) if self.values else None,
            "max": round(max(self.values), 6) if self.values else None,
            "note": self.note,
        }


@dataclass
class Target:
    """A figure's requirement: ``value op threshold``; a missing value misses the target."""

    label: str
    value: float | None
    op: Literal[">=", "<="]
    threshold: float
    unit: str
    measured: str = ""  # what the value is, e.g. "queuejob / docs' loop"
    detail: str = ""  # why it is missing, or how it was derived

    @property
    def passed(self) -> bool:
        """True when the value exists and meets the threshold."""
        if self.value is None:
            return False
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def as_dict(self) -> dict[str, Any]:
        """For results.json."""
        out = asdict(self)
        out["passed"] = self.passed
        return out


@dataclass
class Ratio:
    """A ratio of two series' medians."""

    label: str
    numerator: str
    denominator: str
    value: float | None

    def as_dict(self) -> dict[str, Any]:
        """For results.json."""
        return asdict(self)


@dataclass
class FigureResult:
    """Everything one figure measured."""

    key: str
    number: int
    title: str
    runs: int
    series: list[Series] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    elapsed_s: float = 0.0

    def new_series(self, key: str, label: str, unit: str, note: str = "") -> Series:
        """Add and return an empty series."""
        series = Series(key=key, label=label, unit=unit, note=note)
        self.series.append(series)
        return series

    def get(self, key: str) -> Series:
        """The series with this key."""
        for series in self.series:
            if series.key == key:
                return series
        raise KeyError(key)

    def ratio(self, label: str, numerator: str, denominator: str) -> float | None:
        """Add the ratio of two series' medians and return it (None when one is missing)."""
        num, den = self.get(numerator).median, self.get(denominator).median
        value = None if num is None or den is None or den == 0 else num / den
        self.ratios.append(Ratio(label, numerator, denominator, value))
        return value

    def target(
        self,
        label: str,
        value: float | None,
        op: Literal[">=", "<="],
        threshold: float,
        unit: str,
        *,
        measured: str = "",
        detail: str = "",
    ) -> Target:
        """Add and return a target."""
        t = Target(label, value, op, threshold, unit, measured=measured, detail=detail)
        self.targets.append(t)
        return t

    @property
    def passed(self) -> bool:
        """No error and every target met."""
        return self.error is None and all(t.passed for t in self.targets)

    def as_dict(self) -> dict[str, Any]:
        """For results.json."""
        return {
            "key": self.key,
            "number": self.number,
            "title": self.title,
            "runs": self.runs,
            "passed": self.passed,
            "error": self.error,
            "elapsed_s": round(self.elapsed_s, 1),
            "params": self.params,
            "series": [s.as_dict() for s in self.series],
            "ratios": [r.as_dict() for r in self.ratios],
            "targets": [t.as_dict() for t in self.targets],
            "notes": self.notes,
        }


# --- the run's context -------------------------------------------------------------------------


@dataclass
class Context:
    """What a figure needs: the broker, the number of runs, quick mode and a scratch directory."""

    broker_url: str
    runs: int
    quick: bool
    workdir: Path

    def scratch(self, name: str) -> Path:
        """A fresh directory under the run's scratch directory."""
        path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path


def say(message: str) -> None:
    """Progress on stderr (stdout stays for the tables)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def queue_name(figure: str) -> str:
    """A queue name no other run or test uses."""
    return f"qj-bench-{figure}-{uuid.uuid4().hex[:8]}"


def rounds(ctx: Context, label: str) -> Iterator[int]:
    """Run numbers 1..runs, announcing each."""
    for i in range(1, ctx.runs + 1):
        say(f"{label}: run {i}/{ctx.runs}")
        yield i


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; `BenchError` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.02)


# --- child processes ---------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a measured child process: ours, the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def run_child(
    args: Sequence[str], *, env: dict[str, str], timeout_s: float, what: str
) -> dict[str, Any]:
    """Run ``python -m bench.child ARGS`` and return the JSON object it prints last.

    The child's progress lines (stderr) are passed on as they come, and the last of them are
    kept for the error. The child runs in its own session; on a timeout its whole process
    group is killed, so nothing it started outlives the benchmark.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.child", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=15)
    out: list[str] = []

    def relay() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))
            print(f"[bench]     {line.rstrip()}", file=sys.stderr, flush=True)

    def collect() -> None:
        assert proc.stdout is not None
        out.extend(proc.stdout)

    readers = [threading.Thread(target=fn, daemon=True) for fn in (relay, collect)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        raise BenchError(f"{what} did not finish within {timeout_s:g} s") from None
    finally:
        for reader in readers:
            reader.join(timeout=5)
    lines = [line for line in out if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        text = "\n".join(tail)
        raise BenchError(f"{what} failed (exit code {proc.returncode}):\n{text}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- tools -------------------------------------------------------------------------------------


def ensure_amqp_tools() -> str | None:
    """The path of ``amqp-publish`` (Debian's ``amqp-tools``), installing it with apt-get when
    it is missing and we are root; None when it cannot be had."""
    found = shutil.which("amqp-publish")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        say("amqp-publish is missing (Debian package amqp-tools) and we cannot install it")
        return None
    say("installing amqp-tools (the docs' amqp-publish) with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "amqp-tools"],
    ):
        res = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
        if res.returncode != 0:
            say(f"{' '.join(cmd[:2])} failed (exit code {res.returncode})")
            return None
    return shutil.which("amqp-publish")


# --- the machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def rabbitmq_version(broker_url: str) -> str:
    """The broker's product and version, from its AMQP handshake."""
    from queuejob.flows.adapters import broker as broker_io

    try:
        conn = broker_io.connect(broker_io.BrokerConfig(url=broker_url))
    except Exception as exc:  # reported in the table instead of failing the run
        return f"unknown ({type(exc).__name__})"
    try:
        props = getattr(conn, "_impl").server_properties or {}  # noqa: B009 - pika's
        product = props.get("product", b"")
        version = props.get("version", b"")
        product = product.decode() if isinstance(product, bytes) else str(product)
        version = version.decode() if isinstance(version, bytes) else str(version)
        return f"{product} {version}".strip() or "unknown"
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def machine_info(broker_url: str) -> dict[str, Any]:
    """What the figures ran on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": cpus,
        "cpu": _cpu_model(),
        "ram_gib": _ram_gib(),
        "rabbitmq": rabbitmq_version(broker_url),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": [round(x, 2) for x in load],
    }


# --- Prefect -----------------------------------------------------------------------------------

PREFECT_HOME = ROOT / ".cache" / "bench-prefect-home"


def prefect_env(broker_url: str, workdir: Path) -> dict[str, str]:
    """Environment for a child that runs the flow: an ephemeral API on a Prefect home kept
    between benchmark runs (warm after the first), quiet logs, no telemetry, and the flow's own
    settings (broker, local backend state, ledgers) pointing into ``workdir``."""
    env = child_env(
        {
            "PREFECT_HOME": str(PREFECT_HOME),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "QUEUEJOB_BROKER_URL": broker_url,
            "QUEUEJOB_STATE_DIR": str(workdir / "local-jobs"),
            "QUEUEJOB_LEDGER_DIR": str(workdir / "ledgers"),
        }
    )
    env.pop("PREFECT_API_URL", None)
    return env
