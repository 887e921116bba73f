"""The run's report: the dict saved with the ledger and returned by the flow, its markdown and
table artifacts, and the lines it puts in the run's logs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from queuejob.flows.core import caveats
from queuejob.flows.core import results as core_results
from queuejob.flows.core.job_status import JobState
from queuejob.flows.core.ledger import LedgerSummary

if TYPE_CHECKING:
    from queuejob.flows.adapters.ledger_store import RunLedger

TABLE_ROW_CAP = 500
TABLE_BODY_CAP = 200
POD_FAILURES_SHOWN = 20  # failed pods whose log tail goes to the run's logs and the report


def create_artifacts(
    report: dict[str, Any], findings: list[caveats.Finding], ledger: RunLedger
) -> None:
    """The run's two artifacts: the first rows of the ledger as a table, and the report."""
    run_id = report["run_id"]
    rows = [table_row(r) for r in ledger.rows(limit=TABLE_ROW_CAP)]
    create_table_artifact(
        table=rows,
        key=f"queuejob-ledger-{run_id[:8]}",
        description=f"Per-item ledger (first {TABLE_ROW_CAP} rows; full: {report['ledger_path']})",
    )
    create_markdown_artifact(
        markdown=report_markdown(report, findings),
        key=f"queuejob-report-{run_id[:8]}",
        description="queuejob run report",
    )


def log_summary(
    logger: Any,
    summary: LedgerSummary,
    findings: list[caveats.Finding],
    state: JobState,
    headline: str | None = None,
) -> None:
    """The summary line, each finding made after the run, then the run's outcome."""
    s = summary
    logger.info(
        "summary: %d items, %d succeeded, %d failed, %d dead-lettered, %d left in queue; "
        "%d finding(s); job %s",
        s.expected,
        s.succeeded,
        s.failed,
        s.dead_lettered,
        s.left,
        len(findings),
        state.describe(),
    )
    for finding in findings:
        if finding.stage == "after":
            (logger.info if finding.severity is caveats.Severity.INFO else logger.warning)(
                finding.line()
            )
    if headline:
        (logger.error if headline.startswith("Failed") else logger.info)("outcome: %s", headline)


def headline(report: dict[str, Any]) -> tuple[str, str]:
    """The run's outcome and the Job's condition beside it: ``("Failed: 1 of 6 items
    dead-lettered", "Job Succeeded (CompletionsReached)")``. A report from before outcomes were
    recorded has the Job's condition only."""
    from queuejob.flows.core.outcome import job_condition

    outcome = report.get("outcome") or {}
    job = outcome.get("job") or job_condition(report.get("job_phase"), report.get("job_reason"))
    return str(outcome.get("headline") or ""), str(job)


def report_markdown(report: dict[str, Any], findings: list[caveats.Finding]) -> str:
    """The report artifact: the outcome with the Job's condition, the counts, the findings,
    the failed pods and where the whole ledger is."""
    s = report["summary"]
    outcome, job = headline(report)
    rerun = (report.get("outcome") or {}).get("rerun")
    lines = [
        f"# queuejob run {report['run_id']}",
        "",
        f"**{outcome}** · {job}" if outcome else f"**{job}**",
        "",
        f"Job `{report['job']}` in `{report['namespace']}` ({report['backend']} backend), "
        f"queue `{report['queue']}`.",
        "",
    ]
    if rerun:
        lines += [f"`{rerun}` runs the items that did not succeed again, as a new run.", ""]
    if report.get("rerun_of"):
        lines += [f"A rerun of run `{report['rerun_of']}`: its items from that run's ledger.", ""]
    lines += [
        "| items | succeeded | failed | dead-lettered | left in queue | processed twice |",
        "|---|---|---|---|---|---|",
        f"| {s['expected']} | {s['succeeded']} | {s['failed']} | {s['dead_lettered']} | "
        f"{s['left']} | {s['processed_more_than_once']} |",
        "",
    ]
    if findings:
        lines += ["## Findings", ""]
        lines += [
            f"- **{f.severity.value}** `{f.code.value}`: {f.message}. *{f.advice}*"
            for f in findings
        ]
    else:
        lines += ["No caveat findings."]
    if report.get("pod_failures"):
        lines += ["", "## Failed pods", ""]
        for pf in report["pod_failures"][:POD_FAILURES_SHOWN]:
            tail = pf["log_tail"].strip().replace("\n", "\n    ")
            lines += [f"- `{pf['pod']}` exit {pf['exit_code']} ({pf['reason']}):", f"    {tail}"]
    results = report.get("results") or {}
    if results.get("items"):
        lines += [
            "",
            f"Results: {results['items']} item(s) returned one, in the `result` column of the "
            f"ledger; `{results['read_with']}` prints them (`queuejob.read_results` in Python).",
        ]
    lines += ["", f"Full ledger (JSON Lines, one row per item): `{report['ledger_path']}`"]
    return "\n".join(lines)


def log_pod_failures(logger: Any, pod_failures: list[dict[str, Any]]) -> None:
    """Put each failed pod's exit code and the end of its log in the run's logs (the report
    artifact has them too, but the logs are where a failed run is read first)."""
    for pf in pod_failures[:POD_FAILURES_SHOWN]:
        tail = pf["log_tail"].rstrip() or "(the pod wrote nothing)"
        logger.warning(
            "pod %s failed: exit code %s (%s); the end of its log:\n%s",
            pf["pod"],
            pf["exit_code"],
            pf["reason"] or "Error",
            tail,
        )
    if len(pod_failures) > POD_FAILURES_SHOWN:
        logger.warning(
            "%d more pods failed: the report artifact lists them",
            len(pod_failures) - POD_FAILURES_SHOWN,
        )


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row for the table artifact: the body cut, the result short and on one line."""
    body = row.get("body") or ""
    if len(body) > TABLE_BODY_CAP:
        row = {**row, "body": body[:TABLE_BODY_CAP] + "..."}
    if "result" in row:
        row = {**row, "result": core_results.short(row["result"])}
    return row


def results_info(
    run_id: str, ledger_path: str, count: int, ledger_storage: str | None
) -> dict[str, Any]:
    """Where a run's item results are, for its report and return value: how many items have
    one, the ledger file and its column, and the command that prints them."""
    read = f"queuejob results {run_id}"
    if ledger_storage:
        read += f" --ledger-storage {ledger_storage}"
    return {"items": count, "ledger_path": ledger_path, "column": "result", "read_with": read}


def rerun_of(params: dict[str, Any]) -> str | None:
    """The earlier run a rerun's items come from (an item source of kind 'ledger')."""
    items = params.get("items") or {}
    run_id = items.get("run_id") if items.get("kind") == "ledger" else None
    return str(run_id) if run_id else None
