"""Several broker nodes in one URL, and riding out a lost node or connection (through the tests'
own TCP balancer in front of the real broker)."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Iterator

import pika.exceptions as pex
import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    connect,
    declare_queues,
    delete_queues,
    queue_depths,
)
from queuejob.flows.adapters.broker.connection import channel_error, node_down, open_blocking
from queuejob.flows.core.errors import BrokerUnavailable, ConfigError

from .proxy import TcpProxy

pytestmark = pytest.mark.broker


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_hosts(url: str, hosts: str) -> str:
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{hosts}"))


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    parts = urllib.parse.urlsplit(broker_url)
    with TcpProxy([(parts.hostname or "127.0.0.1", parts.port or 5672)]) as p:
        yield p


def test_a_url_may_name_several_nodes() -> None:
    cfg = BrokerConfig("amqps://u:pa%2Css@rabbit-0:5671,rabbit-1,[::1]:5673/%2F?ca_file=/ca.pem")
    assert [str(e) for e in cfg.endpoints] == ["rabbit-0:5671", "rabbit-1:5671", "[::1]:5673"]
    assert (cfg.host, cfg.port, cfg.vhost, cfg.username, cfg.tls) == (
        "rabbit-0", 5671, "/", "u", True,
    )  # fmt: skip
    assert cfg.ca_file == "/ca.pem"
    assert cfg.describe() == "rabbit-0:5671,rabbit-1:5671,[::1]:5673 vhost '/'"
    shown = f"{cfg!r} {cfg.redacted()} {cfg.describe()}"
    assert "pa,ss" not in shown and "pa%2Css" not in shown
    assert cfg.redacted().startswith("amqps://u:***@rabbit-0:5671,rabbit-1,[::1]:5673/%2F")
    # The CA the RabbitMQBroker block writes into the URL for the pods (pika's form).
    block_form = BrokerConfig(
        "amqps://u:p@h/%2F?ssl_options=%7B%27ca_certs%27%3A+%27%2Fx.pem%27%7D"
    )
    assert block_form.ca_file == "/x.pem"
    for bad in ("amqp://u:p@h1,/%2F", "amqp://u:p@h1:x/%2F", "amqp://u:p@::1/%2F"):
        with pytest.raises(ConfigError) as info:
            BrokerConfig(bad)
        assert "several nodes" in str(info.value) or "names no host" in str(info.value)


def test_attempts_go_through_the_nodes_in_turn(broker_url: str) -> None:
    parts = urllib.parse.urlsplit(broker_url)
    live = f"{parts.hostname}:{parts.port}"
    dead = f"127.0.0.1:{_closed_port()}"
    cfg = BrokerConfig(_with_hosts(broker_url, f"{dead},{live}"), connect_timeout_s=3)
    conn = connect(cfg)
    try:
        assert str(conn.queuejob_endpoint) == live
    finally:
        conn.close()
    # The next attempt starts from the node that answered, not from the dead one.
    conn = open_blocking(cfg)
    try:
        assert str(conn.queuejob_endpoint) == live
    finally:
        conn.close()


def test_no_node_answering_names_each_one(broker_url: str) -> None:
    a, b = _closed_port(), _closed_port()
    cfg = BrokerConfig(_with_hosts(broker_url, f"127.0.0.1:{a},127.0.0.1:{b}"), connect_timeout_s=2)
    with pytest.raises(BrokerUnavailable) as info:
        connect(cfg, deadline_s=1.0)
    text = str(info.value)
    assert f"127.0.0.1:{a}" in text and f"127.0.0.1:{b}" in text
    assert "guest" not in text.replace("user 'guest'", "")


def test_a_call_rides_out_a_lost_connection_within_its_window(
    proxy: TcpProxy, broker_url: str, queue_name: str
) -> None:
    parts = urllib.parse.urlsplit(broker_url)
    url = _with_hosts(broker_url, f"127.0.0.1:{proxy.port}")
    qs = QueueSettings(queue_name)
    strict = BrokerConfig(url, connect_timeout_s=2)
    patient = strict.with_options(reconnect_s=30)
    try:
        declare_queues(patient, qs)
        # The node goes away: without a window the call fails at once.
        proxy.refuse(True)
        proxy.cut()
        with pytest.raises(BrokerUnavailable):
            queue_depths(strict, qs)
        # With one, it waits for the node to come back (here after ~1.5 s) and carries on.
        threading.Timer(1.5, proxy.refuse, args=(False,)).start()
        started = time.monotonic()
        depths = queue_depths(patient, qs)
        assert depths["work"].ready == 0
        assert 1.0 < time.monotonic() - started < 25
    finally:
        proxy.refuse(False)
        delete_queues(BrokerConfig(broker_url), qs, only_if_empty=False)
    assert parts.hostname  # the proxy forwarded to the real broker


def test_a_queue_on_a_node_that_is_down_is_retryable_and_named() -> None:
    # RabbitMQ's answer for a classic queue whose node is down (a 404, like a missing queue).
    text = (
        "NOT_FOUND - home node 'rabbit-2@rabbit-2.rabbitmq-nodes' of durable queue 'job1.fill' "
        "in vhost '/' is down or inaccessible"
    )
    cfg = BrokerConfig("amqp://u:p@rabbitmq-service:5672/%2F")
    err = channel_error(pex.ChannelClosedByBroker(404, text), cfg, "job1.fill")
    assert isinstance(err, BrokerUnavailable) and err.retryable
    assert str(err).startswith(
        "node rabbit-2@rabbit-2.rabbitmq-nodes holding queue 'job1.fill' is down"
    )
    assert "declare the queues" not in str(err)
    assert node_down(cfg, "q", "NOT_FOUND - no queue 'q' in vhost '/'") is None
