# hetcomp image: the exact stack of requirements/cpu.lock (TARGET=cpu) or gpu.lock (TARGET=cuda) installed with pip --no-deps (as
# scripts/setup.sh does), this package installed from a wheel, run as a non-root user.
#
#   docker build --build-arg TARGET=cpu|cuda [--build-arg BASE_IMAGE=...] -t hetcomp .
#   docker run --rm --shm-size 2g -v /datasets:/data:ro -e HETCOMP_DATASETS_DIR=/data hetcomp \
#     hetcomp demo --config configs/tiny.yaml --set run=/tmp/run
#
# Build-time only (they stay in the build stage, not in the image):
#   --secret id=pip_cert,src=<CA bundle>   a TLS-intercepting proxy's CA for pip (never in a layer)
#   --build-arg PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS   other package sources
#   --build-arg TORCH_CPU_INDEX=<url or empty>   where torch==2.13.0+cpu comes from (cpu target)
# The base must provide Python 3.11 with venv (python:3.11-slim, or Debian bookworm + python3-venv).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TARGET=cpu
# The CPU torch build is on PyTorch's index, not PyPI. Not used for cuda: PyPI's torch==2.13.0 is
# the CUDA build, and with this index pip would prefer the 2.13.0+cpu local version.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# A venv at the same path in both stages: the same whether the base's Python is /usr/local/bin
# (python:3.11-slim) or /usr/bin (Debian's python3), and copied whole into the runtime stage.
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY requirements/ requirements/
# Build tools pinned as in setup.sh, then the lock without dependency resolution: torchrec's metadata
# names the CUDA fbgemm-gpu, which a resolving install would pull onto the cpu target.
RUN --mount=type=secret,id=pip_cert \
    --mount=type=cache,target=/root/.cache/pip \
    case "$TARGET" in cpu) lock=cpu ;; cuda) lock=gpu ;; *) echo "TARGET must be cpu or cuda, not $TARGET" >&2; exit 2 ;; esac; \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    if [ "$TARGET" = cpu ] && [ -n "$TORCH_CPU_INDEX" ]; then set -- --extra-index-url "$TORCH_CPU_INDEX"; fi; \
    /opt/venv/bin/pip install pip==25.3 setuptools==84.2.1 \
    && /opt/venv/bin/pip install --no-deps -r "requirements/${lock}.lock" "$@"
COPY pyproject.toml ./
COPY hetcomp_dist/ hetcomp_dist/
# A wheel, not an editable install: the image must not depend on /src, which stays in this stage.
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /tmp/dist . \
    && /opt/venv/bin/pip install --no-deps --no-index --no-cache-dir /tmp/dist/hetcomp_dist-*.whl

FROM ${BASE_IMAGE} AS runtime
ARG TARGET=cpu
LABEL org.opencontainers.image.title="hetcomp_dist" \
      org.opencontainers.image.description="HetComp recommender distillation (${TARGET})"
# --no-log-init: a high uid would otherwise grow /var/log/faillog and lastlog to gigabytes.
RUN useradd --no-log-init --create-home --uid 10001 --user-group hetcomp
COPY --from=build /opt/venv /opt/venv
# Written out in full: an imported root filesystem (the debootstrap base) has no PATH to extend.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
WORKDIR /app
# The run configs (paths like configs/tiny.yaml resolve here); runs/ is the configs' default output.
COPY configs/ configs/
COPY jobs/ jobs/
RUN install -d -o hetcomp -g hetcomp runs
# Numeric, so that runAsNonRoot-style checks can verify it without the image's /etc/passwd.
USER 10001:10001
CMD ["hetcomp", "--help"]
