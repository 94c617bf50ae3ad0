"""The CDH + KBS stand-in answers as the real pair does: the resource only to a guest whose
(simulated) measurement is the reference value, Trustee's default resource policy for the
decision, the CDH's REST front end for the status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from tests.unit.runtime.doubles import running
from veil_standins.cdh import (
    AFFIRMING,
    CONTRAINDICATED,
    CdhStandIn,
    KbsError,
    KbsStandIn,
    main,
)

REFERENCE = "ab" * 32
SECRET = b"-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _kbs() -> KbsStandIn:
    return KbsStandIn(REFERENCE.upper(), {"veil/key/model": SECRET})


@pytest.fixture
async def cdh_url() -> AsyncIterator[str]:
    async with running(CdhStandIn(_kbs(), REFERENCE).app()) as url:
        yield url


async def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        return response.status, await response.read()


def test_the_trust_vector_follows_the_measurement() -> None:
    kbs = _kbs()
    assert kbs.trust_vector(REFERENCE)["configuration"] == AFFIRMING
    assert kbs.trust_vector("cd" * 32)["configuration"] == CONTRAINDICATED


def test_the_kbs_releases_only_to_the_reference_measurement() -> None:
    kbs = _kbs()
    assert kbs.release("veil/key/model", REFERENCE) == SECRET
    with pytest.raises(KbsError, match="policy denied") as denied:
        kbs.release("veil/key/model", "cd" * 32)
    assert denied.value.status == 401
    # Unknown resources are 404 only to an attested guest: the policy is asked first.
    with pytest.raises(KbsError) as missing:
        kbs.release("veil/key/other", REFERENCE)
    assert missing.value.status == 404
    with pytest.raises(KbsError) as hidden:
        kbs.release("veil/key/other", "cd" * 32)
    assert hidden.value.status == 401
    with pytest.raises(KbsError) as bad:
        kbs.release("veil/model", REFERENCE)
    assert bad.value.status == 400


@pytest.mark.anyio
async def test_the_cdh_serves_the_released_bytes(cdh_url: str) -> None:
    status, body = await _get(f"{cdh_url}/cdh/resource/veil/key/model")
    assert (status, body) == (200, SECRET)


@pytest.mark.anyio
async def test_the_cdh_folds_kbs_failures_into_500(cdh_url: str) -> None:
    status, body = await _get(f"{cdh_url}/cdh/resource/veil/key/missing")
    assert status == 500
    assert b"404" in body


@pytest.mark.anyio
async def test_a_mismatched_guest_is_refused_with_the_policys_reason() -> None:
    async with running(CdhStandIn(_kbs(), "cd" * 32).app()) as url:
        status, body = await _get(f"{url}/cdh/resource/veil/key/model")
    assert status == 500
    assert b"policy denied" in body
    assert SECRET not in body


@pytest.mark.anyio
async def test_other_methods_and_apis_are_refused(cdh_url: str) -> None:
    assert (await _get(f"{cdh_url}/cdh/resource/veil/key/model", "POST"))[0] == 405
    assert (await _get(f"{cdh_url}/aa/token"))[0] == 404


async def _status_for_peer(peer: str) -> int:
    app = CdhStandIn(_kbs(), REFERENCE).app()
    request = make_mocked_request(
        "GET", "/cdh/resource/veil/key/model", app=app, transport=_Transport(peer)
    )
    match = await app.router.resolve(request)
    request._match_info = match  # what aiohttp does before calling the handler
    response = await match.handler(request)
    return response.status


@pytest.mark.anyio
async def test_a_caller_off_loopback_is_forbidden() -> None:
    assert await _status_for_peer("10.1.2.3") == 403
    assert await _status_for_peer("127.0.0.1") == 200


class _Transport:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self._peer, 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


def test_the_cli_refuses_a_non_loopback_address(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--host", "0.0.0.0", "--measurement", REFERENCE, "--reference", REFERENCE])
    assert code == 2
    assert "loopback" in capsys.readouterr().err


def test_the_cli_refuses_a_measurement_that_is_not_hex() -> None:
    assert main(["--measurement", "zz", "--reference", REFERENCE]) == 2
