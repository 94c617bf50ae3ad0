# syntax=docker/dockerfile:1
# One image, every Veil role; the role is the `veil` subcommand the pod runs:
#   veil run          the operator (the Helm chart's Deployment: run --peering=veil)
#   veil serve        the confidential inference runtime in a ConfidentialModel's pods
#   veil synthesize   the DP synthesizer of a SyntheticDataset's Job
#   veil train        the DP training stage of a ConfidentialModel's Job (DP-SGD families
#                     mlp and cnn: the `trainer` target, which adds torch and Opacus)
#
#   docker build -t veil .
#   docker build --target trainer -t veil-trainer .
#   docker run --rm veil --help
#   bash hack/build-image.sh     the same offline, with buildah and a host-built wheelhouse

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: Veil and every dependency as wheels, installed into a virtualenv -------------------
FROM ${PYTHON_IMAGE} AS builder
# Offline (hack/build-image.sh): WHEELHOUSE names a directory of prebuilt wheels in the context
# and PIP_OFFLINE=1 keeps pip off the index. By default pip fetches from the index as ever.
ARG WHEELHOUSE=wheelhouse
ARG PIP_OFFLINE=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The virtualenv first: its pip is the only one a plain Debian base has.
RUN python -m venv /opt/veil
# pyproject.toml keeps this COPY valid when there is no wheelhouse (a glob matching nothing,
# alone, fails); pip ignores it among the wheels.
COPY pyproject.toml ${WHEELHOUSE}* /wheels/
COPY pyproject.toml ./
# The dependencies first, in a layer of their own: a change to Veil's code (or its README, the
# package's long description) leaves them cached.
# smartnoise-synth goes in without its declared deps (opacus pulls a CUDA torch stack that
# MST and AIM never import); everything it does import is in Veil's own dependencies.
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
      > requirements.txt \
 && /opt/veil/bin/pip wheel --no-cache-dir ${PIP_OFFLINE:+--no-index} --find-links /wheels \
      --wheel-dir /wheels -r requirements.txt \
 && /opt/veil/bin/pip wheel --no-cache-dir ${PIP_OFFLINE:+--no-index} --find-links /wheels \
      --no-deps --wheel-dir /wheels smartnoise-synth==1.0.8 \
 && /opt/veil/bin/pip install --no-cache-dir --no-index --find-links /wheels -r requirements.txt \
 && /opt/veil/bin/pip install --no-cache-dir --no-index --no-deps --find-links /wheels \
      smartnoise-synth==1.0.8
COPY README.md ./
COPY operator/ operator/
# Veil itself beside the virtualenv, not in it: the final stage copies it as a small layer of
# its own. The virtualenv's pip goes with this step, so the big layer above stays as it was.
RUN /opt/veil/bin/pip wheel --no-cache-dir ${PIP_OFFLINE:+--no-index} --find-links /wheels \
      --no-deps --wheel-dir /wheels . \
 && /opt/veil/bin/pip install --no-cache-dir --no-index --no-deps --find-links /wheels \
      --target /opt/veil-app veil

# --- trainer-builder: the builder's virtualenv plus torch and Opacus (the dpsgd extra) ----------
# A few GB (torch from PyPI is the CUDA build), so only the trainer image carries them.
FROM builder AS trainer-builder
ARG PIP_OFFLINE=
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dpsgd"], sep="\n")' \
      > dpsgd.txt \
 && /opt/veil/bin/pip install --no-cache-dir ${PIP_OFFLINE:+--no-index} --find-links /wheels \
      -r dpsgd.txt

# --- runtime: what both images run on: the interpreter, the non-root user, no pip ---------------
FROM ${PYTHON_IMAGE} AS runtime
# UID/GID 65532, as distroless' nonroot: the chart's runAsUser and Pod Security `restricted`.
RUN groupadd --system --gid 65532 veil \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin veil \
 && if python -m pip --version >/dev/null 2>&1; then \
      python -m pip uninstall --yes pip setuptools wheel; fi \
 && rm -rf /root/.cache
ENV PATH=/opt/veil-app/bin:/opt/veil/bin:$PATH \
    PYTHONPATH=/opt/veil-app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp

# --- trainer: `veil train` with the DP-SGD families (mlp, cnn), on CPU or NVIDIA GPUs ----------
#   docker build --target trainer -t veil-trainer .
FROM runtime AS trainer
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="veil-trainer" \
      org.opencontainers.image.description="Veil's DP trainer with torch and Opacus (DP-SGD)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=trainer-builder /opt/veil /opt/veil
COPY --from=builder /opt/veil-app /opt/veil-app
RUN /opt/veil/bin/python -m pip uninstall --yes pip
USER 65532:65532
ENTRYPOINT ["veil"]
CMD ["train", "--help"]

# --- final (the default target): the interpreter, the virtualenv, nothing to build or fetch with
FROM runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="veil" \
      org.opencontainers.image.description="Veil: a Kubernetes operator for confidential AI workloads" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/veil /opt/veil
COPY --from=builder /opt/veil-app /opt/veil-app
# The virtualenv's own pip: nothing installs at run time.
RUN /opt/veil/bin/python -m pip uninstall --yes pip
# `veil node-agent` drives the vTPM with tpm2-tools, through the kernel's resource manager on a
# confidential VM (device TCTI) or a software TPM in tests (swtpm TCTI). A base that has them
# (hack/build-image.sh's, built offline) skips the download.
# The versions are the base release's own (a pin would break the next base).
# hadolint ignore=DL3008
RUN if ! command -v tpm2_quote >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends \
           tpm2-tools libtss2-tcti-device0 libtss2-tcti-swtpm0 \
      && rm -rf /var/lib/apt/lists/*; \
    fi
USER 65532:65532
# 8080 Prometheus metrics, 8081 liveness (veil run); `veil serve` listens where its pod says.
EXPOSE 8080 8081
ENTRYPOINT ["veil"]
CMD ["--help"]
