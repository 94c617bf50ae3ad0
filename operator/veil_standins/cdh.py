"""A LOCAL STAND-IN for a Confidential Containers guest's Confidential Data Hub together with the
Trustee KBS behind it. NOT a security boundary: there is no TEE here, the "evidence" is a
SIMULATED one (a measurement this process is told to report), and resources are plain memory.

    python -m veil_standins.cdh --measurement HEX --reference HEX \
        --resource default/key/model=@key.pem [--port 8006]

The CDH side is the guest's REST front end (api-server-rest), loopback only, as the real one:

    GET /cdh/resource/<repo>/<type>/<tag>
      200  the resource bytes (application/octet-stream)
      500  any failure behind it, the reason in the body (the real CDH folds the KBS's 401/404
           and attestation errors into one 500 with the error text)
      403  a caller not on loopback; 404 another API; 405 a method other than GET

The KBS side, as Trustee decides with its default resource policy on an EAR token:
  1. SIMULATED attestation: the reported measurement (what HOST_DATA / MRCONFIGID would hold,
     e.g. the Kata agent policy or init-data digest) is compared with the reference value;
     equal gives the `configuration` trust claim "affirming" (2), else "contraindicated" (96).
     The other trust claims are affirming: nothing else is simulated.
  2. Resource policy: release only when every one of configuration, executables, file_system and
     hardware is at most 32 (affirming or warning); otherwise 401, "policy denied".
  3. An unknown resource is 404 (checked after the policy, so it reveals nothing unattested).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web

log = logging.getLogger("veil_standins.cdh")

AFFIRMING: Final = 2
CONTRAINDICATED: Final = 96
TRUST_THRESHOLD: Final = 32
TRUST_CLAIMS: Final = ("configuration", "executables", "file_system", "hardware")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_HEX = re.compile(r"[0-9a-f]+")


class KbsError(Exception):
    """The KBS refused; `status` is its HTTP status, the message its error text."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _measurement(value: str, what: str) -> str:
    normalized = value.strip().lower()
    if not normalized or not _HEX.fullmatch(normalized):
        raise ValueError(f"{what} must be hex")
    return normalized


@dataclass
class KbsStandIn:
    """Resources by `repo/type/tag`, released to guests whose measurement is `reference`."""

    reference: str
    resources: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reference = _measurement(self.reference, "the reference value")

    def trust_vector(self, measurement: str) -> dict[str, int]:
        """The EAR trust vector the SIMULATED attestation yields for a reported measurement."""
        matches = measurement.strip().lower() == self.reference
        vector = dict.fromkeys(TRUST_CLAIMS, AFFIRMING)
        vector["configuration"] = AFFIRMING if matches else CONTRAINDICATED
        return vector

    def release(self, path: str, measurement: str) -> bytes:
        segments = path.split("/")
        if len(segments) != 3 or not all(_SEGMENT.fullmatch(s) for s in segments):
            raise KbsError(400, f"invalid resource path {path!r}: want <repo>/<type>/<tag>")
        vector = self.trust_vector(measurement)
        if any(vector[claim] > TRUST_THRESHOLD for claim in TRUST_CLAIMS):
            raise KbsError(401, f"resource policy denied {path}: trust vector {vector}")
        try:
            return self.resources[path]
        except KeyError:
            raise KbsError(404, f"resource {path} not found") from None


class CdhStandIn:
    """The guest's CDH REST API over a KBS; `measurement` is what this SIMULATED guest reports."""

    def __init__(self, kbs: KbsStandIn, measurement: str) -> None:
        self._kbs = kbs
        self.measurement = _measurement(measurement, "the measurement")

    async def _resource(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or ""
        try:
            loopback = ipaddress.ip_address(peer.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return web.Response(status=403)
        if request.method != "GET":
            return web.Response(status=405)
        path = request.match_info["path"]
        try:
            data = self._kbs.release(path, self.measurement)
        except KbsError as exc:
            log.warning("get resource %s failed: KBS %d: %s", path, exc.status, exc)
            # As the real CDH: every failure behind the API is a 500 with the error text.
            text = f"get resource failed: kbs://{path}: KBS answered {exc.status}: {exc}"
            return web.Response(status=500, text=text)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/cdh/resource/{path:.+}", self._resource)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app


def _resource_arg(text: str) -> tuple[str, bytes]:
    path, sep, source = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not <repo>/<type>/<tag>=@FILE or =VALUE")
    if source.startswith("@"):
        try:
            return path, Path(source[1:]).read_bytes()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {source[1:]}: {exc}") from exc
    return path, source.encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m veil_standins.cdh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address only")
    parser.add_argument("--port", type=int, default=8006)
    parser.add_argument("--measurement", required=True, help="what the simulated guest reports")
    parser.add_argument("--reference", required=True, help="the KBS's reference value")
    parser.add_argument("--resource", type=_resource_arg, action="append", default=[])
    args = parser.parse_args(argv)
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            raise ValueError(f"{args.host} is not a loopback address: the CDH serves the pod only")
        kbs = KbsStandIn(args.reference, dict(args.resource))
        cdh = CdhStandIn(kbs, args.measurement)
    except ValueError as exc:
        print(f"veil_standins.cdh: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.warning("LOCAL STAND-IN of the CDH and KBS: attestation is SIMULATED, keys are not safe")
    web.run_app(cdh.app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
