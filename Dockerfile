# The hpsearch image: the locked environment (PyPI's torch wheels bring their own CUDA libraries,
# so a plain Python base runs on GPUs given the NVIDIA container toolkit) and the code.
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t hpsearch .
#   docker run --gpus all -e HPSEARCH_STORAGE=postgresql+psycopg2://... hpsearch worker --study cnn
#
# Needs BuildKit (the cache mount below): Docker 23+ with buildx, or DOCKER_BUILDKIT=1 on Docker
# 20.10. The base images are build arguments whose defaults are the registry images; where no
# registry can be reached, deploy/docker/build-base-images.sh builds stand-ins from Debian packages
# (README, "Docker Compose").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
FROM ${UV_IMAGE} AS uv
FROM ${PYTHON_IMAGE}

COPY --from=uv /uv /usr/local/bin/uv

# Bytecode at build time: workers start in seconds, not after compiling torch. The base image's
# Python and CA store: uv downloads no interpreter and trusts what the base image trusts.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_NATIVE_TLS=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

WORKDIR /app
# Dependencies first, in their own layer: rebuilt only when the lock file changes. uv's cache
# (torch's CUDA wheels are ~3 GB) stays on the build machine between builds, not in the image.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-default-groups --no-install-project
# README.md: the package's metadata (pyproject's readme), needed only to build the project itself.
COPY README.md ./
COPY src ./src
COPY studies ./studies
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-default-groups

# No .git in the image: trials record this commit as their code version.
ARG GIT_COMMIT=""
ENV HPSEARCH_GIT_COMMIT=${GIT_COMMIT}

# The artifact folder exists, owned by the user, so a named volume mounted there inherits that.
RUN useradd --create-home --uid 1000 hpsearch \
    && mkdir -p /artifacts /data \
    && chown hpsearch:hpsearch /artifacts /data
# The cnn study's data (the MNIST copy shipped in the repository), where HPSEARCH_DATA_DIR points:
# the default study runs with no download and no mount.
COPY --chown=hpsearch:hpsearch datasets/mnist-t10k/ /data/
USER hpsearch
WORKDIR /home/hpsearch
ENV HPSEARCH_ARTIFACTS=/artifacts \
    HPSEARCH_DATA_DIR=/data

ENTRYPOINT ["hpsearch"]
CMD ["--help"]
