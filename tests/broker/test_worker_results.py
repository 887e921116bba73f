"""Item results from real workers: a ``--call`` function's return value, a command's result
file, bytes that are not UTF-8, and results that fail their item (not JSON, over the limit)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    declare_queues,
    fill_queue,
)
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.ledger import FAILED, SUCCEEDED, OutcomeRecord
from queuejob.flows.worker import EXIT_ITEM_FAILED

from .support import collect_records, run_worker, worker_env
from .worker_calls import NOT_UTF8

pytestmark = pytest.mark.broker

FINE = ["--mode", "fine", "--idle-timeout", "0.4"]


def _fill(cfg: BrokerConfig, qs: QueueSettings, run_id: str, bodies: list[str]) -> dict[str, str]:
    """Declare and fill the queue with ``bodies``; return each item's body by its id."""
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.inline(bodies)), run_id=run_id)
    return {item.id: item.body.decode() for item in iter_items(ItemSource.inline(bodies))}


def _by_body(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, ids: dict[str, str], count: int
) -> dict[str, OutcomeRecord]:
    records = collect_records(cfg, qs, run_id, count=count)
    assert len(records) == count, records
    return {ids[r.item_id or ""]: r for r in records}


def test_a_call_returns_its_result(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    ids = _fill(cfg, qs, run_id, ["int", "dict", "bytes", "utf8-bytes", "none"])
    env = worker_env(broker_url, qs.name, run_id, "pod-r")
    done = run_worker([*FINE, "--call", "tests.broker.worker_calls:result_of"], env)
    assert done.returncode == 0, done.stderr
    got = _by_body(cfg, qs, run_id, ids, 5)
    assert {body: r.status for body, r in got.items()} == dict.fromkeys(got, SUCCEEDED)
    assert got["int"].result == 3
    assert got["dict"].result == {"item": "dict", "parts": [1, None, "ü"]}
    assert got["bytes"].result == {"$base64": base64.b64encode(NOT_UTF8).decode()}
    assert got["utf8-bytes"].result == "é"
    assert got["none"].result is None


def test_a_result_that_cannot_be_kept_fails_its_item(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    ids = _fill(cfg, qs, run_id, ["set", "big", "int"])
    env = worker_env(broker_url, qs.name, run_id, "pod-r")
    args = [*FINE, "--max-result-bytes", "100", "--call", "tests.broker.worker_calls:result_of"]
    done = run_worker(args, env)
    # The items it held are done, the failed ones left for redelivery; the worker exits 1.
    assert done.returncode == EXIT_ITEM_FAILED, done.stderr
    got = _by_body(cfg, qs, run_id, ids, 3)
    assert (got["int"].status, got["int"].result) == (SUCCEEDED, 3)
    for body in ("set", "big"):
        assert (got[body].status, got[body].exit_code, got[body].result) == (FAILED, 1, None)
    assert "returned a set, which is not JSON-serialisable" in got["set"].stderr_tail
    big = got["big"].stderr_tail
    assert "202 bytes, over the limit of 100 bytes per item (--max-result-bytes" in big
    assert "store large outputs elsewhere" in big
    assert "over the limit of 100 bytes" in done.stderr  # in the pod's log too


# A command that writes its result per item: text (with a newline), bytes that are not UTF-8,
# nothing, too much, or something before it fails.
RESULT_COMMAND = [
    "sh",
    "-c",
    'item=$(cat); case "$item" in '
    'text) printf "%s done\\n" "$item" > "$QUEUEJOB_RESULT_FILE";; '
    "raw) printf '\\377\\376 raw' > \"$QUEUEJOB_RESULT_FILE\";; "
    "nothing) ;; "
    'big) head -c 1000 /dev/zero | tr "\\0" x > "$QUEUEJOB_RESULT_FILE";; '
    'fails) echo partial > "$QUEUEJOB_RESULT_FILE"; echo "bad item" >&2; exit 5;; '
    'esac; echo "stdout stays the pod\'s log: $item"',
]


def test_a_command_writes_its_result_to_the_result_file(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str, tmp_path: Path
) -> None:
    ids = _fill(cfg, qs, run_id, ["text", "raw", "nothing", "big", "fails"])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = worker_env(broker_url, qs.name, run_id, "pod-cmd", TMPDIR=str(tmp))
    done = run_worker([*FINE, "--prefetch", "5", "--max-result-bytes", "999", "--",
                       *RESULT_COMMAND], env)  # fmt: skip
    assert done.returncode == EXIT_ITEM_FAILED, done.stderr
    assert "stdout stays the pod's log: text" in done.stdout
    got = _by_body(cfg, qs, run_id, ids, 5)
    assert (got["text"].status, got["text"].result) == (SUCCEEDED, "text done\n")
    assert got["raw"].result == {"$base64": base64.b64encode(b"\xff\xfe raw").decode()}
    assert (got["nothing"].status, got["nothing"].result) == (SUCCEEDED, None)
    assert (got["big"].status, got["big"].result) == (FAILED, None)
    assert "the result file is 1,000 bytes, over the limit of 999 bytes" in got["big"].stderr_tail
    # A failed attempt has no result, whatever it wrote; its own stderr comes first.
    fails = got["fails"]
    assert (fails.status, fails.exit_code, fails.result) == (FAILED, 5, None)
    assert "bad item" in fails.stderr_tail
    # The records are plain JSON, and every result file is gone with the worker.
    assert all(json.loads(r.to_json()) for r in got.values())
    assert list(tmp.iterdir()) == []
