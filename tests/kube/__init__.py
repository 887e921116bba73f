"""Tests of the Kubernetes backend against the fake API server (tests/fakekube).

``TRACES`` is this project's recorded test data: exchanges with a real kube-apiserver 1.32 that
the fake is held to (its README says how they were recorded).
"""

from pathlib import Path

TRACES = Path(__file__).resolve().parent / "traces"
