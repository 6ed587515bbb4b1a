# dockerproxy: one standard-library Python file on a distroless Python 3 base.
#   docker build -t dockerproxy .
#   docker run -d --name dockerproxy --stop-timeout 30 -v cache:/cache -p 8080:8080 dockerproxy
#
# The base images are build arguments, so the image builds from a registry of
# one's own too (tests/test_docker.py builds it from stand-ins made on the test
# machine).  PYTHON_IMAGE needs only /usr/bin/python3, as its entrypoint (as
# distroless's has); HELPER_IMAGE only /bin/sh, mkdir and chown.
ARG PYTHON_IMAGE=gcr.io/distroless/python3-debian12
ARG HELPER_IMAGE=busybox:1.36

# The distroless image has no shell: create the cache directory, owned by the
# nonroot user (65532), in a small stage and copy it over.
FROM ${HELPER_IMAGE} AS cachedir
RUN mkdir /cache && chown 65532:65532 /cache

FROM ${PYTHON_IMAGE}
COPY --from=cachedir --chown=65532:65532 /cache /cache
COPY dockerproxy.py /app/dockerproxy.py
WORKDIR /app
ENV CACHE_DIR=/cache HOST=0.0.0.0 PORT=8080
VOLUME /cache
EXPOSE 8080
# nonroot
USER 65532:65532
# /healthz on the proxy's own port, with python3 alone (no shell, no curl in the
# image); HTTPS when TLS_CERT is set (not verified: the name is not 127.0.0.1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["/usr/bin/python3", "-c", "import http.client as h, os, ssl; port = int(os.environ.get('PORT') or 8080); c = h.HTTPSConnection('127.0.0.1', port, timeout=4, context=ssl._create_unverified_context()) if os.environ.get('TLS_CERT') else h.HTTPConnection('127.0.0.1', port, timeout=4); c.request('GET', '/healthz'); raise SystemExit(c.getresponse().status != 200)"]
# The image's entrypoint is python3.
CMD ["/app/dockerproxy.py"]
