"""A RabbitMQ cluster of three nodes on loopback, as production runs it (the cluster operator's
three replicas), for the cluster tier and the cluster benchmark.

Each node is Debian's ``rabbitmq-server`` with its own node name, AMQP and distribution ports,
data and logs; all share one private epmd and one Erlang cookie, and find each other through
``classic_config`` peer discovery, so the three form the cluster as they boot. A node may be
killed (SIGKILL), stopped (SIGTERM) and started again with its data, like a StatefulSet's pod
with its volume. `balancer` puts the tests' own TCP balancer in front of them, in the role of
the Kubernetes Service. `close` leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

from tests.broker.proxy import TcpProxy
from tests.reliability.private_broker import (
    BrokerStartError,
    answers_amqp,
    find_server,
    free_port,
    port_is_free,
)


class Node:
    """One node of the cluster."""

    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"{cluster.prefix}{index + 1}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.base = cluster.base / f"node{index + 1}"
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        b, c = self.base, self.cluster
        return {
            **os.environ,
            "HOME": str(c.base / "home"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(c.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(c.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(c.base / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(b / "rabbit.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(b / "feature_flags"),
            "ERL_CRASH_DUMP": str(b / "erl_crash.dump"),
        }

    def is_up(self) -> bool:
        """True when the node answers AMQP."""
        return answers_amqp(self.port, timeout=1.0)

    def launch(self) -> None:
        """Start the node's server process (returns at once; `wait_up` waits)."""
        binary = find_server()
        if binary is None:
            raise BrokerStartError("rabbitmq-server is not installed")
        if self.proc is not None and self.proc.poll() is None:
            return
        with (self.base / "server.out").open("ab") as log:
            self.proc = subprocess.Popen(
                [binary],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_up(self, timeout: float = 180.0) -> None:
        """Wait until the node answers AMQP and is running in the cluster."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                tail = (self.base / "server.out").read_text(errors="replace").splitlines()[-6:]
                raise BrokerStartError(f"node {self.name} exited while starting: {tail}")
            if self.is_up():
                return
            time.sleep(0.2)
        raise BrokerStartError(f"node {self.name} did not answer on port {self.port} in time")

    def start(self, timeout: float = 180.0) -> None:
        """Start the node (its data kept) and wait for it."""
        self.launch()
        self.wait_up(timeout)

    def kill(self) -> None:
        """SIGKILL the node (its whole process group): a crash, no goodbye to the cluster."""
        self._signal(signal.SIGKILL, grace_s=0)

    def stop(self, grace_s: float = 60.0) -> None:
        """Stop the node as a pod is stopped: SIGTERM, SIGKILL after ``grace_s``."""
        self._signal(signal.SIGTERM, grace_s=grace_s)

    def _signal(self, sig: int, *, grace_s: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=max(grace_s, 10))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the script
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            port_is_free(self.port) and port_is_free(self.dist_port)
        ):
            time.sleep(0.1)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <node> ARGS``; its stdout."""
        ctl = Path(find_server() or "rabbitmq-server").with_name("rabbitmqctl")
        res = subprocess.run(
            [str(ctl), "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.name}: {res.stderr[-400:]}")
        return res.stdout


class RabbitCluster:
    """Three clustered nodes under ``base`` whose only user is ``user``/``password``."""

    def __init__(self, base: Path, *, user: str, password: str, size: int = 3) -> None:
        self.base = Path(base)
        self.user = user
        self.password = password
        self.prefix = f"qjc{uuid.uuid4().hex[:6]}-"
        self.epmd_port = free_port()
        (self.base / "home").mkdir(parents=True, exist_ok=True)
        cookie = self.base / "home" / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        self.nodes = [Node(self, i) for i in range(size)]
        peers = "".join(
            f"cluster_formation.classic_config.nodes.{n.index + 1} = {n.name}\n" for n in self.nodes
        )
        (self.base / "rabbitmq.conf").write_text(
            f"default_user = {user}\n"
            f"default_pass = {password}\n"
            "loopback_users = none\n"
            "cluster_formation.peer_discovery_backend = classic_config\n"
            f"{peers}"
            "cluster_formation.randomized_startup_delay_range.min = 0\n"
            "cluster_formation.randomized_startup_delay_range.max = 1\n"
            "vm_memory_high_watermark.relative = 0.15\n"
            "disk_free_limit.absolute = 50MB\n"
            # A node down is noticed within seconds (net_ticktime), as on a real cluster.
            "net_ticktime = 10\n"
        )
        self._balancer: TcpProxy | None = None

    # -- the cluster ------------------------------------------------------------------------

    def start(self, timeout: float = 240.0) -> None:
        """Start the private epmd and every node at once; return when the cluster has formed."""
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1", "-daemon"],
                env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)},
                check=False,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_up(timeout)
        self.wait_formed(timeout)

    def wait_formed(self, timeout: float = 120.0) -> None:
        """Wait until every node runs as a member of one cluster."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                last = self.nodes[0].ctl("-q", "eval", "lists:usort(rabbit_nodes:all_running()).")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                last = str(exc)
            if all(n.name in last for n in self.nodes):
                return
            time.sleep(1.0)
        raise BrokerStartError(f"the cluster did not form in time: {last[-400:]}")

    def up(self) -> None:
        """Start every node that is not running (a case may have left one down)."""
        down = [n for n in self.nodes if not n.is_up()]
        for node in down:
            node.launch()
        for node in down:
            node.wait_up()
        if down:
            self.wait_formed()

    def node_url(self, node: Node) -> str:
        """The AMQP URL (with the password) of one node."""
        return self._url(f"127.0.0.1:{node.port}")

    def multi_url(self) -> str:
        """One URL naming every node: ``amqp://u:p@127.0.0.1:A,127.0.0.1:B,.../%2F``."""
        return self._url(",".join(f"127.0.0.1:{n.port}" for n in self.nodes))

    def balancer(self) -> TcpProxy:
        """The TCP balancer in front of the nodes (started on first use)."""
        if self._balancer is None:
            self._balancer = TcpProxy([("127.0.0.1", n.port) for n in self.nodes])
        return self._balancer

    @property
    def url(self) -> str:
        """The URL through the balancer: what a client of a Service uses."""
        return self._url(f"127.0.0.1:{self.balancer().port}")

    def _url(self, hosts: str) -> str:
        user = urllib.parse.quote(self.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        return f"amqp://{user}:{password}@{hosts}/%2F"

    def node_named(self, name: str) -> Node:
        """The node with this Erlang node name."""
        return next(n for n in self.nodes if n.name == name)

    def leader_of(self, queue: str) -> Node:
        """The node holding a quorum queue's leader (a classic queue's only copy)."""
        for node in self.nodes:
            if not node.is_up():
                continue
            out = node.ctl("-q", "list_queues", "--no-table-headers", "name", "leader", "pid")
            for line in out.splitlines():
                parts = line.split()
                if parts and parts[0] == queue:
                    where = next((p for p in parts[1:] if "@" in p), "")
                    where = where.strip("<>").split(".")[0] if where.startswith("<") else where
                    return self.node_named(where)
        raise LookupError(f"no node knows queue {queue!r}")

    def restart_in_background(self, node: Node, *, after_s: float = 0.0) -> threading.Thread:
        """Start ``node`` again from a thread, after ``after_s``."""

        def run() -> None:
            time.sleep(after_s)
            node.start()

        thread = threading.Thread(target=run, name=f"restart-{node.name}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop the balancer, every node and the epmd."""
        if self._balancer is not None:
            self._balancer.close()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(grace_s=20)
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"],
                check=False,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=10,
            )
