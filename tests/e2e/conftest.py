"""The end-to-end tier: a real node (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS,
kube-router) beside the Go-built control plane, the chart's operator running as a pod from the
locally built image, and the Azure stand-ins and Azurite where pods reach them.

Nothing here falls back to kwok: if the node cannot start, every test of the tier errors with
the reason. The cluster lives for this package only (the integration tier has its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.localcluster import LocalCluster, running
from tests.cluster.localenv import LocalEnvironment


@pytest.fixture(scope="package")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("e2e-cluster"), real_node=True) as cluster:
        yield cluster


@pytest.fixture(scope="package")
def environment(
    real_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalEnvironment]:
    env = LocalEnvironment(real_cluster, tmp_path_factory.mktemp("e2e-env"))
    try:
        env.start()
        assert real_cluster.real_node is not None
        env.install_chart(real_cluster.real_node.images)
        yield env
    finally:
        env.stop()


def repo_path(*parts: str) -> Path:
    return Path(__file__).resolve().parents[2].joinpath(*parts)
