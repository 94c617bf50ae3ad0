"""`veil node-agent`'s command line: the flags the DaemonSet passes, and what it refuses."""

from __future__ import annotations

import argparse

import pytest

from veil.node_agent.main import DEFAULT_TCTI, register, run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_the_daemonset_flags_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VEIL_TPM_TCTI", raising=False)
    monkeypatch.setenv("NODE_NAME", "aks-cvm-1")
    args = _parser().parse_args(["node-agent", "--port", "9000", "--pcrs", "7,0,7"])
    assert args.func is run
    assert (args.node_name, args.port, args.tcti, args.pcrs) == (
        "aks-cvm-1",
        9000,
        DEFAULT_TCTI,
        (0, 7),
    )


def test_bad_pcrs_are_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["node-agent", "--pcrs", "0,24"])


def test_it_will_not_start_without_knowing_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert run(_parser().parse_args(["node-agent"])) == 2
