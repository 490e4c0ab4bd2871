# syntax=docker/dockerfile:1
# The LatencyAutoscaler operator: kopf + the official Kubernetes client, no model code and no torch.
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "kopf>=1.44,<2" "kubernetes>=29,<38" "aiohttp>=3.9,<4" "prometheus-client>=0.20,<1"

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="recsys operator" \
      org.opencontainers.image.description="Scales the recsys predictor on p99 latency and ejects slow replicas"
RUN groupadd --gid 10001 recsys && useradd --uid 10001 --gid recsys --no-create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# the operator imports only operators/{__main__,run,handlers,control,cluster,scrape,policy}.py
COPY operators/__init__.py operators/__main__.py operators/run.py operators/handlers.py operators/control.py operators/cluster.py operators/scrape.py operators/policy.py ./operators/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONPATH=/app
USER 10001:10001
EXPOSE 8080
# the same as `recsys operator run` (operators/run.py): peering for leader election, /healthz on 8080
ENTRYPOINT ["python", "-m", "operators"]
CMD ["run"]
