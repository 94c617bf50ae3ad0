"""Benchmark: inference serving overhead and unseal throughput of the Veil runtime.

    .venv/bin/python -m bench.inference [--quick]

Serving: a real model (logistic regression on scikit-learn's breast-cancer data, converted with
skl2onnx) sealed and served by `veil serve` in its own process (validation, metrics on their own
port and the access log all on, as deployed; on uvloop when it is installed, see
`server_event_loop`), against (a) plain in-process onnxruntime on the same inputs (the limit)
and (b) a minimal aiohttp server around the same onnxruntime session (same session options, same
OIP v2 requests and responses, JSON and binary, inference inline on asyncio's default loop, no
validation, no metrics, no access log) in its own process. The load generator is `wrk` (native:
a Python client saturates before either server does), 1 thread and 4 keep-alive connections on
127.0.0.1, posting one fixed body per run (bench/wrk/post.lua): batch 1 and batch 64, as JSON and
with the binary tensor data extension. After a warm-up, every (server, body) pair is measured in
alternating rounds and the median round is reported. Each server's CPU time per request (from
/proc) is reported as well: it is less sensitive to a busy machine.

Encrypted requests: the same `veil serve` (its channel accepts both) answers the batch-1 JSON
request encrypted as `veil.client` sends it by default, in a channel session (runtime/sessions.py:
opened once with HPKE to the attested key, then AES-256-GCM each way; POST .../infer/encrypted),
in the same rounds and with the same load generator: `encrypted_rps`, its latency and CPU per
request, and `encrypted_vs_plaintext_ratio` (target >= 0.8). Beside it, the same request sealed
on its own with HPKE (runtime/channel.py, the client's `sessions=False`): `hpke_per_request_*`.
wrk replays one encrypted body, so each request costs the server what a fresh one does: the
session lookup and AES-GCM open (or the HPKE open: an X25519 agreement, HKDF, AES-GCM) and the
AES-GCM sealed answer.

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
import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
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
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.unit.runtime.doubles import train_breast_cancer_model

from bench.report import publish
from veil.runtime import sessions
from veil.runtime.channel import (
    EVIDENCE_PATH,
    REQUEST_MEDIA_TYPE,
    ChannelPublicKey,
    seal_request,
)
from veil.runtime.keywrap import RsaPublicKeyWrapper
from veil.runtime.model import OnnxModel
from veil.runtime.sealing import seal_bytes, unseal_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WRK_SCRIPT = REPO / "bench" / "wrk" / "post.lua"
MODEL_NAME = "cancer"
INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"
ENCRYPTED_PATH = f"{INFER_PATH}/encrypted"
ENCRYPTED = "encrypted_b1"  # in a channel session, as the client sends by default
HPKE = "hpke_b1"  # sealed on its own with HPKE
HEADER_LENGTH = "Inference-Header-Content-Length"
MIB = 1024 * 1024
MB = 1_000_000
RAW_CHUNK_SIZES = (256 * 1024, MIB, 4 * MIB)
WRK_THREADS = 1
BATCHES = (1, 64)
SERVERS = ("server", "minimal_server")


@dataclass(frozen=True)
class Settings:
    seconds: int  # per wrk run (wrk takes whole seconds)
    rounds: int
    warmup_seconds: int
    concurrency: int
    unseal_mib: int
    unseal_repeats: int


# Short runs in many alternating rounds: on a shared machine, both servers then see the same
# spells of noise, and the median round drops the worst of them.
FULL = Settings(
    seconds=3, rounds=7, warmup_seconds=2, concurrency=4, unseal_mib=64, unseal_repeats=5
)
INPROCESS_ROUNDS = 3
QUICK = Settings(
    seconds=1, rounds=1, warmup_seconds=0, concurrency=4, unseal_mib=4, unseal_repeats=2
)


# --- the model and the request bodies --------------------------------------------------------


def build_model() -> tuple[bytes, npt.NDArray[np.float32]]:
    """Logistic regression on breast cancer (skl2onnx, zipmap off); the held-out rows as inputs."""
    model = train_breast_cancer_model()  # the runtime tests' model
    return model.onnx_bytes, model.samples


@dataclass(frozen=True)
class Body:
    """One request body; `header_length` is set for the binary tensor data extension."""

    content: bytes
    header_length: int | None = None

    def headers(self) -> dict[str, str]:
        if self.header_length is None:
            return {"Content-Type": "application/json"}
        return {
            "Content-Type": "application/octet-stream",
            HEADER_LENGTH: str(self.header_length),
        }


def json_body(rows: npt.NDArray[np.float32]) -> Body:
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32"}
    return Body(json.dumps({"inputs": [{**tensor, "data": rows.ravel().tolist()}]}).encode())


def binary_body(rows: npt.NDArray[np.float32]) -> Body:
    """As tritonclient sends it by default: tensors as raw bytes, outputs asked as binary."""
    data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32"}
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return Body(header + data, len(header))


def bodies(samples: npt.NDArray[np.float32]) -> dict[str, Body]:
    """Batch 1 and batch 64 (rows repeated as needed), JSON and binary."""
    out = {}
    for batch in BATCHES:
        rows = np.resize(samples, (batch, samples.shape[1])).astype(np.float32)
        out[f"json_b{batch}"] = json_body(rows)
        out[f"binary_b{batch}"] = binary_body(rows)
    return out


# --- the minimal server (runs in its own process) ---------------------------------------------


def minimal_app(model: bytes, json_library: str = "json") -> web.Application:
    """The leanest honest OIP v2 infer endpoint: aiohttp around the same onnxruntime session,
    with the standard library's JSON (the anchor) or orjson (what `veil serve` uses)."""
    from veil.runtime.tensors import V2_TO_NUMPY, numpy_to_v2

    if json_library == "orjson":
        import orjson

        loads: Callable[[bytes], Any] = orjson.loads
        dumps: Callable[[Any], bytes] = orjson.dumps
    else:
        loads, dumps = json.loads, lambda document: json.dumps(document).encode()

    session = OnnxModel.from_bytes(MODEL_NAME, model).session
    output_names = [output.name for output in session.get_outputs()]

    async def infer(request: web.Request) -> web.Response:
        raw = await request.read()
        offset = int(request.headers.get(HEADER_LENGTH, len(raw)))  # binary data starts here
        document = loads(raw[:offset])
        feeds = {}
        for tensor in document["inputs"]:
            dtype = V2_TO_NUMPY[tensor["datatype"]]
            if "parameters" in tensor:  # binary tensor data
                size = tensor["parameters"]["binary_data_size"]
                array = np.frombuffer(raw, dtype, size // dtype.itemsize, offset)
                offset += size
            else:
                array = np.asarray(tensor["data"], dtype=dtype)
            feeds[tensor["name"]] = array.reshape(tensor["shape"])
        results = session.run(output_names, feeds)
        binary = "parameters" in document  # binary_data_output
        outputs, chunks = [], []
        for name, array in zip(output_names, results, strict=True):
            meta = {"name": name, "datatype": numpy_to_v2(array.dtype), "shape": list(array.shape)}
            if binary:
                chunks.append(array.tobytes())
                outputs.append({**meta, "parameters": {"binary_data_size": len(chunks[-1])}})
            else:
                outputs.append({**meta, "data": array.ravel().tolist()})
        payload: dict[str, Any] = {
            "model_name": MODEL_NAME,
            "model_version": "1",
            "outputs": outputs,
        }
        header = dumps(payload)
        if not binary:
            return web.Response(body=header, content_type="application/json")
        headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
        return web.Response(body=b"".join([header, *chunks]), headers=headers)

    app = web.Application()
    app.router.add_post(INFER_PATH, infer)
    return app


def serve_minimal(model_path: Path, port: int, json_library: str) -> None:
    app = minimal_app(model_path.read_bytes(), json_library)
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
    probe = json_body(np.zeros((1, 30), dtype=np.float32)).content
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
        sys.executable, "-m", "veil.cli", "serve", "--model-name", MODEL_NAME,
        "--sealed", str(sealed), "--private-key", str(pem), "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(free_port()),
        "--drain-seconds", "0", "--shutdown-timeout", "2", "--channel", "plaintext",
    ]  # fmt: skip


def minimal_command(
    scratch: Path, model: bytes, port: int, json_library: str = "json"
) -> list[str]:
    path = scratch / "model.onnx"
    path.write_bytes(model)
    command = [sys.executable, "-m", "bench.inference", "--serve-minimal", str(path)]
    return [*command, "--port", str(port), "--minimal-json", json_library]


def event_loop() -> str:
    """The event loop `veil serve` runs on (uvloop when installed)."""
    try:
        return f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        return "asyncio"


# --- load generation -------------------------------------------------------------------------


@dataclass
class Series:
    """Requests per second, server CPU seconds per request and latency of each round."""

    rps: list[float] = field(default_factory=list)
    cpu_per_request: list[float] = field(default_factory=list)
    p50_us: list[int] = field(default_factory=list)
    p99_us: list[int] = field(default_factory=list)

    def median_rps(self) -> float:
        return round(statistics.median(self.rps), 1)

    def median_cpu_us(self) -> int:
        return round(statistics.median(self.cpu_per_request) * 1e6)

    def p50_ms(self) -> float:
        return round(statistics.median(self.p50_us) / 1000, 3)

    def p99_ms(self) -> float:
        return round(statistics.median(self.p99_us) / 1000, 3)


def wrk(
    url: str,
    body_file: Path,
    body: Body,
    seconds: int,
    connections: int,
    *,
    path: str = INFER_PATH,
    script: Path = WRK_SCRIPT,
) -> dict[str, int]:
    """One wrk run posting `body` to `path`; the figures bench/wrk/post.lua prints."""
    env = {**os.environ, "WRK_BODY_FILE": str(body_file)}
    if body.header_length is not None:
        env["WRK_INFERENCE_HEADER_LENGTH"] = str(body.header_length)
    command = [
        "wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(script), url + path,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    figures: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    failures = {
        key: figures[key]
        for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        if figures[key]
    }
    if failures or not figures["requests"]:
        raise RuntimeError(f"wrk against {url} with {body_file.name}: {failures or 'no requests'}")
    return figures


def measure(
    server: Server,
    body_file: Path,
    body: Body,
    settings: Settings,
    series: Series,
    **target: Any,
) -> None:
    cpu = server.cpu_seconds()
    figures = wrk(server.url, body_file, body, settings.seconds, settings.concurrency, **target)
    series.cpu_per_request.append((server.cpu_seconds() - cpu) / figures["requests"])
    series.rps.append(figures["requests"] / figures["duration_us"] * 1e6)
    series.p50_us.append(figures["p50_us"])
    series.p99_us.append(figures["p99_us"])


def check_answers(servers: dict[str, Server], requests: dict[str, Body]) -> None:
    """Both servers give the same answer to every body (binary ones decoded by header)."""
    for kind, body in requests.items():
        answers = []
        for server in servers.values():
            response = httpx.post(
                server.url + INFER_PATH, content=body.content, headers=body.headers(), timeout=30
            )
            if response.status_code != 200:
                raise RuntimeError(f"{server.url} answered {kind} with {response.status_code}")
            length = int(response.headers.get(HEADER_LENGTH, len(response.content)))
            answers.append((json.loads(response.content[:length]), response.content[length:]))
        if any(answer != answers[0] for answer in answers):
            raise RuntimeError(f"the servers answer {kind} differently: {answers}")


@dataclass(frozen=True)
class Encrypted:
    """The batch-1 JSON request encrypted to the veil server's channel key, and how wrk posts
    it: post.lua with the encrypted media type, to the encrypted infer path."""

    content: bytes
    body_file: Path
    script: Path

    @property
    def body(self) -> Body:
        return Body(self.content)


def _open_session(server: Server, key: ChannelPublicKey) -> sessions.CallerSession:
    offer = sessions.offer_session(key)
    answer = httpx.post(
        server.url + sessions.SESSIONS_PATH,
        content=offer.body,
        headers={"Content-Type": sessions.OPEN_MEDIA_TYPE},
        timeout=30,
    )
    if answer.status_code != 201:
        raise RuntimeError(f"the server opened no session: {answer.status_code} {answer.text}")
    return offer.confirm(answer.content)


def encrypted_requests(server: Server, plain: Body, scratch: Path) -> dict[str, Encrypted]:
    """Fetch the server's channel key (its evidence), encrypt `plain` to it both ways (in a
    session, and with HPKE alone), and check each encrypted answer opens to the plaintext one."""
    evidence = httpx.get(server.url + EVIDENCE_PATH, timeout=30)
    evidence.raise_for_status()
    key = ChannelPublicKey.from_jwk(evidence.json()["key"])
    expected = httpx.post(
        server.url + INFER_PATH, content=plain.content, headers=plain.headers(), timeout=30
    )
    in_session = _open_session(server, key).seal(plain.content)
    alone = seal_request(key, plain.content)
    lua = WRK_SCRIPT.read_text(encoding="utf-8")
    plain_type = 'wrk.headers["Content-Type"] = "application/json"'
    if plain_type not in lua:
        raise RuntimeError(f"{WRK_SCRIPT} no longer sets the JSON content type as expected")
    out = {}
    for kind, sealed, media_type in (
        (ENCRYPTED, in_session, sessions.REQUEST_MEDIA_TYPE),
        (HPKE, alone, REQUEST_MEDIA_TYPE),
    ):
        answer = httpx.post(
            server.url + ENCRYPTED_PATH,
            content=sealed.body,
            headers={"Content-Type": media_type},
            timeout=30,
        )
        if answer.status_code != 200 or sealed.open_response(answer.content) != (
            200,
            None,
            expected.content,
        ):
            raise RuntimeError(f"the {kind} answer differs from the plaintext one: {answer}")
        script = scratch / f"post-{kind}.lua"
        script.write_text(
            lua.replace(plain_type, f'wrk.headers["Content-Type"] = "{media_type}"'),
            encoding="utf-8",
        )
        body_file = scratch / f"{kind}.body"
        body_file.write_bytes(sealed.body)
        out[kind] = Encrypted(sealed.body, body_file, script)
    return out


def inprocess_rps(session: Any, rows: npt.NDArray[np.float32], seconds: float) -> float:
    """Back-to-back `session.run` on the same inputs."""
    names = [output.name for output in session.get_outputs()]
    feeds = {"input": rows}
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        session.run(names, feeds)
        count += 1
    return count / (time.perf_counter() - started)


def warm_up(
    servers: dict[str, Server],
    requests: dict[str, Body],
    files: dict[str, Path],
    encrypted: dict[str, Encrypted],
    settings: Settings,
) -> None:
    for server in servers.values():
        for kind, body in requests.items():
            wrk(server.url, files[kind], body, settings.warmup_seconds, settings.concurrency)
    for sealed in encrypted.values():
        wrk(
            servers["server"].url,
            sealed.body_file,
            sealed.body,
            settings.warmup_seconds,
            settings.concurrency,
            path=ENCRYPTED_PATH,
            script=sealed.script,
        )


def serving(
    servers: dict[str, Server],
    model: bytes,
    samples: npt.NDArray[np.float32],
    settings: Settings,
    scratch: Path,
) -> dict[str, Series]:
    """Check both servers answer alike, warm up, then alternate rounds; in-process last."""
    requests = bodies(samples)
    check_answers(servers, requests)
    files = {}
    for kind, body in requests.items():
        files[kind] = scratch / f"{kind}.body"
        files[kind].write_bytes(body.content)
    veil = servers["server"]
    encrypted = encrypted_requests(veil, requests["json_b1"], scratch)
    if settings.warmup_seconds:
        warm_up(servers, requests, files, encrypted, settings)
    series = {f"{name}:{kind}": Series() for name in servers for kind in requests}
    series.update({f"server:{kind}": Series() for kind in encrypted})
    for round_ in range(settings.rounds):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
        for kind, body in requests.items():
            for name in order:
                measure(servers[name], files[kind], body, settings, series[f"{name}:{kind}"])
            if kind != "json_b1":
                continue
            for sealed_kind, sealed in encrypted.items():  # beside their plaintext twin
                measure(
                    veil,
                    sealed.body_file,
                    sealed.body,
                    settings,
                    series[f"server:{sealed_kind}"],
                    path=ENCRYPTED_PATH,
                    script=sealed.script,
                )
    session = OnnxModel.from_bytes(MODEL_NAME, model).session  # Veil's session options
    for batch in BATCHES:
        rows = np.resize(samples, (batch, samples.shape[1])).astype(np.float32)
        inprocess_rps(session, rows, settings.warmup_seconds)
        measured = series[f"inprocess:b{batch}"] = Series()
        for _ in range(min(settings.rounds, INPROCESS_ROUNDS)):
            measured.rps.append(inprocess_rps(session, rows, settings.seconds))
    return series


def serving_figures(settings: Settings) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise RuntimeError("the load generator wrk is not installed (hack/setup.sh installs it)")
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
            series = serving(servers, model, samples, settings, scratch)
    return figures(series, settings)


def figures(series: dict[str, Series], settings: Settings) -> dict[str, Any]:
    """The published keys: batch-1 JSON under the historical names, the rest by suffix."""
    rps = {key: measured.median_rps() for key, measured in series.items()}
    server, minimal, inprocess = (
        rps["server:json_b1"],
        rps["minimal_server:json_b1"],
        rps["inprocess:b1"],
    )
    out: dict[str, Any] = {
        "load_generator": "wrk",
        "wrk_threads": WRK_THREADS,
        "wrk_seconds_per_round": settings.seconds,
        "rounds": settings.rounds,
        "server_event_loop": event_loop(),
        "batch_size": 1,
        "concurrency": settings.concurrency,
        "server_rps": server,
        "minimal_server_rps": minimal,
        "inprocess_rps": inprocess,
    }
    for name in SERVERS:
        out[f"{name}_p50_ms"] = series[f"{name}:json_b1"].p50_ms()
        out[f"{name}_p99_ms"] = series[f"{name}:json_b1"].p99_ms()
    out["server_vs_minimal_ratio"] = round(server / minimal, 4)
    encrypted = series[f"server:{ENCRYPTED}"]
    out["encrypted_rps"] = rps[f"server:{ENCRYPTED}"]
    out["encrypted_p50_ms"] = encrypted.p50_ms()
    out["encrypted_p99_ms"] = encrypted.p99_ms()
    out["encrypted_cpu_us_per_request"] = encrypted.median_cpu_us()
    out["encrypted_vs_plaintext_ratio"] = round(out["encrypted_rps"] / server, 4)
    alone = series[f"server:{HPKE}"]
    out["hpke_per_request_rps"] = rps[f"server:{HPKE}"]
    out["hpke_per_request_p50_ms"] = alone.p50_ms()
    out["hpke_per_request_cpu_us_per_request"] = alone.median_cpu_us()
    out["hpke_per_request_vs_plaintext_ratio"] = round(out["hpke_per_request_rps"] / server, 4)
    out["server_vs_inprocess_ratio"] = round(server / inprocess, 4)
    for name in SERVERS:
        out[f"{name}_cpu_us_per_request"] = series[f"{name}:json_b1"].median_cpu_us()
    out["server_binary_rps"] = rps["server:binary_b1"]
    out["minimal_server_binary_rps"] = rps["minimal_server:binary_b1"]
    out["batch64_rps"] = rps["server:json_b64"]
    out["minimal_server_batch64_rps"] = rps["minimal_server:json_b64"]
    out["batch64_binary_rps"] = rps["server:binary_b64"]
    out["minimal_server_batch64_binary_rps"] = rps["minimal_server:binary_b64"]
    out["inprocess_batch64_rps"] = rps["inprocess:b64"]
    out["server_binary_vs_minimal_ratio"] = round(
        out["server_binary_rps"] / out["minimal_server_binary_rps"], 4
    )
    out["batch64_vs_minimal_ratio"] = round(
        out["batch64_rps"] / out["minimal_server_batch64_rps"], 4
    )
    for name in SERVERS:
        for kind in ("binary_b1", "json_b64", "binary_b64"):
            out[f"{name}_{kind}_cpu_us_per_request"] = series[f"{name}:{kind}"].median_cpu_us()
            out[f"{name}_{kind}_p50_ms"] = series[f"{name}:{kind}"].p50_ms()
    return out


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
    parser.add_argument("--seconds", type=int, help="per wrk run (whole seconds)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--unseal-mib", type=int)
    parser.add_argument("--output", type=Path, default=RESULTS / "inference.json")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--serve-minimal", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--minimal-json", choices=("json", "orjson"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_minimal is not None:
        serve_minimal(args.serve_minimal, args.port, args.minimal_json or "json")
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
