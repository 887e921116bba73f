"""The `queuejob` command's argument handling and `render` (no broker, no Prefect run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.cli import main


def test_render_prints_a_redacted_secret_and_the_job(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["render", "--image", "registry.example/q:1", "--parallelism", "3",
         "--items-count", "8", "--", "sh", "-c", "cat"]
    )  # fmt: skip
    assert rc == 0
    secret, job = yaml.safe_load_all(capsys.readouterr().out)
    assert secret["kind"] == "Secret"
    assert secret["stringData"] == {"BROKER_URL": "<redacted>"}
    assert job["kind"] == "Job"
    assert job["spec"]["completions"] == 8
    assert job["spec"]["parallelism"] == 3
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["queuejob", "worker"]
    assert container["command"][-3:] == ["sh", "-c", "cat"]
    assert "password" not in yaml.safe_dump_all([secret, job])


def test_render_fine_mode_leaves_completions_unset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--mode", "fine", "--image", "r.example/q:1", "--", "cat"]) == 0
    _, job = yaml.safe_load_all(capsys.readouterr().out)
    assert "completions" not in job["spec"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["run", "a", "b"], "give the per-item command", id="no-command"),
        pytest.param(["run", "--", "cat"], "give the items one way", id="no-items"),
        pytest.param(
            ["run", "a", "--file", "x.txt", "--", "cat"], "give the items one way", id="two-sources"
        ),
        pytest.param(
            ["render", "--image", "Not An Image", "--", "cat"], "not a valid image", id="bad-image"
        ),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["run", "a", "--parallelism", "0", "--", "cat"], id="parallelism-0"),
        pytest.param(["run", "a", "--completions", "0", "--", "cat"], id="completions-0"),
        pytest.param(["run", "a", "--completions", "many", "--", "cat"], id="completions-word"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_dead_letters_without_a_broker_says_how_to_name_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QUEUEJOB_BROKER_URL", raising=False)
    assert main(["dead-letters", "job1", "--requeue"]) == 1
    err = capsys.readouterr().err
    assert "no broker configured" in err and "QUEUEJOB_BROKER_URL" in err


def test_dead_letters_refuses_a_bad_queue_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dead-letters", "job 1"]) == 1
    assert "queue name 'job 1' contains ' '" in capsys.readouterr().err


def _rerun_args(argv: list[str]) -> Any:
    import argparse

    from flows.cli import _add_rerun_options

    parser = argparse.ArgumentParser()
    _add_rerun_options(parser)
    return parser.parse_args(argv)


def test_rerun_overrides_only_the_options_given() -> None:
    from flows.cli import _rerun_overrides

    assert _rerun_overrides(_rerun_args(["r1"]), []) == {}
    args = _rerun_args(
        ["r1", "--fate", "failed", "--parallelism", "2", "--stale", "fail", "--keep-job",
         "--policy", "warn", "--backend", "local"]
    )  # fmt: skip
    assert args.fate == ["failed"]
    assert _rerun_overrides(args, ["sh", "-c", "cat"]) == {
        "job": {"parallelism": 2, "command": ["sh", "-c", "cat"]},
        "queue": {"stale_messages": "fail"},
        "cleanup": {"delete_job": False},
        "caveat_policy": "warn",
        "backend": "local",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["rerun", "no-such-run"], "no ledger for run no-such-run at", id="unknown"),
        pytest.param(["rerun", "r1", "--fate", "lost"], "unknown fate 'lost'", id="bad-fate"),
        pytest.param(["rerun", "r1", "a", "b"], "drop ITEM...", id="items"),
        pytest.param(["rerun", "r1", "--range", "0", "3"], "drop --range", id="range"),
    ],
)
def test_rerun_bad_input_exits_2_before_anything_starts(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(tmp_path))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_rerun_of_a_report_without_parameters_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(tmp_path))
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "report.json").write_text(json.dumps({"run_id": "r1"}))
    assert main(["rerun", "r1"]) == 2
    assert "does not record its parameters" in capsys.readouterr().err
