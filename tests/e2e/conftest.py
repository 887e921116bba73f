"""The end-to-end stack: a real Prefect server, the work pools, queuejob's deployments from
``deployments/prefect.yaml`` and a process worker, started once per session and always stopped.

Every process started here runs in a session (process group) of its own, with a temporary
PREFECT_HOME and a free port, and with the environment marker ``TMPDIR=<session dir>/tmp``. Every
descendant inherits that marker - flow-run processes, which the worker starts in sessions of their
own, and the local backend's Job supervisors and pods, which keep ``TMPDIR`` from the flow's
environment - so teardown finds and stops all of them, also when a test failed half-way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import psutil
import pytest

from tests.foreground import sigint_delivered

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
PREFECT_FILE = "deployments/prefect.yaml"
FLOW_NAME = "queuejob"
LOCAL_POOL = "queuejob-local"
K8S_POOL = "queuejob-k8s"
ON_DEMAND_QUEUE = "on-demand"
BROKER_BLOCK = "queuejob-broker"

SERVER_START_TIMEOUT_S = 150.0
WORKER_START_TIMEOUT_S = 90.0
CLI_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0
SWEEP_TIMEOUT_S = 15.0

T = TypeVar("T")

# Saves the RabbitMQBroker block through the server's API. The URL arrives through the
# environment, never the command line, where `ps` would show its password.
_SAVE_BROKER_BLOCK = """
import os
from queuejob.blocks import RabbitMQBroker
block = RabbitMQBroker.from_url(os.environ["QUEUEJOB_E2E_BROKER_URL"])
block.save(os.environ["QUEUEJOB_E2E_BLOCK_NAME"], overwrite=True)
"""


def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    detail: Callable[[], str] = lambda: "",
    interval: float = 0.5,
) -> T:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class Service:
    """A long-running child (server, worker) in a session of its own, output to a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], *, env: dict[str, str], cwd: Path, log: Path
    ) -> None:
        self.name = name
        self.log = log
        self._fh: IO[bytes] = log.open("ab")
        with sigint_delivered():  # the worker is stopped with Ctrl-C, as a user stops it
            self.proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.name} log ({self.log}) ---\n{_tail(self.log, lines)}"

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal the whole group, give it a grace period, then kill what is left of it."""
        try:
            _killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_GRACE_S)
            # Whatever is left of the group (a stuck leader, or children that outlived it).
            _killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5.0)
        finally:
            self._fh.close()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def marked_pids(marker: str) -> list[int]:
    """Live processes (other than this one) whose environment carries TMPDIR=marker."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("TMPDIR") == marker:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours to read
    return [pid for pid in found if pid != os.getpid()]


def sweep(marker: str) -> list[str]:
    """Kill every process still carrying the marker; return what had been left behind."""
    left = []
    for pid in marked_pids(marker):
        try:
            proc = psutil.Process(pid)
            left.append(f"{pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except (psutil.Error, OSError):
            continue
    wait_for(
        lambda: not marked_pids(marker),
        timeout=SWEEP_TIMEOUT_S,
        what="the e2e stack's processes to exit",
        detail=lambda: f"still alive: {marked_pids(marker)}",
        interval=0.2,
    )
    return left


@dataclass(frozen=True)
class Cmd:
    """A command for `PrefectStack.cli`, with environment variables of its own."""

    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)


class PrefectStack:
    """A running Prefect server and how to talk to it: REST, and the `prefect` CLI."""

    def __init__(self, *, root: Path, port: int, env: dict[str, str]) -> None:
        self.root = root
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.env = env
        self.ledger_dir = Path(env["QUEUEJOB_LEDGER_DIR"])
        self.services: dict[str, Service] = {}
        self.deploy_output = ""
        self.http = httpx.Client(base_url=self.api_url, timeout=30.0)

    # --- REST ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """One API call; a 503 (the server's database busy, its transaction rolled back) is
        tried again after a pause, as Prefect's own client does, at most 5 times."""
        for attempt in range(5):
            response = self.http.request(method, path, json=body)
            if response.status_code != 503:
                break
            time.sleep(0.5 * 2**attempt)
        return response

    def get(self, path: str) -> Any:
        return self._ok(self.request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        return self._ok(self.request("POST", path, body))

    def _ok(self, response: httpx.Response) -> Any:
        if response.is_error:
            raise AssertionError(
                f"{response.request.method} {response.request.url} -> {response.status_code}: "
                f"{response.text[:2000]}"
            )
        return response.json() if response.content else None

    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    # --- processes -------------------------------------------------------------------------

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, argv, env=env or self.env, cwd=ROOT, log=self.root / f"{name}.log")
        self.services[name] = service
        return service

    def cli(self, *commands: Cmd) -> list[str]:
        """Run independent commands at once, wait for all; fail with the output of one that
        failed. Returns their outputs in order."""
        procs = [
            subprocess.Popen(
                list(cmd.argv),
                cwd=ROOT,
                env={**self.env, **cmd.env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            for cmd in commands
        ]
        outputs = []
        try:
            for cmd, proc in zip(commands, procs, strict=True):
                out, _ = proc.communicate(timeout=CLI_TIMEOUT_S)
                if proc.returncode != 0:
                    raise AssertionError(
                        f"{' '.join(cmd.argv[:6])} exited {proc.returncode}:\n{out[-4000:]}"
                    )
                outputs.append(out)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    _killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5.0)
        return outputs

    def diagnostics(self) -> str:
        return "\n".join(s.tail() for s in self.services.values())


@pytest.fixture(scope="session")
def prefect_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[PrefectStack]:
    """`prefect server start` on a free port with a temporary PREFECT_HOME; stopped at the end
    together with everything the session started."""
    root = tmp_path_factory.mktemp("e2e")
    marker = root / "tmp"
    marker.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QUEUEJOB_"))}
    env.update(
        {
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_CLI_WRAP_LINES": "false",
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(marker),
            # The flow run reads these (inherited from the worker); the broker comes from the
            # block only: QUEUEJOB_BROKER_URL is deliberately absent.
            "QUEUEJOB_STATE_DIR": str(root / "local-jobs"),
            "QUEUEJOB_LEDGER_DIR": str(root / "ledgers"),
        }
    )
    stack = PrefectStack(root=root, port=port, env=env)
    try:
        server = stack.start(
            "server",
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "PREFECT_LOGGING_LEVEL": "WARNING"},
        )

        def up() -> bool:
            if not server.alive():
                raise AssertionError(f"prefect server exited early\n{server.tail()}")
            return stack.healthy()

        wait_for(
            up, timeout=SERVER_START_TIMEOUT_S, what="the Prefect server's health check",
            detail=server.tail,
        )  # fmt: skip
        yield stack
    finally:
        stack.http.close()
        for name in reversed(list(stack.services)):
            stack.services[name].stop(signal.SIGINT if name == "worker" else signal.SIGTERM)
        left = sweep(str(marker))
        if left:
            message = "processes left behind by the e2e stack (killed):\n" + "\n".join(left)
            if request.session.testsfailed:
                # A test failed mid-run: its flow run and pods were still going. Not news.
                warnings.warn(message, stacklevel=1)
            else:
                # Every run had ended and the worker stopped cleanly: this is a leak.
                raise AssertionError(message)


@pytest.fixture(scope="session")
def deployed(prefect_server: PrefectStack, broker_url: str) -> PrefectStack:
    """The blocks registered, a RabbitMQBroker block saved, both work pools created, every
    deployment of deployments/prefect.yaml deployed and a process worker polling the local
    pool's on-demand queue."""
    stack = prefect_server
    stack.cli(
        Cmd([PREFECT, "block", "register", "-m", "queuejob.blocks"]),
        Cmd([PREFECT, "work-pool", "create", LOCAL_POOL, "--type", "process"]),
        Cmd([PREFECT, "work-pool", "create", K8S_POOL, "--type", "kubernetes"]),
    )
    stack.deploy_output, _ = stack.cli(
        Cmd([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", PREFECT_FILE]),
        Cmd(
            [sys.executable, "-c", _SAVE_BROKER_BLOCK],
            env={"QUEUEJOB_E2E_BROKER_URL": broker_url, "QUEUEJOB_E2E_BLOCK_NAME": BROKER_BLOCK},
        ),
    )
    # Only the on-demand queue: a nightly run falling due while the tests run stays queued.
    worker = stack.start(
        "worker",
        [PREFECT, "worker", "start", "--pool", LOCAL_POOL, "--type", "process",
         "--work-queue", ON_DEMAND_QUEUE],
        env={**stack.env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
    )  # fmt: skip

    def polling() -> bool:
        if not worker.alive():
            raise AssertionError(f"the worker exited early\n{worker.tail()}")
        return bool(stack.post(f"/work_pools/{LOCAL_POOL}/workers/filter", {}))

    wait_for(
        polling, timeout=WORKER_START_TIMEOUT_S, what="the worker's first heartbeat",
        detail=worker.tail,
    )  # fmt: skip
    return stack
