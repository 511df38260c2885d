#!/usr/bin/env bash
# Local stand-ins for the three registry images that Dockerfile and docker-compose.yml name, built
# from Debian packages and PyPI, for machines that reach an apt mirror and a package index but no
# container registry (offline sites, clusters behind a mirror):
#
#   hpsearch-local/python:3.11-bookworm  bookworm minbase + Debian's python3.11   for python:3.11-slim-bookworm
#   hpsearch-local/uv:<version>          the uv binary at /uv, from PyPI's wheel   for ghcr.io/astral-sh/uv:<version>
#   hpsearch-local/postgres:bookworm     Debian's PostgreSQL 15 behind             for postgres:16-bookworm
#                                        postgres-entrypoint.sh (the official image's contract; its
#                                        SIGINT stop signal is set in docker-compose.yml, as docker
#                                        import cannot)
#
#   deploy/docker/build-base-images.sh               # as root (mmdebstrap, docker); --force rebuilds
#   export PYTHON_IMAGE=hpsearch-local/python:3.11-bookworm UV_IMAGE=hpsearch-local/uv:0.13.9 \
#          POSTGRES_IMAGE=hpsearch-local/postgres:bookworm
#   docker compose build && docker compose up -d     # Dockerfile and docker-compose.yml read these
#
# The root file systems come from this machine's own apt sources (mmdebstrap reads them). The
# Python base trusts what this machine trusts: its /etc/ssl/certs/ca-certificates.crt becomes the
# image's, so a build behind a TLS-inspecting proxy reaches the package index. Needs mmdebstrap,
# a Docker engine and python3 (to fetch the uv wheel). Images that exist are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

# The uv version is the one Dockerfile names, so the stand-in and the registry image agree.
UV_VERSION=$(sed -n 's|^ARG UV_IMAGE=ghcr.io/astral-sh/uv:\([0-9.]*\)$|\1|p' "$here/../../Dockerfile")
if [ -z "$UV_VERSION" ]; then
    echo "build-base-images.sh: Dockerfile has no 'ARG UV_IMAGE=ghcr.io/astral-sh/uv:X.Y.Z' line; restore it" >&2
    exit 2
fi
PYTHON_TAG=hpsearch-local/python:3.11-bookworm
UV_TAG=hpsearch-local/uv:$UV_VERSION
POSTGRES_TAG=hpsearch-local/postgres:bookworm
force=0
[ "${1:-}" = "--force" ] && force=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
needed() { [ "$force" = 1 ] || ! docker image inspect "$1" >/dev/null 2>&1; }

# A bookworm root file system with the given packages (minbase: Essential packages and apt), with
# no docs and no apt lists, as the official images; extra mmdebstrap options (hooks) follow.
# Prints the tarball's path.
rootfs() {
    local packages=$1
    shift
    mmdebstrap --quiet --variant=minbase --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        "$@" bookworm "$work/rootfs.tar" >&2
    echo "$work/rootfs.tar"
}

if needed "$PYTHON_TAG"; then
    # passwd for useradd, as in the official slim image; python and python3 on /usr/local/bin as
    # there (the Dockerfile's uv finds either).
    tar=$(rootfs python3.11,python3-venv,ca-certificates,passwd \
        --customize-hook='upload /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt' \
        --customize-hook='ln -sf /usr/bin/python3.11 "$1"/usr/local/bin/python3' \
        --customize-hook='ln -sf /usr/bin/python3.11 "$1"/usr/local/bin/python')
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tar" "$PYTHON_TAG"
    rm -f "$tar"
fi

if needed "$UV_TAG"; then
    # PyPI's manylinux uv wheel for this machine's architecture, checked against the sha256 the
    # index lists, unpacked (the standard library only: no pip needed).
    python3 - "$work" "$UV_VERSION" "$(uname -m)" <<'PY'
import hashlib, io, json, os, sys, urllib.request, zipfile
work, version, arch = sys.argv[1:]
# The index's JSON API (PEP 691): PyPI's, or a mirror's in PYPI_SIMPLE_URL.
index = os.environ.get("PYPI_SIMPLE_URL", "https://pypi.org/simple").rstrip("/")
request = urllib.request.Request(f"{index}/uv/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(request, timeout=60) as r:
    files = json.load(r)["files"]
wheel = next(f for f in files if f["filename"].startswith(f"uv-{version}-")
             and "manylinux" in f["filename"] and f["filename"].endswith(f"_{arch}.whl"))
with urllib.request.urlopen(wheel["url"], timeout=300) as r:
    data = r.read()
if hashlib.sha256(data).hexdigest() != wheel["hashes"]["sha256"]:
    sys.exit(f"build-base-images.sh: {wheel['filename']} does not match PyPI's sha256")
with zipfile.ZipFile(io.BytesIO(data)) as z:
    name = next(n for n in z.namelist() if n.endswith(".data/scripts/uv"))
    with open(f"{work}/uv", "wb") as out:
        out.write(z.read(name))
os.chmod(f"{work}/uv", 0o755)
PY
    tar -C "$work" -cf - uv | docker import - "$UV_TAG"
fi

if needed "$POSTGRES_TAG"; then
    # postgresql's install creates a cluster "main"; the entrypoint makes its own in the volume.
    tar=$(rootfs postgresql,ca-certificates \
        --customize-hook='chroot "$1" pg_dropcluster 15 main' \
        --customize-hook="upload $here/postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh" \
        --customize-hook='chmod 755 "$1"/usr/local/bin/docker-entrypoint.sh')
    docker import \
        --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change 'VOLUME /var/lib/postgresql/data' --change 'EXPOSE 5432' \
        --change 'ENTRYPOINT ["docker-entrypoint.sh"]' --change 'CMD ["postgres"]' \
        "$tar" "$POSTGRES_TAG"
    rm -f "$tar"
fi

docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^hpsearch-local/'
