#!/usr/bin/env bash
# Builds deploy/Dockerfile's image on a Debian bookworm host that has no Docker daemon and cannot
# reach Docker Hub or download.pytorch.org, only Debian's mirror and PyPI (a CI runner, a sandbox):
#   1. the base: a bookworm rootfs with Debian's Python 3.11 and pip (mmdebstrap), in place of
#      python:3.11-slim-bookworm;
#   2. cpu only: a small PEP 503 index holding torch's CPU wheel and its dependencies, made with the
#      host's pip (its find-links must reach a folder holding that wheel; PyPI has none);
#   3. the image: `buildah bud` with chroot isolation (no daemon, no cgroups needed).
# Run from the repository root as root:  deploy/build_image_offline.sh [cpu|cuda] [TAG]
# Needs: apt-get install buildah mmdebstrap.
set -euo pipefail

VARIANT=${1:-cpu}
TAG=${2:-localhost/raylane:0.1.0-$VARIANT}
BASE=localhost/debian-python:3.11-bookworm
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/Dockerfile)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    # As in the official image: pip installs into its Python (no EXTERNALLY-MANAGED marker), and
    # apt keeps neither the packages it downloads nor its binary caches.
    mmdebstrap --variant=minbase --format=tar \
        --include=python3,python3-pip,python-is-python3,ca-certificates \
        --customize-hook='rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED' \
        --customize-hook='printf "%s\n" "APT::Keep-Downloaded-Packages \"false\";" \
            "Dir::Cache::pkgcache \"\";" "Dir::Cache::srcpkgcache \"\";" \
            > "$1"/etc/apt/apt.conf.d/docker-clean' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        bookworm "$work/base.tar" http://deb.debian.org/debian
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$work/base.tar" /
    buildah config --env LANG=C.UTF-8 --cmd python3 "$ctr"
    buildah commit --rm "$ctr" "$BASE"
    rm "$work/base.tar"
fi

torch_source=()
if [ "$VARIANT" = cpu ]; then
    # A PEP 503 index, as download.pytorch.org/whl/cpu is: one folder per project, linking its files.
    index="$work/torch-index"
    mkdir -p "$index/files"
    python3 -m pip download --quiet --only-binary=:all: --dest "$index/files" "torch==${TORCH_VERSION}"
    if ! ls "$index"/files/torch-*+cpu-*.whl >/dev/null 2>&1; then
        echo "pip found no CPU-only torch ${TORCH_VERSION} wheel: set PIP_FIND_LINKS to a folder holding it" >&2
        exit 1
    fi
    python3 - "$index" <<'EOF'
import pathlib, re, sys, urllib.parse
root = pathlib.Path(sys.argv[1])
for wheel in sorted((root / "files").iterdir()):
    project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    (root / project).mkdir(exist_ok=True)
    with open(root / project / "index.html", "a") as page:
        page.write(f'<a href="../files/{urllib.parse.quote(wheel.name)}">{wheel.name}</a>\n')
EOF
    torch_source=(--volume "$index:/torch-index:ro" --build-arg TORCH_CPU_INDEX_URL=file:///torch-index)
fi

# The host's CA bundle, for the build only: it trusts what the host trusts (e.g. an egress proxy).
time buildah bud --isolation chroot --network host --layers \
    --ignorefile deploy/Dockerfile.dockerignore -f deploy/Dockerfile \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg BASE_IMAGE="$BASE" --build-arg VARIANT="$VARIANT" "${torch_source[@]}" \
    -t "$TAG" .
buildah images "$TAG"
