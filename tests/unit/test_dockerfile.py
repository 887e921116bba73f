"""The Dockerfile, checked without a Docker engine: parsed with dockerfile-parse, its COPY sources
matched against the repository and .dockerignore, its user and command against pyproject.toml and
the way Prefect's kubernetes worker starts a flow run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from queuejob.flows.core.manifest import JobSpec, worker_command

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return list(parser.structure)


def _all(instructions: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [i for i in instructions if i["instruction"] == name]


def _final_stage(instructions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    starts = [n for n, i in enumerate(instructions) if i["instruction"] == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1] :]


def _exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def _copy_sources(value: str) -> tuple[list[str], list[str]]:
    """(sources, flags) of a COPY/ADD value in shell or JSON form."""
    words = _exec_form(value) or shlex.split(value)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    assert len(paths) >= 2, f"COPY needs a source and a destination: {value}"
    return paths[:-1], flags


# --- .dockerignore, with Docker's rules ---------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern language: * and ? within a path element, ** across elements."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        elif pattern[i] == "\\" and i + 1 < len(pattern):
            out, i = out + re.escape(pattern[i + 1]), i + 2
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


class DockerIgnore:
    """The build context filter: later patterns win; a pattern matching a directory matches
    everything below it (as moby's patternmatcher does for the context)."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((include, _pattern_regex(pattern)))

    def excluded(self, path: str) -> bool:
        parts = Path(path).parts
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for include, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not include
        return excluded


@pytest.fixture(scope="module")
def ignore() -> DockerIgnore:
    return DockerIgnore((ROOT / ".dockerignore").read_text())


def test_dockerignore_matcher_follows_docker_rules() -> None:
    m = DockerIgnore("*\n!src/\n**/__pycache__\n!keep/**/*.py\n# comment\n/abs\n")
    assert m.excluded("README.md")
    assert not m.excluded("src/pkg/mod.py")
    assert m.excluded("src/pkg/__pycache__/mod.cpython-311.pyc")
    assert not m.excluded("keep/a/b/c.py")
    assert m.excluded("keep/a/b/c.txt")
    assert m.excluded("abs/file")
    assert m.excluded(".git/config")


# --- the checks ---------------------------------------------------------------------------------


def test_base_image_is_python_311_slim(instructions: list[dict[str, Any]]) -> None:
    froms = _all(instructions, "FROM")
    assert len(froms) == 1, "one stage: the flow run and the workers share this image"
    image = froms[0]["value"].split()[0]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), image


def test_every_copy_source_exists_and_is_in_the_build_context(
    instructions: list[dict[str, Any]], ignore: DockerIgnore
) -> None:
    copies = _all(instructions, "COPY") + _all(instructions, "ADD")
    assert copies
    for ins in copies:
        sources, flags = _copy_sources(ins["value"])
        assert not any(f.startswith("--from") for f in flags), "single stage: nothing to copy from"
        for src in sources:
            assert not re.search(r"[*?\[]|://", src), f"be explicit: {src}"
            path = ROOT / src
            assert path.exists(), f"COPY source {src} does not exist"
            assert not ignore.excluded(src), f"COPY source {src} is excluded by .dockerignore"
            if path.is_dir():
                files = [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
                assert files, f"{src} holds no Python files"
                dropped = [p for p in files if ignore.excluded(str(p.relative_to(ROOT)))]
                assert dropped == [], f".dockerignore drops sources the build needs: {dropped}"


def test_build_copies_what_the_package_build_reads(instructions: list[dict[str, Any]]) -> None:
    copied = {
        Path(src).parts[0]
        for ins in _all(instructions, "COPY")
        for src in _copy_sources(ins["value"])[0]
    }
    project = PYPROJECT["project"]
    # The package's folders: pyproject maps each installed package to a folder of the repository.
    package_dirs = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    top_level = {Path(d).parts[0] for d in package_dirs}
    assert "pyproject.toml" in copied
    assert top_level <= copied, f"packages not copied: {top_level - copied}"
    if isinstance(project.get("readme"), str):
        assert project["readme"] in copied, "pyproject's readme must be in the image build"


def test_context_keeps_out_local_state(ignore: DockerIgnore) -> None:
    for path in [
        ".git/config",
        ".venv/bin/python",
        ".cache/prefect-test-home/prefect.db",
        "tests/conftest.py",
        "bench/results.json",
        "flows/__pycache__/cli.cpython-311.pyc",
        "queuejob.egg-info/PKG-INFO",
        ".env",
    ]:
        assert ignore.excluded(path), path


def test_project_is_pip_installed_without_cache(instructions: list[dict[str, Any]]) -> None:
    runs = [i["value"] for i in _all(instructions, "RUN")]
    install = [r for r in runs if re.search(r"\bpip install\b", r)]
    assert len(install) == 1, install
    words = shlex.split(install[0].split("&&")[0])
    assert "--no-cache-dir" in words
    assert words[-1] == ".", "install the project itself, not an editable or partial install"
    assert "-e" not in words and "--editable" not in words
    # The sources must be in place before the install runs.
    pos = {id(i): n for n, i in enumerate(instructions)}
    first_install = next(i for i in instructions if i["value"] == install[0])
    last_copy = max(pos[id(i)] for i in _all(instructions, "COPY"))
    assert last_copy < pos[id(first_install)]


def test_runs_as_a_fixed_non_root_user(instructions: list[dict[str, Any]]) -> None:
    stage = _final_stage(instructions)
    users = [n for n, i in enumerate(stage) if i["instruction"] == "USER"]
    assert users, "no USER: the image would run as root"
    user = stage[users[-1]]["value"].strip()
    name, _, group = user.partition(":")
    assert name not in ("root", "0") and group not in ("root", "0"), user
    # Numeric, so Kubernetes' runAsNonRoot can verify it.
    assert name == "10001", user
    # Nothing after the switch runs as root again, and the command comes after it.
    assert all(i["instruction"] not in ("RUN",) for i in stage[users[-1] + 1 :])
    starts = [n for n, i in enumerate(stage) if i["instruction"] in ("CMD", "ENTRYPOINT")]
    assert starts and min(starts) > users[-1]
    created = " ".join(i["value"] for i in _all(stage, "RUN"))
    assert re.search(r"useradd\b.*--uid 10001\b.*\bqueuejob\b", created), "user queuejob 10001"


def test_default_command_is_the_queuejob_console_script(
    instructions: list[dict[str, Any]],
) -> None:
    stage = _final_stage(instructions)
    # No ENTRYPOINT: Prefect's kubernetes worker passes `prefect flow-run execute` as args,
    # which replace CMD but would be appended to an ENTRYPOINT.
    assert _all(stage, "ENTRYPOINT") == []
    cmds = _all(stage, "CMD")
    assert cmds, "no CMD"
    argv = _exec_form(cmds[-1]["value"])
    assert argv is not None, "CMD must be in exec form (no shell as PID 1)"
    scripts = PYPROJECT["project"]["scripts"]
    assert argv[0] == "queuejob" and argv[0] in scripts
    module, _, func = scripts["queuejob"].partition(":")
    target = __import__(module, fromlist=[func])
    assert callable(getattr(target, func))


def test_worker_jobs_run_the_same_console_script() -> None:
    spec = JobSpec(image="registry.example.com/queuejob:1", command=("cat",))
    assert worker_command(spec)[0] in PYPROJECT["project"]["scripts"]


def test_prefect_kubernetes_worker_sets_args_not_command() -> None:
    # The reason the image has no ENTRYPOINT; if Prefect ever sets `command`, revisit it.
    from prefect_kubernetes.worker import KubernetesWorker

    template = KubernetesWorker.get_default_base_job_template()
    manifest = template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert "args" in container
    assert "command" not in container
