#!/usr/bin/env bash
# Builds Veil's image from the Dockerfile and the pod sandbox (pause) image with buildah, with no
# registry: the base is a Debian bookworm root made by mmdebstrap from this machine's own apt
# sources, and pip installs from a wheelhouse built here on the host. Each image is written as an
# uncompressed OCI archive under $VEIL_CACHE/images/, named by a hash of everything that goes
# into it, so an unchanged tree reuses the archive and a second run takes seconds.
# Prints one line per image last: `<name> <reference> <archive>`; logs go to stderr.
#
#   bash hack/build-image.sh
#   veil docker.io/local/veil:0123456789abcdef /root/.cache/veil/images/veil-0123456789abcdef.oci.tar
#   pause docker.io/local/pause:… …
#   skr docker.io/local/skr:… …      the SKR sidecar stand-in (local clusters only)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${VEIL_CACHE:-$HOME/.cache/veil}"
IMAGES="$CACHE/images"
NODE_BIN="$CACHE/node/k8s-${KUBE_VERSION:-v1.35.4}-coredns-${COREDNS_VERSION:-v1.15.0}-kube-router-${KUBE_ROUTER_VERSION:-v2.1.0}/bin"
PAUSE_BINARY="${VEIL_PAUSE_BINARY:-$NODE_BIN/pause}"
# The base's packages: the Dockerfile's final stage needs python, venv and groupadd/useradd.
# tpm2-tools and its TCTIs: the node agent (the Dockerfile installs them where a base lacks them).
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates,passwd,tpm2-tools,libtss2-tcti-device0,libtss2-tcti-swtpm0"
# Beside Veil's own dependencies: smartnoise-synth goes in --no-deps (see the Dockerfile), and
# the build backend lets the image build Veil's wheel with --no-index.
BUILD_BACKEND=("setuptools>=77" "wheel")
SMARTNOISE="smartnoise-synth==1.0.8"

log() { echo "[build-image] ${SECONDS}s $*" >&2; }
die() { log "$*"; exit 1; }
hash16() { sha256sum | cut -c1-16; }

for tool in buildah mmdebstrap git; do
  command -v "$tool" >/dev/null || die "$tool is required (apt-get install $tool)"
done
[ -x .venv/bin/python ] || die "no .venv: run hack/setup.sh first"
[ -x "$PAUSE_BINARY" ] || die "no pause binary at $PAUSE_BINARY: run hack/build-node.sh first"
mkdir -p "$IMAGES"
# One build at a time: two would race on the same archives and buildah storage.
exec 9>"$IMAGES/.lock"
flock 9

# buildah's storage stays in the cache, not /var/lib/containers; overlay where the kernel has it.
driver="${VEIL_BUILDAH_DRIVER:-$(grep -qw overlay /proc/filesystems && echo overlay || echo vfs)}"
STORE="$IMAGES/buildah-$driver"
mkdir -p "$STORE"
printf '[storage]\ndriver = "%s"\ngraphroot = "%s/root"\nrunroot = "%s/run"\n' \
  "$driver" "$STORE" "$STORE" >"$STORE/storage.conf"
export CONTAINERS_STORAGE_CONF="$STORE/storage.conf"
export TMPDIR="$IMAGES/tmp"   # buildah and mmdebstrap stage large files here, not in /var/tmp
rm -rf "$TMPDIR" && mkdir -p "$TMPDIR"
trap 'rm -rf "$TMPDIR"' EXIT

# publish NAME TAG: localhost/NAME:TAG as an uncompressed OCI archive, NAME-TAG.oci.tar, whose
# reference is fully qualified (containerd's CRI looks images up by docker.io/... names).
# buildah 1.28 gzips oci-archive: layers whatever the flags, but honours --disable-compression
# for dir:, so the archive is laid out by hand from that. Written aside, then renamed.
publish() {
  local ref="localhost/$1:$2" archive="$IMAGES/$1-$2.oci.tar" dir="$TMPDIR/$1.dir"
  local layout="$TMPDIR/$1.layout" digest size
  rm -rf "$dir" "$layout" && mkdir -p "$layout/blobs/sha256"
  buildah push --quiet --disable-compression --format oci "$ref" "dir:$dir" >&2
  find "$dir" -type f -name '[0-9a-f]*' -exec ln -t "$layout/blobs/sha256" {} +
  digest=$(sha256sum <"$dir/manifest.json" | cut -d' ' -f1)
  size=$(stat -c %s "$dir/manifest.json")
  ln "$dir/manifest.json" "$layout/blobs/sha256/$digest"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  # Two names for one manifest: the tag, and the digest reference pods are given (Veil refuses
  # images by tag), which the CRI then finds without a registry.
  local entry='{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}'
  printf "{\"schemaVersion\":2,\"manifests\":[$entry,$entry]}" \
    "$digest" "$size" "docker.io/local/$1:$2" "$digest" "$size" "docker.io/local/$1@sha256:$digest" \
    >"$layout/index.json"
  tar -C "$layout" -cf "$archive.part" oci-layout index.json blobs
  mv "$archive.part" "$archive"
  echo "sha256:$digest" >"$archive.digest"  # last: its presence means the archive is complete
  rm -rf "$dir" "$layout"
  # Older builds of the same image are superseded: each of Veil's is over a gigabyte.
  find "$IMAGES" -maxdepth 1 -name "$1-*.oci.tar" ! -name "$1-$2.oci.tar" -delete
  buildah images --format '{{.Name}}:{{.Tag}}' | grep "^localhost/$1:" | grep -v ":$2\$" |
    xargs -r buildah rmi >/dev/null || true
}

# --- base: Debian bookworm from this machine's apt sources -----------------------------------------
# The host's sources files are pasted into the build as they are (mmdebstrap takes a file as a
# mirror), so the mirror is whatever this machine's apt uses; no host name lives in the repo.
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && grep -qv '^[[:space:]]*\(#\|$\)' "$f" && sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || die "no apt sources on this machine (/etc/apt/sources.list*)"
# Only the host's apt settings that decide whether its mirrors answer (proxy, snapshot dates).
aptopts=()
while IFS= read -r line; do aptopts+=(--aptopt="$line"); done < <(apt-config dump |
  grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy|ftp::Proxy) ' || true)
# shellcheck disable=SC2016  # the hook's $1 is the chroot, expanded by mmdebstrap's shell
mm_args=(--variant=minbase --include="$BASE_PACKAGES"
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
  --customize-hook='rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"')
base_key=$( { printf '%s\n' "${mm_args[@]}"; cat "${sources[@]}"; } | hash16)
base_ref="localhost/base:$base_key"
base_archive="$IMAGES/base-$base_key.oci.tar"
if ! buildah inspect --type image "$base_ref" >/dev/null 2>&1; then
  if [ -f "$base_archive" ]; then
    log "base: loading $base_archive"
    buildah tag "$(buildah pull --quiet "oci-archive:$base_archive")" "$base_ref"
  else
    log "base: mmdebstrap bookworm ($BASE_PACKAGES)"
    mmdebstrap --quiet "${mm_args[@]}" "${aptopts[@]}" --format=tar bookworm \
      "$TMPDIR/rootfs.tar" "${sources[@]}" >&2
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$TMPDIR/rootfs.tar" / >&2
    rm "$TMPDIR/rootfs.tar"
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env LANG=C.UTF-8 --cmd python3 "$ctr"
    buildah commit --quiet --rm "$ctr" "$base_ref" >&2
    publish base "$base_key"
  fi
fi
base_id=$(buildah images --quiet --no-trunc "$base_ref")

# --- wheelhouse: every runtime dependency as wheels, built here where the index is reachable -----
# Veil's own wheel is not in it: the Dockerfile builds that from the source, so the wheelhouse
# only changes with pyproject.toml.
wheel_key=$( { cat pyproject.toml; printf '%s\n' "${BUILD_BACKEND[@]}" "$SMARTNOISE"; } | hash16)
wheelhouse="$IMAGES/wheelhouse-$wheel_key"
if [ ! -d "$wheelhouse" ]; then
  log "wheelhouse: pip wheel of pyproject.toml's dependencies into $wheelhouse"
  rm -rf "$wheelhouse.partial"
  .venv/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
    >"$TMPDIR/requirements.txt"
  pip=(.venv/bin/python -m pip wheel --quiet --progress-bar off --wheel-dir "$wheelhouse.partial")
  "${pip[@]}" -r "$TMPDIR/requirements.txt" "${BUILD_BACKEND[@]}" >&2
  "${pip[@]}" --no-deps "$SMARTNOISE" >&2
  mv "$wheelhouse.partial" "$wheelhouse"
  find "$IMAGES" -maxdepth 1 -name 'wheelhouse-*' ! -name "wheelhouse-$wheel_key" -exec rm -rf {} +
fi

# --- veil: the Dockerfile, offline ------------------------------------------------------------------
# The tag hashes every file that goes in (tracked or untracked-but-not-ignored), the base and the
# wheelhouse: an unchanged tree finds its archive and skips the build.
git ls-files -z -co --exclude-standard -- Dockerfile .dockerignore pyproject.toml README.md operator |
  while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done >"$TMPDIR/files"
veil_tag=$( { xargs -0 sha256sum <"$TMPDIR/files"; echo "$base_id $wheel_key"; } | hash16)
veil_archive="$IMAGES/veil-$veil_tag.oci.tar"
if [ ! -f "$veil_archive.digest" ]; then
  log "veil: building localhost/veil:$veil_tag"
  # The context is exactly the hashed files plus the wheelhouse (hard links), so nothing else
  # leaks in and nothing is written into the repository.
  context="$TMPDIR/context"
  mkdir -p "$context"
  tar -c --null -T "$TMPDIR/files" -f - | tar -x -C "$context" -f -
  cp -al "$wheelhouse" "$context/wheelhouse"
  buildah bud --layers --force-rm --pull=never --network=none \
    --build-arg PYTHON_IMAGE="$base_ref" --build-arg WHEELHOUSE=wheelhouse \
    --build-arg PIP_OFFLINE=1 --tag "localhost/veil:$veil_tag" "$context" >&2
  # Smoke check before it is archived: the entrypoint answers, the heavy imports load.
  ctr=$(buildah from --pull=never "localhost/veil:$veil_tag")
  trap 'buildah rm "$ctr" >/dev/null 2>&1; rm -rf "$TMPDIR"' EXIT
  buildah run --network=none "$ctr" -- veil --help >/dev/null
  buildah run --network=none "$ctr" -- python -c 'import veil.cli, onnxruntime, snsynth, mbi'
  buildah rm "$ctr" >/dev/null
  trap 'rm -rf "$TMPDIR"' EXIT
  publish veil "$veil_tag"
  log "veil: $(buildah images --format '{{.Size}}' "localhost/veil:$veil_tag")," \
    "archive $(du -h "$veil_archive" | cut -f1)"
  # The builder stage keeps a tag (all cached, seconds), so its dependency layer survives the
  # prune below: the next build after a change to Veil's code reinstalls nothing. Everything
  # else no tagged image uses (older builds' layers) goes, so the cache does not grow.
  buildah bud --layers --pull=never --network=none --target builder \
    --build-arg PYTHON_IMAGE="$base_ref" --build-arg WHEELHOUSE=wheelhouse \
    --build-arg PIP_OFFLINE=1 --tag "localhost/veil-builder:$veil_tag" "$context" >/dev/null
  buildah images --format '{{.Name}}:{{.Tag}}' | grep "^localhost/veil-builder:" |
    grep -v ":$veil_tag\$" | xargs -r buildah rmi >/dev/null || true
  buildah rmi --prune >/dev/null
fi

# --- skr: the Secure Key Release sidecar's contract stand-in, for local clusters only ----------------
# The real sidecar image (mcr.microsoft.com/aci/skr) is not reachable here. The same image runs
# `python -m veil_standins.skr` instead: a new config over the same layers.
skr_tag=$(echo "skr $veil_tag entrypoint=python -m veil_standins.skr cmd=[]" | hash16)
skr_archive="$IMAGES/skr-$skr_tag.oci.tar"
if [ ! -f "$skr_archive.digest" ]; then
  log "skr: localhost/skr:$skr_tag from localhost/veil:$veil_tag"
  ctr=$(buildah from --pull=never "localhost/veil:$veil_tag")
  buildah config --entrypoint '["python", "-m", "veil_standins.skr"]' --cmd '[]' \
    --label org.opencontainers.image.title=veil-skr-standin "$ctr"
  buildah commit --quiet --rm "$ctr" "localhost/skr:$skr_tag" >&2
  publish skr "$skr_tag"
fi

# --- pause: the pod sandbox, one static binary ----------------------------------------------------
pause_tag=$(hash16 <"$PAUSE_BINARY")
pause_archive="$IMAGES/pause-$pause_tag.oci.tar"
if [ ! -f "$pause_archive.digest" ]; then
  log "pause: building from $PAUSE_BINARY"
  ctr=$(buildah from scratch)
  buildah copy --quiet --chmod 0755 "$ctr" "$PAUSE_BINARY" /pause >&2
  # As upstream's pause image: nobody's UID, /pause the entrypoint.
  buildah config --user 65535:65535 --entrypoint '["/pause"]' "$ctr"
  buildah commit --quiet --rm "$ctr" "localhost/pause:$pause_tag" >&2
  publish pause "$pause_tag"
fi

# name, the digest reference, the archive (ctr imports it under both names)
for image in "veil $veil_archive" "pause $pause_archive" "skr $skr_archive"; do
  set -- $image
  echo "$1 docker.io/local/$1@$(cat "$2.digest") $2"
done
