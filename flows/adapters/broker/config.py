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


@dataclass(frozen=True)
class Endpoint:
    """One broker node of a URL: its host and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class _Parsed:
    scheme: str
    username: str | None
    password: str | None
    endpoints: tuple[Endpoint, ...]
    path: str
    query: str


def _parse(url: str) -> _Parsed:
    """Split an AMQP URL whose host part may name several nodes (``h1:5672,h2,h3:5673``).
    ValueError for anything malformed (the caller scrubs the message)."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, hostpart = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user)
        password = urllib.parse.unquote(secret) if colon else None
    default = 5671 if parts.scheme == "amqps" else 5672
    endpoints: list[Endpoint] = []
    for raw in hostpart.split(","):
        raw = raw.strip()
        if raw.startswith("["):
            host, bracket, rest = raw[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"bad IPv6 host {raw!r}")
            port_text = rest[1:]
        else:
            host, _, port_text = raw.partition(":")
            if ":" in port_text:
                raise ValueError(f"an IPv6 address needs brackets: {raw!r}")
        if port_text and not port_text.isdigit():
            raise ValueError(f"port {port_text!r} of host {host!r} is not a number")
        port = int(port_text) if port_text else default
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} of host {host!r} is out of range")
        endpoints.append(Endpoint(host, port))
    return _Parsed(parts.scheme, username, password, tuple(endpoints), parts.path, parts.query)


def _query_ca_file(query: str) -> str | None:
    """A CA bundle named in the URL's query: ``ca_file=/path`` or pika's
    ``ssl_options={'ca_certs': '/path'}`` (what the RabbitMQBroker block writes)."""
    params = urllib.parse.parse_qs(query)
    if params.get("ca_file"):
        return params["ca_file"][0]
    if params.get("ssl_options"):
        import ast

        try:
            opts = ast.literal_eval(params["ssl_options"][0])
        except (ValueError, SyntaxError):
            return None
        if isinstance(opts, dict):
            ca = opts.get("ca_certs") or opts.get("cafile")
            return str(ca) if ca else None
    return None


# Set in a worker pod by the Job when its template names a CA Secret or ConfigMap: the CA
# bundle mounted into the pod, which wins over a CA file named in the URL.
CA_FILE_ENV = "QUEUEJOB_BROKER_CA_FILE"


@dataclass(frozen=True, repr=False)
class BrokerConfig:
    """How to reach the broker: an AMQP URL plus timeouts. `repr`/`str` never show the password.

    ``url`` is ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS; the vhost is
    URL-encoded, ``%2F`` for ``/``; user and password default to guest/guest). The host part may
    name several nodes of one cluster, comma-separated (``amqp://user:pw@rabbit-0:5672,
    rabbit-1:5672,rabbit-2:5672/%2F``; a node without a port gets the scheme's default): each
    connection attempt goes through them in turn, starting after the last one that failed.
    ``ca_file`` is a CA bundle to verify the broker's certificate with (system CAs otherwise);
    the URL may name one too (``?ca_file=/path``, or pika's ``ssl_options={'ca_certs': ...}``).
    ``management_url`` (``http(s)://host:15672``) enables the management API, used for the
    unacked count of `queue_depths` and the full argument set of a `QueueConflict`; it is
    queried with the AMQP URL's credentials.

    ``reconnect_s`` is how long a call rides out a lost node or connection: the adapters'
    calls (declaring, filling, depths, the dead-letter requeue, cleanup) connect again, through
    the next node, and carry on for up to that long before they raise `BrokerUnavailable`.
    0 (the default) makes each call fail at its first lost connection.
    """

    url: str
    connect_timeout_s: float = 10.0
    heartbeat_s: int = 30
    ca_file: str | None = None
    management_url: str | None = None
    reconnect_s: float = 0.0

    def __post_init__(self) -> None:
        try:
            parsed = _parse(self.url)
        except ValueError as exc:
            raise ConfigError(
                f"broker URL {self.redacted()!r} is malformed ({self.scrub(str(exc))}); "
                "write it as amqp://user:password@host:5672/vhost (several nodes: "
                "amqp://user:password@host1:5672,host2:5672/vhost)"
            ) from None
        if parsed.scheme not in ("amqp", "amqps"):
            raise ConfigError(
                f"broker URL {self.redacted()!r} must start with amqp:// or amqps:// "
                f"(got {parsed.scheme or 'no scheme'!r})"
            )
        if not all(e.host for e in parsed.endpoints):
            raise ConfigError(
                f"broker URL {self.redacted()!r} names no host; "
                "write it as amqp://user:password@host:5672/vhost"
            )
        if any(e.port == 0 for e in parsed.endpoints):
            raise ConfigError(f"broker URL {self.redacted()!r} has port 0")
        if self.connect_timeout_s <= 0:
            raise ConfigError(f"connect_timeout_s must be positive (got {self.connect_timeout_s})")
        if self.heartbeat_s < 0:
            raise ConfigError(f"heartbeat_s must be 0 (off) or positive (got {self.heartbeat_s})")
        if self.reconnect_s < 0:
            raise ConfigError(f"reconnect_s must be 0 or more (got {self.reconnect_s})")
        if self.ca_file is None:
            ca = _query_ca_file(parsed.query)
            if ca is not None:
                object.__setattr__(self, "ca_file", ca)
        object.__setattr__(self, "_parsed", parsed)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The broker nodes the URL names, in order (one for a plain URL)."""
        return self._p.endpoints

    @property
    def _p(self) -> _Parsed:
        return self.__dict__["_parsed"]  # type: ignore[no-any-return]

    @property
    def tls(self) -> bool:
        """True for amqps URLs."""
        return self._p.scheme == "amqps"

    @property
    def host(self) -> str:
        """The (first) broker host name or address."""
        return self.endpoints[0].host

    @property
    def port(self) -> int:
        """The (first) port, 5672 (amqp) or 5671 (amqps) unless the URL names one."""
        return self.endpoints[0].port

    @property
    def vhost(self) -> str:
        """The virtual host, ``/`` when the URL has no path."""
        path = self._p.path
        return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"

    @property
    def username(self) -> str:
        """The user name (guest when the URL has none)."""
        return self._p.username or "guest"

    def with_options(self, **changes: Any) -> BrokerConfig:
        """A copy with some fields changed (``reconnect_s=60``, ``ca_file=...``)."""
        import dataclasses

        return dataclasses.replace(self, **changes)

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
        parsed = self.__dict__.get("_parsed")
        if parsed is not None:
            return parsed.password if parsed.password is not None else "guest"
        # Before parsing succeeded (a malformed URL being reported): the best guess.
        userinfo = self.url.split("://", 1)[-1].rpartition("@")[0]
        if ":" in userinfo:
            return urllib.parse.unquote(userinfo.split(":", 1)[1])
        return "guest"

    def redacted(self) -> str:
        """The URL with its password replaced by ``***``."""
        scheme, sep, rest = self.url.partition("://")
        if not sep:
            return "<unparseable broker URL>"
        netloc_end = len(rest)
        for stop in "/?#":
            i = rest.find(stop, rest.rfind("@") + 1)
            if i != -1:
                netloc_end = min(netloc_end, i)
        netloc, tail = rest[:netloc_end], rest[netloc_end:]
        userinfo, at, hosts = netloc.rpartition("@")
        if not at or ":" not in userinfo:
            return self.url
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:***@{hosts}{tail}"

    def describe(self) -> str:
        """``host:port vhost '/'`` (``h1:5672,h2:5672 vhost '/'`` for several nodes): how
        errors and logs name the broker."""
        return f"{','.join(str(e) for e in self.endpoints)} vhost {self.vhost!r}"

    def __repr__(self) -> str:
        return (
            f"BrokerConfig(url={self.redacted()!r}, connect_timeout_s={self.connect_timeout_s}, "
            f"heartbeat_s={self.heartbeat_s}, ca_file={self.ca_file!r}, "
            f"management_url={self.management_url!r}, reconnect_s={self.reconnect_s})"
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


def work_queue_arguments(qs: QueueSettings, *, broker_major: int = 3) -> dict[str, Any]:
    """The ``x-`` arguments the work queue is declared with, on a broker of major version
    ``broker_major`` (`server_major` reads it from a connection)."""
    args: dict[str, Any] = {
        "x-queue-type": qs.queue_type,
        # Dead letters go through the default exchange straight to <name>.dead: no exchange to
        # declare, bind or clean up.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": qs.dead_name,
    }
    if qs.queue_type == "quorum":
        if qs.delivery_limit is not None:
            args["x-delivery-limit"] = qs.delivery_limit
        elif broker_major >= 4:
            # RabbitMQ 4 gives every quorum queue a delivery limit of 20 unless told -1 (none);
            # 3.x has none by default, and takes -1 as "dead-letter at the first return".
            args["x-delivery-limit"] = -1
    if qs.queue_type == "classic":
        args.update(CLASSIC_STORAGE_ARGUMENTS)
    return args


def companion_arguments(qs: QueueSettings, *, broker_major: int = 3) -> dict[str, Any]:
    """The arguments of the run's other queues (dead letters, results, fill marker, requeue
    records): replicated like the work queue when it is a quorum queue, so that losing one
    node of a cluster loses none of them.

    They are read without being consumed (the fill marker, dead letters listed) or handed back
    after a lost connection (records), which a quorum queue counts as deliveries: on RabbitMQ 4,
    whose quorum queues drop a message after 20 of them by default, they are declared with no
    delivery limit (-1).
    """
    if qs.queue_type != "quorum":
        return dict(AUX_ARGUMENTS)
    args: dict[str, Any] = {"x-queue-type": "quorum"}
    if broker_major >= 4:
        args["x-delivery-limit"] = -1
    return args


AUX_ARGUMENTS: dict[str, Any] = {"x-queue-type": "classic"}
