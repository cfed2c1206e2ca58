# GRPO learner: trains against the rollout service, HTTP side (/metrics, /healthz, /readyz) on 9401.
# Build from the repository root: docker build -f docker/learner.Dockerfile .
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 FASTGRPO_CACHE=/cache

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
COPY docker/learner-entrypoint.sh /usr/local/bin/fastgrpo-learner-entrypoint

EXPOSE 9401
ENTRYPOINT ["fastgrpo-learner-entrypoint"]
