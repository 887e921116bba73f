"""A private RabbitMQ the reliability tests may stop, start and restart.

It runs the installed ``rabbitmq-server`` with its own node name, AMQP/distribution/epmd ports and
its data (mnesia) and logs under a directory the test owns. The ports and the data directory stay
the same across a restart, so durable queues and persistent messages survive it and every URL
handed out stays valid. Its only user is made from ``rabbitmq.conf`` (``default_user`` /
``default_pass``), so the tests can use a password they recognise anywhere it leaks.

Stopping sends SIGTERM to the server's process group (SIGKILL after a grace period) and then
stops its private epmd; `close` always leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
SERVER_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server")


class BrokerStartError(RuntimeError):
    """The private broker did not come up."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_amqp(port: int, timeout: float = 1.0) -> bool:
    """True when 127.0.0.1:port answers the AMQP 0-9-1 protocol header with a method frame."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(AMQP_HEADER)
            head = sock.recv(7)
            return len(head) == 7 and head[0] == 1
    except OSError:
        return False


def port_is_free(port: int) -> bool:
    """True when 127.0.0.1:port can be bound (nothing listens on it, no socket lingers)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_server() -> str | None:
    """The rabbitmq-server script (the real one, not Debian's wrapper that switches user)."""
    for candidate in SERVER_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return shutil.which("rabbitmq-server")


class PrivateBroker:
    """One private RabbitMQ node under ``base`` (see the module docstring)."""

    def __init__(self, base: Path, *, user: str, password: str) -> None:
        self.base = Path(base)
        self.user = user
        self.password = password
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"qjrel{uuid.uuid4().hex[:8]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stops = 0
        self._lock = threading.Lock()
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        for sub in ("home", "mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"default_user = {user}\n"
            f"default_pass = {password}\n"
            "loopback_users = none\n"
            "vm_memory_high_watermark.relative = 0.2\n"
            "disk_free_limit.absolute = 50MB\n"
        )

    @property
    def url(self) -> str:
        """The AMQP URL (with the password) of this broker's default vhost."""
        user = urllib.parse.quote(self.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        b = self.base
        return {
            **os.environ,
            "HOME": str(b / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(b / "rabbit.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(b / "feature_flags"),
            "ERL_CRASH_DUMP": str(b / "erl_crash.dump"),
        }

    # --- lifecycle -------------------------------------------------------------------------------

    def is_up(self) -> bool:
        """True when the node answers AMQP now."""
        return answers_amqp(self.port)

    def start(self, timeout: float = 120.0) -> None:
        """Start the node (same ports, same data) and return once it answers AMQP.

        A node that exits while booting (on a loaded machine, a port of the previous node may
        linger a moment longer) is started once more before giving up.
        """
        try:
            self._start_once(timeout)
        except BrokerStartError:
            self.stop()
            self._start_once(timeout)

    def _start_once(self, timeout: float) -> None:
        binary = find_server()
        if binary is None:
            raise BrokerStartError("rabbitmq-server is not installed")
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            with (self.base / "server.out").open("ab") as log:
                self.proc = subprocess.Popen(
                    [binary],
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.starts += 1
            proc = self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.base / "server.out").read_text(errors="replace").splitlines()[-8:]
                raise BrokerStartError(
                    f"rabbitmq-server exited with {proc.returncode} while starting: "
                    + " | ".join(tail)
                )
            if answers_amqp(self.port):
                return
            time.sleep(0.2)
        self.stop()
        raise BrokerStartError(f"rabbitmq-server did not answer on port {self.port} in time")

    def start_in_background(
        self, *, when: Callable[[], bool] | None = None, wait_s: float = 120.0
    ) -> threading.Thread:
        """Start the node from a thread, once ``when()`` is true (polled for up to ``wait_s``);
        `join_start` waits for the start and re-raises its error."""

        def run() -> None:
            try:
                deadline = time.monotonic() + wait_s
                while when is not None and not when():
                    if time.monotonic() > deadline:
                        raise BrokerStartError(f"the start condition did not hold in {wait_s} s")
                    time.sleep(0.05)
                self.start()
            except BaseException as exc:  # reported by join_start
                self._start_error = exc

        self._start_error = None
        self._starter = threading.Thread(target=run, name="private-broker-start", daemon=True)
        self._starter.start()
        return self._starter

    def join_start(self, timeout: float = 150.0) -> None:
        """Wait for a background start to finish; re-raise its error."""
        if self._starter is not None:
            self._starter.join(timeout)
            if self._starter.is_alive():
                raise BrokerStartError("the background start of the private broker hung")
            self._starter = None
        if self._start_error is not None:
            err, self._start_error = self._start_error, None
            raise err

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``grace_s``, then stop its epmd."""
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # The group may hold helpers (erl_child_setup, inet_gethost) that outlive the script.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.stops += 1
        self._kill_epmd()
        # The next start binds the same ports: wait until they are free.
        ports = (self.port, self.dist_port, self.epmd_port)
        deadline = time.monotonic() + 30
        while not all(port_is_free(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.1)

    def unacked(self, queue: str) -> int | None:
        """The queue's unacknowledged messages, read from the broker itself (``rabbitmqctl
        list_queues``: exact, unlike the management API's sampled stats); None when the queue
        does not exist."""
        ctl = Path(find_server() or "rabbitmq-server").with_name("rabbitmqctl")
        out = subprocess.run(
            [str(ctl), "-n", self.node, "-q", "list_queues", "--no-table-headers",
             "name", "messages_unacknowledged"],
            env=self._env(), capture_output=True, text=True, timeout=60, check=True,
            stdin=subprocess.DEVNULL,
        ).stdout  # fmt: skip
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        return None

    def restart(self) -> None:
        """Stop, then start again with the same data."""
        self.stop()
        self.start()

    def _kill_epmd(self) -> None:
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )

    def close(self) -> None:
        """Stop everything (a background start is waited for first)."""
        with contextlib.suppress(BaseException):
            self.join_start(timeout=150)
        self.stop()
