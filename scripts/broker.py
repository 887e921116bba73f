#!/usr/bin/env python3
"""Find or start a RabbitMQ broker for tests and the demo (standard library only).

Order:
  1. the URL in QUEUEJOB_TEST_BROKER_URL;
  2. a broker already answering AMQP on 127.0.0.1:5672 (guest/guest);
  3. a private `rabbitmq-server` started from the installed binary: its own node name, free ports,
     data under .cache/rabbitmq, stopped again by `stop` (or when `run` ends);
  4. if the binary is missing and we are root with apt-get: install Debian's rabbitmq-server and
     amqp-tools first, then 3.

Usage:
  scripts/broker.py ensure          print the broker URL on stdout (progress on stderr)
  scripts/broker.py stop            stop the private broker if this checkout started one
  scripts/broker.py run -- CMD ...  ensure, run CMD with QUEUEJOB_TEST_BROKER_URL set, then stop
                                    the private broker if this call started it
  scripts/broker.py run --rabbitmq4 -- CMD ...
                                    the same with a private RabbitMQ 4 (Debian trixie's
                                    rabbitmq-server in the chroot scripts/rabbitmq4.sh builds),
                                    whatever else is running

The password in a URL is never printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".cache" / "rabbitmq"
STATE_FILE = STATE_DIR / "state.json"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
START_TIMEOUT_S = 90.0


class BrokerNotFound(RuntimeError):
    """No broker could be found or started."""


def say(msg: str) -> None:
    print(f"[broker] {msg}", file=sys.stderr, flush=True)


def redact(url: str) -> str:
    """The URL with its password replaced."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "127.0.0.1", parts.port or default


def answers_amqp(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when host:port speaks AMQP 0-9-1 (the server answers our protocol header with a
    connection.start method frame), not merely accepts TCP."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(AMQP_HEADER)
            head = sock.recv(7)
            return len(head) == 7 and head[0] == 1  # frame type 1 = method, on channel 0
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state() -> dict[str, object] | None:
    try:
        data = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def install_rabbitmq() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BrokerNotFound(
            "rabbitmq-server is not installed and this script cannot install it (needs root and "
            "apt-get). Install it (Debian: apt-get install rabbitmq-server amqp-tools), or point "
            "QUEUEJOB_TEST_BROKER_URL at a broker"
        )
    say("rabbitmq-server not installed: installing Debian's rabbitmq-server and amqp-tools")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "rabbitmq-server",
            "amqp-tools",
        ],
    ):
        res = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
            raise BrokerNotFound(f"{' '.join(cmd)} failed: " + " | ".join(tail))
    # Debian's package starts a system broker where it can; we run our own, so stop it quietly.
    say("installed rabbitmq-server")


def find_server() -> str | None:
    """The server script. Debian's /usr/sbin wrapper switches to the rabbitmq user (which could
    not write our .cache), so prefer the real script it wraps."""
    for candidate in ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server"):
        if Path(candidate).exists():
            return candidate
    return shutil.which("rabbitmq-server")


def private_env(
    port: int, dist_port: int, epmd_port: int, state: Path = STATE_DIR, inside: Path | None = None
) -> dict[str, str]:
    """The server's environment; its files under ``state``, named as ``inside`` (the same
    directory as seen from within a chroot)."""
    home = state / "home"
    for sub in (home, state / "mnesia", state / "log"):
        sub.mkdir(parents=True, exist_ok=True)
    plugins = state / "enabled_plugins"
    if not plugins.exists():
        plugins.write_text("[].\n")
    conf = state / "rabbitmq.conf"
    conf.write_text(
        "loopback_users.guest = true\n"
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        "vm_memory_high_watermark.relative = 0.2\n"
        "disk_free_limit.absolute = 50MB\n"
    )
    env = _server_env(port, dist_port, epmd_port, inside or state)
    if inside is None:
        return {**os.environ, **env}
    # In the chroot only what the server needs: the host's PATH and libraries are not there.
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **env}


def _server_env(port: int, dist_port: int, epmd_port: int, state: Path) -> dict[str, str]:
    home = state / "home"
    plugins = state / "enabled_plugins"
    conf = state / "rabbitmq.conf"
    STATE = state
    return {
        "HOME": str(home),
        "RABBITMQ_NODENAME": "queuejob@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_MNESIA_BASE": str(STATE / "mnesia"),
        "RABBITMQ_LOG_BASE": str(STATE / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_CONFIG_FILE": str(conf.with_suffix("")),
        "RABBITMQ_PID_FILE": str(STATE / "rabbit.pid"),
        "RABBITMQ_FEATURE_FLAGS_FILE": str(STATE / "feature_flags"),
        "ERL_CRASH_DUMP": str(STATE / "erl_crash.dump"),
    }


def rabbitmq4_root() -> Path:
    """The RabbitMQ 4 chroot, built (once, cached outside the repository) if missing."""
    script = ROOT / "scripts" / "rabbitmq4.sh"
    res = subprocess.run(["bash", str(script), "build"], stdin=subprocess.DEVNULL, check=False)
    if res.returncode != 0:
        raise BrokerNotFound("the RabbitMQ 4 chroot could not be built (scripts/rabbitmq4.sh)")
    out = subprocess.run(
        ["bash", str(script), "root"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not out:
        raise BrokerNotFound("the RabbitMQ 4 chroot is missing after its build")
    return Path(out)


def start_private(chroot: Path | None = None) -> str:
    state = STATE_DIR
    inside: Path | None = None
    if chroot is not None:
        # The data lives inside the chroot, where the server sees it.
        inside = Path("/var/lib/queuejob-test-broker")
        state = chroot / inside.relative_to("/")
        command = ["chroot", str(chroot), "/usr/lib/rabbitmq/bin/rabbitmq-server"]
    else:
        binary = find_server()
        if binary is None:
            install_rabbitmq()
            binary = find_server()
            if binary is None:
                raise BrokerNotFound("rabbitmq-server is still missing after the install")
        command = [binary]
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    # Fresh data on every start: queues left by an earlier session must not leak into this one.
    shutil.rmtree(state / "mnesia", ignore_errors=True)
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    env = private_env(port, dist_port, epmd_port, state, inside)
    which = "RabbitMQ 4 (chroot)" if chroot is not None else "rabbitmq-server"
    say(f"starting a private {which} on 127.0.0.1:{port}")
    log = open(STATE_DIR / "server.out", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    STATE_FILE.write_text(
        json.dumps({"pid": proc.pid, "port": port, "epmd_port": epmd_port, "url": url})
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (STATE_DIR / "server.out").read_text(errors="replace").strip().splitlines()[-8:]
            STATE_FILE.unlink(missing_ok=True)
            raise BrokerNotFound(
                f"rabbitmq-server exited with code {proc.returncode} while starting: "
                + " | ".join(tail)
            )
        if answers_amqp("127.0.0.1", port, timeout=1.0):
            say(f"private broker answers on 127.0.0.1:{port}")
            return url
        time.sleep(0.5)
    stop_private()
    raise BrokerNotFound(
        f"rabbitmq-server did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s; "
        "see .cache/rabbitmq/server.out"
    )


def ensure(rabbitmq4: bool = False) -> tuple[str, bool]:
    """Return (url, started_here)."""
    if rabbitmq4:
        return start_private(rabbitmq4_root()), True
    env_url = os.environ.get("QUEUEJOB_TEST_BROKER_URL")
    if env_url:
        host, port = host_port(env_url)
        say(f"using QUEUEJOB_TEST_BROKER_URL={redact(env_url)}")
        if not answers_amqp(host, port):
            raise BrokerNotFound(
                f"QUEUEJOB_TEST_BROKER_URL points at {host}:{port}, which does not answer AMQP; "
                "start that broker or unset the variable"
            )
        return env_url, False
    say("checking for a broker on 127.0.0.1:5672")
    if answers_amqp("127.0.0.1", 5672):
        say("using the broker on 127.0.0.1:5672 (guest/guest)")
        return DEFAULT_URL, False
    state = read_state()
    if state and isinstance(state.get("pid"), int) and pid_alive(int(state["pid"])):  # type: ignore[arg-type]
        url = str(state["url"])
        host, port = host_port(url)
        if answers_amqp(host, port):
            say(f"reusing the private broker on {host}:{port}")
            return url, False
    say("no broker on 127.0.0.1:5672")
    return start_private(), True


def stop_private() -> None:
    state = read_state()
    if not state:
        return
    pid = int(state.get("pid", 0))  # type: ignore[call-overload]
    if pid and pid_alive(pid):
        say(f"stopping the private broker (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and pid_alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    epmd_port = state.get("epmd_port")
    if epmd_port and shutil.which("epmd"):
        subprocess.run(
            ["epmd", "-port", str(epmd_port), "-kill"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    STATE_FILE.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd = argv[0]
    try:
        if cmd == "ensure":
            url, _ = ensure()
            print(url)
            return 0
        if cmd == "stop":
            stop_private()
            return 0
        if cmd == "run":
            rest = argv[1:]
            rabbitmq4 = rest[:1] == ["--rabbitmq4"]
            if rabbitmq4:
                rest = rest[1:]
                # Its own state file: a 3.x broker this checkout started stays untouched.
                global STATE_FILE
                STATE_FILE = STATE_DIR / "state-rabbitmq4.json"
            if rest[:1] == ["--"]:
                rest = rest[1:]
            if not rest:
                print("usage: broker.py run [--rabbitmq4] -- CMD ...", file=sys.stderr)
                return 2
            url, started = ensure(rabbitmq4)
            try:
                env = {**os.environ, "QUEUEJOB_TEST_BROKER_URL": url}
                return subprocess.call(rest, env=env)
            finally:
                if started:
                    stop_private()
    except BrokerNotFound as exc:
        say(f"ERROR: {exc}")
        return 3
    print(f"unknown command {cmd!r}; see --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
