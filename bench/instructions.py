"""Benchmark: CPU instructions per inference request, counted by valgrind (callgrind).

    .venv/bin/python -m bench.instructions [--requests N]

wrk's requests/s (bench/inference.py) are what a caller sees, but on a shared VM they swing by
±30% from run to run, more than the differences they are meant to show. This counts the
instructions each server executes per request instead, which no neighbour can change: `veil
serve` and the minimal aiohttp wrapper of bench/inference.py each run under callgrind with
instrumentation off (so start-up is not counted), and it is switched on only around N
sequential requests of one kind, then off and dumped. Kinds: plain JSON batch 1 on both
servers (the minimal one also with orjson, the JSON library `veil serve` uses, which shows
Veil's own overhead apart from its faster JSON); on `veil serve`, the same request encrypted
in a channel session and sealed on its own with HPKE.

Counted: user-space instructions of the server process (the interpreter, onnxruntime,
OpenSSL, uvloop). Not counted: the kernel's share (the same socket calls for every kind) and
waiting. The ratios estimate what a CPU-bound server's requests/s ratios would be.
Needs valgrind (`callgrind_control` on PATH).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import inference
from bench.report import publish
from veil.runtime import sessions
from veil.runtime.channel import (
    EVIDENCE_PATH,
    REQUEST_MEDIA_TYPE,
    ChannelPublicKey,
    seal_request,
)

RESULTS = inference.RESULTS
WARMUP = 30
Send = Callable[[httpx.Client], httpx.Response]


@contextmanager
def under_callgrind(command: list[str], port: int, out: Path) -> Iterator[tuple[int, str]]:
    """The server under callgrind, instrumentation off, once it answers; (pid, base URL)."""
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}.%p",
                *command,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start under valgrind: {log.read_text()}")
            time.sleep(1)
        yield process.pid, url
    finally:
        process.terminate()
        process.wait(120)


def _answers(url: str) -> bool:
    """Whether the server answers HTTP at all (the minimal one serves only its infer route)."""
    try:
        httpx.get(url + "/v2/health/live", timeout=5)
    except httpx.HTTPError:
        return False
    return True


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def instructions_per_request(
    pid: int, client: httpx.Client, send: Send, kind: str, *, requests: int, out: Path
) -> float:
    for _ in range(WARMUP):
        send(client)
    _control(pid, "-z")
    _control(pid, "-i", "on")
    for _ in range(requests):
        answer = send(client)
        if answer.status_code != 200:
            raise RuntimeError(f"{kind}: HTTP {answer.status_code}: {answer.text}")
    _control(pid, "-i", "off")
    _control(pid, "-d", kind)
    dumps = sorted(out.parent.glob(f"{out.name}.{pid}.*"), key=lambda p: p.stat().st_mtime)
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1]) / requests
    raise RuntimeError(f"{dumps[-1]} holds no totals")


def _post(path: str, body: bytes, media_type: str) -> Send:
    return lambda client: client.post(path, content=body, headers={"Content-Type": media_type})


def measure(requests: int) -> dict[str, Any]:
    model, samples = inference.build_model()
    plain = inference.bodies(samples)["json_b1"]
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="veil-instructions-") as tmp:
        scratch = Path(tmp)
        out = scratch / "callgrind.out"
        for kind, library in (("minimal_plain", "json"), ("minimal_orjson", "orjson")):
            port = inference.free_port()
            minimal = inference.minimal_command(scratch, model, port, library)
            with (
                under_callgrind(minimal, port, out) as (pid, url),
                httpx.Client(base_url=url, timeout=120) as client,
            ):
                send = _post(inference.INFER_PATH, plain.content, "application/json")
                counts[kind] = instructions_per_request(
                    pid, client, send, kind, requests=requests, out=out
                )
        port = inference.free_port()
        veil = inference.veil_command(scratch, model, port)
        with (
            under_callgrind(veil, port, out) as (pid, url),
            httpx.Client(base_url=url, timeout=120) as client,
        ):
            key = ChannelPublicKey.from_jwk(client.get(EVIDENCE_PATH).json()["key"])
            offer = sessions.offer_session(key)
            opened = client.post(
                sessions.SESSIONS_PATH,
                content=offer.body,
                headers={"Content-Type": sessions.OPEN_MEDIA_TYPE},
            )
            in_session = offer.confirm(opened.content).seal(plain.content).body
            alone = seal_request(key, plain.content).body
            kinds = {
                "veil_plain": _post(inference.INFER_PATH, plain.content, "application/json"),
                "veil_session": _post(
                    inference.ENCRYPTED_PATH, in_session, sessions.REQUEST_MEDIA_TYPE
                ),
                "veil_hpke": _post(inference.ENCRYPTED_PATH, alone, REQUEST_MEDIA_TYPE),
            }
            for kind, send in kinds.items():
                counts[kind] = instructions_per_request(
                    pid, client, send, kind, requests=requests, out=out
                )
    plain_count = counts["veil_plain"]
    return {
        "tool": "valgrind callgrind (user-space instructions of the server process)",
        "requests_per_kind": requests,
        "instructions_per_request": {kind: round(count) for kind, count in counts.items()},
        "server_vs_minimal_ratio": round(counts["minimal_plain"] / plain_count, 4),
        # The same wrapper with the JSON library `veil serve` uses: Veil's own overhead alone.
        "server_vs_minimal_orjson_ratio": round(counts["minimal_orjson"] / plain_count, 4),
        "encrypted_vs_plaintext_ratio": round(plain_count / counts["veil_session"], 4),
        "hpke_per_request_vs_plaintext_ratio": round(plain_count / counts["veil_hpke"], 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="requests per kind")
    parser.add_argument("--output", type=Path, default=RESULTS / "instructions.json")
    args = parser.parse_args(argv)
    if shutil.which("callgrind_control") is None:
        raise SystemExit("bench.instructions needs valgrind (callgrind_control on PATH)")
    figures = measure(args.requests)
    publish(figures, args.output)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
