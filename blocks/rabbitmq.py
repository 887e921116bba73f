"""The RabbitMQ broker a run's work queue lives on, as a Prefect block.

The flow reads this block by name, checks the broker from the flow run, and hands the pods the
URL from `RabbitMQBroker.url` through the run's Kubernetes Secret. That method is the only place the
password is revealed; everything meant for display (`redacted_url`, ``repr``, ``str``, logs) masks
it.
"""

from __future__ import annotations

import ast
import re
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from queuejob.blocks._validation import readable_errors
from queuejob.flows.core.errors import ConfigError

DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671
REDACTED = "***"
# Query parameters `from_url` understands (pika's names); `url` writes the same ones.
_URL_PARAMS = ("heartbeat", "socket_timeout", "stack_timeout", "ssl_options")
# A host name or an IP address; no scheme, credentials, port or path in it.
_HOST = re.compile(r"^(?:[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[?[0-9A-Fa-f:.]+\]?)$")


class RabbitMQBroker(Block):
    """A RabbitMQ broker: where the run's work queue, results queue and dead letters live.

    Pods receive the URL built by `url()` through a Kubernetes Secret, so the host must be
    reachable from inside the cluster (for the manifests shipped with queuejob:
    ``rabbitmq-service.<namespace>.svc``).
    """

    _block_type_name = "RabbitMQ Broker"
    _block_type_slug = "rabbitmq-broker"
    _description = (
        "Connection settings for the RabbitMQ broker that holds queuejob's work queues. The "
        "password is stored as a secret and only reaches worker pods through a Kubernetes Secret."
    )

    host: str = Field(
        min_length=1,
        max_length=253,
        description="Broker host name or IP address as seen from the flow run and the worker "
        "pods, e.g. 'rabbitmq-service.default.svc'. No scheme, port or credentials.",
    )
    hosts: list[str] = Field(
        default_factory=list,
        description="More nodes of the same RabbitMQ cluster, each 'host' or 'host:port' (the "
        "port defaults to 'port'), tried in turn after 'host' when a node does not answer. "
        "Leave empty when one Service name reaches every node (the usual setup).",
    )
    port: int = Field(
        default=DEFAULT_PORT,
        ge=1,
        le=65535,
        description="AMQP port: 5672 for plain AMQP, usually 5671 when TLS is on.",
    )
    vhost: str = Field(
        default="/",
        min_length=1,
        description="RabbitMQ virtual host; '/' is the default one.",
    )
    username: str = Field(
        default="guest",
        min_length=1,
        description="User name. RabbitMQ's 'guest' user can only log in from localhost unless "
        "the broker allows it.",
    )
    password: SecretStr = Field(
        min_length=1,
        description="Password for the user; stored as a secret and never shown in logs.",
    )
    tls: bool = Field(
        default=False,
        description="Connect with TLS (amqps). The broker's certificate is checked against "
        "the system's CAs, or against ca_file when given.",
    )
    ca_file: str | None = Field(
        default=None,
        description="Absolute path of a PEM CA bundle inside the flow-run and worker "
        "containers (e.g. mounted from a ConfigMap) to verify the broker with; needs tls.",
    )
    heartbeat_s: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="AMQP heartbeat in seconds; 0 turns heartbeats off.",
    )
    connect_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Seconds allowed to open the TCP connection; the whole TCP/TLS/AMQP "
        "handshake may take twice as long.",
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not _HOST.fullmatch(value):
            raise ValueError(
                f"host {value!r} is not a host name or IP address: give only the host, "
                "without scheme, credentials, port or path"
            )
        return value.strip("[]")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        out = []
        for entry in value:
            host, port = _split_host_port(entry)
            if not _HOST.fullmatch(host) or (port is not None and not 1 <= port <= 65535):
                raise ValueError(
                    f"hosts entry {entry!r} is not 'host' or 'host:port': give a host name or "
                    "IP address (IPv6 in brackets), optionally with a port"
                )
            out.append(entry.strip())
        return out

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(
                f"ca_file {value!r} must be an absolute path inside the containers, "
                "e.g. '/etc/queuejob/ca.pem'"
            )
        return value

    @model_validator(mode="after")
    def _ca_needs_tls(self) -> RabbitMQBroker:
        if self.ca_file is not None and not self.tls:
            raise ValueError("ca_file is set but tls is off: turn tls on or clear ca_file")
        return self

    def url(self) -> str:
        """The AMQP URL for the run's Secret, password included (with `hosts`, the host part
        names every node: ``amqp://user:pw@h1:5672,h2:5672/vhost``, which queuejob's flow and
        worker go through in turn).

        The vhost and credentials are percent-encoded; ``heartbeat``, ``socket_timeout`` and
        ``stack_timeout`` (twice the connect timeout) are query parameters, and with a CA file
        ``ssl_options={'ca_certs': ...}``. Never log the result: use `redacted_url` for display.
        """
        return self._build_url(quote(self.password.get_secret_value(), safe=""))

    def redacted_url(self) -> str:
        """The same URL with the password replaced by ``***``, safe to log and display."""
        return self._build_url(REDACTED)

    def endpoint(self) -> str:
        """``host:port/vhost`` (``h1:5672,h2:5672/vhost`` with more hosts), for messages that
        name the broker."""
        return f"{self._netloc_hosts()}/{quote(self.vhost, safe='')}"

    def _netloc_host(self) -> str:
        # An IPv6 address needs brackets in a URL.
        return f"[{self.host}]" if ":" in self.host else self.host

    def _netloc_hosts(self) -> str:
        """Every node as ``host:port``, comma-separated: the URL's host part."""
        nodes = [f"{self._netloc_host()}:{self.port}"]
        for entry in self.hosts:
            host, port = _split_host_port(entry)
            shown = f"[{host}]" if ":" in host else host
            nodes.append(f"{shown}:{port if port is not None else self.port}")
        return ",".join(nodes)

    def _build_url(self, secret: str) -> str:
        # `secret` arrives percent-encoded (or as the REDACTED marker).
        scheme = "amqps" if self.tls else "amqp"
        user = quote(self.username, safe="")
        query: dict[str, str] = {
            "heartbeat": str(self.heartbeat_s),
            "socket_timeout": f"{self.connect_timeout_s:g}",
            "stack_timeout": f"{2 * self.connect_timeout_s:g}",
        }
        if self.ca_file:
            # pika evaluates this with ast.literal_eval and loads the CA into a verifying context.
            query["ssl_options"] = repr({"ca_certs": self.ca_file})
        return (
            f"{scheme}://{user}:{secret}@{self._netloc_hosts()}/"
            f"{quote(self.vhost, safe='')}?{urlencode(query)}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.redacted_url()!r})"

    def __str__(self) -> str:
        return self.redacted_url()

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> RabbitMQBroker:
        """A block from an AMQP URL such as ``amqp://user:pass@host:5672/%2F?heartbeat=30``.

        Accepts the schemes amqp and amqps (TLS; the port defaults to 5671), percent-encoded
        credentials and vhost, and the query parameters `url` writes. Without credentials the
        URL means guest/guest, as it does to pika. Keyword arguments override parsed values.
        Raises `ConfigError` (never quoting the password) when the URL cannot be used.
        """
        values = _parse_url(url)
        values.update(kw)
        try:
            return cls(**values)
        except ValidationError as exc:
            # Without the chained pydantic error: its message quotes raw input values.
            raise ConfigError(
                f"broker URL for host {values.get('host')!r} is not usable: "
                f"{readable_errors(exc, show_input=False)}"
            ) from None


def _parse_url(url: str) -> dict[str, Any]:
    """The block's field values from an AMQP URL; errors name the host, never the URL."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise ConfigError(
            "broker URL is malformed: expected amqp[s]://user:password@host:port/vhost"
        ) from None
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        # An unencoded '/', '?' or '#' in the credentials ends the host part early, leaving the
        # rest of the password in the path: refuse rather than store (and show) it as a vhost.
        raise ConfigError(
            "broker URL has an '@' after the host: percent-encode '/', '?', '#' and '@' in the "
            "user name and password (e.g. with urllib.parse.quote(password, safe=''))"
        )
    netloc_hosts = parts.netloc.rpartition("@")[2]
    more: list[str] = []
    if "," in netloc_hosts:
        first, *rest = netloc_hosts.split(",")
        more = [r.strip() for r in rest]
        parts = parts._replace(netloc=parts.netloc[: len(parts.netloc) - len(netloc_hosts)] + first)
    try:
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ConfigError(
            "broker URL is malformed (bad port or brackets): expected "
            "amqp[s]://user:password@host:port/vhost"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise ConfigError(
            f"broker URL scheme {parts.scheme!r} is not supported: use amqp:// or amqps:// (TLS)"
        )
    if not host:
        raise ConfigError("broker URL has no host: expected amqp[s]://user:password@host/vhost")
    tls = scheme == "amqps"
    values: dict[str, Any] = {
        "host": host,
        "port": port if port is not None else (DEFAULT_TLS_PORT if tls else DEFAULT_PORT),
        "tls": tls,
        "username": "guest",
        "password": SecretStr("guest"),
    }
    if more:
        if not all(more):
            raise ConfigError(f"broker URL for host {host!r} has an empty entry in its host list")
        values["hosts"] = more
    if parts.username is not None:
        if parts.password is None:
            raise ConfigError(
                f"broker URL for host {host!r} names a user but no password: write "
                "amqp[s]://user:password@host/vhost (percent-encode special characters)"
            )
        values["username"] = unquote(parts.username)
        values["password"] = SecretStr(unquote(parts.password))
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if path:
        if "/" in path:
            raise ConfigError(
                f"broker URL for host {host!r} has a vhost with an unencoded '/': "
                "percent-encode it (the default vhost '/' is written %2F)"
            )
        values["vhost"] = unquote(path)
    values.update(_parse_query(parts.query, host=host, tls=tls))
    return values


def _parse_query(query: str, *, host: str, tls: bool) -> dict[str, Any]:
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"broker URL for host {host!r} has a malformed query string") from None
    unknown = sorted(set(params) - set(_URL_PARAMS))
    if unknown:
        raise ConfigError(
            f"broker URL for host {host!r} has query parameters the RabbitMQ Broker block cannot "
            f"hold: {unknown}; supported: {list(_URL_PARAMS)}"
        )
    repeated = sorted(k for k, v in params.items() if len(v) > 1)
    if repeated:
        raise ConfigError(f"broker URL for host {host!r} repeats query parameters {repeated}")
    values: dict[str, Any] = {}
    if "heartbeat" in params:
        values["heartbeat_s"] = params["heartbeat"][0]
    if "socket_timeout" in params:
        values["connect_timeout_s"] = params["socket_timeout"][0]
    # stack_timeout is derived from the connect timeout, so it is accepted and not stored.
    if "ssl_options" in params:
        values["ca_file"] = _ca_from_ssl_options(params["ssl_options"][0], host=host, tls=tls)
    return values


def _ca_from_ssl_options(raw: str, *, host: str, tls: bool) -> str | None:
    try:
        opts = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        opts = ...
    if opts is None:
        if tls:
            raise ConfigError(f"broker URL for host {host!r} says amqps but ssl_options=None")
        return None
    if not tls:
        raise ConfigError(
            f"broker URL for host {host!r} has ssl_options but the scheme is amqp: use amqps://"
        )
    if not isinstance(opts, dict) or not set(opts) <= {"ca_certs", "cafile"}:
        raise ConfigError(
            f"broker URL for host {host!r}: ssl_options must be a dict with only 'ca_certs' "
            "(a CA bundle path); other TLS settings are not supported by the block"
        )
    ca = opts.get("ca_certs") or opts.get("cafile")
    return str(ca) if ca is not None else None


def _split_host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` as (host, port or None); a port that is
    not a number gives port -1 (rejected by the caller)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:
        host, port_text = entry, ""
    if not port_text:
        return host, None
    return host, int(port_text) if port_text.isdigit() else -1
