"""The package's shape: installed only as `queuejob`, nothing imports a top-level `flows` or
`blocks`, every sub-package is listed for the build, the version has one source."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
# Folders whose Python files are the project's own code, tests and tools.
CODE_DIRS = ("flows", "blocks", "bench", "tests", "scripts")
TOP_LEVEL_NAMES = ("flows", "blocks")


def _python_files() -> list[Path]:
    return [
        p
        for d in CODE_DIRS
        for p in sorted((ROOT / d).rglob("*.py"))
        if "__pycache__" not in p.parts and "traces" not in p.parts
    ]


def _bad_imports(source: str) -> list[str]:
    """Imports of a top-level `flows` or `blocks` (absolute ones; relative imports are fine)."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        bad += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] in TOP_LEVEL_NAMES]
    return bad


# Module paths given as strings: `python -m flows.worker`, import_module("blocks"), mock targets.
_STRING_MODULE = re.compile(r"""["'](-m\s+)?(flows|blocks)(\.[a-z_]+)+["']""")


def test_nothing_imports_a_top_level_flows_or_blocks() -> None:
    offenders = {}
    for path in _python_files():
        source = path.read_text()
        found = _bad_imports(source)
        found += [f"string {m.group(0)}" for m in _STRING_MODULE.finditer(source)]
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}, (
        "import the package as queuejob.flows / queuejob.blocks, not as the repository's "
        f"folders: {offenders}"
    )


def test_the_checks_above_see_what_they_look_for() -> None:
    assert _bad_imports("import flows.worker\nfrom blocks import x\nfrom . import y\n") == [
        "line 1: flows.worker",
        "line 2: blocks",
    ]
    assert _bad_imports("from queuejob.flows import work_queue\nimport queuejob.blocks") == []
    top = "flows"  # spelled apart so that this file passes its own check
    assert _STRING_MODULE.search(f'argv = ["-m", "{top}.adapters.local"]')
    assert not _STRING_MODULE.search('argv = ["-m", "queuejob.flows.adapters.local"]')


def test_every_package_folder_is_built() -> None:
    """setuptools lists the packages by hand (each installed under queuejob): a new sub-package
    missing from the list would be missing from the wheel and the image."""
    dirs: dict[str, str] = SETUPTOOLS["package-dir"]
    folders = {}
    for name, folder in dirs.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            sub = init.parent.relative_to(ROOT / folder).parts
            if any(part.startswith("_") for part in sub) or "__pycache__" in sub:
                continue  # the mapped root of another package (flows/_queuejob), or a cache
            folders[".".join((name, *sub))] = init.parent
    assert sorted(folders) == sorted(SETUPTOOLS["packages"])
    assert set(dirs) == {"queuejob", "queuejob.flows", "queuejob.blocks"}
    for name in ("queuejob", "queuejob.flows", "queuejob.blocks"):
        assert (ROOT / dirs[name] / "py.typed").exists(), f"{name} is typed (PEP 561)"


def _queuejob(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "queuejob"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def test_version_comes_from_the_package_metadata() -> None:
    out = _queuejob("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"queuejob {PYPROJECT['project']['version']}"


@pytest.mark.parametrize(
    "name", ["run_work_queue", "rerun_failures", "read_results", "RabbitMQBroker"]
)
def test_the_api_is_lazy_and_complete(name: str) -> None:
    """`import queuejob` loads no Prefect (every pod imports it); each API name then resolves."""
    code = (
        "import sys, queuejob\n"
        "assert 'prefect' not in sys.modules and 'pydantic' not in sys.modules, 'eager import'\n"
        f"obj = queuejob.{name}\n"
        "assert sorted(queuejob.__all__) == sorted(set(queuejob.__all__))\n"
        "missing = [n for n in queuejob.__all__ if getattr(queuejob, n, None) is None]\n"
        "assert missing == [], missing\n"
        "print(type(obj).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        import queuejob

        _ = queuejob.nosuch  # type: ignore[attr-defined]
