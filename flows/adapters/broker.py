"""RabbitMQ adapter (pika): readiness, declaration, fill, depth, dead letters and results.

Everything here is I/O; pika's exceptions are translated into `flows.core.errors`:

* `BrokerUnavailable` (retryable): refused or dropped connections, DNS failures, timeouts.
* `BrokerAuthError` (permanent): the broker refused the credentials or the vhost.
* `QueueConflict` (permanent): a queue exists with other arguments (PRECONDITION_FAILED).
* `QueueNotFound` (permanent): a queue the call needs has not been declared (or was deleted).
* `PublishError` (retryable): a publish was nacked or returned unroutable, or the work queue
  did not gain exactly the confirmed messages.
* `FillInProgress` (retryable): another fill of the same queue holds its lock.

Queues of one work queue ``<name>`` (see `QueueSettings`):

* ``<name>``: the durable work queue, quorum by default. Its ``x-delivery-limit`` bounds poison
  messages: RabbitMQ dead-letters a message once it has been returned (rejected, or left unacked
  by a dying consumer) more than ``delivery_limit`` times, so an item is attempted at most
  ``delivery_limit + 1`` times. Dead letters go through the default exchange to ``<name>.dead``.
* ``<name>.dead``: classic, durable; dead letters keep their headers and ``message_id``.
* ``<name>.results``: classic, durable; workers' outcome records (`OutcomeRecord` JSON).
* ``<name>.fill``: classic, durable; at most one live *fill marker* (see `fill_queue`).
* ``<name>.fill.lock``: exclusive and transient, held by a running fill so two fills of the
  same queue never interleave (the broker drops it when the filling connection closes).

Timeouts: connecting is bounded by ``connect_timeout_s`` (socket connect, TLS and the AMQP
handshake). Once connected, pika's heartbeat closes a connection that has been silent for
``heartbeat_s`` seconds, so a broker that dies mid-call fails the call within about that long;
a fill also aborts when no publisher confirm arrives for ``max(30, 3 * connect_timeout_s)``
seconds, and drops its socket if the broker then does not answer the close within 5 s. No call
here can wait forever on a dead or stuck broker.

The password of a broker URL never appears in a message, a log line or an exception.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import socket
import struct
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pika
import pika.exceptions as pex
from pika import frame as pika_frame
from pika import spec as pika_spec
from pika.adapters.select_connection import SelectConnection

from flows.core.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    ConfigError,
    FillInProgress,
    InvalidInput,
    PublishError,
    QueueConflict,
    QueueJobError,
    QueueNotFound,
)
from flows.core.ledger import OutcomeRecord

if TYPE_CHECKING:  # the worker imports this module: keep pydantic (items.py) out of its start-up
    from flows.core.items import Item

log = logging.getLogger(__name__)
T = TypeVar("T")

# Message headers set by the fill and read by the worker.
HEADER_RUN_ID = "queuejob-run-id"
HEADER_INDEX = "queuejob-index"
# Failed attempts counted by the worker itself when it enforces a delivery limit (classic queues).
HEADER_FAILURES = "queuejob-failures"
# Added by quorum queues: how often the message was returned before this delivery.
HEADER_DELIVERY_COUNT = "x-delivery-count"

ITEM_CONTENT_TYPE = "application/octet-stream"
RECORD_CONTENT_TYPE = "application/json"
PERSISTENT = 2

_SUFFIXES = (".dead", ".results", ".fill", ".fill.lock")
MAX_QUEUE_NAME_BYTES = 255 - max(len(s) for s in _SUFFIXES)
_MAX_BYTES_IN_FLIGHT = 32 * 1024 * 1024  # with the message window, bounds the fill's memory
_MARKER_SCAN_LIMIT = 1000
_MIN_STALL_S = 30.0  # a fill with confirms outstanding and none arriving for this long fails
_CLOSE_GRACE_S = 5.0  # how long a failed fill waits for the broker to confirm the close


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class BrokerConfig:
    """How to reach the broker: an AMQP URL plus timeouts. `repr`/`str` never show the password.

    ``url`` is ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS; the vhost is
    URL-encoded, ``%2F`` for ``/``; user and password default to guest/guest). ``ca_file`` is a
    CA bundle to verify the broker's certificate with (system CAs otherwise).
    ``management_url`` (``http(s)://host:15672``) enables the management API, used for the
    unacked count of `queue_depths` and the full argument set of a `QueueConflict`; it is
    queried with the AMQP URL's credentials.
    """

    url: str
    connect_timeout_s: float = 10.0
    heartbeat_s: int = 30
    ca_file: str | None = None
    management_url: str | None = None

    def __post_init__(self) -> None:
        try:
            parts = urllib.parse.urlsplit(self.url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(
                f"broker URL {self.redacted()!r} is malformed ({_scrub(str(exc), self)}); "
                "write it as amqp://user:password@host:5672/vhost"
            ) from None
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigError(
                f"broker URL {self.redacted()!r} must start with amqp:// or amqps:// "
                f"(got {parts.scheme or 'no scheme'!r})"
            )
        if not parts.hostname:
            raise ConfigError(
                f"broker URL {self.redacted()!r} names no host; "
                "write it as amqp://user:password@host:5672/vhost"
            )
        if port == 0:
            raise ConfigError(f"broker URL {self.redacted()!r} has port 0")
        if self.connect_timeout_s <= 0:
            raise ConfigError(f"connect_timeout_s must be positive (got {self.connect_timeout_s})")
        if self.heartbeat_s < 0:
            raise ConfigError(f"heartbeat_s must be 0 (off) or positive (got {self.heartbeat_s})")

    @property
    def tls(self) -> bool:
        """True for amqps URLs."""
        return urllib.parse.urlsplit(self.url).scheme == "amqps"

    @property
    def host(self) -> str:
        """The broker's host name or address."""
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """The port, 5672 (amqp) or 5671 (amqps) unless the URL names one."""
        return urllib.parse.urlsplit(self.url).port or (5671 if self.tls else 5672)

    @property
    def vhost(self) -> str:
        """The virtual host, ``/`` when the URL has no path."""
        path = urllib.parse.urlsplit(self.url).path
        return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"

    @property
    def username(self) -> str:
        """The user name (guest when the URL has none)."""
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.unquote(parts.username) if parts.username else "guest"

    def _password(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.unquote(parts.password) if parts.password is not None else "guest"

    def redacted(self) -> str:
        """The URL with its password replaced by ``***``."""
        try:
            parts = urllib.parse.urlsplit(self.url)
            if parts.password is None:
                return self.url
            host = parts.netloc.rsplit("@", 1)[-1]
            return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
        except ValueError:
            return "<unparseable broker URL>"

    def describe(self) -> str:
        """``host:port vhost '/'``: how errors and logs name the broker."""
        return f"{self.host}:{self.port} vhost {self.vhost!r}"

    def __repr__(self) -> str:
        return (
            f"BrokerConfig(url={self.redacted()!r}, connect_timeout_s={self.connect_timeout_s}, "
            f"heartbeat_s={self.heartbeat_s}, ca_file={self.ca_file!r}, "
            f"management_url={self.management_url!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class QueueSettings:
    """The work queue's name and type, and the names of its companion queues.

    ``delivery_limit`` is RabbitMQ's ``x-delivery-limit`` (quorum queues): how often a message
    may be returned before it is dead-lettered, so an item is attempted at most
    ``delivery_limit + 1`` times; None means no limit. Classic queues have no broker-side limit:
    pass the same number to the worker (``--delivery-limit``), which then counts failures in a
    header and dead-letters the message itself.
    """

    name: str
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int | None = 3

    def __post_init__(self) -> None:
        check_queue_name(self.name)
        if self.queue_type not in ("quorum", "classic"):
            raise InvalidInput(
                f"queue_type must be 'quorum' or 'classic' (got {self.queue_type!r})"
            )
        limit = self.delivery_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise InvalidInput(f"delivery_limit must be an integer or None (got {limit!r})")
        if limit is not None and not 0 <= limit <= 1_000_000:
            raise InvalidInput(
                f"delivery_limit must be between 0 and 1000000, or None for no limit (got {limit})"
            )

    @property
    def dead_name(self) -> str:
        """The dead-letter queue."""
        return f"{self.name}.dead"

    @property
    def results_name(self) -> str:
        """The queue workers publish outcome records to."""
        return f"{self.name}.results"

    @property
    def fill_name(self) -> str:
        """The queue holding the fill marker."""
        return f"{self.name}.fill"

    @property
    def lock_name(self) -> str:
        """The exclusive queue a running fill (or dead-letter requeue) holds."""
        return f"{self.name}.fill.lock"

    @property
    def requeued_name(self) -> str:
        """The queue recording which dead letters a requeue moved back (adapters.dead_letters)."""
        return f"{self.name}.requeued"


def check_queue_name(name: str) -> str:
    """Return ``name`` if RabbitMQ and queuejob accept it as a work queue name, else raise
    `InvalidInput` saying what to change."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("queue name must be a non-empty string")
    size = len(name.encode("utf-8"))
    if size > MAX_QUEUE_NAME_BYTES:
        raise InvalidInput(
            f"queue name {name[:40]!r}... is {size} bytes; at most {MAX_QUEUE_NAME_BYTES} bytes "
            f"are allowed (AMQP names are 255 bytes and queuejob appends '.fill.lock' and "
            "'.results'); choose a shorter name"
        )
    bad = next((c for c in name if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise InvalidInput(
            f"queue name {name!r} contains {bad!r}; use letters, digits, '-', '_', '.' or ':'"
        )
    if name.startswith("amq."):
        raise InvalidInput(
            f"queue name {name!r} starts with 'amq.', which RabbitMQ reserves; choose another"
        )
    return name


# A classic work queue asks for the storage RabbitMQ 3.12+ gives every classic queue anyway:
# version 2 of the queue index and messages kept on disk, not in RAM. On 3.10 and 3.11 this
# speeds up the confirmed fill of a classic queue (bench/fill.py measures it against a queue
# without them) and keeps a million-item queue out of the broker's memory; 3.12+ ignores the
# mode and 3.13+ defaults to version 2. RabbitMQ compares these arguments on re-declare, so a
# classic queue declared without them (by an older queuejob or by hand) is a QueueConflict.
CLASSIC_STORAGE_ARGUMENTS: dict[str, Any] = {"x-queue-version": 2, "x-queue-mode": "lazy"}


def work_queue_arguments(qs: QueueSettings) -> dict[str, Any]:
    """The ``x-`` arguments the work queue is declared with."""
    args: dict[str, Any] = {
        "x-queue-type": qs.queue_type,
        # Dead letters go through the default exchange straight to <name>.dead: no exchange to
        # declare, bind or clean up.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": qs.dead_name,
    }
    if qs.queue_type == "quorum" and qs.delivery_limit is not None:
        args["x-delivery-limit"] = qs.delivery_limit
    if qs.queue_type == "classic":
        args.update(CLASSIC_STORAGE_ARGUMENTS)
    return args


_AUX_ARGUMENTS: dict[str, Any] = {"x-queue-type": "classic"}


# --- connecting --------------------------------------------------------------------------------


def _scrub(text: str, cfg: BrokerConfig) -> str:
    """Remove the password from text that came from a library."""
    password = cfg._password()
    if password and len(password) >= 3:
        text = text.replace(password, "***")
        quoted = urllib.parse.quote(password, safe="")
        if quoted != password:
            text = text.replace(quoted, "***")
    return text


def _cause(exc: BaseException, cfg: BrokerConfig) -> str:
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
    return _scrub(text, cfg)[:500]


def _connection_params(cfg: BrokerConfig, timeout_s: float) -> pika.ConnectionParameters:
    ssl_options = None
    if cfg.tls:
        import ssl

        context = ssl.create_default_context(cafile=cfg.ca_file)
        ssl_options = pika.SSLOptions(context, server_hostname=cfg.host)
    return pika.ConnectionParameters(
        host=cfg.host,
        port=cfg.port,
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


def _translate_connect_error(
    exc: BaseException, cfg: BrokerConfig, timeout_s: float | None = None
) -> QueueJobError:
    where = cfg.describe()
    if isinstance(exc, pex.ProbableAccessDeniedError | pex.ProbableAuthenticationError) and (
        "ConnectionClosedByBroker" not in str(exc)
    ):
        # pika guesses "probable" refusals from the handshake stage at which the connection
        # ended. Only a Connection.Close from the broker is a refusal; a dropped socket is not
        # (a broker that is still booting resets connections mid-handshake): retry.
        err = BrokerUnavailable(
            f"broker at {where} dropped the connection during the AMQP handshake "
            f"({_cause(exc, cfg)}); it may be starting or restarting"
        )
        err.detail = _cause(exc, cfg)  # type: ignore[attr-defined]
        return err
    if isinstance(exc, pex.ProbableAccessDeniedError):
        return BrokerAuthError(
            f"broker at {where} refused user {cfg.username!r} access to the vhost "
            f"({_cause(exc, cfg)}); create the vhost or grant the user permissions on it "
            f"(rabbitmqctl set_permissions -p {cfg.vhost} {cfg.username} '.*' '.*' '.*')"
        )
    if isinstance(exc, pex.ProbableAuthenticationError | pex.AuthenticationError):
        return BrokerAuthError(
            f"broker at {where} refused the credentials of user {cfg.username!r} "
            f"({_cause(exc, cfg)}); check the user name and password in the broker URL or "
            "block (retrying with the same credentials will not help)"
        )
    import ssl

    if _find_in_chain(exc, ssl.SSLCertVerificationError):
        return BrokerAuthError(
            f"TLS certificate of the broker at {where} could not be verified "
            f"({_cause(exc, cfg)}); set ca_file to the CA bundle that signed it"
        )
    if isinstance(exc, socket.gaierror):
        detail = f"cannot resolve host {cfg.host!r}: {_scrub(str(exc), cfg)}"
        advice = "check the host name, or wait for its DNS record (a Service still being created)"
    elif _find_in_chain(exc, TimeoutError) or "Timeout" in _cause(exc, cfg).split(":")[0]:
        detail = (
            f"timed out after {timeout_s:g} s (TCP connect, TLS and AMQP handshake)"
            if timeout_s
            else "timed out"
        )
        advice = "check that RabbitMQ is running and that host and port are the AMQP listener"
    else:
        detail = _cause(exc, cfg)
        advice = "check that RabbitMQ is running and reachable from here"
    err = BrokerUnavailable(f"broker at {where} is not answering: {detail}; {advice}")
    err.detail = detail  # type: ignore[attr-defined]
    return err


def _find_in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: list[BaseException] = [exc]
    while seen:
        cur = seen.pop()
        if isinstance(cur, kind):
            return True
        seen.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
        inner = getattr(cur, "exception", None)
        if isinstance(inner, BaseException):
            seen.append(inner)
        if len(seen) > 20:
            break
    return False


def _open_blocking(cfg: BrokerConfig, timeout_s: float | None = None) -> Any:
    """One connection attempt; raises BrokerUnavailable or BrokerAuthError."""
    timeout = timeout_s or cfg.connect_timeout_s
    params = _connection_params(cfg, timeout)
    try:
        return pika.BlockingConnection(params)
    except Exception as exc:  # pika's connector errors share no base class with AMQPError
        raise _translate_connect_error(exc, cfg, timeout) from None


def connect(cfg: BrokerConfig, *, deadline_s: float = 0.0) -> pika.BlockingConnection:
    """An open `pika.BlockingConnection`. With ``deadline_s > 0`` it waits for the broker as
    `wait_for_broker` does; otherwise it makes one attempt. Raises `BrokerUnavailable` or
    `BrokerAuthError`."""
    if deadline_s > 0:
        holder: list[Any] = []
        _retry_until(cfg, deadline_s, 0.5, 5.0, None, keep=holder)
        return holder[0]
    return _open_blocking(cfg)


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
            conn = _open_blocking(cfg, max(0.2, timeout))
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
                _close_quietly(conn)
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


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        if conn is not None and conn.is_open:
            conn.close()


@contextlib.contextmanager
def _session(cfg: BrokerConfig) -> Iterator[Any]:
    """A blocking connection, closed on exit; connection-level pika errors become
    BrokerUnavailable."""
    conn = _open_blocking(cfg)
    try:
        yield conn
    except (pex.AMQPConnectionError, pex.StreamLostError, pex.ConnectionWrongStateError) as exc:
        raise BrokerUnavailable(
            f"lost the connection to the broker at {cfg.describe()}: {_cause(exc, cfg)}; "
            "retry once the broker is reachable"
        ) from None
    finally:
        _close_quietly(conn)


def _not_found(cfg: BrokerConfig, queue: str) -> QueueNotFound:
    return QueueNotFound(
        f"queue {queue!r} does not exist on the broker at {cfg.describe()}; declare the queues "
        "first (declare_queues), or check the queue name"
    )


def _channel_error(exc: pex.ChannelClosedByBroker, cfg: BrokerConfig, queue: str) -> QueueJobError:
    if exc.reply_code == 404:
        return _not_found(cfg, queue)
    if exc.reply_code == 403:
        return BrokerAuthError(
            f"user {cfg.username!r} may not use queue {queue!r} on {cfg.describe()} "
            f"({exc.reply_text}); grant configure/write/read permissions for it"
        )
    return BrokerUnavailable(
        f"the broker at {cfg.describe()} closed the channel while working on queue {queue!r}: "
        f"({exc.reply_code}) {exc.reply_text}"
    )


def _passive(conn: Any, cfg: BrokerConfig, queue: str) -> Any:
    """queue.declare(passive) on a fresh channel (a 404 closes the channel); the Declare-ok."""
    ch = conn.channel()
    try:
        return ch.queue_declare(queue, passive=True).method
    except pex.ChannelClosedByBroker as exc:
        raise _channel_error(exc, cfg, queue) from None
    finally:
        with contextlib.suppress(Exception):
            if ch.is_open:
                ch.close()


# --- declaration -------------------------------------------------------------------------------

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for queue .*?: received (?P<got>.+?) but current is "
    r"(?P<cur>.+)$"
)


def _reported_value(text: str) -> str | None:
    text = text.strip()
    if text == "none":
        return None
    m = re.match(r"^(?:the value )?'(?P<v>.*?)'(?: of type '[^']*')?$", text)
    return m.group("v") if m else text


def _declare_one(conn: Any, cfg: BrokerConfig, queue: str, arguments: dict[str, Any]) -> Any:
    ch = conn.channel()
    try:
        ch.queue_declare(queue, durable=True, arguments=arguments)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise _conflict(cfg, queue, arguments, exc.reply_text) from None
        raise _channel_error(exc, cfg, queue) from None
    return ch


def _conflict(cfg: BrokerConfig, queue: str, wanted: dict[str, Any], reply: str) -> QueueConflict:
    existing: dict[str, Any] | None = None
    source = "the broker's reply (it names only the first argument that differs)"
    mgmt = _management_queue(cfg, queue)
    if mgmt is not None:
        existing = dict(mgmt.get("arguments") or {})
        if not mgmt.get("durable", True):
            existing["durable"] = False
        source = "the management API"
    else:
        m = _INEQUIVALENT.search(reply)
        if m:
            existing = {m.group("arg"): _reported_value(m.group("cur"))}
    shown = (
        "unknown"
        if existing is None
        else "{"
        + ", ".join(f"{k!r}: {'(not set)' if v is None else repr(v)}" for k, v in existing.items())
        + "}"
    )
    err = QueueConflict(
        f"queue {queue!r} on {cfg.describe()} already exists with different arguments. "
        f"Asked for {wanted!r}; existing (from {source}): {shown}. Broker: {reply}. "
        f"Either use the existing queue's settings (queue_type, delivery_limit), choose another "
        f"queue name, or delete the queue once nothing needs its messages "
        f"(rabbitmqctl delete_queue {queue}, or queuejob's cleanup)"
    )
    err.queue = queue  # type: ignore[attr-defined]
    err.wanted = dict(wanted)  # type: ignore[attr-defined]
    err.existing = existing  # type: ignore[attr-defined]
    return err


def declare_queues(cfg: BrokerConfig, qs: QueueSettings) -> None:
    """Declare (idempotently) the dead-letter, results and fill-marker queues and the work queue.

    All are durable. Raises `QueueConflict` when one exists with other arguments (the message
    names the queue, both argument sets as far as they are known, and what to do).
    """
    with _session(cfg) as conn:
        # Dead-letter queue first: the work queue dead-letters into it from its first message.
        for name in (qs.dead_name, qs.results_name, qs.fill_name):
            _declare_one(conn, cfg, name, _AUX_ARGUMENTS).close()
        _declare_one(conn, cfg, qs.name, work_queue_arguments(qs)).close()


def delete_queues(
    cfg: BrokerConfig, qs: QueueSettings, *, only_if_empty: bool = True
) -> dict[str, int]:
    """Delete the run's queues; return the queues kept, with the messages each still holds.

    The results, fill-marker and requeue-record queues are the run's bookkeeping and go (the
    requeue records stay while the dead-letter queue does: they keep a requeue idempotent). The
    work and dead-letter queues hold items: with ``only_if_empty`` (the default) each is deleted
    only when it holds no message and has no consumer, and is otherwise kept and returned, so
    that no item is lost with its queue. ``only_if_empty=False`` deletes them with whatever they
    hold. Queues
    that do not exist are skipped.
    """
    kept: dict[str, int] = {}
    with _session(cfg) as conn:
        for name in (qs.name, qs.dead_name, qs.results_name, qs.fill_name, qs.requeued_name):
            if name == qs.requeued_name and qs.dead_name in kept:
                continue
            guarded = only_if_empty and name in (qs.name, qs.dead_name)
            if guarded:
                try:
                    ok = _passive(conn, cfg, name)
                except QueueNotFound:
                    continue
                if ok.message_count or ok.consumer_count:
                    kept[name] = int(ok.message_count)
                    continue
            # Quorum queues refuse queue.delete with if-empty (the broker closes the connection
            # with 540 NOT_IMPLEMENTED); classic ones take it, closing the window between the
            # count above and the delete.
            if_empty = guarded and (name != qs.name or qs.queue_type == "classic")
            ch = conn.channel()
            try:
                ch.queue_delete(name, if_empty=if_empty)
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    continue
                if exc.reply_code != 406 or not if_empty:
                    raise _channel_error(exc, cfg, name) from None
                kept[name] = int(_passive(conn, cfg, name).message_count)  # filled meanwhile
                continue
            ch.close()
    return kept


# --- depth -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueDepth:
    """Messages in one queue.

    ``ready`` and ``consumers`` come from an AMQP passive declare, exact within milliseconds.
    ``unacked`` (delivered, not yet acknowledged: items in flight) is only known through the
    management API (``source == "management"``; its statistics lag by up to the broker's
    stats interval, 5 s by default). Over plain AMQP (``source == "amqp"``) it is None: derive
    in-flight work from the run's own numbers instead (confirmed items minus ready messages
    minus items with a final outcome record), and use ``consumers`` as the count of live
    workers.
    """

    ready: int
    unacked: int | None
    consumers: int
    source: Literal["amqp", "management"]


def queue_depths(cfg: BrokerConfig, qs: QueueSettings) -> dict[str, QueueDepth]:
    """Depths of the ``work``, ``results`` and ``dead`` queues (keys of the returned dict).

    Raises `QueueNotFound` if one of them does not exist.
    """
    out: dict[str, QueueDepth] = {}
    with _session(cfg) as conn:
        for key, name in (("work", qs.name), ("results", qs.results_name), ("dead", qs.dead_name)):
            ok = _passive(conn, cfg, name)
            unacked: int | None = None
            source: Literal["amqp", "management"] = "amqp"
            mgmt = _management_queue(cfg, name)
            if mgmt is not None and "messages_unacknowledged" in mgmt:
                unacked = int(mgmt["messages_unacknowledged"])
                source = "management"
            out[key] = QueueDepth(
                ready=int(ok.message_count),
                unacked=unacked,
                consumers=int(ok.consumer_count),
                source=source,
            )
    return out


def _management_queue(cfg: BrokerConfig, queue: str) -> dict[str, Any] | None:
    """The management API's view of a queue, or None (not configured, unreachable, missing)."""
    if not cfg.management_url:
        return None
    import base64
    import urllib.error
    import urllib.request

    base = cfg.management_url.rstrip("/")
    url = (
        f"{base}/api/queues/{urllib.parse.quote(cfg.vhost, safe='')}/"
        f"{urllib.parse.quote(queue, safe='')}"
    )
    token = base64.b64encode(f"{cfg.username}:{cfg._password()}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    context = None
    if base.startswith("https"):
        import ssl

        context = ssl.create_default_context(cafile=cfg.ca_file)
    try:
        with urllib.request.urlopen(req, timeout=cfg.connect_timeout_s, context=context) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning(
            "management API at %s did not answer for queue %r (%s); using AMQP counts only",
            base,
            queue,
            _scrub(str(exc), cfg),
        )
        return None
    return data if isinstance(data, dict) else None


def purge_work_queue(cfg: BrokerConfig, qs: QueueSettings) -> int:
    """Remove the work queue's ready messages (unacked ones stay); return how many."""
    return _purge(cfg, qs.name)


def purge_results(cfg: BrokerConfig, qs: QueueSettings) -> int:
    """Remove the outcome records from ``<name>.results`` once a run's ledger is saved."""
    return _purge(cfg, qs.results_name)


def _purge(cfg: BrokerConfig, queue: str) -> int:
    with _session(cfg) as conn:
        ch = conn.channel()
        try:
            return int(ch.queue_purge(queue).method.message_count)
        except pex.ChannelClosedByBroker as exc:
            raise _channel_error(exc, cfg, queue) from None


# --- fill marker -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FillMarker:
    """Which run last filled the work queue, and whether that fill finished."""

    run_id: str
    done: bool
    confirmed: int

    def to_json(self) -> bytes:
        """The marker message's body."""
        return json.dumps(
            {"run_id": self.run_id, "done": self.done, "confirmed": self.confirmed, "v": 1}
        ).encode()

    @classmethod
    def from_json(cls, body: bytes) -> FillMarker | None:
        """Parse a marker body; None for anything that is not one."""
        try:
            raw = json.loads(body)
            return cls(str(raw["run_id"]), bool(raw["done"]), int(raw["confirmed"]))
        except (ValueError, KeyError, TypeError):
            return None


def _read_marker(conn: Any, cfg: BrokerConfig, qs: QueueSettings) -> FillMarker | None:
    """The newest marker (the last message of the fill queue), read without consuming."""
    ch = conn.channel()
    newest: FillMarker | None = None
    try:
        for _ in range(_MARKER_SCAN_LIMIT):
            method, _props, body = ch.basic_get(qs.fill_name, auto_ack=False)
            if method is None:
                break
            marker = FillMarker.from_json(body)
            if marker is not None:
                newest = marker
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise _channel_error(exc, cfg, qs.fill_name) from None
    # Closing the channel returns every message we held to its place in the queue.
    ch.close()
    return newest


def _write_marker(conn: Any, cfg: BrokerConfig, qs: QueueSettings, marker: FillMarker) -> None:
    """Publish the new marker first, then remove older ones: at every moment the queue's last
    message is the newest marker, even if we die half-way."""
    ch = conn.channel()
    ch.confirm_delivery()
    marker_id = uuid.uuid4().hex
    props = pika.BasicProperties(
        delivery_mode=PERSISTENT, content_type=RECORD_CONTENT_TYPE, message_id=marker_id
    )
    try:
        ch.basic_publish("", qs.fill_name, marker.to_json(), props, mandatory=True)
        for _ in range(_MARKER_SCAN_LIMIT):
            method, got, _body = ch.basic_get(qs.fill_name, auto_ack=False)
            if method is None:
                break
            if got.message_id == marker_id:
                ch.basic_reject(method.delivery_tag, requeue=True)
                break
            ch.basic_ack(method.delivery_tag)
    except pex.UnroutableError:
        raise _not_found(cfg, qs.fill_name) from None
    except pex.NackError:
        raise PublishError(
            f"the broker at {cfg.describe()} nacked the fill marker for queue {qs.name!r}; "
            "retry the fill"
        ) from None
    except pex.ChannelClosedByBroker as exc:
        raise _channel_error(exc, cfg, qs.fill_name) from None
    ch.close()


def read_fill_marker(cfg: BrokerConfig, qs: QueueSettings) -> FillMarker | None:
    """The work queue's fill marker: which run filled it and whether that fill finished.
    None when no fill was ever recorded (or the marker queue does not exist)."""
    with _session(cfg) as conn:
        return _read_marker(conn, cfg, qs)


# --- fill --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FillResult:
    """The outcome of `fill_queue`."""

    confirmed: int
    skipped: bool  # True when this run's fill had already finished: nothing was published


def fill_queue(
    cfg: BrokerConfig,
    qs: QueueSettings,
    items: Iterable[Item],
    *,
    run_id: str,
    window: int = 1000,
    on_progress: Callable[[int], None] | None = None,
) -> FillResult:
    """Publish one persistent message per item to the work queue; return the confirmed count.

    Messages: ``message_id`` = item id, headers ``queuejob-run-id`` and ``queuejob-index``,
    delivery mode 2. Publisher confirms are pipelined: up to ``window`` messages (and 32 MiB)
    are unconfirmed at once, so memory stays flat whatever the number of items. Nothing is
    silently lost: a nack or an unroutable return raises `PublishError`, and so does a work
    queue that does not hold exactly the confirmed messages more after the fill than before it
    (a length limit or TTL policy dropped some, or a consumer took some). A work queue deleted
    before the fill raises `QueueNotFound`.

    Idempotent per run, through the marker in ``<name>.fill``: if this run's fill already
    finished, nothing is published (``skipped=True``); if this run's fill stopped half-way (a
    crash, a retry), the work queue is purged and filled again from the start, so each item
    ends up in the queue exactly once. A fill for a new run writes its marker first and marks
    it done with the confirmed count at the end. Callers must not fill a queue that workers
    are consuming (the flow creates the Job only after the fill). ``on_progress(confirmed)``
    is called as confirms arrive. A second concurrent fill of the same queue raises
    `FillInProgress`. The queues must have been declared (`declare_queues`).
    """
    if not run_id:
        raise InvalidInput("run_id must be a non-empty string (the flow run id)")
    if not 1 <= window <= 100_000:
        raise InvalidInput(f"window must be between 1 and 100000 (got {window})")
    with _session(cfg) as conn:
        take_fill_lock(conn, cfg, qs)
        marker = _read_marker(conn, cfg, qs)
        if marker is not None and marker.run_id == run_id and marker.done:
            log.info(
                "fill of %r for run %s already done (%d items)", qs.name, run_id, marker.confirmed
            )
            return FillResult(confirmed=marker.confirmed, skipped=True)
        if marker is not None and marker.run_id == run_id:
            ch = conn.channel()
            try:
                purged = ch.queue_purge(qs.name).method.message_count
            except pex.ChannelClosedByBroker as exc:
                raise _channel_error(exc, cfg, qs.name) from None
            ch.close()
            log.warning(
                "fill of %r for run %s stopped half-way earlier: purged %d messages, refilling",
                qs.name,
                run_id,
                purged,
            )
        else:
            _write_marker(conn, cfg, qs, FillMarker(run_id, done=False, confirmed=0))

        def keepalive() -> None:
            # The lock lives on this connection: service its heartbeats during the fill.
            conn.process_data_events(time_limit=0)

        before = int(_passive(conn, cfg, qs.name).message_count)
        confirmed = _Publisher(cfg, qs, items, run_id, window, on_progress, keepalive).run()
        _check_filled(conn, cfg, qs, before, confirmed)
        _write_marker(conn, cfg, qs, FillMarker(run_id, done=True, confirmed=confirmed))
    return FillResult(confirmed=confirmed, skipped=False)


def _check_filled(
    conn: Any, cfg: BrokerConfig, qs: QueueSettings, before: int, confirmed: int
) -> None:
    """The work queue must hold exactly the confirmed messages more than before the fill."""
    ok = _passive(conn, cfg, qs.name)  # QueueNotFound if it was deleted during the fill
    added = int(ok.message_count) - before
    if added == confirmed:
        return
    consumers = int(ok.consumer_count)
    if added > confirmed:
        why = "something else published into it during the fill: stop it and retry the fill"
    elif consumers:
        why = (
            f"{consumers} consumer(s) are attached to it and may have taken messages: stop "
            "them (an earlier run's pods?) and retry the fill"
        )
    else:
        why = (
            "the queue was deleted and declared again during the fill, or a length limit or "
            "message TTL policy dropped messages: check the queue's policies and retry the fill"
        )
    raise PublishError(
        f"the broker at {cfg.describe()} confirmed {confirmed} messages of the fill of queue "
        f"{qs.name!r}, but the queue gained {added} (it held {before} before the fill); {why}"
    )


def take_fill_lock(conn: Any, cfg: BrokerConfig, qs: QueueSettings) -> None:
    """Hold the queue's publisher lock on ``conn`` (an exclusive queue, gone with the
    connection): one fill or dead-letter requeue publishes into a work queue at a time."""
    ch = conn.channel()
    try:
        ch.queue_declare(qs.lock_name, exclusive=True, auto_delete=True)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 405:  # RESOURCE_LOCKED: another connection holds it
            raise FillInProgress(
                f"a fill or a dead-letter requeue of queue {qs.name!r} on {cfg.describe()} is "
                f"running (it holds {qs.lock_name!r}); retry once it has finished or been stopped"
            ) from None
        raise _channel_error(exc, cfg, qs.lock_name) from None


class FillFrames:
    """The AMQP frames of one fill message, built without pika's per-message marshalling.

    Every message of a fill has the same method frame (publish to the work queue, mandatory)
    and the same properties but for the message id and the index header, so the bytes can be
    put together from constant pieces, at a fraction of the client CPU `pika.BasicProperties`
    and pika's marshalling take. On a small machine the client shares the CPU with the broker,
    so this raises the confirmed fill rate (`bench/fill.py` measures it). The bytes equal
    pika's own, which the unit tests check.

    `encode` returns None when a message needs what this does not do (a body larger than one
    frame); the caller then publishes it through pika.
    """

    _PROPERTY_FLAGS = (
        pika_spec.BasicProperties.FLAG_CONTENT_TYPE
        | pika_spec.BasicProperties.FLAG_HEADERS
        | pika_spec.BasicProperties.FLAG_DELIVERY_MODE
        | pika_spec.BasicProperties.FLAG_MESSAGE_ID
    )

    def __init__(self, channel_number: int, queue: str, run_id: str, body_max: int) -> None:
        publish = pika_spec.Basic.Publish(exchange="", routing_key=queue, mandatory=True)
        self.method = pika_frame.Method(channel_number, publish).marshal()
        self.channel_number = channel_number
        self.body_max = body_max
        run = run_id.encode()
        self._content_type = _shortstr(ITEM_CONTENT_TYPE.encode())
        # The headers table: the run id, then the index key; the index value is appended.
        self._headers_head = (
            _shortstr(HEADER_RUN_ID.encode())
            + b"S"
            + struct.pack(">I", len(run))
            + run
            + _shortstr(HEADER_INDEX.encode())
        )

    @staticmethod
    def properties(item_id: str, index: int, run_id: str) -> pika.BasicProperties:
        """The properties `encode` writes, as pika would send them."""
        return pika.BasicProperties(
            content_type=ITEM_CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=item_id,
            headers={HEADER_RUN_ID: run_id, HEADER_INDEX: index},
        )

    def encode(self, item_id: str, index: int, body: bytes) -> bytes | None:
        """Method, content header and body frame of one message, or None (publish via pika)."""
        if not body or len(body) > self.body_max:
            return None
        message_id = item_id.encode()
        if len(message_id) > 255:
            return None
        pack = struct.pack
        # pika's encoding of an int in a table: 32-bit when it fits, else 64-bit.
        if -2147483648 <= index <= 2147483647:
            table = self._headers_head + b"I" + pack(">i", index)
        else:
            table = self._headers_head + b"l" + pack(">q", index)
        header = b"".join(
            (
                pack(">HHQH", pika_spec.BasicProperties.INDEX, 0, len(body), self._PROPERTY_FLAGS),
                self._content_type,
                pack(">I", len(table)),
                table,
                bytes((PERSISTENT, len(message_id))),
                message_id,
            )
        )
        channel = self.channel_number
        return b"".join(
            (
                self.method,
                pack(">BHI", pika_spec.FRAME_HEADER, channel, len(header)),
                header,
                _FRAME_END,
                pack(">BHI", pika_spec.FRAME_BODY, channel, len(body)),
                body,
                _FRAME_END,
            )
        )


_FRAME_END = bytes((pika_spec.FRAME_END,))


def _shortstr(value: bytes) -> bytes:
    return bytes((len(value),)) + value


def _coalesce_pending_frames(conn: Any) -> None:
    """Join the frames an asynchronous pika connection buffered into one chunk before it writes.

    pika sends every frame with its own send() call, three per message; on a small machine
    those system calls, not the broker, cap a publisher's rate. Joining the pending buffers
    turns a batch into one send. It touches pika internals, so it only acts when they look as
    expected (pika 1.x) and does nothing otherwise.
    """
    transport = getattr(conn, "_transport", None)
    buffers = getattr(transport, "_tx_buffers", None)
    if isinstance(buffers, deque) and len(buffers) > 1:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)


class _Publisher:
    """Pipelined, confirmed publishing on a SelectConnection (one ioloop, no threads)."""

    def __init__(
        self,
        cfg: BrokerConfig,
        qs: QueueSettings,
        items: Iterable[Item],
        run_id: str,
        window: int,
        on_progress: Callable[[int], None] | None,
        keepalive: Callable[[], None] | None,
    ) -> None:
        self.cfg = cfg
        self.qs = qs
        self.items = iter(items)
        self.run_id = run_id
        self.window = window
        self.on_progress = on_progress
        self.keepalive = keepalive
        self.stall_s = max(_MIN_STALL_S, 3 * cfg.connect_timeout_s)
        self.conn: Any = None
        self.channel: Any = None
        self.frames: FillFrames | None = None  # None: every message goes through pika
        self.published = 0
        self.confirmed = 0
        self.bytes_in_flight = 0
        # (delivery tag, item id, size) of unconfirmed messages, in publish order: <= window.
        self.outstanding: deque[tuple[int, str, int]] = deque()
        self.acked_out_of_order: set[int] = set()
        self.exhausted = False
        self.finished = False
        self.error: BaseException | None = None
        self.last_progress_at = time.monotonic()
        self.progress_reported_at = 0.0

    def run(self) -> int:
        params = _connection_params(self.cfg, self.cfg.connect_timeout_s)
        self.conn = SelectConnection(
            params,
            on_open_callback=self._guard(self._on_open),
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        try:
            self.conn.ioloop.start()
        finally:
            if self.conn.is_open:  # an exception escaped the loop: do not leak the socket
                with contextlib.suppress(Exception):
                    self.conn.close()
                    self.conn.ioloop.start()
        if self.error is not None:
            raise self.error
        if not self.finished:
            raise BrokerUnavailable(
                f"the fill of queue {self.qs.name!r} stopped before all items were confirmed "
                f"({self.confirmed} confirmed); retry the fill"
            )
        return self.confirmed

    # -- plumbing ------------------------------------------------------------------------------

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        def wrapped(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:  # re-raised by run() after cleanup
                self._fail(exc)

        return wrapped

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.conn.is_open:
            self.conn.close()
            # A broker whose channel is stuck (waiting on a quorum queue deleted under it, say)
            # never answers the close: drop the socket after a grace period.
            self.conn.ioloop.call_later(_CLOSE_GRACE_S, self._abort)
        elif not self.conn.is_closing:
            self.conn.ioloop.stop()

    def _abort(self) -> None:
        if self.conn.is_closed:
            return
        disconnect = getattr(self.conn, "_adapter_disconnect_stream", None)
        if callable(disconnect):  # pika 1.x: abort the transport; the close callback follows
            with contextlib.suppress(Exception):
                disconnect()
                return
        self.conn.ioloop.stop()

    def _on_open_error(self, _conn: Any, exc: BaseException) -> None:
        if self.error is None:
            self.error = _translate_connect_error(exc, self.cfg, self.cfg.connect_timeout_s)
        self.conn.ioloop.stop()

    def _on_closed(self, _conn: Any, reason: BaseException) -> None:
        if not self.finished and self.error is None:
            self.error = BrokerUnavailable(
                f"lost the connection to the broker at {self.cfg.describe()} during the fill "
                f"of queue {self.qs.name!r} after {self.confirmed} confirmed messages "
                f"({_cause(reason, self.cfg)}); retry the fill (it restarts from scratch)"
            )
        self.conn.ioloop.stop()

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._guard(self._on_channel))
        self._schedule_watchdog()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        # Build frames ourselves only where pika's internals are as expected (pika 1.x).
        body_max = getattr(self.conn, "_body_max_length", None)
        if callable(getattr(self.conn, "_output_marshaled_frames", None)) and isinstance(
            body_max, int
        ):
            self.frames = FillFrames(channel.channel_number, self.qs.name, self.run_id, body_max)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._guard(self._on_return))
        channel.confirm_delivery(
            self._guard(self._on_confirm), callback=self._guard(lambda _frame: self._pump())
        )

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if self.finished:
            return
        if isinstance(reason, pex.ChannelClosedByBroker):
            err: BaseException = _channel_error(reason, self.cfg, self.qs.name)
        else:
            err = BrokerUnavailable(
                f"the publishing channel to {self.cfg.describe()} closed during the fill of "
                f"queue {self.qs.name!r}: {_cause(reason, self.cfg)}; retry the fill"
            )
        self._fail(err)

    def _schedule_watchdog(self) -> None:
        self.conn.ioloop.call_later(min(5.0, self.stall_s / 3), self._guard(self._watchdog))

    def _watchdog(self) -> None:
        if self.finished or self.error is not None:
            return
        if self.keepalive is not None:
            self.keepalive()
        if self.outstanding and time.monotonic() - self.last_progress_at > self.stall_s:
            raise PublishError(
                f"no publisher confirm from {self.cfg.describe()} for {self.stall_s:g} s during "
                f"the fill of queue {self.qs.name!r} ({self.confirmed} confirmed, "
                f"{len(self.outstanding)} waiting); the broker may be overloaded or under a "
                "resource alarm; retry the fill"
            )
        self._schedule_watchdog()

    # -- publishing ----------------------------------------------------------------------------

    def _pump(self) -> None:
        channel = self.channel
        if not channel.is_open:
            return  # the channel's close callback ends the fill
        frames = self.frames
        pending: list[bytes] = []
        while (
            not self.exhausted
            and len(self.outstanding) < self.window
            and self.bytes_in_flight < _MAX_BYTES_IN_FLIGHT
        ):
            try:
                item = next(self.items)
            except StopIteration:
                self.exhausted = True
                break
            data = None if frames is None else frames.encode(item.id, item.index, item.body)
            if data is not None:
                pending.append(data)
            else:  # through pika, after what is pending: the delivery tags follow publish order
                self._emit(pending)
                props = FillFrames.properties(item.id, item.index, self.run_id)
                channel.basic_publish("", self.qs.name, item.body, props, mandatory=True)
            self.published += 1
            size = len(item.body)
            self.outstanding.append((self.published, item.id, size))
            self.bytes_in_flight += size
        self._emit(pending)
        _coalesce_pending_frames(self.conn)
        if self.exhausted and not self.outstanding:
            self._finish()

    def _emit(self, pending: list[bytes]) -> None:
        """Hand frames built by `FillFrames` to the connection, as one write."""
        if pending:
            self.conn._output_marshaled_frames([b"".join(pending)])
            pending.clear()

    def _on_return(self, _channel: Any, method: Any, props: Any, _body: bytes) -> None:
        raise PublishError(
            f"item {props.message_id!r} was returned unroutable by {self.cfg.describe()} "
            f"({method.reply_code} {method.reply_text}): queue {self.qs.name!r} does not exist "
            "(deleted during the fill?); declare the queues again and retry the fill"
        )

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        if isinstance(method, pika.spec.Basic.Nack):
            item = next((i for t, i, _ in self.outstanding if t == tag), "?")
            raise PublishError(
                f"the broker at {self.cfg.describe()} nacked message {tag} (item {item!r}) "
                f"of the fill of queue {self.qs.name!r}; retry the fill"
            )
        if method.multiple:
            while self.outstanding and self.outstanding[0][0] <= tag:
                self._confirm_head()
        else:
            self.acked_out_of_order.add(tag)
        while self.outstanding and self.outstanding[0][0] in self.acked_out_of_order:
            self.acked_out_of_order.discard(self.outstanding[0][0])
            self._confirm_head()
        now = time.monotonic()
        self.last_progress_at = now
        if self.on_progress is not None and now - self.progress_reported_at >= 0.2:
            self.progress_reported_at = now
            self.on_progress(self.confirmed)
        self._pump()

    def _confirm_head(self) -> None:
        _tag, _item, size = self.outstanding.popleft()
        self.bytes_in_flight -= size
        self.confirmed += 1

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.on_progress is not None:
            self.on_progress(self.confirmed)
        self.conn.close()


# --- dead letters ------------------------------------------------------------------------------


def dead_letter_ids(
    cfg: BrokerConfig, qs: QueueSettings, *, run_id: str, limit: int = 100_000
) -> list[str]:
    """Item ids (message ids) of this run's messages in ``<name>.dead``, oldest first, at most
    ``limit``. Read without consuming: every message stays in the queue."""
    with _session(cfg) as conn:
        total = int(_passive(conn, cfg, qs.dead_name).message_count)
        if total == 0 or limit <= 0:
            return []
        ch = conn.channel()
        # Every message we read stays unacked until the channel closes; an unbounded prefetch
        # (0) when there are more than the 16-bit maximum.
        ch.basic_qos(prefetch_count=total if total <= 65535 else 0)
        ids: list[str] = []
        seen_ids: set[str] = set()
        deadline = time.monotonic() + max(10.0, cfg.connect_timeout_s)
        deliveries = ch.consume(
            qs.dead_name, auto_ack=False, inactivity_timeout=min(2.0, cfg.connect_timeout_s)
        )
        for seen, (method, props, _body) in enumerate(deliveries, start=1):
            if method is None:  # nothing more arrived within the inactivity timeout
                break
            headers = props.headers or {}
            mid = props.message_id
            if _header_str(headers.get(HEADER_RUN_ID)) == run_id and mid and mid not in seen_ids:
                seen_ids.add(mid)
                ids.append(mid)
            if seen >= total or len(ids) >= limit or time.monotonic() > deadline:
                break
        # Closing the channel hands every message back to the queue, in its place.
        ch.close()
        return ids


def _header_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResultBatch:
    """Records taken from the results queue in one `ResultsConsumer.take`, and what to
    acknowledge once they are saved: every delivery up to ``last_tag`` on the channel
    ``channel_gen`` (foreign and malformed messages included)."""

    records: list[OutcomeRecord]
    last_tag: int
    channel_gen: int
    messages: int


class ResultsConsumer:
    """Reads outcome records from ``<name>.results`` while the flow waits for the Job.

    Use as a context manager. Two ways to read:

    - `take` + `ack`: the flow's way. At most ``prefetch`` records are unacknowledged at any
      time (the broker sends no more); the caller saves a batch durably, then acknowledges it
      (one ``basic.ack`` with ``multiple``). A flow run that dies before the ack loses nothing:
      the records go back to the queue and are delivered again, and the ledger counts a record
      it already saved once.
    - `drain`: returns this run's records and leaves them unacknowledged until the consumer
      closes (they go back to the queue); `purge_results` removes them.

    Records of other runs are counted in `foreign` (so an old run's leftovers cannot clog the
    queue), and so are messages that are not outcome records (`malformed`): `drain` acks them
    at once, `take` with its batch. If the connection drops, a read reconnects once; deliveries
    of the lost channel cannot be acknowledged any more (the broker delivers them again).
    """

    def __init__(
        self, cfg: BrokerConfig, qs: QueueSettings, *, run_id: str, prefetch: int = 0
    ) -> None:
        self.cfg = cfg
        self.qs = qs
        self.run_id = run_id
        self.prefetch = max(0, min(prefetch, 65535))  # 0: no limit
        self.foreign = 0
        self.malformed = 0
        self._conn: Any = None
        self._channel: Any = None
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._gen = 0  # which channel the delivery tags belong to
        self.unacked = 0  # deliveries handed out by `take` and not acknowledged yet
        self.max_unacked_seen = 0

    def __enter__(self) -> ResultsConsumer:
        self._open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _open(self) -> None:
        self._buffer.clear()
        conn = _open_blocking(self.cfg)
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=self.prefetch)
            ch.basic_consume(self.qs.results_name, self._on_message, auto_ack=False)
        except pex.ChannelClosedByBroker as exc:
            _close_quietly(conn)
            raise _channel_error(exc, self.cfg, self.qs.results_name) from None
        except BaseException:
            _close_quietly(conn)
            raise
        self._conn, self._channel = conn, ch
        self._gen += 1
        self.unacked = 0

    def _on_message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        self._buffer.append((int(method.delivery_tag), body))

    def drain(self, *, max_wait_s: float = 0.5, max_records: int = 10_000) -> list[OutcomeRecord]:
        """This run's records that arrived so far: waits up to ``max_wait_s`` for the first
        one, then takes what is already there, up to ``max_records``."""
        return self._reconnecting(lambda: self._drain(max_wait_s, max_records))

    def take(self, *, max_wait_s: float = 0.5, max_records: int = 5_000) -> ResultBatch:
        """Up to ``max_records`` deliveries that arrived so far (waiting up to ``max_wait_s``
        for the first one), parsed; this run's records in the batch. Acknowledge the batch with
        `ack` once its records are saved."""
        return self._reconnecting(lambda: self._take(max_wait_s, max_records))

    def _reconnecting(self, step: Callable[[], T]) -> T:
        """``step()``; after a lost connection, once more on a new one (the broker delivers the
        unacknowledged records again), then `BrokerUnavailable`."""
        try:
            return step()
        except (pex.AMQPConnectionError, pex.StreamLostError, pex.AMQPChannelError) as first:
            log.warning(
                "results consumer lost its connection (%s); reconnecting", _cause(first, self.cfg)
            )
            self.close()
            try:
                self._open()
                return step()
            except (pex.AMQPConnectionError, pex.StreamLostError, pex.AMQPChannelError) as exc:
                self.close()
                raise BrokerUnavailable(
                    f"lost the connection to {self.cfg.describe()} while reading outcome records "
                    f"from {self.qs.results_name!r}: {_cause(exc, self.cfg)}; retry later"
                ) from None

    def _take(self, max_wait_s: float, max_records: int) -> ResultBatch:
        self._fetch(max_wait_s, max_records)
        records: list[OutcomeRecord] = []
        last_tag = 0
        n = 0
        while self._buffer and n < max_records:
            tag, body = self._buffer.popleft()
            n += 1
            last_tag = tag
            try:
                record = OutcomeRecord.from_json(body)
            except (ValueError, TypeError):
                self.malformed += 1
                continue
            if record.run_id != self.run_id:
                self.foreign += 1
                continue
            records.append(record)
        # Counted from the tags: this channel's deliveries so far, less those acknowledged.
        self.unacked += n
        self.max_unacked_seen = max(self.max_unacked_seen, self.unacked + len(self._buffer))
        return ResultBatch(records=records, last_tag=last_tag, channel_gen=self._gen, messages=n)

    def ack(self, batch: ResultBatch) -> bool:
        """Acknowledge every delivery up to the batch's last one. False (nothing done) when the
        batch is empty or came from a channel that has been lost since: the broker has
        already put those messages back."""
        if batch.messages == 0 or batch.channel_gen != self._gen or self._channel is None:
            return False
        try:
            self._channel.basic_ack(batch.last_tag, multiple=True)
        except (pex.AMQPConnectionError, pex.StreamLostError, pex.AMQPChannelError) as exc:
            log.warning(
                "could not acknowledge %d outcome records (%s); the broker delivers them again",
                batch.messages,
                _cause(exc, self.cfg),
            )
            self.close()
            return False
        self.unacked = max(0, self.unacked - batch.messages)
        return True

    def _fetch(self, max_wait_s: float, max_records: int) -> None:
        if self._conn is None:
            self._open()
        conn = self._conn
        deadline = time.monotonic() + max(0.0, max_wait_s)
        while not self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn.process_data_events(time_limit=min(remaining, 0.25))
        # Take what has already arrived without waiting further.
        before = -1
        while len(self._buffer) != before and len(self._buffer) < max_records:
            before = len(self._buffer)
            conn.process_data_events(time_limit=0)

    def _drain(self, max_wait_s: float, max_records: int) -> list[OutcomeRecord]:
        self._fetch(max_wait_s, max_records)
        records: list[OutcomeRecord] = []
        taken = 0
        while self._buffer and taken < max_records:
            tag, body = self._buffer.popleft()
            taken += 1
            try:
                record = OutcomeRecord.from_json(body)
            except (ValueError, TypeError):
                self.malformed += 1
                self._channel.basic_ack(tag)
                continue
            if record.run_id != self.run_id:
                self.foreign += 1
                self._channel.basic_ack(tag)
                continue
            records.append(record)  # left unacknowledged until purge_results
        return records

    def close(self) -> None:
        """Close the connection; unacknowledged records go back to the queue."""
        conn, self._conn, self._channel = self._conn, None, None
        self._buffer.clear()
        self.unacked = 0
        _close_quietly(conn)


__all__ = [
    "CLASSIC_STORAGE_ARGUMENTS",
    "HEADER_DELIVERY_COUNT",
    "HEADER_FAILURES",
    "HEADER_INDEX",
    "HEADER_RUN_ID",
    "BrokerConfig",
    "FillFrames",
    "FillMarker",
    "FillResult",
    "QueueDepth",
    "QueueSettings",
    "ResultBatch",
    "ResultsConsumer",
    "check_queue_name",
    "connect",
    "dead_letter_ids",
    "declare_queues",
    "delete_queues",
    "fill_queue",
    "purge_results",
    "purge_work_queue",
    "queue_depths",
    "read_fill_marker",
    "wait_for_broker",
    "work_queue_arguments",
]
