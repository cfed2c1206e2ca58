# Rollout service on an NVIDIA GPU: gRPC on 50051, HTTP side (/metrics, /healthz, /readyz) on 9400.
# Build from the repository root: docker build -f docker/rollout.Dockerfile .
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH FASTGRPO_CACHE=/cache
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/fastgrpo
# torch alone first, pinned: the largest layer, rebuilt only when the constraints change
COPY constraints.txt ./
RUN pip install -c constraints.txt torch
COPY pyproject.toml setup.py README.md ./
COPY proto/python proto/python
COPY common/python common/python
COPY services services
COPY clients/python clients/python
COPY fixture fixture
COPY benchmarks/fastgrpo benchmarks/fastgrpo
RUN pip install -c constraints.txt .
COPY docker/rollout-entrypoint.sh /usr/local/bin/fastgrpo-rollout-entrypoint

EXPOSE 50051 9400
ENTRYPOINT ["fastgrpo-rollout-entrypoint"]
