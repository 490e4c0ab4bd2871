# syntax=docker/dockerfile:1
# The KServe predictor (`recsys serve`). CPU by default; the CUDA variant:
#   docker build -f docker/predictor.Dockerfile --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t recsys-predictor:cuda .
# Target `trainer` (--target trainer) is the retraining CronJob's image: the same code, `recsys retrain`;
# the Feast jobs (`feast apply`, `feast materialize-incremental`) run in the predictor image.
ARG BASE=python:3.11.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# the CUDA base images have no Python of their own: install the distribution's 3.12 there
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.12=3.12.* python3.12-venv=3.12.* \
      && rm -rf /var/lib/apt/lists/*; fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the index that matches the base (CPU or CUDA): an exact pin, no resolver surprises
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY predictor ./predictor
COPY operators ./operators
COPY feature_repo ./feature_repo
# hadolint ignore=DL3013
RUN pip install ".[serve,events,train]"  # the project itself (predictor, events service, jobs): its dependencies are pinned to ranges in pyproject.toml

FROM ${BASE} AS predictor
LABEL org.opencontainers.image.title="recsys predictor" \
      org.opencontainers.image.description="KServe predictor, training and Feast jobs of recsys-k8s" \
      org.opencontainers.image.source="https://github.com/recsys-k8s/recsys-k8s"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.12=3.12.* libgomp1=* \
      && rm -rf /var/lib/apt/lists/*; fi \
    && groupadd --gid 10001 recsys && useradd --uid 10001 --gid recsys --no-create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/feature_repo /app/feature_repo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RECSYS_HOME=/tmp/recsys \
    RECSYS_PROFILE=production \
    RECSYS_FEATURE_REPO=/app/feature_repo
WORKDIR /app
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["recsys"]
CMD ["serve", "--port", "8080"]

FROM predictor AS trainer
LABEL org.opencontainers.image.title="recsys trainer"
CMD ["retrain"]
