"""Readiness: a real AMQP handshake with back-off, and which failures are retried."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from queuejob.flows.adapters.broker import BrokerConfig, QueueSettings, wait_for_broker
from queuejob.flows.core.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    ConfigError,
    InvalidInput,
    RetryableError,
)

pytestmark = pytest.mark.broker

PASSWORD = "s3cret-Pa55word"


def _chain_text(exc: BaseException) -> str:
    """Everything an operator could see of an exception: str, repr, causes and contexts."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) but never speaks AMQP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def _with_credentials(url: str, user: str, password: str, vhost: str | None = None) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{parts.hostname}:{parts.port}"
    path = parts.path if vhost is None else "/" + urllib.parse.quote(vhost, safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path))


def test_ready_broker_answers_on_first_attempt(cfg: BrokerConfig) -> None:
    attempts: list[int] = []
    start = time.monotonic()
    wait_for_broker(cfg, deadline_s=10, on_attempt=lambda n, _e: attempts.append(n))
    assert attempts == []
    assert time.monotonic() - start < 5


def test_closed_port_fails_by_its_deadline_with_a_clear_message() -> None:
    port = _free_port()
    cfg = BrokerConfig(f"amqp://app:{PASSWORD}@127.0.0.1:{port}/%2F", connect_timeout_s=1.0)
    attempts: list[tuple[int, Exception]] = []
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        wait_for_broker(
            cfg,
            deadline_s=1.5,
            base_delay_s=0.1,
            max_delay_s=0.4,
            on_attempt=lambda n, e: attempts.append((n, e)),
        )
    elapsed = time.monotonic() - start
    assert 1.4 <= elapsed < 4.0
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "vhost '/'" in message
    assert "1.5 s" in message
    assert "refused" in message.lower()
    assert isinstance(info.value, RetryableError)
    # Capped exponential back-off: several attempts, numbered from 1, each a BrokerUnavailable.
    assert len(attempts) >= 3
    assert [n for n, _ in attempts] == list(range(1, len(attempts) + 1))
    assert all(isinstance(e, BrokerUnavailable) for _, e in attempts)
    assert PASSWORD not in _chain_text(info.value)
    assert all(PASSWORD not in _chain_text(e) for _, e in attempts)


def test_a_silent_server_times_out_and_is_retried(silent_port: int) -> None:
    cfg = BrokerConfig(f"amqp://app:{PASSWORD}@127.0.0.1:{silent_port}/", connect_timeout_s=0.5)
    attempts: list[int] = []
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        wait_for_broker(
            cfg, deadline_s=1.5, base_delay_s=0.05, on_attempt=lambda n, _e: attempts.append(n)
        )
    assert time.monotonic() - start < 4.0
    assert len(attempts) >= 2
    assert "timed out" in str(info.value)
    assert f"127.0.0.1:{silent_port}" in str(info.value)
    assert PASSWORD not in _chain_text(info.value)


def test_bad_credentials_fail_after_one_attempt(broker_url: str) -> None:
    cfg = BrokerConfig(_with_credentials(broker_url, "guest", PASSWORD))
    attempts: list[tuple[int, Exception]] = []
    start = time.monotonic()
    with pytest.raises(BrokerAuthError) as info:
        wait_for_broker(cfg, deadline_s=30, on_attempt=lambda n, e: attempts.append((n, e)))
    assert time.monotonic() - start < 5  # not after a deadline's worth of retries
    assert len(attempts) == 1
    assert attempts[0][1] is info.value
    assert not info.value.retryable
    message = str(info.value)
    assert "'guest'" in message and f"{cfg.host}:{cfg.port}" in message
    assert "ACCESS_REFUSED" in message
    assert PASSWORD not in _chain_text(info.value)


@pytest.fixture
def resetting_port() -> Iterator[int]:
    """An AMQP server that sends Connection.Start, reads the client's Start-Ok (the
    credentials) and then resets the socket, as a booting RabbitMQ may."""
    from pika import frame, spec

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    start = frame.Method(
        0, spec.Connection.Start(server_properties={}, mechanisms="PLAIN", locales="en_US")
    ).marshal()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(8)  # the protocol header
                    conn.sendall(start)
                    conn.recv(4096)  # Start-Ok
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def test_a_reset_during_the_handshake_is_retried_not_an_auth_error(resetting_port: int) -> None:
    """pika calls this a probable authentication error; it is not one, the broker said nothing."""
    cfg = BrokerConfig(f"amqp://app:{PASSWORD}@127.0.0.1:{resetting_port}/", connect_timeout_s=1)
    attempts: list[int] = []
    with pytest.raises(BrokerUnavailable) as info:
        wait_for_broker(
            cfg, deadline_s=1.0, base_delay_s=0.05, on_attempt=lambda n, _e: attempts.append(n)
        )
    assert len(attempts) >= 2, "retried, not given up after one attempt"
    assert info.value.retryable
    assert "reset by peer" in str(info.value)  # the last cause, named
    assert PASSWORD not in _chain_text(info.value)


def test_unknown_vhost_is_permanent(broker_url: str) -> None:
    cfg = BrokerConfig(_with_credentials(broker_url, "guest", "guest", vhost="qj-no-such-vhost"))
    attempts: list[int] = []
    with pytest.raises(BrokerAuthError) as info:
        wait_for_broker(cfg, deadline_s=30, on_attempt=lambda n, _e: attempts.append(n))
    assert attempts == [1]
    assert "qj-no-such-vhost" in str(info.value)


def test_dns_failure_is_retryable() -> None:
    cfg = BrokerConfig(f"amqp://app:{PASSWORD}@qj-no-such-host.invalid/", connect_timeout_s=1)
    attempts: list[int] = []
    with pytest.raises(BrokerUnavailable) as info:
        wait_for_broker(
            cfg, deadline_s=0.8, base_delay_s=0.05, on_attempt=lambda n, _e: attempts.append(n)
        )
    assert len(attempts) >= 2
    assert "qj-no-such-host.invalid" in str(info.value)
    assert PASSWORD not in _chain_text(info.value)


# --- configuration ----------------------------------------------------------------------------


def test_config_never_shows_the_password() -> None:
    cfg = BrokerConfig(
        f"amqps://app:{urllib.parse.quote('p@ss/w0rd!', safe='')}@mq.example:5671/jobs"
    )
    shown = [repr(cfg), str(cfg), f"{cfg}", cfg.redacted(), cfg.describe()]
    assert all("p%40ss" not in s and "p@ss" not in s for s in shown)
    assert cfg.redacted() == "amqps://app:***@mq.example:5671/jobs"
    assert cfg.describe() == "mq.example:5671 vhost 'jobs'"
    assert (cfg.host, cfg.port, cfg.vhost, cfg.username) == ("mq.example", 5671, "jobs", "app")
    assert cfg.tls


def test_config_defaults_and_errors() -> None:
    cfg = BrokerConfig("amqp://mq")
    assert (cfg.port, cfg.vhost, cfg.username) == (5672, "/", "guest")
    assert BrokerConfig("amqp://u:p@h:1/%2F").vhost == "/"
    with pytest.raises(ConfigError) as info:
        BrokerConfig(f"http://u:{PASSWORD}@h/")
    assert PASSWORD not in str(info.value) and "amqp://" in str(info.value)
    with pytest.raises(ConfigError):
        BrokerConfig("amqp:///vhost")
    with pytest.raises(ConfigError) as info:
        BrokerConfig(f"amqp://u:{PASSWORD}@h:notaport/")
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["", "has space", "tab\there", "amq.reserved", "x" * 246, "é" * 124],
)
def test_queue_names_are_validated(name: str) -> None:
    with pytest.raises(InvalidInput):
        QueueSettings(name)


def test_queue_settings() -> None:
    qs = QueueSettings("jobs.v1:batch-7")
    assert (qs.dead_name, qs.results_name, qs.fill_name) == (
        "jobs.v1:batch-7.dead",
        "jobs.v1:batch-7.results",
        "jobs.v1:batch-7.fill",
    )
    QueueSettings("x" * 245)
    with pytest.raises(InvalidInput):
        QueueSettings("jobs", queue_type="stream")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        QueueSettings("jobs", delivery_limit=-1)
    assert QueueSettings("jobs", delivery_limit=None).delivery_limit is None
