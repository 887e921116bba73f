"""Connecting to the broker: `connect`, `wait_for_broker` (retries with back-off), a short-lived
`session`, passive declares, and pika's exceptions translated into `queuejob.flows.core.errors` with
the password scrubbed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pika
import pika.exceptions as pex

from queuejob.flows.core.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    ConfigError,
    QueueJobError,
    QueueNotFound,
)

if TYPE_CHECKING:  # the worker imports this module: keep pydantic (items.py) out of its start-up
    pass
from queuejob.flows.adapters.broker.config import BrokerConfig, Endpoint

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")


def cause(exc: BaseException, cfg: BrokerConfig) -> str:
    """A one-line description of a pika/socket exception, without the password."""
    inner: BaseException = exc
    # pika wraps the real cause: AMQPConnectionError(AMQPConnectorSocketConnectError(...)).
    for _ in range(4):
        args = getattr(inner, "args", ())
        nested = next((a for a in args if isinstance(a, BaseException)), None)
        if nested is None:
            nested = getattr(inner, "exception", None)  # AMQPConnectorAMQPHandshakeError
        if not isinstance(nested, BaseException):
            break
        inner = nested
    text = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
    return cfg.scrub(text)[:500]


def connection_params(
    cfg: BrokerConfig, timeout_s: float, endpoint: Endpoint | None = None
) -> pika.ConnectionParameters:
    """pika's parameters for one node of ``cfg`` (the first when ``endpoint`` is None)."""
    node = endpoint or cfg.endpoints[0]
    ssl_options = None
    if cfg.tls:
        import ssl

        try:
            context = ssl.create_default_context(cafile=cfg.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot read the CA bundle {cfg.ca_file!r} for the broker at {cfg.describe()} "
                f"({exc}); point ca_file at a readable PEM file"
            ) from None
        ssl_options = pika.SSLOptions(context, server_hostname=node.host)
    return pika.ConnectionParameters(
        host=node.host,
        port=node.port,
        virtual_host=cfg.vhost,
        credentials=pika.PlainCredentials(cfg.username, cfg._password()),
        heartbeat=cfg.heartbeat_s,
        # A broker under a memory or disk alarm blocks publishers; give up rather than hang.
        blocked_connection_timeout=max(30.0, 3 * timeout_s),
        socket_timeout=timeout_s,
        stack_timeout=timeout_s,
        connection_attempts=1,
        retry_delay=0,
        ssl_options=ssl_options,
        client_properties={"connection_name": "queuejob"},
    )


def translate_connect_error(
    exc: BaseException,
    cfg: BrokerConfig,
    timeout_s: float | None = None,
    endpoint: Endpoint | None = None,
) -> QueueJobError:
    where = f"{endpoint} vhost {cfg.vhost!r}" if endpoint is not None else cfg.describe()
    if isinstance(exc, pex.ProbableAccessDeniedError | pex.ProbableAuthenticationError) and (
        "ConnectionClosedByBroker" not in str(exc)
    ):
        # pika guesses "probable" refusals from the handshake stage at which the connection
        # ended. Only a Connection.Close from the broker is a refusal; a dropped socket is not
        # (a broker that is still booting resets connections mid-handshake): retry.
        err = BrokerUnavailable(
            f"broker at {where} dropped the connection during the AMQP handshake "
            f"({cause(exc, cfg)}); it may be starting or restarting"
        )
        err.detail = cause(exc, cfg)  # type: ignore[attr-defined]
        return err
    if isinstance(exc, pex.ProbableAccessDeniedError):
        return BrokerAuthError(
            f"broker at {where} refused user {cfg.username!r} access to the vhost "
            f"({cause(exc, cfg)}); create the vhost or grant the user permissions on it "
            f"(rabbitmqctl set_permissions -p {cfg.vhost} {cfg.username} '.*' '.*' '.*')"
        )
    if isinstance(exc, pex.ProbableAuthenticationError | pex.AuthenticationError):
        return BrokerAuthError(
            f"broker at {where} refused the credentials of user {cfg.username!r} "
            f"({cause(exc, cfg)}); check the user name and password in the broker URL or "
            "block (retrying with the same credentials will not help)"
        )
    import ssl

    if _find_in_chain(exc, ssl.SSLCertVerificationError):
        return BrokerAuthError(
            f"TLS certificate of the broker at {where} could not be verified "
            f"({cause(exc, cfg)}); set ca_file to the CA bundle that signed it"
            + (f" (now {cfg.ca_file!r})" if cfg.ca_file else "")
        )
    if cfg.tls and _plain_text_answer(exc):
        return BrokerAuthError(
            f"the broker at {where} answered in plain text, not TLS ({cause(exc, cfg)}): that "
            "port is a plain AMQP listener; use the broker's TLS port (5671 by default) with "
            "amqps://, or amqp:// for this port"
        )
    if isinstance(exc, socket.gaierror):
        detail = f"cannot resolve host {cfg.host!r}: {cfg.scrub(str(exc))}"
        advice = "check the host name, or wait for its DNS record (a Service still being created)"
    elif _find_in_chain(exc, TimeoutError) or "Timeout" in cause(exc, cfg).split(":")[0]:
        detail = (
            f"timed out after {timeout_s:g} s (TCP connect, TLS and AMQP handshake)"
            if timeout_s
            else "timed out"
        )
        advice = "check that RabbitMQ is running and that host and port are the AMQP listener"
    else:
        detail = cause(exc, cfg)
        advice = "check that RabbitMQ is running and reachable from here"
    err = BrokerUnavailable(f"broker at {where} is not answering: {detail}; {advice}")
    err.detail = detail  # type: ignore[attr-defined]
    return err


def _plain_text_answer(exc: BaseException) -> bool:
    """True when a TLS handshake met a server that speaks plain text (an AMQP listener answers
    a ClientHello with its protocol header, which OpenSSL reads as a bad record)."""
    import ssl

    marks = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")
    return any(
        isinstance(cur, ssl.SSLError) and any(mark in str(cur).upper() for mark in marks)
        for cur in _chain(exc)
    )


def _find_in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(cur, kind) for cur in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those pika wraps in it (its args, its ``exception``), a bounded walk."""
    seen: list[BaseException] = [exc]
    while seen:
        cur = seen.pop()
        yield cur
        seen.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
        inner = getattr(cur, "exception", None)
        if isinstance(inner, BaseException):
            seen.append(inner)
        if len(seen) > 20:
            return


# Per broker URL: the node to try first (the one after the last that failed), so that every
# attempt of a process goes through the nodes in turn.
_FIRST_NODE: dict[int, int] = {}


def open_blocking(cfg: BrokerConfig, timeout_s: float | None = None) -> Any:
    """One connection attempt, through each node of ``cfg`` in turn until one answers (the
    node that answered is ``conn.queuejob_endpoint``); raises BrokerUnavailable (naming every
    node's cause) or BrokerAuthError."""
    timeout = timeout_s or cfg.connect_timeout_s
    nodes = cfg.endpoints
    key = hash(cfg.url)
    first = _FIRST_NODE.get(key, 0) % len(nodes)
    causes: list[str] = []
    last: QueueJobError | None = None
    for step in range(len(nodes)):
        i = (first + step) % len(nodes)
        node = nodes[i]
        params = connection_params(cfg, timeout, node)
        try:
            conn = pika.BlockingConnection(params)
        except Exception as exc:  # pika's connector errors share no base class with AMQPError
            err = translate_connect_error(exc, cfg, timeout, node if len(nodes) > 1 else None)
            if not isinstance(err, BrokerUnavailable):
                raise err from None
            _FIRST_NODE[key] = i + 1
            last = err
            causes.append(f"{node}: {getattr(err, 'detail', None) or err}")
            continue
        _FIRST_NODE[key] = i
        conn.queuejob_endpoint = node
        return conn
    assert last is not None
    if len(nodes) == 1:
        raise last
    err = BrokerUnavailable(
        f"no node of the broker at {cfg.describe()} is answering: " + "; ".join(causes)
    )
    err.detail = "; ".join(causes)  # type: ignore[attr-defined]
    raise err


def server_major(conn: Any) -> int:
    """The broker's major version (3 for 3.x, 4 for 4.x) from the connection's handshake; 3
    when it cannot be read."""
    impl = getattr(conn, "_impl", conn)
    props = getattr(impl, "server_properties", None) or {}
    raw = props.get("version", b"")
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    head = text.split(".", 1)[0]
    return int(head) if head.isdigit() else 3


def connect(cfg: BrokerConfig, *, deadline_s: float = 0.0) -> pika.BlockingConnection:
    """An open `pika.BlockingConnection`. With ``deadline_s > 0`` it waits for the broker as
    `wait_for_broker` does; otherwise it makes one attempt. Raises `BrokerUnavailable` or
    `BrokerAuthError`."""
    if deadline_s > 0:
        holder: list[Any] = []
        _retry_until(cfg, deadline_s, 0.5, 5.0, None, keep=holder)
        return holder[0]
    return open_blocking(cfg)


def wait_for_broker(
    cfg: BrokerConfig,
    *,
    deadline_s: float = 60.0,
    base_delay_s: float = 0.5,
    max_delay_s: float = 5.0,
    on_attempt: Callable[[int, Exception], None] | None = None,
) -> None:
    """Return once the broker completes a real AMQP handshake (connection.open-ok).

    Failed attempts are retried with capped exponential back-off and jitter until
    ``deadline_s`` has passed, then `BrokerUnavailable` names host, port, vhost, the number of
    attempts and the last cause. Refused credentials or vhost access raise `BrokerAuthError` at
    once. ``on_attempt(n, error)`` is called after every failed attempt.
    """
    _retry_until(cfg, deadline_s, base_delay_s, max_delay_s, on_attempt, keep=None)


def _retry_until(
    cfg: BrokerConfig,
    deadline_s: float,
    base_delay_s: float,
    max_delay_s: float,
    on_attempt: Callable[[int, Exception], None] | None,
    *,
    keep: list[Any] | None,
) -> None:
    start = time.monotonic()
    end = start + deadline_s
    attempt = 0
    last: QueueJobError | None = None
    while True:
        attempt += 1
        remaining = end - time.monotonic()
        # Each attempt ends by the deadline (a zero deadline still makes one full attempt).
        timeout = (
            cfg.connect_timeout_s if deadline_s <= 0 else min(cfg.connect_timeout_s, remaining)
        )
        try:
            conn = open_blocking(cfg, max(0.2, timeout))
        except BrokerAuthError as exc:
            if on_attempt:
                on_attempt(attempt, exc)
            raise
        except BrokerUnavailable as exc:
            last = exc
            if on_attempt:
                on_attempt(attempt, exc)
        else:
            if keep is not None:
                keep.append(conn)
            else:
                close_quietly(conn)
            if attempt > 1:
                log.info("broker at %s answered after %d attempts", cfg.describe(), attempt)
            return
        delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
        # Jitter keeps many pods that lost the broker together from retrying in lockstep.
        delay = random.uniform(delay / 2, delay)
        remaining = end - time.monotonic()
        if remaining <= 0.05:
            detail = getattr(last, "detail", None) or str(last)
            raise BrokerUnavailable(
                f"broker at {cfg.describe()} did not answer an AMQP handshake within "
                f"{deadline_s:g} s ({attempt} attempt{'s' if attempt != 1 else ''}); last cause: "
                f"{detail}; check that RabbitMQ is running and reachable from here (host, port, "
                "vhost, network policy)"
            ) from None
        log.debug("broker at %s not ready (attempt %d): %s", cfg.describe(), attempt, last)
        time.sleep(min(delay, remaining))


def close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        if conn is not None and conn.is_open:
            conn.close()


@contextlib.contextmanager
def session(cfg: BrokerConfig) -> Iterator[Any]:
    """A blocking connection, closed on exit; connection-level pika errors become
    BrokerUnavailable."""
    conn = open_blocking(cfg)
    try:
        yield conn
    except (
        pex.AMQPConnectionError,
        pex.StreamLostError,
        pex.ConnectionWrongStateError,
        pex.ChannelWrongStateError,
        ConnectionError,
    ) as exc:
        raise BrokerUnavailable(
            f"lost the connection to the broker at {cfg.describe()}: {cause(exc, cfg)}; "
            "retry once the broker is reachable"
        ) from None
    finally:
        close_quietly(conn)


def not_found(cfg: BrokerConfig, queue: str) -> QueueNotFound:
    return QueueNotFound(
        f"queue {queue!r} does not exist on the broker at {cfg.describe()}; declare the queues "
        "first (declare_queues), or check the queue name"
    )


_NODE_DOWN = re.compile(r"home node '(?P<node>[^']+)' of durable queue '(?P<queue>[^']*)'")


def node_down(cfg: BrokerConfig, queue: str, reply_text: str) -> BrokerUnavailable | None:
    """The error for a queue whose node is down (RabbitMQ answers 404 for it), or None."""
    if "is down or inaccessible" not in reply_text:
        return None
    m = _NODE_DOWN.search(reply_text)
    node = m.group("node") if m else "?"
    queue = m.group("queue") if m else queue
    err = BrokerUnavailable(
        f"node {node} holding queue {queue!r} is down (the broker at {cfg.describe()} answered: "
        f"{reply_text}); retried until that node is back. A classic queue lives on one node "
        "only: a quorum work queue (the default) has all of a run's queues replicated"
    )
    err.detail = f"node {node} holding queue {queue!r} is down"  # type: ignore[attr-defined]
    return err


def channel_error(exc: pex.ChannelClosedByBroker, cfg: BrokerConfig, queue: str) -> QueueJobError:
    if exc.reply_code == 404:
        return node_down(cfg, queue, str(exc.reply_text)) or not_found(cfg, queue)
    if exc.reply_code == 403:
        return BrokerAuthError(
            f"user {cfg.username!r} may not use queue {queue!r} on {cfg.describe()} "
            f"({exc.reply_text}); grant configure/write/read permissions for it"
        )
    return BrokerUnavailable(
        f"the broker at {cfg.describe()} closed the channel while working on queue {queue!r}: "
        f"({exc.reply_code}) {exc.reply_text}"
    )


def passive(conn: Any, cfg: BrokerConfig, queue: str) -> Any:
    """queue.declare(passive) on a fresh channel (a 404 closes the channel); the Declare-ok."""
    ch = conn.channel()
    try:
        return ch.queue_declare(queue, passive=True).method
    except pex.ChannelClosedByBroker as exc:
        raise channel_error(exc, cfg, queue) from None
    finally:
        with contextlib.suppress(Exception):
            if ch.is_open:
                ch.close()


def rides_out_node_loss(fn: Callable[P, T]) -> Callable[P, T]:
    """Make an adapter call ride out a lost node or connection: on `BrokerUnavailable` it is
    called again (connecting anew, through the next node) with capped back-off until the
    ``reconnect_s`` of its `BrokerConfig` (its first argument) has passed, then the error
    stands. Only for calls that are idempotent as a whole: declaring, reading, purging,
    deleting, the fill (its marker) and the dead-letter requeue (its tokens)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        cfg = args[0]
        assert isinstance(cfg, BrokerConfig)
        return ride_out(cfg, fn.__name__, lambda: fn(*args, **kwargs))

    return wrapper


def ride_out(cfg: BrokerConfig, what: str, call: Callable[[], T]) -> T:
    """``call()``, called again on `BrokerUnavailable` until ``cfg.reconnect_s`` has passed
    (see `rides_out_node_loss`)."""
    deadline = time.monotonic() + cfg.reconnect_s
    attempt = 0
    while True:
        try:
            return call()
        except BrokerUnavailable as exc:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            delay = random.uniform(0.25, min(5.0, 0.5 * 2 ** (attempt - 1)))
            log.warning("%s: %s; trying again (up to %.0f s more)", what, exc, remaining)
            time.sleep(min(delay, remaining))
