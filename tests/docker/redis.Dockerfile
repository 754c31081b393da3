# For the tests only: a stand-in for the official redis:7-bookworm image (Docker Hub is out of
# reach here): Debian's redis-server, run as given by the compose file's command.
ARG BASE
FROM ${BASE}
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
USER redis
EXPOSE 6379
CMD ["redis-server"]
