"""Rerun's pure parts: fates, the ledger item source, and the earlier run's settings merged
with the rerun's options."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from queuejob.flows.core.errors import InvalidInput, ItemError, StaleMessages
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.rerun import (
    DEFAULT_FATES,
    MORE_THAN_RERUN,
    NOT_IN_LEDGER,
    OTHER_RUN,
    RerunLeftovers,
    check_rerun_leftovers,
    fate_statuses,
    parse_fates,
    rerun_params,
)

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
    for key in ("mode", "backend", "broker_block", "caveat_policy", "timeout_seconds"):
        assert params[key] == EARLIER[key], key
    # The Job is sized to the rerun's own items, whatever the earlier run fixed.
    assert params["job"] == {**EARLIER["job"], "completions": "auto"}
    # The stale-message policy stays the earlier run's, whatever the fates: the earlier run's
    # own leftovers of the rerun's items are taken out before the fill, not purged by policy.
    for fates in (("failed",), ("left",), DEFAULT_FATES):
        again = rerun_params(EARLIER, run_id="r1", fates=fates, ledger_storage="lstore")
        assert again["queue"] == EARLIER["queue"], fates
    assert "completions" not in EARLIER["job"]  # the input is not changed


def test_a_rerun_sizes_completions_to_its_items_unless_told() -> None:
    earlier = {**EARLIER, "mode": "coarse", "job": {**EARLIER["job"], "completions": 5}}
    assert (
        rerun_params(earlier, run_id="r1", fates=("left",), ledger_storage=None)["job"][
            "completions"
        ]
        == "auto"
    )
    told = rerun_params(
        earlier,
        run_id="r1",
        fates=("left",),
        ledger_storage=None,
        overrides={"job": {"completions": 2}},
    )
    assert told["job"]["completions"] == 2


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
        "completions": "auto",
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


# --- the earlier run's leftovers in the work queue -------------------------------------------

LEDGER_ROWS = [
    {"index": 0, "item_id": "a", "status": "succeeded", "body": "a"},
    {"index": 1, "item_id": "b", "status": "failed", "body": "b"},
    {"index": 2, "item_id": "c", "status": "dead_lettered", "body": "c"},
    {"index": 3, "item_id": "d", "status": "left_in_queue", "body": "d"},
    {"index": 4, "item_id": "e", "status": "left_in_queue", "body": "e"},
]


def test_leftovers_of_the_rerun_fates_are_taken_and_nothing_else() -> None:
    lookup = RerunLeftovers.from_rows("r1", fate_statuses(("left",)), LEDGER_ROWS)
    assert lookup.items == 2
    assert lookup.classify("r1", "d", 3) is None
    assert lookup.classify("r1", "e", 4) is None
    # The earlier run's messages of fates not rerun: named by their fate.
    assert lookup.classify("r1", "b", 1) == "failed"
    assert lookup.classify("r1", "a", 0) == "succeeded"
    # Another run's message, even for an item of the same id and index.
    assert lookup.classify("r2", "d", 3) == OTHER_RUN
    assert lookup.classify(None, "d", 3) == OTHER_RUN
    # The earlier run's id, but not its item at that index (or no index, or none such).
    for item_id, index in (("x", 3), ("d", 4), ("d", None), ("d", 99), (None, 3)):
        assert lookup.classify("r1", item_id, index) == NOT_IN_LEDGER, (item_id, index)
    every = RerunLeftovers.from_rows("r1", fate_statuses(DEFAULT_FATES), LEDGER_ROWS)
    assert every.items == 4
    assert every.classify("r1", "b", 1) is None and every.classify("r1", "c", 2) is None


def test_the_leftovers_lookup_holds_a_few_bytes_per_item() -> None:
    def rows() -> Iterator[dict[str, Any]]:
        for i in range(200_000):
            yield {"index": i, "item_id": f"item-{i:08d}", "status": "left_in_queue", "body": "x"}

    tracemalloc.start()
    lookup = RerunLeftovers.from_rows("r1", {"left_in_queue"}, rows())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert lookup.items == 200_000 and lookup.classify("r1", "item-00199999", 199_999) is None
    assert peak < 2_500_000  # the ids themselves would be well over 10 MB


def test_no_stale_messages_no_finding() -> None:
    assert (
        check_rerun_leftovers(
            queue="q", earlier_run="r1", taken=3, others={}, exhaustive=True, policy="fail"
        )
        is None
    )


def test_other_messages_stop_a_rerun_under_fail_naming_them_and_the_ways_out() -> None:
    with pytest.raises(StaleMessages) as exc:
        check_rerun_leftovers(
            queue="job1",
            earlier_run="r1",
            taken=0,
            others={"failed": 1},
            exhaustive=False,
            policy="fail",
        )
    text = str(exc.value)
    assert "queue 'job1' holds at least 1 message(s) that are not this rerun's" in text
    assert "1 of run r1's failed items, not rerun" in text
    assert "--fate failed" in text and "--stale purge" in text
    with pytest.raises(StaleMessages, match="more than the items this rerun queues again"):
        check_rerun_leftovers(
            queue="job1",
            earlier_run="r1",
            taken=0,
            others={MORE_THAN_RERUN: 4},
            exhaustive=False,
            policy="fail",
        )


def test_other_messages_purged_under_purge_are_a_finding() -> None:
    finding = check_rerun_leftovers(
        queue="job1",
        earlier_run="r1",
        taken=3,
        others={OTHER_RUN: 2},
        exhaustive=True,
        policy="purge",
    )
    assert finding is not None and finding.code.value == "stale-purged"
    assert "held 2 message(s) that are not this rerun's: 2 of other runs" in finding.message
    assert "3 of run r1's own were taken out and queued again" in finding.message
    assert finding.numbers == {"stale": 2, "taken": 3, OTHER_RUN: 2}
