# tokenproxy container image: build wheels, then a slim runtime without build tools.
#   docker build -t tokenproxy .
#   docker run --read-only -v tp-state:/var/lib/tokenproxy \
#     -v "$PWD/config.yaml:/etc/tokenproxy/config.yaml:ro" --network container:app tokenproxy
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# The wheel stage is named so that a build may replace it with wheels made elsewhere:
#   podman build --build-context wheels=DIR .   (DIR/wheels holds tokenproxy's and its deps')
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY tokenproxy ./tokenproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# Byte-compiled at install time: the root filesystem may be read-only at run time.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/tokenproxy-*.whl \
    && mkdir -p /var/lib/tokenproxy /etc/tokenproxy \
    && chown 65532:65532 /var/lib/tokenproxy \
    && chmod 0700 /var/lib/tokenproxy
ENV STATE_DIRECTORY=/var/lib/tokenproxy \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/tokenproxy"]
USER 65532:65532
# The proxy port is meant for containers sharing the network namespace (a pod, or
# `--network container:app`); it is deliberately not EXPOSEd.
# Healthy means ready: every provider holds a valid token (/readyz, 503 until then), which is
# what an app waiting on this container (Compose's depends_on: service_healthy) needs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/readyz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokenproxy"]
CMD ["run", "-c", "/etc/tokenproxy/config.yaml"]
