"""The `queuejob` command's argument handling, help and `render` (no broker, no Prefect run).

Bad input to `queuejob run` is refused in a child process, which must not even import Prefect:
no temporary server, one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from queuejob.flows.cli import main
from queuejob.flows.cli.running import _NoTraceback


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

    from queuejob.flows.cli.after_run import add_rerun_options as _add_rerun_options

    parser = argparse.ArgumentParser()
    _add_rerun_options(parser)
    return parser.parse_args(argv)


def test_rerun_overrides_only_the_options_given() -> None:
    from queuejob.flows.cli.after_run import _rerun_overrides

    assert _rerun_overrides(_rerun_args(["r1"]), []) == {}
    args = _rerun_args(
        ["r1", "--fate", "failed", "--parallelism", "2", "--stale", "fail", "--keep-job",
         "--policy", "warn", "--backend", "local", "--max-failed-items", "10%"]
    )  # fmt: skip
    assert args.fate == ["failed"]
    assert _rerun_overrides(args, ["sh", "-c", "cat"]) == {
        "job": {"parallelism": 2, "command": ["sh", "-c", "cat"]},
        "queue": {"stale_messages": "fail"},
        "cleanup": {"delete_job": False},
        "caveat_policy": "warn",
        "max_failed_items": "10%",
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


# --- bad input is refused before Prefect starts ---------------------------------------------

# Runs `queuejob` in a child and says whether Prefect was imported there, whatever way it ends.
CHILD = """\
import sys
from queuejob.flows.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    print("prefect imported" if "prefect" in sys.modules else "prefect not imported")
sys.exit(rc)
"""
BROKER_URL = "amqp://queuejob:s3cret-pw@127.0.0.1:5672/%2F"  # never dialled: all checks fail first


def _latin1(tmp: Path) -> list[str]:
    path = tmp / "latin1.txt"
    path.write_bytes("apple\nbanana\ncr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    return ["--file", str(path)]


def _broken_jsonl(tmp: Path) -> list[str]:
    path = tmp / "items.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", \n{"id": "c"}\n')
    return ["--jsonl", str(path)]


def _empty_file(tmp: Path) -> list[str]:
    path = tmp / "empty.txt"
    path.write_text("\n\n")
    return ["--file", str(path)]


LOCAL = ["--backend", "local"]
CMD = ["--", "sh", "-c", "cat"]
# (id, argv after `run` from the temporary directory, environment changes, fragments of the line)
BAD_RUNS: list[tuple[str, Callable[[Path], list[str]], dict[str, str | None], list[str]]] = [
    ("file-missing", lambda t: ["--file", str(t / "nope.txt"), *LOCAL, *CMD], {},
     ["cannot open item file", "nope.txt: No such file or directory", "check the path"]),
    ("file-is-a-directory", lambda t: ["--file", str(t), *LOCAL, *CMD], {},
     ["cannot open item file", "Is a directory"]),
    ("file-not-utf8", lambda t: [*_latin1(t), *LOCAL, *CMD], {},
     ["latin1.txt:3: not valid UTF-8", "re-encode the file as UTF-8"]),
    ("jsonl-broken-line", lambda t: [*_broken_jsonl(t), *LOCAL, *CMD], {},
     ["items.jsonl:2: malformed JSON", "each line must be one JSON object"]),
    ("file-without-items", lambda t: [*_empty_file(t), *LOCAL, *CMD], {},
     ["no items in text file", "give at least one item"]),
    ("range-empty", lambda _t: ["--range", "5", "5", *LOCAL, *CMD], {},
     ["no items in range(5, 5, 1)"]),
    ("queue-name-spaces", lambda _t: ["a", "--queue", "my queue", *LOCAL, *CMD], {},
     ["--queue: queue name 'my queue' contains ' '", "use only letters, digits"]),
    ("queue-name-too-long", lambda _t: ["a", "--queue", "q" * 256, *LOCAL, *CMD], {},
     ["--queue: queue name", "256 characters", "use at most 200"]),
    ("no-command", lambda _t: ["a", *LOCAL], {},
     ["give the per-item command after '--'", "or --call"]),
    ("command-and-call", lambda _t: ["a", "--call", "m:f", *LOCAL, *CMD], {},
     ["give either the per-item command after '--' or --call, not both"]),
    ("call-malformed", lambda _t: ["a", "--call", "nofunction", *LOCAL], {},
     ["call 'nofunction' must look like 'package.module:function'"]),
    ("kubernetes-without-image", lambda _t: ["a", *CMD], {},
     ["no image for the kubernetes backend", "--image", "--backend local"]),
    ("image-invalid", lambda _t: ["a", "--image", "Registry.Example/My Image:latest!", *CMD], {},
     ["--image: image 'Registry.Example/My Image:latest!' is not a valid image reference",
      "[registry/]repository[:tag]"]),
    ("namespace-invalid", lambda _t: ["a", "--namespace", "Batch_Jobs", *LOCAL, *CMD], {},
     ["--namespace: 'Batch_Jobs' is not a valid DNS-1123 label"]),
    ("idle-timeout-too-long", lambda _t: ["a", "--idle-timeout", "5000", *LOCAL, *CMD], {},
     ["--idle-timeout: Input should be less than or equal to 3600 (got 5000.0)"]),
    ("parallelism-0", lambda _t: ["a", "--parallelism", "0", *LOCAL, *CMD], {},
     ["argument --parallelism: must be at least 1 (got 0)", "see `queuejob run --help`"]),
    ("backoff-limit-negative", lambda _t: ["a", "--backoff-limit", "-1", *LOCAL, *CMD], {},
     ["argument --backoff-limit: must be 0 or more (got -1)"]),
    ("timeout-0", lambda _t: ["a", "--timeout", "0", *LOCAL, *CMD], {},
     ["argument --timeout: must be a positive number of seconds"]),
    ("no-broker", lambda _t: ["a", *LOCAL, *CMD], {"QUEUEJOB_BROKER_URL": None},
     ["no broker: set QUEUEJOB_BROKER_URL=", "or pass --broker-block NAME"]),
    ("broker-url-malformed", lambda _t: ["a", *LOCAL, *CMD],
     {"QUEUEJOB_BROKER_URL": "amqp://queuejob:s3cret-pw@rabbit:port/%2F"},
     ["broker URL", "is malformed", "amqp://user:password@host:5672/vhost"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "env_changes", "fragments"),
    [pytest.param(argv, env, frags, id=case) for case, argv, env, frags in BAD_RUNS],
)
def test_bad_input_is_one_line_before_prefect_starts(
    argv: Callable[[Path], list[str]],
    env_changes: dict[str, str | None],
    fragments: list[str],
    tmp_path: Path,
) -> None:
    home = tmp_path / "prefect-home"  # importing Prefect creates it; a server writes its database
    env = {**os.environ, "PREFECT_HOME": str(home), "QUEUEJOB_BROKER_URL": BROKER_URL}
    env.pop("PREFECT_API_URL", None)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "run", *argv(tmp_path)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "prefect not imported\n", proc.stdout
    assert not home.exists(), "Prefect was started"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(("queuejob: ", "queuejob run: ")), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    for noise in ("Traceback", "validation error", "errors.pydantic.dev", "s3cret-pw"):
        assert noise not in proc.stderr


def test_render_errors_are_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--namespace", "Bad_NS", "--", "cat"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "queuejob: invalid job settings: --namespace: 'Bad_NS' is not a valid DNS-1123 label: "
        "at most 63 lower-case letters, digits and '-', starting and ending with a letter or "
        "digit\n"
    )


# --- help ---------------------------------------------------------------------------------


def test_run_help_gives_every_option_one_line_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z-]+)(.*)$", text, flags=re.MULTILINE)
    assert len(options) >= 20
    sources = {"--file", "--jsonl", "--range"}  # one of them (or inline items) is required
    assert sources <= {name for name, _ in options}
    for name, rest in options:
        if name in sources:
            continue
        assert "(default: " in rest, f"{name} has no default on its line: {rest!r}"
    # Nothing wraps onto a continuation line.
    assert not re.search(r"^ {20,}\S", text, flags=re.MULTILINE), text
    assert "--parallelism N" in text and "(default: 2, or the template's)" in text
    assert "(default: auto)" in text and "(default: 3600)" in text
    examples = text.split("examples:", 1)[1]
    assert len(re.findall(r"^  queuejob run ", examples, flags=re.MULTILINE)) == 4
    assert "--max-failed-items N|P%" in text and "--policy is about the pattern's caveats" in text


def _statuses(rows: list[tuple[str, str]]) -> dict[int, str]:
    """Exit statuses and their meanings, a meaning continued on a second row joined to it."""
    words: dict[int, list[str]] = {}
    last = 0
    for code, meaning in rows:
        last = int(code) if code.strip() else last
        words.setdefault(last, []).extend(meaning.replace("`", "").split())
    return {code: " ".join(w) for code, w in words.items()}


def test_the_exit_statuses_are_one_table_in_the_help_and_the_readme(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    block = text.split("exit status:\n", 1)[1].split("\n\n", 1)[0]
    in_help = _statuses(re.findall(r"^  (\d*)\s+(.*)$", block, flags=re.MULTILINE))
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("| exit status | meaning |\n| --- | --- |\n", 1)[1].split("\n\n", 1)[0]
    in_readme = _statuses(re.findall(r"^\| (\d+) \| (.*) \|$", table, flags=re.MULTILINE))
    assert in_help == in_readme
    assert sorted(in_help) == [0, 1, 2, 130, 143]
    assert "within --max-failed-items" in in_help[0]
    assert "before anything was queued or created" in in_help[2]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("3", 3), ("5%", "5%"), (" 2.5% ", "2.5%")],
)
def test_max_failed_items_is_a_number_or_a_percentage(value: str, expected: object) -> None:
    from queuejob.flows.cli.args import max_failed_items

    assert max_failed_items(value) == expected


@pytest.mark.parametrize("value", ["-1", "many", "150%"])
def test_a_bad_max_failed_items_is_refused_by_the_parser(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "a", "--backend", "local", "--max-failed-items", value, "--", "cat"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-failed-items" in err and "or a percentage of the items" in err


def _subcommands() -> list[str]:
    """Every subcommand of the `queuejob` parser, as it is built (so a new one is walked too)."""
    from queuejob.flows.cli import _parser

    actions = _parser()._actions
    sub = next(a for a in actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_the_walk_finds_every_subcommand() -> None:
    assert set(_subcommands()) >= {
        "run", "demo", "render", "ledger", "worker", "rerun", "dead-letters"
    }  # fmt: skip


@pytest.mark.parametrize("command", ["", *_subcommands()])
def test_every_help_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse exits; `queuejob worker --help` (the pod program's own parser) returns 0.
    try:
        code = main([command, "--help"] if command else ["--help"])
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: ") and not captured.err


@pytest.mark.parametrize("command", ["rerun", "dead-letters", "ledger"])
def test_after_run_helps_give_defaults_and_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    body, examples = text.split("examples:", 1)
    assert len(re.findall(rf"^  queuejob {command} ", examples, flags=re.MULTILINE)) >= 2
    # Each option's entry (its line and any continuation) names its default.
    entries = re.split(r"\n(?=  -)", body.split("options:", 1)[1])
    for entry in entries:
        if not entry.strip() or "-h, --help" in entry:
            continue
        assert "(default: " in " ".join(entry.split()), entry
    assert "%(" not in text
    assert sum(1 for e in entries if e.strip()) >= 4


def test_rerun_help_says_completions_are_sized_to_the_rerun(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["rerun", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--completions N|auto pods to succeed, or auto (default: auto, sized to this rerun's items)"
        in text
    )
    assert "--parallelism N pods running at once (default: earlier run's)" in text
    assert "--file" not in text  # the items come from the ledger


# --- quiet output -------------------------------------------------------------------------


def test_console_formatter_drops_tracebacks_and_keeps_the_record_whole() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception: %r",
            (ValueError("boom"),), sys.exc_info(),
        )  # fmt: skip
    formatter = _NoTraceback(logging.Formatter("%(levelname)s %(message)s"))
    assert formatter.format(record) == "ERROR Encountered exception: ValueError('boom')"
    # Other handlers (the Prefect API's) still get the traceback.
    assert record.exc_info is not None
    assert "Traceback" in logging.Formatter().format(record)
    embedded = logging.LogRecord(
        "prefect", logging.ERROR, __file__, 1, "failed\nTraceback (most recent call last):\n  x",
        None, None,
    )  # fmt: skip
    assert formatter.format(embedded) == "ERROR failed"
