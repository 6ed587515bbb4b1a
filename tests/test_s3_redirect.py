"""S3_REDIRECT with real parts: dockerproxy.py processes on a SeaweedFS bucket, real registries and clients.

Every upstream is Debian's docker-registry on 127.0.0.1 (realregistry.RealRegistry),
the bucket is a real S3 server that checks signatures (tests/s3server.py,
SeaweedFS), each proxy is a `dockerproxy.py` process (tests/cluster.py's Cluster),
and the clients are skopeo and containerd's ctr, with HTTP(S)_PROXY on the
trap of test_interop.py (a fallback to a public registry fails the test).

1. A pull fills CACHE_DIR and the bucket; then skopeo and ctr pull through
   the proxy and every blob GET is a 307 to a presigned URL of the bucket
   (status=307 bytes=0 in the proxy's access log, dockerproxy_s3_redirects_total
   counts each, dockerproxy_cache_bytes_served_total grows only by the
   manifests' bytes): the clients got each blob from the bucket, every digest
   right, and the manifests from the proxy (200).
2. A private repository (htpasswd upstream): after a pull with credentials,
   an anonymous client, and one with the wrong password, get the upstream's
   401 and no Location, from the proxy that filled and from a second proxy
   on the same bucket, which reads the same records from the bucket; the
   right password gets the 307.
3. S3_REDIRECT_BASE: Location is on that base (here a small relay in front
   of SeaweedFS) with exactly the path and query Bucket.presigned_url() makes
   on the endpoint; a client following it through the relay gets the blob.

Tools as in test_interop.py (skopeo, docker-registry, containerd/ctr,
htpasswd): a missing one skips loudly, or fails under REQUIRE_INTEROP=1;
SeaweedFS and boto3 likewise (conftest's s3server fixture).
"""

import base64
import calendar
import hashlib
import http.client
import json
import os
import re
import time
import urllib.parse

import pytest

import dockerproxy
import test_interop
from cluster import make_cluster, parse_metrics
from conftest import http_request
from realregistry import (HTPASSWD, LoopbackServer, RealRegistry, _QuietHandler, make_htpasswd_line, wait_until,
                          write_oci_image)
from test_interop import (check_containerd_image, check_dir_copy, containerd_hosts_dir, need, skopeo,
                          start_containerd)

# test_interop.py's fixtures: the trap every client's HTTP(S)_PROXY points at (and the check
# after each test that nothing reached it); cluster.py's processes on this test's bucket.
trap = test_interop.trap
nothing_left_loopback = test_interop.nothing_left_loopback
make_cluster = make_cluster

PREFIX = "px"  # the Cluster's
USER, PASSWORD = "s3-puller", "s3-pull-pass"
REGISTRY_PATH = re.compile(r"/v2/(?P<name>\S+)/(?P<kind>manifests|blobs)/(?P<reference>[^/?]+)")


# Helpers ###################################################################

def key_of(digest):
    return dockerproxy.blob_key(PREFIX + "/", digest)


def image_digests(image):
    """(manifest digest, blob digests) of a write_oci_image() description."""
    return image["digest"], image["layers"] + [image["config"]]


def wait_in_bucket(server, bucket, digests, timeout=60):
    """Poll until every digest's object is in the bucket (the uploads run after the fills); then
    each must hash to its digest (the proxy's upload checked against boto3's reading)."""
    wanted = {key_of(digest): digest for digest in digests}
    wait_until(lambda: set(wanted) <= set(server.objects(bucket, PREFIX + "/docker/")), timeout=timeout,
               what="the uploads of " + ", ".join(sorted(digests)))
    for key, digest in wanted.items():
        assert server.sha256_of(bucket, key) == digest, key


def access_lines(proxy, since=0):
    """The proxy's answers to manifest and blob requests (its access log), from the `since`-th answer on,
    each with the `kind` (manifests, blobs) and `reference` of its path."""
    lines = []
    for line in proxy.access_lines()[since:]:
        match = REGISTRY_PATH.fullmatch(line["path"])
        if match:
            lines.append({**line, **match.groupdict()})
    return lines


def metrics(proxy):
    """/metrics (the Cluster's ADMIN_ALLOW=127.0.0.1/32): {(name, labels): value}."""
    return parse_metrics(proxy.metrics_text())


def total(values, name):
    return sum(value for (series, _), value in values.items() if series == name)


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def fetch(url, headers=None):
    """GET an absolute URL (a presigned Location): (status, headers, body)."""
    return http_request(url, headers=headers)


def check_redirect(server, bucket, status, headers, digest, base=None):
    """A 307 to a presigned URL of the digest's object, on the endpoint (or `base`), that serves the blob."""
    assert status == 307, (status, dict(headers))
    location = headers["Location"]
    assert location.startswith((base or server.endpoint) + f"/{bucket}/{key_of(digest)}?"), location
    assert headers["Docker-Content-Digest"] == digest
    assert headers["X-Cache"] == "HIT"
    assert server.secret_key not in location
    got_status, _, body = fetch(location)
    assert got_status == 200, body[:300]
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    return location


def no_redirect(status, headers, body):
    """A refusal as a registry answers one: 401, a challenge, an error document, no Location."""
    assert status == 401, (status, dict(headers), body[:300])
    assert "Location" not in headers, dict(headers)
    assert headers.get("WWW-Authenticate", "").lower().startswith("basic"), dict(headers)
    codes = [error.get("code") for error in json.loads(body)["errors"]]
    assert codes == ["UNAUTHORIZED"], body[:300]


# Upstreams ###################################################################

def big_layers(name):
    """A 1 MiB incompressible layer (the bytes a redirect saves) and a small one."""
    return [{f"{name}/data.bin": os.urandom(1 << 20)}, {f"etc/{name}.conf": f"setting of {name}".encode()}]


@pytest.fixture(scope="module")
def public_registry(tmp_path_factory):
    """Anonymous docker-registry with library/s3app:latest."""
    workdir = tmp_path_factory.mktemp("public-registry")
    real = RealRegistry(workdir / "server")
    try:
        real.image = write_oci_image(workdir / "app", "latest", big_layers("s3app"))
        real.push(workdir / "app", "latest", "library/s3app", "latest")
        yield real
    finally:
        real.stop()


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory):
    """docker-registry behind htpasswd basic auth, with private/app:latest pushed with credentials."""
    need(htpasswd=HTPASSWD)
    workdir = tmp_path_factory.mktemp("private-registry")
    real = RealRegistry(workdir / "server", htpasswd_line=make_htpasswd_line(USER, PASSWORD))
    try:
        real.image = write_oci_image(workdir / "app", "latest", big_layers("private"))
        real.push(workdir / "app", "latest", "private/app", "latest", creds=f"{USER}:{PASSWORD}")
        yield real
    finally:
        real.stop()


# 1. Redirected pulls: the blobs from the bucket, nothing through the proxy #####

def test_redirected_pulls_get_every_blob_from_the_bucket(make_cluster, public_registry, tmp_path, trap):
    cluster = make_cluster(public_registry.url)
    server, bucket = cluster.s3server, cluster.bucket
    image = public_registry.image
    manifest, blobs = image_digests(image)
    [proxy] = cluster.start(1, peers=False, env={"S3_REDIRECT": "true"})
    source = f"docker://{proxy.host}/library/s3app:latest"

    # The first pull: from upstream, through the proxy (nothing in the bucket yet), uploaded after.
    skopeo("copy", "--src-tls-verify=false", source, f"dir:{tmp_path / 'cold'}", env=trap.environ())
    check_dir_copy(tmp_path / "cold", image)
    # (an access line is written just after its answer: polled for)
    wait_until(lambda: {line["reference"] for line in access_lines(proxy)
                        if line["kind"] == "blobs" and line["status"] == "200"} == set(blobs),
               timeout=10, what="the first pull's blobs answered 200 from upstream")
    wait_in_bucket(server, bucket, blobs + [manifest])

    since, before = len(proxy.access_lines()), metrics(proxy)
    skopeo("copy", "--src-tls-verify=false", source, f"dir:{tmp_path / 'warm'}", env=trap.environ())
    check_dir_copy(tmp_path / "warm", image)
    (tmp_path / "ctrd").mkdir()
    daemon = start_containerd(tmp_path / "ctrd", trap)
    try:
        reference = "docker.io/library/s3app:latest"
        daemon.pull(reference, containerd_hosts_dir(tmp_path / "certs.d", proxy))
        check_containerd_image(daemon, reference, image)
    finally:
        daemon.stop()

    def blob_gets():
        return [line for line in access_lines(proxy, since) if line["kind"] == "blobs" and line["method"] == "GET"]
    # both clients asked for every blob (skopeo's and containerd's copies are complete and verified) ...
    wait_until(lambda: all(sum(line["reference"] == digest for line in blob_gets()) >= 2 for digest in blobs),
               timeout=10, what="two GETs of every blob in the access log")
    lines = access_lines(proxy, since)
    blob_gets = blob_gets()
    # ... and the proxy sent none of their bytes: every blob GET was a redirect.
    assert all(line["status"] == "307" and line["bytes"] == "0" and line["cache"] == "hit"
               for line in blob_gets), blob_gets
    manifests = [line for line in lines if line["kind"] == "manifests"]
    assert manifests and all(line["status"] == "200" for line in manifests), manifests
    assert any(line["method"] == "GET" and int(line["bytes"]) > 0 for line in manifests), manifests

    after = metrics(proxy)
    redirects = "dockerproxy_s3_redirects_total"
    assert total(after, redirects) - total(before, redirects) == len(blob_gets)
    # what the proxy sent these clients from its cache: the manifests' bytes, no blob's
    manifest_bytes = sum(int(line["bytes"]) for line in manifests if line["cache"] != "-")
    served = "dockerproxy_cache_bytes_served_total"
    assert total(after, served) - total(before, served) == manifest_bytes


# 2. A private repository: no redirect for a client upstream would refuse #######

def test_no_redirect_for_a_client_upstream_refuses(make_cluster, private_registry, tmp_path, trap):
    cluster = make_cluster(private_registry.url)
    server, bucket = cluster.s3server, cluster.bucket
    image = private_registry.image
    manifest, blobs = image_digests(image)
    [first] = cluster.start(1, peers=False, env={"S3_REDIRECT": "true"})
    skopeo("copy", "--src-tls-verify=false", "--src-creds", f"{USER}:{PASSWORD}",
           f"docker://{first.host}/private/app:latest", f"dir:{tmp_path / 'copy'}", env=trap.environ())
    check_dir_copy(tmp_path / "copy", image)
    wait_in_bucket(server, bucket, blobs + [manifest])
    # The records are in the bucket: links to private/app, and no anonymous-pull mark.
    repository = f"{PREFIX}/dockerproxy/repos/{private_registry.host}/private/app/"
    records = server.objects(bucket, repository)
    for digest in blobs:
        assert repository + "_links/" + digest.replace(":", "/") in records, sorted(records)
    assert repository + "_public" not in records, sorted(records)

    # a second proxy on the bucket (no PEERS), its CACHE_DIR empty
    [second] = cluster.start(1, peers=False, env={"S3_REDIRECT": "true"})
    for proxy in (first, second):
        for digest in blobs:
            path = f"/v2/private/app/blobs/{digest}"
            no_redirect(*proxy.request("GET", path))
            no_redirect(*proxy.request("GET", path, basic(USER, "not-the-password")))
            status, headers, _ = proxy.request("GET", path, basic(USER, PASSWORD))
            check_redirect(server, bucket, status, headers, digest)
    # the second proxy answered from the bucket: it made no copy of its own
    for digest in blobs:
        assert not os.path.exists(dockerproxy.object_path(second.cache_dir, digest)), digest


# 3. S3_REDIRECT_BASE: the same signed path and query, on a CDN ##############

class _RelayHandler(_QuietHandler):
    """GET and HEAD sent on to the S3 endpoint as they came (path and query), Host its own."""

    def do_GET(self):
        relay = self.server.owner
        relay.requests.append((self.command, self.path))
        endpoint = urllib.parse.urlsplit(relay.endpoint)
        connection = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=30)
        try:
            connection.request(self.command, self.path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "keep-alive", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET


class Relay(LoopbackServer):
    """A reverse relay in front of the S3 server, as a CDN in front of a bucket; records each request."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.requests = []
        super().__init__(_RelayHandler)


class FixedClock(dockerproxy.Clock):
    def __init__(self, when):
        self.when = when

    def time(self):
        return self.when


def test_redirect_base_keeps_the_signed_path_and_query(make_cluster, public_registry, tmp_path, trap):
    cluster = make_cluster(public_registry.url)
    server, bucket = cluster.s3server, cluster.bucket
    image = public_registry.image
    manifest, blobs = image_digests(image)
    relay = Relay(server.endpoint)
    try:
        [proxy] = cluster.start(1, peers=False, env={"S3_REDIRECT": "true", "S3_REDIRECT_BASE": relay.url})
        source = f"docker://{proxy.host}/library/s3app:latest"
        skopeo("copy", "--src-tls-verify=false", source, f"dir:{tmp_path / 'cold'}", env=trap.environ())
        check_dir_copy(tmp_path / "cold", image)
        wait_in_bucket(server, bucket, blobs + [manifest])

        layer = image["layers"][0]
        status, headers, _ = proxy.request("GET", f"/v2/library/s3app/blobs/{layer}")
        location = check_redirect(server, bucket, status, headers, layer, base=relay.url)
        url = urllib.parse.urlsplit(location)
        assert relay.requests[-1] == ("GET", f"{url.path}?{url.query}")
        query = dict(urllib.parse.parse_qsl(url.query))
        assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-SignedHeaders"] == "host"
        assert query["X-Amz-Credential"].startswith(server.access_key + "/")
        assert query["X-Amz-Expires"] == "1200"  # S3_REDIRECT_TTL's default, 20m
        # exactly what presigned_url() makes on the endpoint at that second: only the origin differs
        when = calendar.timegm(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
        config = dockerproxy.load_config(["--env-file", os.devnull], proxy.env)  # the process's settings
        signer = dockerproxy.Bucket(config, FixedClock(when), dockerproxy.Metrics())
        assert signer.presigned_url(key_of(layer), 1200) == f"{server.endpoint}{url.path}?{url.query}"
        status, _, body = fetch(f"{server.endpoint}{url.path}?{url.query}")
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer
        # the relay passes S3's refusal of a signature that is not the proxy's
        signature = query["X-Amz-Signature"]
        forged = location.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
        status, _, body = fetch(forged)
        assert status == 403, body[:300]

        # skopeo follows the redirects to the relay: every blob through it, every digest right
        before = len(relay.requests)
        skopeo("copy", "--src-tls-verify=false", source, f"dir:{tmp_path / 'warm'}", env=trap.environ())
        check_dir_copy(tmp_path / "warm", image)
        relayed = {urllib.parse.urlsplit(path).path for method, path in relay.requests[before:] if method == "GET"}
        assert relayed >= {f"/{bucket}/{key_of(digest)}" for digest in blobs}, relayed
    finally:
        relay.stop()
