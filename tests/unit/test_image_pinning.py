"""Images by digest only: the operator refuses to start with an image by tag (a tag can be moved
to other content; on ACI the CCE policy measures digests) unless development allows tags."""

from __future__ import annotations

import pytest

from veil.config import Images, OperatorConfig, pinned
from veil.operator_main import run

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("image", "is_pinned"),
    [
        (f"ghcr.io/veil-dev/veil@{DIGEST}", True),
        (f"ghcr.io/veil-dev/veil:1.0@{DIGEST}", True),
        ("ghcr.io/veil-dev/veil:1.0", False),
        ("ghcr.io/veil-dev/veil@sha256:abc", False),
        (f"ghcr.io/veil-dev/veil@{DIGEST.upper()}", False),
    ],
)
def test_only_a_full_sha256_digest_pins_an_image(image: str, is_pinned: bool) -> None:
    assert pinned(image) is is_pinned


def test_the_default_key_release_sidecar_is_pinned() -> None:
    assert pinned(Images().key_release)
    assert Images().key_release.startswith("mcr.microsoft.com/aci/skr@")


def test_a_tag_is_a_problem_unless_development_allows_it() -> None:
    tagged = OperatorConfig(images=Images(runtime="ghcr.io/veil-dev/veil:1.0"))
    problem = tagged.image_problem()
    assert problem is not None
    assert "ghcr.io/veil-dev/veil:1.0" in problem
    assert "image.digest" in problem
    allowed = OperatorConfig(images=tagged.images, allow_image_tags=True)
    assert allowed.image_problem() is None
    assert OperatorConfig(images=Images(runtime=f"r@{DIGEST}")).image_problem() is None


def test_the_operator_refuses_to_start_with_a_tag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VEIL_RUNTIME_IMAGE", "ghcr.io/veil-dev/veil:latest")
    monkeypatch.delenv("VEIL_ALLOW_IMAGE_TAGS", raising=False)
    code = run(
        namespaces=[],
        all_namespaces=True,
        metrics_port=0,
        health_port=0,
        peering=None,
        standalone=True,
    )
    assert code == 2
    # The operator's own log handler (veil.logs) writes to stderr.
    assert "pinned by digest" in capsys.readouterr().err
