# syntax=docker/dockerfile:1
# The sinkhole resolver image. Build: docker build -t sinkhole .
# Run:   docker run -p 53:53/udp -p 53:53/tcp -p 9153:9153 sinkhole
# Own blocklists: -v /srv/dept-blocklists:/etc/sinkhole/blocklists:ro (hot-reloaded, no restart)
# Own config:     -v /srv/sinkhole.yaml:/etc/sinkhole/sinkhole.yaml:ro

# --- build: wheels for the package and its dependencies -------------------------------------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY resolver/ resolver/
COPY exporters/ exporters/
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[sidecar]'

# --- runtime --------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="sinkhole" \
      org.opencontainers.image.description="Departmental DNS sinkhole: per-subnet service blocking, expiring exemptions, audit log" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels sinkhole \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sinkhole
COPY blocklists/ /etc/sinkhole/blocklists/
COPY deploy/docker/sinkhole.yaml /etc/sinkhole/sinkhole.yaml
ENV PYTHONUNBUFFERED=1
# Docker lets unprivileged processes bind port 53 inside the container
# (net.ipv4.ip_unprivileged_port_start=0 since Engine 20.10); elsewhere add CAP_NET_BIND_SERVICE.
USER 10001:10001
EXPOSE 53/udp 53/tcp 9153/tcp
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["sinkhole", "healthcheck", "--server", "127.0.0.1:53"]
ENTRYPOINT ["sinkhole", "serve", "-c", "/etc/sinkhole/sinkhole.yaml"]
