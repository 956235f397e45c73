# Postgres, Redis, an S3-compatible store, nginx and Prometheus from Debian's (and, for
# the store, PyPI's) packages on a local Debian base: what docker/compose.local.yml runs
# where the public images (postgres, redis, minio, nginx, prom/prometheus) cannot be
# pulled. One image, one command per service. The S3 store is moto's server: in memory,
# for a test stack, not for data that must survive it.
#   BASE_IMAGE      a Debian bookworm image with Python 3 and pip (scripts/stack.sh makes
#                   unlearn-base:bookworm with debootstrap)
#   WHEELHOUSE_URL  as in api.Dockerfile: where moto comes from without an index
ARG BASE_IMAGE=unlearn-base:bookworm
FROM ${BASE_IMAGE}
ARG WHEELHOUSE_URL=
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="unlearn-services" \
      org.opencontainers.image.description="Postgres, Redis, moto (S3), nginx, Prometheus from Debian packages" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    PATH=/usr/lib/postgresql/15/bin:$PATH
# No cluster at install time: the entrypoint makes one in its volume.
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       postgresql-15 redis-server nginx-light prometheus \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY constraints.txt /tmp/constraints.txt
RUN python3 -m pip install ${WHEELHOUSE_URL:+--no-index --find-links "$WHEELHOUSE_URL"} \
       -c /tmp/constraints.txt "moto[server]" \
    && useradd --uid 10002 --no-create-home s3
# The volumes' mount points of docker-compose.yml, owned by the service's user (a new
# named volume takes the owner of the directory it is mounted on).
RUN mkdir -p /var/lib/postgresql/data /data /srv/prometheus \
    && chown postgres /var/lib/postgresql/data && chmod 700 /var/lib/postgresql/data \
    && chown redis /data && chown prometheus /srv/prometheus
COPY docker/local/postgres.sh /usr/local/bin/unlearn-postgres
