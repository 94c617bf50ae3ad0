"""LOCAL STAND-IN for Azure's paravisor provisioning a confidential VM's vTPM: a software TPM
(swtpm) provisioned as Azure's is, for the node agent's tests and the local cluster's real node.
NOT a security boundary: every key behind it is a throwaway key in this process's memory, and
anyone who can reach its port can drive it.

`SoftwareCvm.start(directory)` runs swtpm on two consecutive ports (the swtpm TCTI reaches the
control channel at port + 1), listening on `host` only (127.0.0.1 unless told otherwise: the
local cluster's node address, so that pods reach it), and provisions it as Azure's paravisor
does:

    0x81000003   the AK: a restricted RSA-2048 signing key (RSASSA-SHA256), endorsement hierarchy
    0x01C101D0   the AK certificate, issued by `ak_ca` (a test "vTPM CA"), zero-padded
    0x01400001   a synthetic HCL report: "HCLA" header, an SEV-SNP report whose REPORT_DATA is
                 SHA-256 of the runtime data, signed by `hardware_key` (standing for AMD's VCEK),
                 then the runtime data JSON naming the AK as `HCLAkPub`

`trust()` is what MAA's stand-in must believe to verify this VM's evidence; `trust().to_files(d)`
hands it to another process (`python -m veil_standins --guest-trust d`). `stop()` ends swtpm.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from veil_standins.jose import rsa_public_jwk
from veil_standins.maa_guest import (
    HCL_DATA_OFFSET,
    HCL_REPORT_TYPE_SNP,
    SNP_POLICY_OFFSET,
    SNP_REPORT_DATA_OFFSET,
    SNP_REPORT_SIZE,
    SNP_SIGNATURE_COMPONENT,
    SNP_SIGNATURE_OFFSET,
    GuestTrust,
)

AK_HANDLE = "0x81000003"
HCL_INDEX = "0x01400001"
AK_CERT_INDEX = "0x01C101D0"
AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
NV_ATTRIBUTES = "ownerread|ownerwrite|authread"
SNP_POLICY = 0x30000  # SMT allowed, reserved bit 17; debug (bit 19) off


def _free_port_pair(host: str) -> int:
    for _ in range(100):
        port = random.randint(20000, 60000)
        sockets = []
        try:
            for candidate in (port, port + 1):
                s = socket.socket()
                sockets.append(s)
                s.bind((host, candidate))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no two free consecutive ports")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class AkCa:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, common_name: str) -> AkCa:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    def issue(self, subject: rsa.RSAPublicKey, common_name: str = "veil test AK") -> bytes:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(subject)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )


def snp_report(report_data: bytes, hardware_key: ec.EllipticCurvePrivateKey, policy: int) -> bytes:
    """A synthetic SEV-SNP ATTESTATION_REPORT signed as AMD's firmware signs one."""
    report = bytearray(SNP_REPORT_SIZE)
    struct.pack_into("<I", report, 0, 2)  # version
    struct.pack_into("<Q", report, SNP_POLICY_OFFSET, policy)
    report[SNP_REPORT_DATA_OFFSET : SNP_REPORT_DATA_OFFSET + 64] = report_data.ljust(64, b"\0")
    signature = hardware_key.sign(bytes(report[:SNP_SIGNATURE_OFFSET]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(signature)
    size = SNP_SIGNATURE_COMPONENT
    report[SNP_SIGNATURE_OFFSET : SNP_SIGNATURE_OFFSET + size] = r.to_bytes(size, "little")
    report[SNP_SIGNATURE_OFFSET + size : SNP_SIGNATURE_OFFSET + 2 * size] = s.to_bytes(
        size, "little"
    )
    return bytes(report)


def runtime_data(ak: rsa.RSAPublicKey) -> bytes:
    """The HCL runtime data: the AK (as Azure's HCL names it) and the VM configuration."""
    document = {
        "keys": [{"kid": "HCLAkPub", "key_ops": ["sign"], **rsa_public_jwk(ak)}],
        "vm-configuration": {
            "console-enabled": False,
            "secure-boot": True,
            "tpm-enabled": True,
            "vmUniqueId": "00000000-0000-0000-0000-00000000c0de",
        },
        "user-data": "0" * 128,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def hcl_report(
    ak: rsa.RSAPublicKey, hardware_key: ec.EllipticCurvePrivateKey, policy: int = SNP_POLICY
) -> bytes:
    data = runtime_data(ak)
    header = b"HCLA" + struct.pack("<III", 2, HCL_DATA_OFFSET + 20 + len(data), 1) + bytes(16)
    hardware = snp_report(hashlib.sha256(data).digest(), hardware_key, policy)
    request = struct.pack("<IIIII", 20 + len(data), 1, HCL_REPORT_TYPE_SNP, 1, len(data))
    return header + hardware + request + data


@dataclass
class SoftwareCvm:
    """A provisioned swtpm, the keys behind it, and what MAA's stand-in should trust."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    state: Path
    ak_ca: AkCa
    hardware_key: ec.EllipticCurvePrivateKey
    ak_public: rsa.RSAPublicKey

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    def trust(self) -> GuestTrust:
        """What MAA's stand-in believes for this node (a fresh nonce memory each time)."""
        return GuestTrust(self.ak_ca.certificate, self.hardware_key.public_key())

    def tool(self, *args: str) -> str:
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def _nv_write(self, index: str, data: bytes) -> None:
        self.tool("tpm2_nvdefine", index, "-C", "o", "-s", str(len(data)), "-a", NV_ATTRIBUTES)
        source = self.state / f"nv-{index}.bin"
        source.write_bytes(data)
        self.tool("tpm2_nvwrite", index, "-C", "o", "-i", str(source))
        source.unlink()

    @classmethod
    def start(
        cls,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log: Path | None = None,
        detach: bool = False,
    ) -> SoftwareCvm:
        """swtpm on `host` only, at `port` and `port + 1` (a free pair when None), its state in
        `directory`/state (which must not exist yet), provisioned. `log` takes swtpm's output;
        `detach` puts it in a session of its own, to outlive this process (stop it by its pid)."""
        state = directory / "state"
        state.mkdir(parents=True)
        port = _free_port_pair(host) if port is None else port
        with contextlib.ExitStack() as files:
            # The child holds its own copy of the log's descriptor; ours closes right after.
            output = subprocess.DEVNULL if log is None else files.enter_context(log.open("ab"))
            process = subprocess.Popen(
                [
                    "swtpm", "socket", "--tpm2",
                    "--server", f"type=tcp,port={port},bindaddr={host}",
                    "--ctrl", f"type=tcp,port={port + 1},bindaddr={host}",
                    "--tpmstate", f"dir={state}",
                    "--flags", "not-need-init,startup-clear",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=detach,
            )  # fmt: skip
        cvm = cls(
            process,
            host,
            port,
            state,
            AkCa.create("veil test Global Virtual TPM CA"),
            ec.generate_private_key(ec.SECP384R1()),
            rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
        )
        try:
            cvm._wait()
            cvm._provision()
        except BaseException:
            cvm.stop()
            raise
        return cvm

    def _wait(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"swtpm exited with {self.process.returncode}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("swtpm did not start listening within 10 s")

    def _provision(self) -> None:
        context, pem = self.state / "ak.ctx", self.state / "ak.pem"
        self.tool(
            "tpm2_createprimary", "-C", "e", "-g", "sha256", "-G", "rsa2048:rsassa-sha256:null",
            "-a", AK_ATTRIBUTES, "-c", str(context), "-Q",
        )  # fmt: skip
        self.tool("tpm2_evictcontrol", "-C", "o", "-c", str(context), AK_HANDLE)
        self.tool("tpm2_flushcontext", "-t")
        self.tool("tpm2_readpublic", "-c", AK_HANDLE, "-f", "pem", "-o", str(pem), "-Q")
        ak = serialization.load_pem_public_key(pem.read_bytes())
        assert isinstance(ak, rsa.RSAPublicKey)
        self.ak_public = ak
        # Azure pads the certificate's index with zeros; the agent must cut at the DER length.
        self._nv_write(AK_CERT_INDEX, self.ak_ca.issue(ak) + bytes(24))
        self._nv_write(HCL_INDEX, hcl_report(ak, self.hardware_key))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
