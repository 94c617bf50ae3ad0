"""The fault tier's own control plane (package scope: torn down before any other package
starts its own, and free to be restarted or paused by a scenario), its CRDs and API client.

Each scenario module starts the doubles and the operator it injects faults into; the helpers
(`OperatorProcess`, `wait_for`, ...) are the integration tier's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client, config

from tests.cluster.localcluster import LocalCluster, running
from tests.integration.conftest import install_crds


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("faults-cluster")) as local:
        yield local


@pytest.fixture(scope="package")
def crds(cluster: LocalCluster) -> LocalCluster:
    return install_crds(cluster)


@pytest.fixture(scope="package")
def api(cluster: LocalCluster) -> client.ApiClient:
    made: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(cluster.kubeconfig)
    )
    return made
