"""Start kopf with Veil's names, its log format, a liveness endpoint and a Prometheus
endpoint."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from prometheus_client import start_http_server

# Importing the controllers registers their handlers with kopf's default registry.
from veil import API_GROUP, logs, metrics
from veil.azure import AzureSettings
from veil.config import OperatorConfig
from veil.controllers import (  # noqa: F401
    budget_observer,
    confidential_model,
    privacy_budget,
    synthetic_dataset,
)
from veil.controllers.azure_ports import AzurePorts
from veil.metrics import REGISTRY

FINALIZER = f"{API_GROUP}/finalizer"


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's defaults renamed under Veil's API group; its events posted from INFO up."""
    settings.persistence.finalizer = FINALIZER
    # Replicas sharing a peering need distinct priorities, or all of them pause; the highest
    # is active and the others take over when its keep-alive lapses.
    settings.peering.priority = int(
        os.environ.get("VEIL_PEERING_PRIORITY") or random.SystemRandom().randint(1, 2**30)
    )
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # Veil posts its own events (veil.events: series, never on a no-op resync); kopf posts
    # what it is asked to (kopf.info/warn/exception) from INFO up, and never its log lines.
    settings.posting.level = logging.INFO
    settings.posting.loggers = False
    settings.posting.reporting_component = "veil.dev/operator"
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure(settings)
    # Reconciles block on the Kubernetes and Azure APIs in worker threads; the default pool
    # (cores + 4) would queue them behind one another.
    workers = int(os.environ.get("VEIL_WORKER_THREADS", "32"))
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=workers))
    metrics.initialize(workers)
    azure = AzurePorts(AzureSettings.from_env())
    confidential_model.configure(
        confidential_model.Ports(
            ensure_key=azure.ensure_key,
            remove_key=azure.remove_key,
            ensure_pool=azure.ensure_pool,
            config=OperatorConfig.from_env(),
            retire_key_versions=azure.retire_key_versions,
        )
    )


@kopf.on.probe(id="handlers")
def _probe(**_: Any) -> str:
    return "ok"


def run(
    *,
    namespaces: list[str],
    all_namespaces: bool,
    metrics_port: int,
    health_port: int,
    peering: str | None,
    standalone: bool,
    log_format: str | None = None,
) -> int:
    """Run the operator; `log_format` (text or json) defaults to VEIL_LOG_FORMAT, then text."""
    try:
        chosen = logs.resolve_format(log_format)
    except ValueError as unknown:
        print(f"veil run: {unknown}", file=sys.stderr)
        return 2
    logs.configure_operator(chosen, level=os.environ.get("VEIL_LOG_LEVEL", "INFO").upper())
    os.environ[logs.ENV] = chosen  # the pods it renders log the same way (OperatorConfig)
    problem = OperatorConfig.from_env().image_problem()
    if problem is not None:
        logging.getLogger("veil").error("refusing to start: %s", problem)
        return 2
    if metrics_port:
        start_http_server(metrics_port, registry=REGISTRY)
    kopf.run(
        standalone=standalone or peering is None,
        peering_name=peering,
        clusterwide=not namespaces and all_namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )
    return 0
