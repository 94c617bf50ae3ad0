"""Logs: text or JSON by flag or VEIL_LOG_FORMAT; kopf's JSON shape everywhere; the object and
a reconcile id on the operator's lines; the format passed on to the pods Veil renders."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf._core.actions.loggers import ObjectJsonFormatter

from veil import logs
from veil.config import OperatorConfig, PodSettings

REPO = Path(__file__).resolve().parents[2]


def test_the_flag_wins_then_the_environment_then_text() -> None:
    assert logs.resolve_format(None, {}) == "text"
    assert logs.resolve_format(None, {"VEIL_LOG_FORMAT": "JSON"}) == "json"
    assert logs.resolve_format("text", {"VEIL_LOG_FORMAT": "json"}) == "text"
    with pytest.raises(ValueError, match="not one of text, json"):
        logs.resolve_format("yaml", {})


def _record(message: str = "reconciled", **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("veil.controllers", logging.WARNING, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_the_pods_json_has_the_shape_of_kopfs() -> None:
    """The runtime, synthesizer and trainer write what kopf's formatter writes for the operator."""
    ref = {"kind": "ConfidentialModel", "namespace": "ns", "name": "m"}
    kopf_line = json.loads(
        ObjectJsonFormatter(refkey=logs.OBJECT_KEY).format(
            _record(k8s_ref=ref, reconcile_id="r1", logger="veil.controllers")
        )
    )
    ours = json.loads(logs.JsonFormatter().format(_record(k8s_ref=ref, reconcile_id="r1")))
    assert set(ours) == set(kopf_line)
    for key in ("message", "severity", "object", "reconcile_id", "logger"):
        assert ours[key] == kopf_line[key], key
    plain = json.loads(logs.JsonFormatter().format(_record()))
    assert set(plain) == {"message", "logger", "timestamp", "severity"}


@pytest.fixture
def root_logging() -> Iterator[io.StringIO]:
    """The operator's logging on a string; the root logger as it was afterwards."""
    root, quiet = logging.getLogger(), logging.getLogger("asyncio")
    saved = (list(root.handlers), root.level, list(quiet.handlers), quiet.propagate)
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    quiet.handlers[:] = saved[2]
    quiet.propagate = saved[3]
    logging.captureWarnings(False)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_every_operator_line_in_a_reconcile_names_the_object_and_the_reconcile(
    root_logging: io.StringIO,
) -> None:
    logs.configure_operator("json", level=logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setStream(root_logging)  # type: ignore[attr-defined]
    log = logging.getLogger("veil.kube.apply")

    async def reconcile_in_a_task() -> str:
        reconcile = logs.start("SyntheticDataset", "ns", "synth")
        await asyncio.to_thread(log.info, "correcting Service/synth")  # a worker thread
        with logs.reconciling("SyntheticDataset", "ns", "synth") as same:
            assert same.id == reconcile.id
        return reconcile.id

    async def main() -> str:
        # kopf runs an object's handlers in a task of its own; it logs the outcome after.
        task = asyncio.create_task(reconcile_in_a_task())
        reconcile_id = await task
        log.info("outside any reconcile")
        return reconcile_id

    reconcile_id = asyncio.run(main())
    inside, outside = _lines(root_logging)
    assert inside["object"] == {"kind": "SyntheticDataset", "namespace": "ns", "name": "synth"}
    assert inside["reconcile_id"] == reconcile_id
    assert inside["logger"] == "veil.kube.apply"
    assert inside["severity"] == "info"
    assert "object" not in outside
    assert "reconcile_id" not in outside


def test_a_nested_reconcile_of_another_object_gets_its_own_id_and_ends() -> None:
    with logs.reconciling("ConfidentialModel", "ns", "a") as outer:
        with logs.reconciling("ConfidentialModel", "ns", "b") as inner:
            assert inner.id != outer.id
        assert logs.current() == outer
    assert logs.current() is None


def test_text_lines_are_prefixed_with_the_object(root_logging: io.StringIO) -> None:
    logs.configure_operator("text", level=logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setStream(root_logging)  # type: ignore[attr-defined]
    with logs.reconciling("PrivacyBudget", "ns", "study"):
        logging.getLogger("veil").info("granted")
    assert "[ns/study] granted" in root_logging.getvalue()


def test_a_program_logs_json_when_the_operator_passes_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    root.handlers[:] = []
    try:
        monkeypatch.setenv("VEIL_LOG_FORMAT", "json")
        logs.configure_program()
        assert logs.json_enabled()
        (handler,) = root.handlers
        stream = io.StringIO()
        handler.setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("veil.runtime.server").info("serving")
        line = json.loads(stream.getvalue())
        assert line["message"] == "serving"
        assert line["logger"] == "veil.runtime.server"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)


@dataclass(frozen=True)
class _JsonLogs(PodSettings):
    log_format: str = "json"


def _containers(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for child in children:
        if child["kind"] in ("Deployment", "Job"):
            pod = child["spec"]["template"]["spec"]
            out += [*pod.get("initContainers", []), *pod["containers"]]
    return out


def test_the_operator_passes_its_log_format_to_every_pod_it_renders() -> None:
    from veil.api.confidential_model import ConfidentialModel
    from veil.resources import confidential_model, synthetic_dataset, training

    json_config = OperatorConfig(pods=_JsonLogs())
    examples = REPO / "examples"
    model = yaml.safe_load((examples / "confidential-model-cvm" / "model.yaml").read_text())
    model["metadata"]["uid"] = "00000000-1111-2222-3333-444444444444"
    synthetic = yaml.safe_load((examples / "synthetic-data" / "synthetic.yaml").read_text())
    synthetic["metadata"]["uid"] = "00000000-1111-2222-3333-555555555555"
    trainer = yaml.safe_load((examples / "dp-training" / "model.yaml").read_text())
    trainer["metadata"]["uid"] = "00000000-1111-2222-3333-666666666666"

    def rendered(config: OperatorConfig) -> list[dict[str, Any]]:
        spec = ConfidentialModel.model_validate(model).spec
        trainer_spec = ConfidentialModel.model_validate(trainer).spec
        return _containers(
            [
                *confidential_model.children(model, spec, config).apply,
                *synthetic_dataset.render_for_review(synthetic, config),
                *training.children(trainer, trainer_spec, config),
            ]
        )

    containers = rendered(json_config)
    assert len(containers) >= 3
    for container in containers:
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        assert env["VEIL_LOG_FORMAT"] == "json", container["name"]
    # Text is every program's default: nothing is added, the golden files stay as they are.
    for container in rendered(OperatorConfig()):
        assert "VEIL_LOG_FORMAT" not in {item["name"] for item in container.get("env", [])}
