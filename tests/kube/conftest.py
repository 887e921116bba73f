"""Fixtures for the Kubernetes tests: the fake API server (see tests/fakekube)."""

from tests.fakekube.pytest_plugin import fake_kube, fake_kube_client, fake_kubeconfig

__all__ = ["fake_kube", "fake_kube_client", "fake_kubeconfig"]
