"""A run's outcome and events on a real Prefect server, run by a real process worker.

The README's automation (a notification when a run dead-letters items) is created with a
webhook notification block pointing at a small HTTP server here; then ``on-demand`` runs six
items, one of them poison (delivery limit 1, completions auto), the way the UI's Run button
starts it. Read back through the API: the flow run ends Failed with the outcome as its message,
its result (persisted) is the report, the server holds the run's events
(``queuejob.finding.dead-letters``, ``queuejob.run.failed``) related to the flow run, and the
automation's notification arrives with the numbers and the rerun command.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from tests.e2e.conftest import FLOW_NAME, Cmd, PrefectStack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.prefect, pytest.mark.broker, pytest.mark.slow]

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SIX = ["apple", "banana", "cherry", "poison", "date", "fig"]
POISON = 'item=$(cat); [ "$item" = poison ] && { echo "cannot take $item" >&2; exit 3; }; echo ok'

# The README's automation, with a webhook notification block instead of Slack (same trigger,
# same templates). Arguments: the webhook URL, the queue to watch.
CREATE_AUTOMATION = """
import sys
from prefect.automations import Automation, EventTrigger, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock

url, queue = sys.argv[1], sys.argv[2]
block_id = CustomWebhookNotificationBlock(
    name="queuejob-test", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
).save("queuejob-alerts", overwrite=True)
Automation(
    name="queuejob: items dead-lettered",
    trigger=EventTrigger(
        expect={"queuejob.finding.dead-letters"},
        match={"prefect.resource.id": "queuejob.run.*", "queuejob.queue": queue},
        posture="Reactive",
        threshold=1,
    ),
    actions=[
        SendNotification(
            block_document_id=block_id,
            subject="queuejob: {{ event.payload.numbers.dead_lettered }} item(s) dead-lettered",
            body="Run {{ event.resource['queuejob.run-id'] }} on queue "
            "{{ event.resource['queuejob.queue'] }}: {{ event.payload.message }}. "
            "{{ event.payload.advice }}",
        )
    ],
).create()
"""

# Reads a flow run's result through the API (the persisted result the state points at).
READ_RESULT = """
import json, sys, uuid
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    state = client.read_flow_run(uuid.UUID(sys.argv[1])).state
result = state.result(raise_on_failure=False)
print(json.dumps({"type": type(result).__name__, "report": dict(result)}))
"""


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # http.server calls it by this name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def _events(stack: PrefectStack, run_id: str) -> list[dict[str, Any]]:
    page = stack.post(
        "/events/filter",
        {
            "filter": {
                "event": {"prefix": ["queuejob."]},
                "resource": {"id": [f"queuejob.run.{run_id}"]},
                "order": "ASC",
            },
            "limit": 50,
        },
    )
    events: list[dict[str, Any]] = page["events"]
    return events


def test_a_run_that_dead_letters_an_item_ends_failed_emits_events_and_notifies(
    deployed: PrefectStack, queue_name: str, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    deployed.cli(Cmd([sys.executable, "-c", CREATE_AUTOMATION, url, queue_name]))
    dep = deployed.get(f"/deployments/name/{FLOW_NAME}/on-demand")
    run = deployed.post(
        f"/deployments/{dep['id']}/create_flow_run",
        {
            "parameters": {
                "items": {"kind": "list", "values": SIX},
                "queue": {"name": queue_name, "delivery_limit": 1},
                "job": {"command": ["sh", "-c", POISON], "idle_timeout_seconds": 1},
                "timeout_seconds": 120,
            },
            "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
            # Result persistence on for this run, so the API can give its result back.
            "job_variables": {"env": {"PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true"}},
        },
    )
    run_id = run["id"]
    assert run["parameters"]["max_failed_items"] == 0  # the deployment's, shown in the form

    def finished() -> dict[str, Any] | None:
        current = deployed.get(f"/flow_runs/{run_id}")
        return current if current["state"]["type"] in TERMINAL else None

    final = wait_for(
        finished, timeout=150, what=f"flow run {run_id} to finish", detail=deployed.diagnostics,
        interval=1.0,
    )  # fmt: skip
    # What the UI shows: Failed, and why.
    assert final["state"]["type"] == "FAILED", deployed.diagnostics()
    assert final["state"]["message"] == (
        "Failed: 1 of 6 items dead-lettered; Job Succeeded (CompletionsReached); "
        f"`queuejob rerun {run_id}` runs it again"
    )

    # The report is the Failed run's result, read through the API.
    (line,) = deployed.cli(Cmd([sys.executable, "-c", READ_RESULT, run_id]))
    result = json.loads(line.strip().splitlines()[-1])
    assert result["type"] == "ItemsFailed"
    report = result["report"]
    assert report["run_id"] == run_id
    assert report["summary"]["dead_lettered"] == 1 and report["summary"]["succeeded"] == 5
    assert [f["code"] for f in report["findings"]] == ["dead-letters"]

    # The events, as the server stored them (its persister writes them in batches).
    events = wait_for(
        lambda: (found if len(found := _events(deployed, run_id)) >= 2 else None),
        timeout=60, what="the run's events on the server", interval=1.0,
    )  # fmt: skip
    assert [e["event"] for e in events] == ["queuejob.finding.dead-letters", "queuejob.run.failed"]
    finding, end = events
    for event in events:
        assert event["resource"]["queuejob.queue"] == queue_name
        assert event["resource"]["queuejob.run-id"] == run_id
        related = {r["prefect.resource.id"] for r in event["related"]}
        assert f"prefect.flow-run.{run_id}" in related
    assert finding["payload"]["severity"] == "error" and finding["payload"]["kind"] == "outcome"
    assert finding["payload"]["numbers"] == {"dead_lettered": 1, "no_work_pods": 1}
    assert end["payload"]["outcome"] == "Failed"
    assert end["payload"]["headline"] == "Failed: 1 of 6 items dead-lettered"
    assert end["payload"]["summary"]["expected"] == 6
    assert end["payload"]["not_succeeded"] == {"dead_lettered": 1}
    assert end["payload"]["rerun"] == f"queuejob rerun {run_id}"

    # The automation acted on the finding's event: the notification arrived.
    (note,) = wait_for(
        lambda: list(received), timeout=60, what="the automation's notification",
        detail=deployed.diagnostics, interval=0.5,
    )  # fmt: skip
    assert note["subject"] == "queuejob: 1 item(s) dead-lettered"
    assert f"Run {run_id} on queue {queue_name}: 1 item(s) were dead-lettered" in note["body"]
    assert f"queuejob rerun {run_id} --fate dead_lettered" in note["body"]
