"""The broker's configuration: `BrokerConfig` (URL, timeouts, redaction of the password),
`QueueSettings` (a work queue's queue names and arguments) and the message headers the fill
writes and the worker reads.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from queuejob.flows.core.errors import (
    ConfigError,
    InvalidInput,
)

if TYPE_CHECKING:  # the worker imports this module: keep pydantic (items.py) out of its start-up
    pass


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
                f"broker URL {self.redacted()!r} is malformed ({self.scrub(str(exc))}); "
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

    def scrub(self, text: str) -> str:
        """Remove the password from text that came from a library."""
        password = self._password()
        if password and len(password) >= 3:
            text = text.replace(password, "***")
            quoted = urllib.parse.quote(password, safe="")
            if quoted != password:
                text = text.replace(quoted, "***")
        return text

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
        """The queue recording which dead letters a requeue moved back (broker.dead_letters)."""
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


AUX_ARGUMENTS: dict[str, Any] = {"x-queue-type": "classic"}
