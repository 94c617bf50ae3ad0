"""Benchmark: inference serving overhead and unseal throughput of the Veil runtime.

    .venv/bin/python -m bench.inference [--quick]

Serving: a real model (logistic regression on scikit-learn's breast-cancer data, converted with
skl2onnx) sealed and served by `veil serve` in its own process, against (a) plain in-process
onnxruntime on the same batch-1 inputs (the limit) and (b) a minimal aiohttp server around the
same onnxruntime session (same session options, same OIP v2 JSON request and response, inference
inline on the event loop, no validation, no metrics, no access log) in its own process. Batch-1
requests over HTTP/1.1 keep-alive on 127.0.0.1 from one httpx client at the same concurrency for
both servers; after a warm-up the servers are measured in alternating rounds and the median
round is reported (latency percentiles pool every request of every round). Each server's CPU
time per request (from /proc) is reported as well: it is less sensitive to a busy machine.

Unsealing: Veil's in-memory unseal (`unseal_bytes`, as the runtime calls it: RSA-OAEP-256 key
unwrap, chunked AES-256-GCM with the STREAM bindings, the plaintext as one `bytes`, which is what
onnxruntime loads) of random bytes sealed in 1 MiB chunks, against raw AES-GCM decryption with
`cryptography` of the same plaintext delivering the same product (one `bytes`) at whichever chunk
size is fastest here; best of a few interleaved repetitions. For context: raw AES-GCM that drops
each chunk's output at once (no fresh memory to fill, so it measures the cipher alone), Veil's
unseal with the optional plaintext SHA-256 recheck, and SHA-256 alone. MB is 10^6 bytes.

Prints and writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.unit.runtime.doubles import train_breast_cancer_model

from bench.report import publish
from veil.runtime.keywrap import RsaPublicKeyWrapper
from veil.runtime.model import OnnxModel
from veil.runtime.sealing import seal_bytes, unseal_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL_NAME = "cancer"
INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"
MIB = 1024 * 1024
MB = 1_000_000
RAW_CHUNK_SIZES = (256 * 1024, MIB, 4 * MIB)


@dataclass(frozen=True)
class Settings:
    seconds: float  # per server per round
    rounds: int
    warmup_seconds: float
    concurrency: int
    unseal_mib: int
    unseal_repeats: int


FULL = Settings(
    seconds=3.0, rounds=7, warmup_seconds=2.0, concurrency=4, unseal_mib=64, unseal_repeats=5
)
QUICK = Settings(
    seconds=0.3, rounds=1, warmup_seconds=0.2, concurrency=4, unseal_mib=4, unseal_repeats=2
)


# --- the model -------------------------------------------------------------------------------


def build_model() -> tuple[bytes, npt.NDArray[np.float32]]:
    """Logistic regression on breast cancer (skl2onnx, zipmap off); the held-out rows as inputs."""
    model = train_breast_cancer_model()  # the runtime tests' model
    return model.onnx_bytes, model.samples


def request_bodies(samples: npt.NDArray[np.float32]) -> list[bytes]:
    """One OIP v2 batch-1 JSON request per sample row."""
    return [
        json.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": row.tolist()}
                ]
            }
        ).encode()
        for row in samples
    ]


# --- the minimal server (runs in its own process) ---------------------------------------------


def serve_minimal(model_path: Path, port: int) -> None:
    """The leanest honest OIP v2 infer endpoint: aiohttp around the same onnxruntime session."""
    from aiohttp import web

    from veil.runtime.tensors import V2_TO_NUMPY, numpy_to_v2

    session = OnnxModel.from_bytes(MODEL_NAME, model_path.read_bytes()).session
    output_names = [output.name for output in session.get_outputs()]

    async def infer(request: web.Request) -> web.Response:
        document = json.loads(await request.read())
        feeds = {
            tensor["name"]: np.asarray(
                tensor["data"], dtype=V2_TO_NUMPY[tensor["datatype"]]
            ).reshape(tensor["shape"])
            for tensor in document["inputs"]
        }
        results = session.run(output_names, feeds)
        payload: dict[str, Any] = {
            "model_name": MODEL_NAME,
            "model_version": "1",
            "outputs": [
                {
                    "name": name,
                    "datatype": numpy_to_v2(array.dtype),
                    "shape": list(array.shape),
                    "data": array.ravel().tolist(),
                }
                for name, array in zip(output_names, results, strict=True)
            ],
        }
        if "id" in document:
            payload["id"] = document["id"]
        return web.Response(body=json.dumps(payload).encode(), content_type="application/json")

    app = web.Application()
    app.router.add_post(INFER_PATH, infer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- server processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Server:
    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server_process(command: list[str], port: int, log_path: Path) -> Iterator[Server]:
    """Run a server until its infer endpoint answers 200."""
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(process, url, log_path)
        yield Server(url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    probe = request_bodies(np.zeros((1, 30), dtype=np.float32))[0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.post(url + INFER_PATH, content=probe, timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{process.args!r} did not start serving:\n{log_path.read_text()}")


def veil_command(scratch: Path, model: bytes, port: int) -> list[str]:
    """`veil serve` of the sealed model, key from a PEM file (the local path: no attestation)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sealed = scratch / "model.sealed"
    sealed.write_bytes(seal_bytes(model, RsaPublicKeyWrapper(key.public_key())))
    pem = scratch / "model-key.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.chmod(0o600)
    return [
        sys.executable,
        "-m",
        "veil.cli",
        "serve",
        "--model-name",
        MODEL_NAME,
        "--sealed",
        str(sealed),
        "--private-key",
        str(pem),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--drain-seconds",
        "0",
        "--shutdown-timeout",
        "2",
    ]


def minimal_command(scratch: Path, model: bytes, port: int) -> list[str]:
    path = scratch / "model.onnx"
    path.write_bytes(model)
    command = [sys.executable, "-m", "bench.inference", "--serve-minimal", str(path)]
    return [*command, "--port", str(port)]


# --- load generation -------------------------------------------------------------------------


@dataclass
class Series:
    """Requests per second and server CPU seconds per request of each round; every latency."""

    rps: list[float] = field(default_factory=list)
    cpu_per_request: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def median_rps(self) -> float:
        return statistics.median(self.rps)

    def median_cpu_us(self) -> float:
        return statistics.median(self.cpu_per_request) * 1e6

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies), q)) * 1000


async def drive(
    client: httpx.AsyncClient, url: str, bodies: Sequence[bytes], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    """`concurrency` workers posting batch-1 requests back to back for `seconds`."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def worker(offset: int) -> None:
        index = offset
        while time.perf_counter() < deadline:
            body = bodies[index % len(bodies)]
            index += concurrency
            sent = time.perf_counter()
            response = await client.post(url, content=body, headers=headers)
            latencies.append(time.perf_counter() - sent)
            if response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}: {response.text}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


def inprocess_rps(session: Any, samples: npt.NDArray[np.float32], seconds: float) -> float:
    """Back-to-back `session.run` on the same batch-1 inputs."""
    names = [output.name for output in session.get_outputs()]
    feeds = [{"input": row.reshape(1, 30)} for row in samples]
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        session.run(names, feeds[count % len(feeds)])
        count += 1
    return count / (time.perf_counter() - started)


async def serving(
    servers: dict[str, Server],
    model: bytes,
    samples: npt.NDArray[np.float32],
    settings: Settings,
) -> dict[str, Series]:
    """Warm up, check both servers answer alike, then alternate rounds: each server, in-process."""
    bodies = request_bodies(samples)
    concurrency = settings.concurrency
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    series = {name: Series() for name in [*servers, "inprocess"]}
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        answers = [
            await client.post(s.url + INFER_PATH, content=bodies[0]) for s in servers.values()
        ]
        if len({json.dumps(answer.json(), sort_keys=True) for answer in answers}) != 1:
            raise RuntimeError(f"the servers answer differently: {[a.text for a in answers]}")
        for server in servers.values():
            await drive(
                client, server.url + INFER_PATH, bodies, concurrency, settings.warmup_seconds
            )
        session = OnnxModel.from_bytes(MODEL_NAME, model).session  # Veil's session options
        inprocess_rps(session, samples, settings.warmup_seconds)
        for round_ in range(settings.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                server = servers[name]
                cpu = server.cpu_seconds()
                rps, latencies = await drive(
                    client, server.url + INFER_PATH, bodies, concurrency, settings.seconds
                )
                series[name].rps.append(rps)
                series[name].cpu_per_request.append((server.cpu_seconds() - cpu) / len(latencies))
                series[name].latencies.extend(latencies)
            series["inprocess"].rps.append(inprocess_rps(session, samples, settings.seconds))
    return series


def serving_figures(settings: Settings) -> dict[str, Any]:
    model, samples = build_model()
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        scratch = Path(tmp)
        veil_port, minimal_port = free_port(), free_port()
        with (
            server_process(
                veil_command(scratch, model, veil_port), veil_port, scratch / "veil.log"
            ) as veil,
            server_process(
                minimal_command(scratch, model, minimal_port),
                minimal_port,
                scratch / "minimal.log",
            ) as minimal,
        ):
            servers = {"server": veil, "minimal_server": minimal}
            series = asyncio.run(serving(servers, model, samples, settings))
    server_rps = round(series["server"].median_rps(), 1)
    minimal_rps = round(series["minimal_server"].median_rps(), 1)
    inprocess = round(series["inprocess"].median_rps(), 1)
    return {
        "batch_size": 1,
        "concurrency": settings.concurrency,
        "server_rps": server_rps,
        "minimal_server_rps": minimal_rps,
        "inprocess_rps": inprocess,
        "server_p50_ms": round(series["server"].percentile_ms(50), 3),
        "server_p99_ms": round(series["server"].percentile_ms(99), 3),
        "minimal_server_p50_ms": round(series["minimal_server"].percentile_ms(50), 3),
        "minimal_server_p99_ms": round(series["minimal_server"].percentile_ms(99), 3),
        "server_vs_minimal_ratio": round(server_rps / minimal_rps, 4),
        "server_vs_inprocess_ratio": round(server_rps / inprocess, 4),
        "server_cpu_us_per_request": round(series["server"].median_cpu_us()),
        "minimal_server_cpu_us_per_request": round(series["minimal_server"].median_cpu_us()),
    }


# --- unsealing -------------------------------------------------------------------------------


def seconds_of(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def raw_decrypt(aead: AESGCM, records: Sequence[tuple[bytes, bytes]], *, keep: bool) -> bytes:
    """Decrypt every record; with `keep`, join the plaintext (as an unsealer must hold it)."""
    if keep:
        return b"".join([aead.decrypt(nonce, record, None) for nonce, record in records])
    for nonce, record in records:
        aead.decrypt(nonce, record, None)
    return b""


def unseal_figures(settings: Settings) -> dict[str, Any]:
    size = settings.unseal_mib * MIB
    plaintext = os.urandom(size)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sealed = seal_bytes(plaintext, RsaPublicKeyWrapper(key.public_key()), chunk_size=MIB)
    aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def records(chunk_size: int) -> list[tuple[bytes, bytes]]:
        out = []
        for index, start in enumerate(range(0, size, chunk_size)):
            nonce = index.to_bytes(12, "big")
            out.append((nonce, aead.encrypt(nonce, plaintext[start : start + chunk_size], None)))
        return out

    by_chunk = {chunk_size: records(chunk_size) for chunk_size in RAW_CHUNK_SIZES}
    # Correctness, and the warm-up.
    if unseal_bytes(sealed, key) != plaintext:
        raise RuntimeError("unsealing did not give back the plaintext")
    if raw_decrypt(aead, by_chunk[MIB], keep=True) != plaintext:
        raise RuntimeError("raw AES-GCM did not give back the plaintext")
    contenders: dict[str, Callable[[], object]] = {
        "unseal": partial(unseal_bytes, sealed, key),
        "unseal_verified": partial(unseal_bytes, sealed, key, verify_digest=True),
        "sha256": partial(hashlib.sha256, plaintext),
    }
    for chunk_size, chunk_records in by_chunk.items():
        contenders[f"kept:{chunk_size}"] = partial(raw_decrypt, aead, chunk_records, keep=True)
        contenders[f"dropped:{chunk_size}"] = partial(raw_decrypt, aead, chunk_records, keep=False)
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(settings.unseal_repeats):  # interleaved: a busy spell hurts every contender
        for name, run in contenders.items():
            best[name] = min(best[name], seconds_of(run))

    def fastest(kind: str) -> tuple[int, float]:
        chunk = min(RAW_CHUNK_SIZES, key=lambda chunk_size: best[f"{kind}:{chunk_size}"])
        return chunk, round(size / best[f"{kind}:{chunk}"] / MB, 1)

    raw_chunk, raw_mb_s = fastest("kept")
    dropped_chunk, dropped_mb_s = fastest("dropped")
    unseal_mb_s = round(size / best["unseal"] / MB, 1)
    return {
        "unseal_bytes": size,
        "unseal_mb_s": unseal_mb_s,
        "raw_aesgcm_mb_s": raw_mb_s,
        "raw_aesgcm_chunk_bytes": raw_chunk,
        "unseal_vs_raw_ratio": round(unseal_mb_s / raw_mb_s, 4),
        "raw_aesgcm_dropped_mb_s": dropped_mb_s,
        "raw_aesgcm_dropped_chunk_bytes": dropped_chunk,
        "unseal_vs_dropped_ratio": round(unseal_mb_s / dropped_mb_s, 4),
        "unseal_verified_digest_mb_s": round(size / best["unseal_verified"] / MB, 1),
        "sha256_mb_s": round(size / best["sha256"] / MB, 1),
    }


# --- entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny durations and sizes (smoke)")
    parser.add_argument("--seconds", type=float, help="per server per round")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--unseal-mib", type=int)
    parser.add_argument("--output", type=Path, default=RESULTS / "inference.json")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--serve-minimal", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_minimal is not None:
        serve_minimal(args.serve_minimal, args.port)
        return {}
    base = QUICK if args.quick else FULL
    settings = Settings(
        seconds=args.seconds or base.seconds,
        rounds=args.rounds or base.rounds,
        warmup_seconds=base.warmup_seconds,
        concurrency=args.concurrency or base.concurrency,
        unseal_mib=args.unseal_mib or base.unseal_mib,
        unseal_repeats=base.unseal_repeats,
    )
    started = time.monotonic()
    result = {**serving_figures(settings), **unseal_figures(settings)}
    result["benchmark_seconds"] = round(time.monotonic() - started, 1)
    return publish(result, None if args.no_write else args.output)


if __name__ == "__main__":
    main()
