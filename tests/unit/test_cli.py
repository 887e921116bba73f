"""The `queuejob` command's argument handling and `render` (no broker, no Prefect run)."""

from __future__ import annotations

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
