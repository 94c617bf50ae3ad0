"""The node's TPM, driven through tpm2-tools (no Python TPM binding needed).

Azure confidential VMs expose a vTPM provisioned by the paravisor (HCL):

    NV 0x01400001   the HCL report: "HCLA" header, SEV-SNP / TDX report, runtime data
    NV 0x01C101D0   the attestation key (AK) certificate, DER, zero-padded
    0x81000003      the AK itself, a restricted RSA signing key (RSASSA-SHA256)

Every command runs with the TCTI from configuration (`device:/dev/tpmrm0` in production). No
resource manager may stand between us and the TPM (swtpm in tests), so transient objects are
flushed after each command, and all commands are serialized by one lock.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HCL_REPORT_INDEX = 0x01400001
AK_CERT_INDEX = 0x01C101D0
AK_HANDLE = 0x81000003
DEFAULT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
COMMAND_TIMEOUT_SECONDS = 30.0
# A decryption key that never leaves this TPM, and that only the TPM can use.
EPHEMERAL_KEY_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt|noda"
_SIZE = re.compile(r"^\s*size:\s*(\d+)\s*$", re.MULTILINE)


class TpmError(Exception):
    """A TPM command failed; the message names the command and the TPM's answer."""


@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote by the AK: the TPMS_ATTEST message, its raw RSASSA signature, and the
    selected PCR values (concatenated, in index order)."""

    message: bytes
    signature: bytes
    pcr_values: bytes
    pcrs: tuple[int, ...]


@dataclass(frozen=True)
class EphemeralKey:
    """A fresh TPM decryption key (null hierarchy: gone at the next TPM reset), certified by
    the AK. `context` is the saved context the TPM reloads it from."""

    context: Path
    public_area: bytes  # TPM2B_PUBLIC
    public_key: rsa.RSAPublicKey
    certify_info: bytes  # TPMS_ATTEST of TPM2_Certify
    certify_signature: bytes


@dataclass
class Tpm:
    """tpm2-tools against `tcti`; scratch files live in a private directory."""

    tcti: str
    timeout: float = COMMAND_TIMEOUT_SECONDS
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _workdir: tempfile.TemporaryDirectory[str] = field(
        default_factory=lambda: tempfile.TemporaryDirectory(prefix="veil-tpm-"), repr=False
    )

    @property
    def workdir(self) -> Path:
        return Path(self._workdir.name)

    def close(self) -> None:
        self._workdir.cleanup()

    def discard(self, key: EphemeralKey) -> None:
        """Forget an ephemeral key's saved context (the TPM holds nothing else of it)."""
        key.context.unlink(missing_ok=True)
        key.context.parent.rmdir()

    def _run(self, *args: str) -> str:
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        try:
            done = subprocess.run(
                args, env=env, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TpmError(f"{args[0]} could not run: {exc}") from exc
        if done.returncode != 0:
            reason = done.stderr.strip().splitlines()[-1:] or ["no error output"]
            raise TpmError(f"{args[0]} failed (exit {done.returncode}): {reason[0]}")
        return done.stdout

    def _flush(self) -> None:
        self._run("tpm2_flushcontext", "-t")

    def _scratch(self) -> tempfile.TemporaryDirectory[str]:
        """A directory for one command's files, removed after it."""
        return tempfile.TemporaryDirectory(dir=self.workdir)

    # -- reading what the paravisor provisioned --------------------------------------------

    def _nv_size(self, index: int) -> int:
        text = self._run("tpm2_nvreadpublic", f"0x{index:08x}")
        match = _SIZE.search(text)
        if match is None:
            raise TpmError(f"NV index 0x{index:08x} has no size in tpm2_nvreadpublic's answer")
        return int(match.group(1))

    def nv_read(self, index: int) -> bytes:
        """The whole content of an NV index (its size read from the TPM, never assumed)."""
        with self._lock, self._scratch() as scratch:
            size = self._nv_size(index)
            out = Path(scratch) / "nv.bin"
            self._run("tpm2_nvread", f"0x{index:08x}", "-s", str(size), "-o", str(out))
            return out.read_bytes()

    def read_public(self, handle: int | Path) -> tuple[bytes, rsa.RSAPublicKey]:
        """The TPM2B_PUBLIC of a key (persistent handle or saved context), and its RSA key."""
        with self._lock:
            return self._read_public(handle)

    def _read_public(self, handle: int | Path) -> tuple[bytes, rsa.RSAPublicKey]:
        target = f"0x{handle:08x}" if isinstance(handle, int) else str(handle)
        with self._scratch() as scratch:
            tss, pem = Path(scratch) / "key.pub", Path(scratch) / "key.pem"
            try:
                self._run("tpm2_readpublic", "-c", target, "-f", "tss", "-o", str(tss), "-Q")
                self._run("tpm2_readpublic", "-c", target, "-f", "pem", "-o", str(pem), "-Q")
            finally:
                self._flush()
            key = serialization.load_pem_public_key(pem.read_bytes())
            if not isinstance(key, rsa.RSAPublicKey):
                raise TpmError(f"the TPM key {target} is not an RSA key")
            return tss.read_bytes(), key

    # -- evidence --------------------------------------------------------------------------

    def quote(self, nonce: bytes, pcrs: Sequence[int] = DEFAULT_PCRS) -> Quote:
        """Quote the SHA-256 PCRs `pcrs` with the AK, over `nonce` (the qualifying data)."""
        selection = "sha256:" + ",".join(str(p) for p in sorted(pcrs))
        with self._lock, self._scratch() as scratch:
            message, signature, values = (Path(scratch) / n for n in ("msg", "sig", "pcrs"))
            try:
                self._run(
                    "tpm2_quote", "-c", f"0x{AK_HANDLE:08x}", "-l", selection, "-q", nonce.hex(),
                    "-g", "sha256", "-m", str(message), "-s", str(signature), "-f", "plain",
                    "-o", str(values), "-F", "values", "-Q",
                )  # fmt: skip
            finally:
                self._flush()
            return Quote(
                message.read_bytes(),
                signature.read_bytes(),
                values.read_bytes(),
                tuple(sorted(pcrs)),
            )

    def create_ephemeral_key(self) -> EphemeralKey:
        """A new RSA-2048 decryption key in the null hierarchy, and the AK's TPM2_Certify of it
        (which proves to a verifier that the key lives in this TPM)."""
        # The saved context outlives this call: the key decrypts until the token expires.
        context = Path(tempfile.mkdtemp(dir=self.workdir)) / "ephemeral.ctx"
        with self._lock, self._scratch() as scratch:
            attest, signature = Path(scratch) / "attest", Path(scratch) / "sig"
            try:
                self._run(
                    "tpm2_createprimary", "-C", "n", "-g", "sha256", "-G", "rsa2048:null:null",
                    "-a", EPHEMERAL_KEY_ATTRIBUTES, "-c", str(context), "-Q",
                )  # fmt: skip
                self._flush()
                self._run(
                    "tpm2_certify", "-c", str(context), "-C", f"0x{AK_HANDLE:08x}",
                    "-g", "sha256", "-o", str(attest), "-s", str(signature), "-f", "plain", "-Q",
                )  # fmt: skip
            finally:
                self._flush()
            public_area, public_key = self._read_public(context)
            return EphemeralKey(
                context, public_area, public_key, attest.read_bytes(), signature.read_bytes()
            )

    def decrypt(self, key: EphemeralKey, ciphertext: bytes, scheme: str) -> bytes:
        """RSA-decrypt with the ephemeral key inside the TPM: scheme "rsaes" (PKCS#1 v1.5) or
        "oaep-sha256" / "oaep-sha1"."""
        if scheme not in ("rsaes", "oaep-sha256", "oaep-sha1"):
            raise ValueError(f"unsupported TPM decryption scheme {scheme!r}")
        with self._lock, self._scratch() as scratch:
            source, out = Path(scratch) / "in", Path(scratch) / "out"
            source.write_bytes(ciphertext)
            try:
                self._run(
                    "tpm2_rsadecrypt", "-c", str(key.context), "-s", scheme,
                    "-o", str(out), str(source),
                )  # fmt: skip
            finally:
                self._flush()
            return out.read_bytes()
