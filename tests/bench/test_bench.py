"""The benchmark machinery: targets, ratios, tables, the README section, and one real
measurement of each kind that is cheap enough for the suite (a small fill, the docs' loop over
a few messages, one detection latency on the local backend)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import detection, fill, overhead, report
from bench.common import (
    BenchError,
    Context,
    FigureResult,
    Target,
    child_env,
    queue_name,
    run_child,
)
from queuejob.flows.adapters import broker as broker_io
from queuejob.flows.adapters.local import LocalBackend

# --- pure --------------------------------------------------------------------------------------


def test_target_passes_only_with_a_value_on_the_right_side() -> None:
    assert Target("rate", 10_000.0, ">=", 10_000.0, "msg/s").passed
    assert not Target("rate", 9_999.9, ">=", 10_000.0, "msg/s").passed
    assert Target("latency", 0.5, "<=", 0.5, "s").passed
    assert not Target("latency", 0.51, "<=", 0.5, "s").passed
    assert not Target("vs docs", None, ">=", 100.0, "x").passed


def test_ratio_is_of_the_medians_and_missing_when_a_series_is_empty() -> None:
    fig = FigureResult(key="k", number=1, title="t", runs=3)
    a = fig.new_series("a", "A", "msg/s")
    b = fig.new_series("b", "B", "msg/s")
    fig.new_series("empty", "E", "msg/s")
    for x in (10.0, 30.0, 20.0):
        a.add(x)
    for x in (1.0, 2.0, 100.0):
        b.add(x)
    assert fig.ratio("a/b", "a", "b") == pytest.approx(10.0)  # 20 / 2, not a mean
    assert fig.ratio("a/empty", "a", "empty") is None
    fig.target("a fast", a.median, ">=", 15.0, "msg/s")
    assert fig.passed
    fig.target("a/empty big", None, ">=", 1.0, "x")
    assert not fig.passed


def test_a_figure_with_an_error_fails_whatever_its_targets() -> None:
    fig = FigureResult(key="k", number=1, title="t", runs=3, error="BenchError: no broker")
    assert not fig.passed
    assert fig.as_dict()["passed"] is False


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (12345.678, "msg/s", "12,346 msg/s"),
        (54.321, "x", "54.3x"),
        (0.0123, "s", "0.012 s"),
        (1.5, "", "1.50"),
        (None, "s", "n/a"),
        (0.0, "items", "0 items"),
        (100000.0, "items", "100,000 items"),
    ],
)
def test_fmt(value: float | None, unit: str, text: str) -> None:
    assert report.fmt(value, unit) == text


def _results(*figures: FigureResult) -> dict[str, object]:
    return {
        "machine": {
            "date": "2024-01-01 00:00 UTC",
            "nproc": 2,
            "cpu": "CPU",
            "ram_gib": 8.0,
            "rabbitmq": "RabbitMQ 3.10.8",
            "python": "3.11.7",
            "os": "Linux",
            "loadavg_at_start": [0.5, 0.5, 0.5],
        },
        "quick": False,
        "runs": 3,
        "figures": [f.as_dict() for f in figures],
        "passed": all(f.passed for f in figures),
        "total_s": 600.0,
    }


def test_tables_show_values_requirements_misses_and_errors() -> None:
    ok = FigureResult(key="fill", number=1, title="Fill", runs=3)
    s = ok.new_series("qj", "queuejob", "msg/s")
    for x in (9000.0, 9500.0, 9900.0):
        s.add(x)
    ok.target("confirmed fill rate", s.median, ">=", 10_000.0, "msg/s", measured="queuejob")
    broken = FigureResult(key="scale", number=6, title="Scale", runs=3, error="BenchError: boom")
    text = "\n".join(report.body(_results(ok, broken), 2))
    assert "| 1 | confirmed fill rate | queuejob | 9,500 msg/s | ≥ 10,000 msg/s | **MISSED** |" in (
        text
    )
    assert "**ERROR**: BenchError: boom" in text
    assert "| 1 | queuejob | 9,500 msg/s | 9,000 - 9,900 | 3 |" in text
    prose = " ".join(text.split())  # the machine sentence is wrapped
    assert "on 2 CPUs (CPU), 8.0 GiB RAM, RabbitMQ 3.10.8, Python 3.11.7, Linux" in prose


def test_readme_section_is_replaced_in_place_or_appended() -> None:
    section = "## Benchmarks\n\nnew table\n"
    before = "# p\n\n## Usage\n\nuse it\n\n## Benchmarks\n\nold table\n\n## Layout\n\nfiles\n"
    after = report.replace_section(before, section)
    assert after == before.replace("old table", "new table")
    assert report.replace_section(after, section) == after  # idempotent
    at_end = report.replace_section("# p\n\n## Benchmarks\n\nold\n", section)
    assert at_end == "# p\n\n## Benchmarks\n\nnew table\n"
    appended = report.replace_section("# p\n\n## Usage\n\nuse it\n", section)
    assert appended == "# p\n\n## Usage\n\nuse it\n\n## Benchmarks\n\nnew table\n"


def test_tables_are_rewritten_from_a_full_run_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "RESULTS_JSON", tmp_path / "results.json")
    monkeypatch.setattr(report, "RESULTS_MD", tmp_path / "RESULTS.md")
    monkeypatch.setattr(report, "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text("# p\n\n## Layout\n\nfiles\n")
    partial = _results(FigureResult(key="fill", number=1, title="Fill", runs=3))
    report.write_json(partial, tmp_path / "results.json")
    assert report.main() == 2
    assert not (tmp_path / "RESULTS.md").exists()
    full = _results(
        *(FigureResult(key=f"f{i}", number=i, title=f"F{i}", runs=3) for i in range(1, 7))
    )
    report.write_json(full, tmp_path / "results.json")
    assert report.main() == 0
    assert (tmp_path / "RESULTS.md").read_text().startswith("# queuejob benchmarks\n")
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# p\n\n## Layout\n\nfiles\n\n## Benchmarks\n")
    prose = [line for line in readme.splitlines() if not line.startswith("|")]
    assert max(len(line) for line in prose) <= report.WIDTH


def test_figure_selection_by_name_or_number() -> None:
    assert bench_main._select(None) == list(bench_main.FIGURES)
    assert bench_main._select("scale,1,memory") == ["fill", "memory", "scale"]
    with pytest.raises(SystemExit, match="unknown figure 'nope'"):
        bench_main._select("fill,nope")


def test_without_a_broker_url_the_run_stops_with_usage_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("QUEUEJOB_TEST_BROKER_URL", raising=False)
    assert bench_main.main(["--only", "fill"]) == 2
    assert "make bench" in capsys.readouterr().err


def test_fewer_than_three_runs_is_refused() -> None:
    with pytest.raises(SystemExit):
        bench_main.main(["--runs", "2"])


# --- real, small -------------------------------------------------------------------------------


def _queue_exists(cfg: broker_io.BrokerConfig, name: str) -> bool:
    try:
        broker_io.queue_depths(cfg, broker_io.QueueSettings(name=name))
    except Exception:
        return False
    return True


@pytest.mark.broker
def test_queuejob_fill_measurement_counts_every_message_and_cleans_up(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = broker_io.BrokerConfig(url=broker_url)
    names: list[str] = []

    def recording_queue_name(figure: str) -> str:
        names.append(queue_name(figure))
        return names[-1]

    monkeypatch.setattr(fill, "queue_name", recording_queue_name)
    seconds = fill.fill_queuejob(cfg, 500, "classic")
    assert seconds > 0
    assert names and not _queue_exists(cfg, names[0])


@pytest.mark.broker
@pytest.mark.skipif(shutil.which("amqp-publish") is None, reason="amqp-tools not installed")
def test_docs_loop_and_c_client_deliver_every_message(broker_url: str, tmp_path: Path) -> None:
    cfg = broker_io.BrokerConfig(url=broker_url)
    tool = shutil.which("amqp-publish")
    assert tool is not None
    auth = fill._authfile(cfg, tmp_path)
    assert auth.stat().st_mode & 0o077 == 0  # the password file is private
    lines = tmp_path / "items.txt"
    lines.write_text("".join(f"{i}\n" for i in range(300)))
    # Both verify the queue depth themselves and raise BenchError on a shortfall.
    assert fill.fill_docs_loop(cfg, tool, auth, 5) > 0
    assert fill.fill_c_client(cfg, tool, auth, lines, 300) > 0
    assert fill.fill_c_client(cfg, tool, auth, lines, 300, docs_queue=True) > 0


@pytest.mark.broker
def test_worker_and_bare_consumer_paces_drain_their_queues(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = broker_io.BrokerConfig(url=broker_url)
    names: list[str] = []

    def recording_queue_name(figure: str) -> str:
        names.append(queue_name(figure))
        return names[-1]

    monkeypatch.setattr(overhead, "queue_name", recording_queue_name)
    # Each checks that every item was done (the worker: a succeeded record for each).
    assert overhead.worker_pace(cfg, 300) > 0
    assert overhead.bare_pace(cfg, 300) > 0
    assert len(names) == 2 and not any(_queue_exists(cfg, n) for n in names)


@pytest.mark.broker
def test_expect_depth_rejects_a_short_queue(broker_url: str) -> None:
    cfg = broker_io.BrokerConfig(url=broker_url)
    name = f"qj-test-bench-{uuid.uuid4().hex[:8]}"
    fill._declare_plain(cfg, name)
    try:
        with pytest.raises(BenchError, match=r"timed out after 0\.3 s waiting for 1 messages"):
            fill._expect_depth(cfg, name, 1, "nothing", timeout_s=0.3)
    finally:
        broker_io.delete_queues(cfg, broker_io.QueueSettings(name=name), only_if_empty=False)


def test_detection_latency_on_the_local_backend_is_measured_from_the_pods_exit(
    tmp_path: Path,
) -> None:
    with detection.local_backend(tmp_path) as (backend, read):
        latency = detection.measure(backend, read, tmp_path, 0.2, poll=False)
    assert 0 <= latency < 5.0
    assert isinstance(backend, LocalBackend)
    # delete_run removed the Job: nothing of it is left in the state directory
    assert not list((tmp_path / "local-jobs").rglob("*.json"))


def test_context_scratch_directories_are_fresh(tmp_path: Path) -> None:
    ctx = Context(broker_url="amqp://x", runs=3, quick=True, workdir=tmp_path)
    a, b = ctx.scratch("fill"), ctx.scratch("fill")
    assert a != b and a.is_dir() and b.is_dir()


def test_a_failing_child_raises_with_its_last_lines_and_no_password() -> None:
    # Port 1 refuses at once: the fill child fails in its first broker call.
    env = child_env({"QUEUEJOB_TEST_BROKER_URL": "amqp://bench:s3cr3t-pw@127.0.0.1:1/%2F"})
    with pytest.raises(BenchError) as info:
        run_child(
            ["fill", "--file", "/nonexistent", "--queue", "qj-test-bench-x"],
            env=env,
            timeout_s=60,
            what="the failing fill",
        )
    text = str(info.value)
    assert "the failing fill failed (exit code 1)" in text
    assert "BrokerUnavailable" in text
    assert "s3cr3t-pw" not in text
