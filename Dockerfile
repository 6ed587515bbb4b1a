# dockerproxy: one standard-library Python file on a distroless Python 3 base.
#   docker build -t dockerproxy .
#   docker run -d -v cache:/cache -e CACHE_DIR=/cache -p 8080:8080 dockerproxy

# The distroless image has no shell: create the cache directory, owned by the
# nonroot user (65532), in a small stage and copy it over.
FROM busybox:1.36 AS cachedir
RUN mkdir /cache && chown 65532:65532 /cache

FROM gcr.io/distroless/python3-debian12
COPY --from=cachedir --chown=65532:65532 /cache /cache
COPY dockerproxy.py /app/dockerproxy.py
WORKDIR /app
ENV CACHE_DIR=/cache HOST=0.0.0.0 PORT=8080
VOLUME /cache
EXPOSE 8080
# nonroot
USER 65532:65532
# The image's entrypoint is python3.
CMD ["/app/dockerproxy.py"]
