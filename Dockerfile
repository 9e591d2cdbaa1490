# drainproxy image: Python slim, the wheel built in a first stage and installed into a virtual
# environment in the final one, so no compiler, pip cache or source tree ends up in the image.
#   docker build -t drainproxy:0.1.0 .       (or `make image`, which tags it as k8s/ expects)
# The manifests in k8s/ run it with `serve --config /etc/drainproxy/drainproxy.yaml`.
# k8s/webhook/ runs `drainproxy webhook`, which needs the webhook extra (aiohttp):
#   docker build --build-arg EXTRAS=webhook -t drainproxy:0.1.0 .

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Optional extras, comma-separated (webhook); none for the sidecar, which never imports them.
ARG EXTRAS=""
WORKDIR /src
# Everything the wheel is built from, and nothing else (see .dockerignore).
COPY pyproject.toml README.md LICENSE ./
COPY drainproxy ./drainproxy
# One wheel for drainproxy and one for each dependency (httptools and uvloop come prebuilt
# for manylinux, so this stage needs no compiler either).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

FROM ${PYTHON_IMAGE}
ARG EXTRAS=""
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="drainproxy" \
      org.opencontainers.image.description="Graceful-shutdown reverse-proxy sidecar for legacy HTTP apps on Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/kubernetes.md"
ENV PATH=/opt/drainproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The wheels come in through a bind mount, so they are not left in any layer; the venv gets
# no pip of its own (the base image's installs into it). Unpinned by name but not by content:
# --no-index takes drainproxy only from the wheel built above.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/drainproxy \
    && pip --python /opt/drainproxy/bin/python install --no-cache-dir --no-index \
        --find-links=/wheels "drainproxy${EXTRAS:+[$EXTRAS]}" \
    && groupadd --system --gid 10001 drainproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --shell /usr/sbin/nologin drainproxy
# The embedded defaults, where the manifests mount their ConfigMap instead.
COPY config/drainproxy.yaml /etc/drainproxy/drainproxy.yaml
# Numeric, so that runAsNonRoot can verify it.
USER 10001:10001
# listen (the Service's targetPort) and admin.listen (probes, /prestop, /metrics).
EXPOSE 8080 9901
# drainproxy drains on SIGTERM; the kubelet sends it, and so must anything else.
STOPSIGNAL SIGTERM
ENTRYPOINT ["drainproxy"]
CMD ["serve", "--config", "/etc/drainproxy/drainproxy.yaml"]
