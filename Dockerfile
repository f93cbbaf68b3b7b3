# Deployster's container image: `deployster serve`, as an unprivileged user.
#
#   docker build -t deployster .
#   docker run -d --name deployster --network host --env-file /etc/deployster/env \
#     -v /var/run/fleet.sock:/var/run/fleet.sock \
#     --group-add "$(stat -c %g /var/run/fleet.sock)" \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" deployster
#
# Sockets to mount, both mode 0660; the user below is not root, so the container needs each
# socket's group, by number (the image has no such group names):
#   /var/run/fleet.sock   fleet's API (the default --fleet-endpoint, unix:///var/run/fleet.sock);
#                         Container Linux's fleet.socket makes it user and group fleet, GID 253.
#   /var/run/docker.sock  the Docker Engine API, for one-off tasks; user root, group docker
#                         (GID 233 on Container Linux).
# Configure it with DEPLOYSTER_* variables (README: "Configuration"); the health check reads
# DEPLOYSTER_LISTEN and DEPLOYSTER_CERT to find the server, so prefer them to -listen/-cert.
#
# BASE is any Debian-like image with python3 (3.11 or later) and its venv module, used for both
# stages (the virtualenv links to the base's python3).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
RUN python3 -m venv /opt/deployster
COPY pyproject.toml README.md /src/
COPY deployster /src/deployster
COPY handlers /src/handlers
RUN /opt/deployster/bin/pip install --no-cache-dir --disable-pip-version-check /src \
    && /opt/deployster/bin/pip uninstall --yes --disable-pip-version-check setuptools pip \
    && /opt/deployster/bin/deployster version

FROM ${BASE}
COPY --from=build /opt/deployster /opt/deployster
ENV PATH=/opt/deployster/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DEPLOYSTER_LISTEN=0.0.0.0:3000 \
    DEPLOYSTER_LOG_FORMAT=json
# A numeric user, so that orchestrators can check it is not root (Kubernetes' runAsNonRoot);
# the server needs no home, no passwd entry and no writable path.
USER 10001:10001
EXPOSE 3000
# Liveness only (/healthz answers while the process runs); /readyz tells whether etcd and
# fleet are reachable. With HTTPS the certificate is not checked: this is the server itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python3", "-c", "\
import os, ssl, urllib.request; \
port = os.environ.get('DEPLOYSTER_LISTEN', '0.0.0.0:3000').rpartition(':')[2]; \
scheme = 'https' if os.environ.get('DEPLOYSTER_CERT') else 'http'; \
context = ssl.create_default_context(); context.check_hostname = False; context.verify_mode = ssl.CERT_NONE; \
urllib.request.urlopen(f'{scheme}://127.0.0.1:{port}/healthz', timeout=4, context=context)"]
ENTRYPOINT ["deployster", "serve"]
