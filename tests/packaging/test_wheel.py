"""The built wheel, installed the way a user installs it, in a Prefect project of the user's own.

A Prefect project usually has a `flows/` folder. queuejob is installed as `queuejob` only, so the
user's `flows` package (a regular one, or a namespace folder without `__init__.py`) and queuejob
live side by side in one process: in the user's flow, and in the pods that call the user's code.

The wheel is built from a copy of the package's sources (never from the checkout's build/
folder, which may hold files of an earlier layout) and installed without its dependencies into
a fresh venv; the dependencies come from this test environment's site-packages through a .pth
line, which adds that folder to the path but does not run its own .pth files, so this
environment's editable install of queuejob stays out of sight.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

USER_ETL = '''
def process(body):
    """The user's own work function, called by queuejob's pods."""
    return body.upper()
'''

USER_FLOW = """
import json
import sys

from prefect import flow

import flows.etl
from queuejob import ItemSource, JobParams, QueueParams, run_work_queue


@flow
def nightly(queue: str) -> dict:
    assert flows.etl.process("x") == "X"  # the user's own flows package, in the same process
    return run_work_queue(
        items=ItemSource.inline(["apple", "banana", "cherry"]),
        queue=QueueParams(name=queue),
        job=JobParams(call="flows.etl:process", parallelism=2, idle_timeout_seconds=1.5),
        backend="local",
    )


if __name__ == "__main__":
    print("SUMMARY " + json.dumps(nightly(sys.argv[1])["summary"]))
"""


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload,no-any-return]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("flows", "blocks"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)]
    )
    assert built.returncode == 0, built.stderr
    (whl,) = out.glob("queuejob-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed: its bin folder."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    done = _run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         str(wheel)]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    purelib = _run(
        [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    Path(purelib, "queuejob-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return bin_dir


@pytest.fixture(params=["package", "namespace"])
def user_project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A Prefect project with its own `flows/`: a regular package, or a folder without
    `__init__.py` (a namespace package)."""
    proj = tmp_path / "project"
    (proj / "flows").mkdir(parents=True)
    if request.param == "package":
        (proj / "flows" / "__init__.py").write_text("")
    (proj / "flows" / "etl.py").write_text(USER_ETL)
    (proj / "pipeline.py").write_text(USER_FLOW)
    yield proj


def test_the_wheel_holds_only_queuejob(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"queuejob", f"queuejob-{VERSION}.dist-info"}
    for module in (
        "queuejob/__init__.py",
        "queuejob/py.typed",
        "queuejob/flows/work_queue.py",
        "queuejob/flows/worker/__main__.py",
        "queuejob/flows/adapters/local/__main__.py",
        "queuejob/blocks/job_template.py",
    ):
        assert module in names
    entry = zipfile.ZipFile(wheel).read(f"queuejob-{VERSION}.dist-info/entry_points.txt")
    assert b"queuejob = queuejob.flows.cli:main" in entry


def test_beside_the_users_own_flows_package(installed: Path, user_project: Path) -> None:
    code = (
        "import flows.etl, queuejob, queuejob.flows.worker\n"
        "from queuejob import RabbitMQBroker, WorkQueueJobTemplate\n"
        "from queuejob import rerun_failures, run_work_queue\n"
        "print(flows.etl.__file__)\n"
        "print(queuejob.flows.worker.__file__)\n"
        "print(queuejob.__version__)\n"
    )
    out = _run([str(installed / "python"), "-c", code], cwd=user_project)
    assert out.returncode == 0, out.stderr
    user_file, ours, version = out.stdout.split()
    assert Path(user_file).resolve() == (user_project / "flows" / "etl.py").resolve()
    assert "site-packages" in ours and str(ROOT) not in ours
    assert version == VERSION
    for argv in (
        [str(installed / "queuejob"), "worker", "--help"],
        [str(installed / "python"), "-m", "queuejob.flows.worker", "--help"],
        [str(installed / "queuejob"), "--version"],
    ):
        shown = _run(argv, cwd=user_project)
        assert shown.returncode == 0, (argv, shown.stderr)
    assert shown.stdout.strip() == f"queuejob {VERSION}"


@pytest.mark.prefect
@pytest.mark.broker
def test_a_users_flow_runs_queuejob_as_a_subflow(
    installed: Path, user_project: Path, broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "QUEUEJOB_BROKER_URL": broker_url,
        "QUEUEJOB_STATE_DIR": str(tmp_path / "local-jobs"),
        "QUEUEJOB_LEDGER_DIR": str(tmp_path / "ledgers"),
    }
    env.pop("PYTHONPATH", None)
    out = _run([str(installed / "python"), "pipeline.py", queue_name], cwd=user_project, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("SUMMARY ")]
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert summary["succeeded"] == 3 and summary["expected"] == 3, summary
