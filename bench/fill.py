"""Figure 1: filling a durable queue with small persistent items, against the docs' ways.

Four ways to put the same items (the integers as text) into the same kind of queue (durable,
classic: what the docs' ``amqp-declare-queue -d`` makes), measured in the same rounds:

* queuejob's fill (`fill_queue`): persistent, publisher-confirmed, pipelined;
* the docs' loop: one ``amqp-publish -p`` process per message, from a shell loop (timed over
  fewer messages and extrapolated, as the issue says);
* ``amqp-publish -l -p``: the C client, one process reading one message per line, no confirms;
* pika's plain way: a `BlockingConnection` with confirms, waiting for each one (timed over
  fewer messages and extrapolated).

queuejob's default queue type, quorum, costs the broker differently (about half the CPU per
persistent message of a classic queue here), so queuejob's fill and ``amqp-publish -l`` are also
measured into a quorum queue, and the rate and C-client targets are checked for both types.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path

import pika

from bench.common import (
    BenchError,
    Context,
    FigureResult,
    ensure_amqp_tools,
    queue_name,
    rounds,
    say,
    wait_until,
)
from flows.adapters import broker as broker_io
from flows.core.items import ItemSource, iter_items

KEY = "fill"
TITLE = "Fill: 100,000 small persistent items into a durable queue"

TARGET_RATE = 10_000.0  # confirmed messages/s
TARGET_VS_DOCS = 100.0
TARGET_VS_C_CLIENT = 0.5


def _sizes(quick: bool) -> tuple[int, int, int]:
    """(items for the full fills, messages for the docs' loop, messages for pika-each)."""
    return (10_000, 200, 1_000) if quick else (100_000, 1_000, 3_000)


# --- queues ------------------------------------------------------------------------------------


def _declare_plain(cfg: broker_io.BrokerConfig, name: str, queue_type: str = "classic") -> None:
    """A durable queue with no other arguments: ``amqp-declare-queue -d -q NAME`` (classic)."""
    conn = broker_io.connect(cfg)
    try:
        arguments = {"x-queue-type": queue_type} if queue_type != "classic" else None
        conn.channel().queue_declare(name, durable=True, arguments=arguments)
    finally:
        conn.close()


def _depth(cfg: broker_io.BrokerConfig, name: str) -> int:
    conn = broker_io.connect(cfg)
    try:
        return int(conn.channel().queue_declare(name, passive=True).method.message_count)
    finally:
        conn.close()


def _delete(cfg: broker_io.BrokerConfig, name: str) -> None:
    with contextlib.suppress(Exception):
        broker_io.delete_queues(cfg, broker_io.QueueSettings(name=name))


def _expect_depth(
    cfg: broker_io.BrokerConfig, name: str, n: int, what: str, *, timeout_s: float = 30.0
) -> None:
    """Every message must have arrived: a fast way that loses messages is no baseline."""
    wait_until(
        lambda: _depth(cfg, name) >= n, timeout_s=timeout_s, what=f"{n} messages from {what}"
    )
    depth = _depth(cfg, name)
    if depth != n:
        raise BenchError(f"{what}: queue {name!r} holds {depth} messages, expected {n}")


# --- the four ways -----------------------------------------------------------------------------


def fill_queuejob(cfg: broker_io.BrokerConfig, n: int, queue_type: str) -> float:
    """Seconds for queuejob's confirmed fill of ``n`` items (a fresh queue, deleted after)."""
    qs = broker_io.QueueSettings(
        name=queue_name(KEY),
        queue_type=queue_type,  # type: ignore[arg-type]
        delivery_limit=None if queue_type == "classic" else 3,
    )
    try:
        broker_io.declare_queues(cfg, qs)
        items = iter_items(ItemSource.int_range(0, n))
        start = time.perf_counter()
        result = broker_io.fill_queue(cfg, qs, items, run_id=str(uuid.uuid4()))
        elapsed = time.perf_counter() - start
        if result.confirmed != n:
            raise BenchError(f"queuejob fill confirmed {result.confirmed} of {n} items")
        _expect_depth(cfg, qs.name, n, "queuejob's fill")
        return elapsed
    finally:
        _delete(cfg, qs.name)


def _authfile(cfg: broker_io.BrokerConfig, workdir: Path) -> Path:
    """amqp-tools' --authfile, so the password is in no process's argument list."""
    path = workdir / "amqp-auth"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"username:{cfg.username}\npassword:{cfg._password()}\n")
    return path


def _amqp_args(tool: str, cfg: broker_io.BrokerConfig, auth: Path) -> list[str]:
    return [
        tool,
        f"--server={cfg.host}",
        f"--port={cfg.port}",
        f"--vhost={cfg.vhost}",
        f"--authfile={auth}",
    ]


def fill_c_client(
    cfg: broker_io.BrokerConfig,
    tool: str,
    auth: Path,
    lines: Path,
    n: int,
    queue_type: str = "classic",
) -> float:
    """Seconds for ``amqp-publish -l -p < lines`` (one process, unconfirmed)."""
    name = queue_name(KEY)
    try:
        _declare_plain(cfg, name, queue_type)
        argv = [*_amqp_args(tool, cfg, auth), "-r", name, "-p", "-l"]
        with lines.open("rb") as stdin:
            start = time.perf_counter()
            res = subprocess.run(argv, stdin=stdin, capture_output=True, timeout=600)
            elapsed = time.perf_counter() - start
        if res.returncode != 0:
            raise BenchError(f"amqp-publish -l failed ({res.returncode}): {res.stderr[-300:]!r}")
        _expect_depth(cfg, name, n, "amqp-publish -l")
        return elapsed
    finally:
        _delete(cfg, name)


def fill_docs_loop(cfg: broker_io.BrokerConfig, tool: str, auth: Path, n: int) -> float:
    """Seconds for the docs' shell loop, one ``amqp-publish -p`` process per message."""
    name = queue_name(KEY)
    script = (
        'i=0; while [ "$i" -lt "$N" ]; do '
        '"$TOOL" --server="$HOST" --port="$PORT" --vhost="$VHOST" --authfile="$AUTH" '
        '-r "$QUEUE" -p -b "$i" || exit 1; i=$((i+1)); done'
    )
    env = {
        **os.environ,
        "N": str(n),
        "TOOL": tool,
        "HOST": cfg.host,
        "PORT": str(cfg.port),
        "VHOST": cfg.vhost,
        "AUTH": str(auth),
        "QUEUE": name,
    }
    try:
        _declare_plain(cfg, name)
        start = time.perf_counter()
        res = subprocess.run(["sh", "-c", script], env=env, capture_output=True, timeout=900)
        elapsed = time.perf_counter() - start
        if res.returncode != 0:
            raise BenchError(f"the docs' loop failed ({res.returncode}): {res.stderr[-300:]!r}")
        _expect_depth(cfg, name, n, "the docs' loop")
        return elapsed
    finally:
        _delete(cfg, name)


def fill_pika_each(cfg: broker_io.BrokerConfig, n: int) -> float:
    """Seconds for pika publishing ``n`` persistent messages, waiting for each confirm."""
    name = queue_name(KEY)
    try:
        _declare_plain(cfg, name)
        conn = broker_io.connect(cfg)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            props = pika.BasicProperties(delivery_mode=2)
            start = time.perf_counter()
            for i in range(n):
                ch.basic_publish("", name, str(i).encode(), props)
            elapsed = time.perf_counter() - start
        finally:
            conn.close()
        _expect_depth(cfg, name, n, "pika confirming each message")
        return elapsed
    finally:
        _delete(cfg, name)


# --- the figure --------------------------------------------------------------------------------


def run(ctx: Context) -> FigureResult:
    """Measure every way side by side, ``ctx.runs`` rounds, interleaved."""
    n, n_docs, n_pika = _sizes(ctx.quick)
    fig = FigureResult(key=KEY, number=1, title=TITLE, runs=ctx.runs)
    fig.params = {"items": n, "docs_loop_messages": n_docs, "pika_each_messages": n_pika}
    cfg = broker_io.BrokerConfig(url=ctx.broker_url)
    qj = fig.new_series("queuejob", "classic queue: queuejob fill (confirmed)", "msg/s")
    c_client = fig.new_series(
        "amqp_publish_l", "classic queue: amqp-publish -l -p (C, one process, unconfirmed)", "msg/s"
    )
    docs = fig.new_series(
        "docs_loop",
        "classic queue: docs' loop, one amqp-publish -p per message",
        "msg/s",
        note=f"timed over {n_docs} messages, extrapolated",
    )
    pika_each = fig.new_series(
        "pika_each",
        "classic queue: pika BlockingConnection, confirm each message",
        "msg/s",
        note=f"timed over {n_pika} messages, extrapolated",
    )
    qj_q = fig.new_series("queuejob_quorum", "quorum queue: queuejob fill (confirmed)", "msg/s")
    c_client_q = fig.new_series(
        "amqp_publish_l_quorum", "quorum queue: amqp-publish -l -p (unconfirmed)", "msg/s"
    )
    qj_time = fig.new_series("queuejob_s", f"classic queue: queuejob, {n:,} items", "s")
    docs_time = fig.new_series(
        "docs_loop_s", f"classic queue: docs' loop, {n:,} items (extrapolated)", "s"
    )

    tool = ensure_amqp_tools()
    work = ctx.scratch(KEY)
    lines = work / "items.txt"
    lines.write_text("".join(f"{i}\n" for i in range(n)))
    auth = _authfile(cfg, work) if tool else None
    if tool is None:
        fig.notes.append("amqp-publish (Debian amqp-tools) is not available: baselines missing")

    for _ in rounds(ctx, KEY):
        t = fill_queuejob(cfg, n, "classic")
        qj.add(n / t)
        qj_time.add(t)
        say(f"  classic, queuejob fill: {n} items in {t:.2f} s ({n / t:,.0f} msg/s)")
        if tool and auth:
            t = fill_c_client(cfg, tool, auth, lines, n)
            c_client.add(n / t)
            say(f"  classic, amqp-publish -l: {n} items in {t:.2f} s ({n / t:,.0f} msg/s)")
        t = fill_pika_each(cfg, n_pika)
        pika_each.add(n_pika / t)
        say(f"  classic, pika confirm-each: {n_pika} in {t:.2f} s ({n_pika / t:,.0f} msg/s)")
        if tool and auth:
            t = fill_docs_loop(cfg, tool, auth, n_docs)
            docs.add(n_docs / t)
            docs_time.add(t * n / n_docs)
            say(f"  classic, docs' loop: {n_docs} in {t:.2f} s ({n_docs / t:,.1f} msg/s)")
        t = fill_queuejob(cfg, n, "quorum")
        qj_q.add(n / t)
        say(f"  quorum, queuejob fill: {n} items in {t:.2f} s ({n / t:,.0f} msg/s)")
        if tool and auth:
            t = fill_c_client(cfg, tool, auth, lines, n, "quorum")
            c_client_q.add(n / t)
            say(f"  quorum, amqp-publish -l: {n} items in {t:.2f} s ({n / t:,.0f} msg/s)")

    vs_docs = fig.ratio("classic: queuejob / docs' loop", "queuejob", "docs_loop")
    vs_c = fig.ratio("classic: queuejob / amqp-publish -l", "queuejob", "amqp_publish_l")
    fig.ratio("classic: queuejob / pika confirm-each", "queuejob", "pika_each")
    vs_c_q = fig.ratio(
        "quorum: queuejob / amqp-publish -l", "queuejob_quorum", "amqp_publish_l_quorum"
    )
    fig.ratio("queuejob: quorum / classic", "queuejob_quorum", "queuejob")
    missing = "" if tool else "amqp-publish unavailable"
    for label, value in (("classic", qj.median), ("quorum", qj_q.median)):
        fig.target(
            f"confirmed fill rate, {label} queue",
            value,
            ">=",
            TARGET_RATE,
            "msg/s",
            measured="queuejob",
        )
    fig.target(
        "vs the docs' loop",
        vs_docs,
        ">=",
        TARGET_VS_DOCS,
        "x",
        measured="queuejob / docs' loop",
        detail=missing,
    )
    for label, value in (("classic", vs_c), ("quorum", vs_c_q)):
        fig.target(
            f"vs amqp-publish -l, {label} queue",
            value,
            ">=",
            TARGET_VS_C_CLIENT,
            "x",
            measured="queuejob / amqp-publish -l",
            detail=missing,
        )
    return fig
