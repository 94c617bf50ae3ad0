"""Confidential inference end to end, without hardware: the runtime's channel key attested by the
test authority (tokens as MAA mints them for a Confidential ACI group, the key in the runtime
data), the evidence endpoint, the client that verifies before it sends, and a recording proxy
between them standing for the host, the network or an ingress."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from veil.client import AsyncClient, Expectations, InferenceError, RefusedError
from veil.runtime.attestation import AttestationPolicy, AttestationVerifier, Placement
from veil.runtime.channel import (
    EVIDENCE_PATH,
    REQUEST_MEDIA_TYPE,
    ChannelError,
    ChannelPrivateKey,
    seal_request,
)
from veil.runtime.evidence import AttesterError, EvidenceService
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.server import SESSION_TABLE, build_app
from veil.runtime.sessions import (
    OPEN_MEDIA_TYPE,
    SESSIONS_PATH,
    CallerSession,
    SessionTable,
    offer_session,
)
from veil.runtime.sessions import REQUEST_MEDIA_TYPE as SESSION_REQUEST_MEDIA_TYPE
from veil.runtime.state import ModelSlot

from .doubles import HOSTDATA, AuthorityAttester, TestAuthority, TrainedModel, running

pytestmark = pytest.mark.anyio

MODEL = "cancer"
INFER = f"/v2/models/{MODEL}/infer"
ACI = Placement.CONFIDENTIAL_ACI


@dataclass
class Proxy:
    """A recording reverse proxy: every byte both ways is kept; evidence may be rewritten."""

    upstream: str
    rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    recorded: bytearray = field(default_factory=bytearray)
    evidence: list[dict[str, Any]] = field(default_factory=list)
    replay_evidence: dict[str, Any] | None = None

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.recorded += request.path_qs.encode() + body
        headers = {k: v for k, v in request.headers.items() if k.lower() in {"content-type"}}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as answer,
        ):
            content = await answer.read()
            status, content_type = answer.status, answer.content_type
        if request.path == EVIDENCE_PATH and status == 200:
            document = json.loads(content)
            self.evidence.append(document)
            if self.replay_evidence is not None:
                document = self.replay_evidence
            if self.rewrite is not None:
                document = self.rewrite(document)
            content = json.dumps(document).encode()
        self.recorded += content
        return web.Response(body=content, status=status, content_type=content_type)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app


@dataclass
class Runtime:
    url: str
    channel: EvidenceService
    attester: AuthorityAttester
    runs: list[int]
    sessions: SessionTable


@pytest.fixture
def expectations(authority: TestAuthority) -> Expectations:
    policy = AttestationPolicy(ACI, hostdata=HOSTDATA)
    return Expectations((authority.issuer,), policy, allow_insecure_loopback_issuers=True)


def _channel(
    authority: TestAuthority, attester: AuthorityAttester | None, *, required: bool = True
) -> EvidenceService:
    verifier = AttestationVerifier(
        [authority.issuer], AttestationPolicy(ACI), allow_insecure_loopback_issuers=True
    )
    return EvidenceService(
        ChannelPrivateKey(),
        model_name=MODEL,
        model_version="1",
        required=required,
        attester=attester,
        verifier=verifier if attester is not None else None,
    )


@pytest.fixture
async def runtime(
    authority: TestAuthority, breast_cancer_model: TrainedModel, request: pytest.FixtureRequest
) -> AsyncIterator[Runtime]:
    authority.container_hostdata = HOSTDATA
    options = getattr(request, "param", {})
    attester = AuthorityAttester(authority)
    channel = _channel(
        authority, None if options.get("unattested") else attester, **options.get("channel", {})
    )
    slot = ModelSlot(MODEL)
    model = OnnxModel.from_bytes(MODEL, breast_cancer_model.onnx_bytes)
    runs: list[int] = []
    original = model.run

    def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        return original(*args, **kwargs)

    object.__setattr__(model, "run", counted)  # count every inference
    slot.set_ready(model)
    app = build_app(slot, RuntimeMetrics(CollectorRegistry()), channel=channel)
    async with running(app) as url:
        if channel.attested:
            await channel.refresh()
        yield Runtime(url, channel, attester, runs, app[SESSION_TABLE])


async def _client(url: str, expectations: Expectations, **options: Any) -> AsyncClient:
    return AsyncClient(url, MODEL, expectations, **options)


async def _refused(url: str, expectations: Expectations, check: str, **options: Any) -> str:
    async with AsyncClient(url, MODEL, expectations, **options) as client:
        with pytest.raises(RefusedError) as caught:
            await client.verify()
    assert caught.value.check == check, str(caught.value)
    return str(caught.value)


def _onnxruntime(model: TrainedModel, rows: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
    return list(session.run(None, {"input": rows}))


# --- the round trip ------------------------------------------------------------------------


# Both ways of sealing: a channel session (the client's default) and HPKE for each request.
SEALING = pytest.mark.parametrize("sessions", [True, False], ids=["session", "per-request"])


@SEALING
async def test_round_trip_equals_onnxruntime_on_the_plaintext_model(
    runtime: Runtime,
    expectations: Expectations,
    breast_cancer_model: TrainedModel,
    sessions: bool,
) -> None:
    rows = breast_cancer_model.samples[:7]
    async with AsyncClient(runtime.url, MODEL, expectations, sessions=sessions) as client:
        verified = await client.verify()
        answer = await client.infer({"input": rows})
    assert verified.encryption_required
    assert verified.key.same_as(runtime.channel.key.public)
    assert len(runtime.sessions) == (1 if sessions else 0)
    expected = _onnxruntime(breast_cancer_model, rows)
    by_name = {output["name"]: output for output in answer["outputs"]}
    assert len(by_name) == len(expected)
    for output, reference in zip(answer["outputs"], expected, strict=True):
        assert output["shape"] == list(reference.shape)
        np.testing.assert_array_equal(
            np.asarray(output["data"]).reshape(reference.shape), reference
        )


@SEALING
async def test_binary_tensors_round_trip_inside_the_envelope(
    runtime: Runtime,
    expectations: Expectations,
    breast_cancer_model: TrainedModel,
    sessions: bool,
) -> None:
    rows = np.ascontiguousarray(breast_cancer_model.samples[:3], dtype="<f4")
    data = rows.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    async with AsyncClient(runtime.url, MODEL, expectations, sessions=sessions) as client:
        status, length, body = await client.send(header + data, len(header))
    assert status == 200
    assert length is not None
    document = json.loads(body[:length])
    expected = _onnxruntime(breast_cancer_model, rows)
    offset = length
    for output, reference in zip(document["outputs"], expected, strict=True):
        size = output["parameters"]["binary_data_size"]
        raw = body[offset : offset + size]
        offset += size
        got = np.frombuffer(raw, dtype=reference.dtype).reshape(reference.shape)
        np.testing.assert_array_equal(got, reference)


async def test_errors_after_opening_come_back_inside_the_envelope(
    runtime: Runtime, expectations: Expectations
) -> None:
    async with AsyncClient(runtime.url, MODEL, expectations) as client:
        status, _, body = await client.send(b'{"inputs": [{"name": "nope"}]}')
        with pytest.raises(InferenceError, match="HTTP 400"):
            await client.infer(
                {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
            )
    assert status == 400
    assert "error" in json.loads(body)
    assert runtime.runs == []


# --- what a host or network sees -------------------------------------------------------------


@SEALING
async def test_a_recording_proxy_sees_none_of_the_input_nor_the_output(
    runtime: Runtime,
    expectations: Expectations,
    breast_cancer_model: TrainedModel,
    sessions: bool,
) -> None:
    marker = np.full((2, 30), 31337.25, dtype=np.float32)
    rows = breast_cancer_model.samples[:4]  # real inputs: probabilities strictly between 0 and 1
    proxy = Proxy(runtime.url)
    async with (
        running(proxy.app()) as proxied,
        AsyncClient(proxied, MODEL, expectations, sessions=sessions) as client,
    ):
        await client.infer({"input": marker})
        answer = await client.infer({"input": rows})
    assert proxy.recorded, "the proxy saw the traffic"
    assert b"31337.25" not in proxy.recorded
    assert struct.pack("<f", 31337.25) not in proxy.recorded
    assert struct.pack(">f", 31337.25) not in proxy.recorded
    for value in rows.ravel().tolist():
        if len(repr(value)) >= 6:
            assert repr(value).encode() not in proxy.recorded, value
    assert b'"inputs"' not in proxy.recorded
    assert b'"outputs"' not in proxy.recorded
    seen = 0
    for output in answer["outputs"]:
        assert json.dumps(output["data"]).encode() not in proxy.recorded
        assert output["name"].encode() not in proxy.recorded
        for value in output["data"]:
            if isinstance(value, float) and len(repr(value)) >= 6:  # probabilities
                assert repr(value).encode() not in proxy.recorded, value
                assert struct.pack("<f", value) not in proxy.recorded, value
                seen += 1
    assert seen, "the answer held probabilities to look for"


# --- the runtime's side ----------------------------------------------------------------------


async def test_plaintext_is_refused_when_encryption_is_required(
    runtime: Runtime, breast_cancer_model: TrainedModel
) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]}
    async with aiohttp.ClientSession() as session:
        for path in (INFER, f"/v2/models/{MODEL}/versions/1/infer"):
            async with session.post(runtime.url + path, json=body) as answer:
                assert answer.status == 403
                assert "accepts only encrypted requests" in (await answer.json())["error"]
    assert runtime.runs == []


@pytest.mark.parametrize("runtime", [{"channel": {"required": False}}], indirect=True)
async def test_plaintext_is_still_served_when_the_channel_is_optional(
    runtime: Runtime, expectations: Expectations
) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(runtime.url + INFER, json=body) as answer,
    ):
        assert answer.status == 200
    async with AsyncClient(runtime.url, MODEL, expectations) as client:
        assert not (await client.verify()).encryption_required
        assert (await client.infer({"input": np.zeros((1, 30), np.float32)}))["outputs"]


async def test_tampered_ciphertext_gets_a_400_and_no_inference(runtime: Runtime) -> None:
    key = runtime.channel.key.public
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]}
    sealed = bytearray(seal_request(key, json.dumps(body).encode()).body)
    url = runtime.url + INFER + "/encrypted"
    headers = {"Content-Type": REQUEST_MEDIA_TYPE}
    async with aiohttp.ClientSession() as session:
        for offset in (20, 60, len(sealed) - 1):
            altered = bytearray(sealed)
            altered[offset] ^= 0x40
            async with session.post(url, data=bytes(altered), headers=headers) as answer:
                assert answer.status == 400
                assert "does not open" in (await answer.json())["error"]
        other = seal_request(ChannelPrivateKey().public, json.dumps(body).encode()).body
        async with session.post(url, data=other, headers=headers) as answer:
            assert answer.status == 400
            assert "fetch the evidence again" in (await answer.json())["error"]
        async with session.post(
            url, data=bytes(sealed), headers={"Content-Type": "application/json"}
        ) as answer:
            assert answer.status == 415
        async with session.post(url, data=bytes(sealed), headers=headers) as answer:
            assert answer.status == 200  # the untouched request works
    assert runtime.runs == [1]


async def test_the_runtime_serves_no_token_that_does_not_bind_its_key(
    authority: TestAuthority,
) -> None:
    other = ChannelPrivateKey().public.jwk()
    attester = AuthorityAttester(authority, tamper=lambda data: {**data, "veil-channel-key": other})
    channel = _channel(authority, attester)
    with pytest.raises(AttesterError, match="another channel key"):
        await channel.refresh()
    with pytest.raises(Exception, match="another channel key"):
        channel.current()


async def test_readiness_waits_for_a_verified_token_when_encryption_is_required(
    authority: TestAuthority, breast_cancer_model: TrainedModel
) -> None:
    """A caller sent to a ready runtime must be able to verify it: not ready before the
    token binding the channel key has been obtained and checked."""
    attester = AuthorityAttester(authority, lifetime=-3600)  # expired: never verifies
    channel = _channel(authority, attester)
    slot = ModelSlot(MODEL)
    slot.set_ready(OnnxModel.from_bytes(MODEL, breast_cancer_model.onnx_bytes))
    app = build_app(slot, RuntimeMetrics(CollectorRegistry()), channel=channel)
    async with running(app) as url, aiohttp.ClientSession() as session:
        with pytest.raises(AttesterError):
            await channel.refresh()
        async with session.get(url + "/v2/health/ready") as answer:
            assert answer.status == 503
            body = await answer.json()
        assert body["state"] == "attesting"
        assert "expired" in body["reason"]
        attester.lifetime = 3600
        await channel.refresh()
        async with session.get(url + "/v2/health/ready") as answer:
            assert answer.status == 200


async def test_the_runtime_verifies_its_own_token(authority: TestAuthority) -> None:
    attester = AuthorityAttester(authority, lifetime=-3600)
    with pytest.raises(AttesterError, match="own attestation token does not verify \\(expired\\)"):
        await _channel(authority, attester).refresh()


async def test_the_token_is_refreshed_before_it_expires(authority: TestAuthority) -> None:
    attester = AuthorityAttester(authority, lifetime=2)
    channel = _channel(authority, attester)
    async with channel.lifespan():
        for _ in range(100):
            if attester.calls >= 2:
                break
            await asyncio.sleep(0.05)
        first = channel.current()["attestation"]["token"]
    assert attester.calls >= 2, "refreshed at three quarters of its life"
    assert first


# --- the client refuses ----------------------------------------------------------------------


async def test_client_refuses_a_served_key_that_is_not_the_attested_one(
    runtime: Runtime, expectations: Expectations
) -> None:
    attacker = ChannelPrivateKey().public.jwk()
    proxy = Proxy(runtime.url, rewrite=lambda document: {**document, "key": attacker})
    async with running(proxy.app()) as proxied:
        message = await _refused(proxied, expectations, "key-binding")
    assert "is not the attested key" in message


async def test_client_refuses_a_token_binding_another_key(
    runtime: Runtime, expectations: Expectations
) -> None:
    attacker = ChannelPrivateKey().public.jwk()
    runtime.attester.tamper = lambda data: {**data, "veil-channel-key": attacker}
    # the runtime refuses to serve it fresh; a host serving it anyway is caught by the client
    async with running(Proxy(runtime.url).app()) as proxied:
        await _refused(proxied, expectations, "evidence")
    runtime.attester.tamper = None
    forged = runtime.attester.authority.token(
        runtime.attester.authority.simulated_container_claims({"veil-channel-key": attacker})
    )

    def swap(document: dict[str, Any]) -> dict[str, Any]:
        return {**document, "attestation": {**document["attestation"], "token": forged}}

    async with running(Proxy(runtime.url, rewrite=swap).app()) as proxied:
        await _refused(proxied, expectations, "key-binding", fresh=False)


async def test_client_refuses_wrong_hostdata(runtime: Runtime, expectations: Expectations) -> None:
    wrong = Expectations(
        expectations.issuers,
        AttestationPolicy(ACI, hostdata="00" * 32),
        allow_insecure_loopback_issuers=True,
    )
    message = await _refused(runtime.url, wrong, "hostdata")
    assert "x-ms-sevsnpvm-hostdata" in message


async def test_client_refuses_an_expired_token(
    runtime: Runtime, expectations: Expectations
) -> None:
    authority = runtime.attester.authority

    def expire(document: dict[str, Any]) -> dict[str, Any]:
        runtime_data = {
            "veil-channel-key": document["key"],
            "nonce": document["attestation"]["nonce"],
        }
        token = authority.token(authority.simulated_container_claims(runtime_data), lifetime=-3600)
        return {**document, "attestation": {**document["attestation"], "token": token}}

    async with running(Proxy(runtime.url, rewrite=expire).app()) as proxied:
        message = await _refused(proxied, expectations, "expired")
    assert "expired at" in message


async def test_client_refuses_a_replayed_token(
    runtime: Runtime, expectations: Expectations
) -> None:
    proxy = Proxy(runtime.url)
    async with running(proxy.app()) as proxied:
        async with AsyncClient(proxied, MODEL, expectations) as client:
            await client.verify()
        proxy.replay_evidence = proxy.evidence[0]  # the host answers with yesterday's evidence
        message = await _refused(proxied, expectations, "nonce")
    assert "not the nonce this verifier issued" in message


async def test_client_refuses_a_token_from_another_issuer(
    runtime: Runtime, expectations: Expectations, rogue_authority: TestAuthority
) -> None:
    def rogue(document: dict[str, Any]) -> dict[str, Any]:
        runtime_data = {
            "veil-channel-key": document["key"],
            "nonce": document["attestation"]["nonce"],
        }
        rogue_authority.container_hostdata = HOSTDATA
        token = rogue_authority.token(rogue_authority.simulated_container_claims(runtime_data))
        return {**document, "attestation": {**document["attestation"], "token": token}}

    async with running(Proxy(runtime.url, rewrite=rogue).app()) as proxied:
        message = await _refused(proxied, expectations, "issuer")
    assert rogue_authority.issuer in message


async def test_client_refuses_a_missing_or_different_required_claim(
    runtime: Runtime, expectations: Expectations
) -> None:
    different = Expectations(
        expectations.issuers,
        expectations.policy,
        (("x-ms-ver", "2.0"),),
        allow_insecure_loopback_issuers=True,
    )
    assert "'1.0', expected '2.0'" in await _refused(runtime.url, different, "required-claim")
    missing = Expectations(
        expectations.issuers,
        expectations.policy,
        (("x-ms-sevsnpvm-launchmeasurement", "ab" * 48),),
        allow_insecure_loopback_issuers=True,
    )
    await _refused(runtime.url, missing, "required-claim")


@pytest.mark.parametrize("runtime", [{"unattested": True}], indirect=True)
async def test_client_refuses_evidence_without_attestation(
    runtime: Runtime, expectations: Expectations
) -> None:
    message = await _refused(runtime.url, expectations, "attestation")
    assert "not attested" in message


async def test_client_refuses_evidence_for_another_model(
    runtime: Runtime, expectations: Expectations
) -> None:
    async with AsyncClient(runtime.url, "other-model", expectations) as client:
        with pytest.raises(RefusedError) as caught:
            await client.verify()
    assert caught.value.check == "model"


async def test_cached_evidence_is_verified_without_a_nonce(
    runtime: Runtime, expectations: Expectations
) -> None:
    calls = runtime.attester.calls
    async with AsyncClient(runtime.url, MODEL, expectations, fresh=False) as client:
        verified = await client.verify()
        await client.infer({"input": np.zeros((1, 30), np.float32)})
    assert verified.attestation.nonce is None
    assert runtime.attester.calls == calls  # no attestation for this caller


async def test_client_verifies_again_after_the_runtime_changes_key(
    runtime: Runtime, expectations: Expectations
) -> None:
    async with AsyncClient(runtime.url, MODEL, expectations) as client:
        first = await client.verify()
        runtime.channel.key = ChannelPrivateKey()  # as after a restart
        await runtime.channel.refresh()
        await client.infer({"input": np.zeros((1, 30), np.float32)})
        assert client.verified is not None
        assert not client.verified.key.same_as(first.key)


async def test_fresh_evidence_is_rate_limited(runtime: Runtime) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(runtime.url + EVIDENCE_PATH, params={"nonce": "short"}) as answer:
            assert answer.status == 400
        statuses = []
        for index in range(35):
            params = {"nonce": f"nonce-{index:04d}"}
            async with session.get(runtime.url + EVIDENCE_PATH, params=params) as answer:
                statuses.append(answer.status)
    assert statuses.count(200) == 30
    assert statuses[-1] == 429


# --- channel sessions: what an attacker on the wire can and cannot do -----------------------


async def _open_session(url: str, runtime: Runtime) -> CallerSession:
    offer = offer_session(runtime.channel.key.public)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url + SESSIONS_PATH, data=offer.body, headers={"Content-Type": OPEN_MEDIA_TYPE}
        ) as answer,
    ):
        assert answer.status == 201
        return offer.confirm(await answer.read())


def _zeros_request() -> bytes:
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]}
    return json.dumps(body).encode()


async def test_tampered_session_requests_get_a_400_and_no_inference(runtime: Runtime) -> None:
    session = await _open_session(runtime.url, runtime)
    sealed = session.seal(_zeros_request())
    url = runtime.url + INFER + "/encrypted"
    headers = {"Content-Type": SESSION_REQUEST_MEDIA_TYPE}
    async with aiohttp.ClientSession() as http:
        # A flipped bit in the session id, the nonce, the ciphertext, the tag.
        flips = [(3, "unknown or expired"), (20, "does not open"), (40, "does not open")]
        for offset, reason in [*flips, (len(sealed.body) - 1, "does not open")]:
            altered = bytearray(sealed.body)
            altered[offset] ^= 0x01
            async with http.post(url, data=bytes(altered), headers=headers) as answer:
                assert answer.status == 400
                assert reason in (await answer.json())["error"]
        async with http.post(url, data=sealed.body, headers=headers) as answer:
            assert answer.status == 200
            status, _, _ = sealed.open_response(await answer.read())
    assert status == 200
    assert runtime.runs == [1]


async def test_an_answer_opens_only_for_the_request_it_answers(runtime: Runtime) -> None:
    session = await _open_session(runtime.url, runtime)
    first, second = session.seal(_zeros_request()), session.seal(_zeros_request())
    url = runtime.url + INFER + "/encrypted"
    headers = {"Content-Type": SESSION_REQUEST_MEDIA_TYPE}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=first.body, headers=headers) as answer:
            first_answer = await answer.read()
        async with http.post(url, data=second.body, headers=headers) as answer:
            second_answer = await answer.read()
    assert first.open_response(first_answer)[0] == 200
    # A proxy swapping the two answers is caught: each is bound to its request's nonce.
    with pytest.raises(ChannelError, match="not the answer to this request"):
        first.open_response(second_answer)
    with pytest.raises(ChannelError, match="not the answer to this request"):
        second.open_response(first_answer)


async def test_a_session_confirmation_only_the_tee_can_make(runtime: Runtime) -> None:
    """An impostor (the host answering in the TEE's place) cannot forge the confirmation: it
    needs the session secret, which only the attested key's holder can open."""
    offer = offer_session(runtime.channel.key.public)
    impostor = SessionTable(ChannelPrivateKey)
    with pytest.raises(ChannelError, match="is encrypted to key"):
        impostor.open_session(offer.body)
    # A confirmation made for another session (the impostor's own) does not confirm ours.
    other_key = ChannelPrivateKey()
    impostors_own = SessionTable(lambda: other_key).open_session(
        offer_session(other_key.public).body
    )
    with pytest.raises(ChannelError, match="not made by the attested key's holder"):
        offer.confirm(impostors_own)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            runtime.url + SESSIONS_PATH,
            data=offer_session(ChannelPrivateKey().public).body,
            headers={"Content-Type": OPEN_MEDIA_TYPE},
        ) as answer,
    ):
        assert answer.status == 400
        assert "fetch the evidence again" in (await answer.json())["error"]


async def test_the_client_reopens_a_session_the_runtime_no_longer_holds(
    runtime: Runtime, expectations: Expectations
) -> None:
    async with AsyncClient(runtime.url, MODEL, expectations) as client:
        await client.infer({"input": np.zeros((1, 30), np.float32)})
        assert len(runtime.sessions) == 1
        runtime.sessions.clear()  # evicted, expired, or the table restarted
        answer = await client.infer({"input": np.zeros((1, 30), np.float32)})
    assert answer["outputs"]
    assert len(runtime.sessions) == 1
    assert runtime.runs == [1, 1]


async def test_plaintext_is_refused_even_with_a_session_open(
    runtime: Runtime, expectations: Expectations
) -> None:
    async with AsyncClient(runtime.url, MODEL, expectations) as client:
        await client.infer({"input": np.zeros((1, 30), np.float32)})
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            runtime.url + INFER, data=_zeros_request(), headers={"Content-Type": "application/json"}
        ) as answer,
    ):
        assert answer.status == 403
    assert runtime.runs == [1]
