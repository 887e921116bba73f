"""Rerun's pure parts: fates, the ledger item source, and the earlier run's settings merged
with the rerun's options."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from queuejob.flows.core.errors import InvalidInput, ItemError
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.rerun import DEFAULT_FATES, fate_statuses, parse_fates, rerun_params

EARLIER: dict[str, Any] = {
    "items": {"kind": "text", "path": "/data/items.txt", "max_item_bytes": 4096},
    "queue": {"name": "job7", "type": "quorum", "delivery_limit": 2, "stale_messages": "fail"},
    "job": {"command": ["sh", "-c", "cat"], "call": None, "parallelism": 4, "image": "r/q:1"},
    "mode": "fine",
    "backend": "local",
    "broker_block": "queuejob-broker",
    "kubernetes_credentials_block": None,
    "caveat_policy": "fail",
    "timeout_seconds": 600.0,
    "broker_wait_seconds": 30.0,
    "cleanup": {"delete_job": True, "delete_queues": False},
    "ledger_storage": None,
}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(None, DEFAULT_FATES, id="default"),
        pytest.param([], DEFAULT_FATES, id="empty"),
        pytest.param(["failed"], ("failed",), id="one"),
        pytest.param(["left,failed", "failed"], ("failed", "left"), id="comma-and-repeat"),
        pytest.param("dead_lettered, left_in_queue", ("dead_lettered", "left"), id="alias"),
    ],
)
def test_fates_parse_to_canonical_names(given: Any, expected: tuple[str, ...]) -> None:
    assert parse_fates(given) == expected


def test_an_unknown_fate_names_the_valid_ones() -> None:
    with pytest.raises(InvalidInput, match=r"unknown fate 'lost'.*failed, dead_lettered, left"):
        parse_fates(["failed,lost"])


def test_fate_left_is_the_ledgers_left_in_queue() -> None:
    assert fate_statuses(("failed", "left")) == {"failed", "left_in_queue"}


def test_ledger_source_needs_a_run_id() -> None:
    with pytest.raises(ValidationError, match="needs 'run_id'"):
        ItemSource(kind="ledger")
    with pytest.raises(ValidationError):
        ItemSource(kind="ledger", run_id="r1", fates=("lost",))  # type: ignore[arg-type]
    source = ItemSource.ledger("r1")
    assert source.fates == ("failed", "dead_lettered", "left")
    assert source.describe() == "the failed, dead_lettered, left items of run r1"


def test_ledger_items_keep_their_ids_and_bodies_numbered_in_the_new_run() -> None:
    rows = [
        {"item_id": "7-ab12cd34", "index": 7, "status": "failed", "body": "cherry"},
        {"item_id": "poison", "index": 9, "status": "dead_lettered", "body": '{"x": "é"}'},
    ]
    items = list(iter_items(ItemSource.ledger("r1"), rows=rows))
    assert [(i.id, i.index, i.body) for i in items] == [
        ("7-ab12cd34", 0, b"cherry"),
        ("poison", 1, '{"x": "é"}'.encode()),
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        pytest.param([], "nothing to rerun: run r1 has no failed or left items", id="none"),
        pytest.param([{"item_id": "a"}], "does not hold the item's body", id="no-body"),
        pytest.param([{"body": "x"}], "no item id", id="no-id"),
        pytest.param([{"item_id": "a", "body": "x" * 11}], "over the limit of 10", id="too-big"),
    ],
)
def test_bad_ledger_rows_are_clear_errors(rows: list[dict[str, Any]], message: str) -> None:
    source = ItemSource.model_validate(
        {"kind": "ledger", "run_id": "r1", "fates": ["failed", "left"], "max_item_bytes": 10}
    )
    with pytest.raises(ItemError, match=message):
        list(iter_items(source, rows=rows))


def test_ledger_source_without_rows_is_refused() -> None:
    with pytest.raises(ItemError, match="must be read by the caller"):
        list(iter_items(ItemSource.ledger("r1")))


def test_ledger_items_are_streamed_not_held() -> None:
    def rows() -> Iterator[dict[str, Any]]:
        for i in range(200_000):
            yield {"item_id": f"id-{i}", "status": "failed", "body": "x" * 100}

    tracemalloc.start()
    n = sum(1 for _ in iter_items(ItemSource.ledger("r1"), rows=rows()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 200_000
    assert peak < 1_000_000  # 200k items of 100+ bytes would be over 20 MB if held


def test_rerun_takes_the_earlier_settings_and_its_ledger_as_items() -> None:
    params = rerun_params(EARLIER, run_id="r1", fates=("failed",), ledger_storage="lstore")
    assert params["items"] == {
        "kind": "ledger",
        "run_id": "r1",
        "fates": ["failed"],
        "ledger_storage": "lstore",
        "max_item_bytes": 4096,
    }
    assert params["ledger_storage"] == "lstore"
    for key in ("job", "mode", "backend", "broker_block", "caveat_policy", "timeout_seconds"):
        assert params[key] == EARLIER[key], key
    # Only the failed items are rerun: what the earlier run left in its queue is not, so it is
    # not purged either (the earlier policy stands).
    assert params["queue"] == EARLIER["queue"]
    # With failed and left both rerun from the ledger, the leftovers are purged, not run twice.
    every = rerun_params(EARLIER, run_id="r1", fates=DEFAULT_FATES, ledger_storage="lstore")
    assert every["queue"] == {**EARLIER["queue"], "stale_messages": "purge"}
    assert EARLIER["queue"]["stale_messages"] == "fail"  # the input is not changed


def test_rerun_options_override_field_by_field() -> None:
    params = rerun_params(
        EARLIER,
        run_id="r1",
        fates=DEFAULT_FATES,
        ledger_storage=None,
        overrides={
            "job": {"parallelism": 1, "call": "mypkg:process"},
            "queue": {"stale_messages": "fail"},
            "backend": "kubernetes",
        },
    )
    assert params["job"] == {
        "command": None,  # a callable given for the rerun replaces the earlier command
        "call": "mypkg:process",
        "parallelism": 1,
        "image": "r/q:1",
    }
    assert params["queue"]["stale_messages"] == "fail"
    assert params["queue"]["name"] == "job7"
    assert params["backend"] == "kubernetes"
    assert params["mode"] == "fine"


def test_a_rerun_of_a_rerun_reads_the_reruns_own_ledger() -> None:
    first = rerun_params(EARLIER, run_id="r1", fates=DEFAULT_FATES, ledger_storage=None)
    second = rerun_params(first, run_id="r2", fates=("failed",), ledger_storage=None)
    assert second["items"]["run_id"] == "r2"
    assert second["items"]["max_item_bytes"] == 4096
    assert second["queue"] == first["queue"]


@pytest.mark.parametrize(
    ("params", "overrides", "message"),
    [
        pytest.param(None, None, "does not record its parameters", id="old-report"),
        pytest.param(EARLIER, {"items": {}}, "cannot override 'items'", id="items"),
        pytest.param(EARLIER, {"colour": "red"}, "cannot override 'colour'", id="unknown"),
    ],
)
def test_rerun_settings_errors(params: Any, overrides: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        rerun_params(
            params, run_id="r1", fates=DEFAULT_FATES, ledger_storage=None, overrides=overrides
        )
