"""Three real dockerproxy.py processes on one SeaweedFS bucket, with PEERS (issue 14).

Every instance is a process (tests/cluster.py) with its own CACHE_DIR and
port; they share CACHE_S3 (a new bucket of the session's SeaweedFS, conftest's
s3bucket), PEERS and PEER_SECRET.  Upstream is Debian's docker-registry
(realregistry.RealRegistry) with images of generated layers of a few MB pushed
by skopeo; what reached it is read from its access log.  What landed in the
bucket is read with boto3 (never through dockerproxy.py) and hashed.

1. a pull through A is a hit on B and C (no request upstream for a blob or
   the manifest, right digests); 1b. the case of 1 that fails when B served a
   peer request just before (its remembered anonymous-pull mark), made
   deterministic;
2. 8 cold clients on A, B and C at once: one upstream GET per blob, every
   object in the bucket its digest;
3. the owner of a blob SIGKILLed mid-fill: the client's retry through another
   instance succeeds, one more upstream GET at most, nothing partial or wrong
   in the bucket, the owner marked down;
4. the peer header's proof: wrong secret, stale timestamp, another peer's,
   malformed, replayed, a manifest: 403; right: the blob; without PEERS the
   header is ignored;
5. a peer that refuses connections owning a digest: the live instance fills it.

Tools as in test_interop.py (its trap and module-level skip are used): a
missing skopeo or docker-registry skips the module loudly, or fails under
REQUIRE_INTEROP=1; a missing SeaweedFS or boto3 likewise (conftest's s3server).
"""

import concurrent.futures
import http.client
import json
import os
import re
import threading
import time
import uuid

import pytest

import dockerproxy
import test_interop
from cluster import HoldingRelay, free_ports, make_cluster, sha256_hex, wait_until
from realregistry import OCI_MANIFEST, RealRegistry, write_oci_image
from test_interop import sha256_file, skopeo

# test_interop.py's fixtures: the trap skopeo's HTTP(S)_PROXY points at, checked after each test.
trap = test_interop.trap
nothing_left_loopback = test_interop.nothing_left_loopback
make_cluster = make_cluster

MB = 1024 * 1024
# docker-registry's access log: "GET /v2/team/app/blobs/sha256:... HTTP/1.1" 200 1234 "" "dockerproxy/..."
REGISTRY_ACCESS = re.compile(r'"(?P<method>[A-Z]+) /v2/(?P<name>\S+?)/(?P<kind>manifests|blobs)/(?P<reference>[^\s?]+)'
                             r'\S* HTTP/[\d.]+" (?P<status>\d+) ')
MANIFEST_TTL = 60.0  # the proxies run with the default


def random_layers(name, *sizes):
    """Layer contents: one file of random (incompressible) bytes per size, and a small text file."""
    layers = [{f"{name}/data{index}.bin": os.urandom(size)} for index, size in enumerate(sizes)]
    return layers + [{f"etc/{name}.conf": f"setting for {name}\n".encode()}]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """docker-registry (anonymous) with team/app:v1, team/cold:v1 and team/slow:v1, each of its own layers."""
    workdir = tmp_path_factory.mktemp("registry")
    real = RealRegistry(workdir / "server")
    real.images = {}
    try:
        for name, sizes in (("app", (3 * MB, 1 * MB)), ("cold", (2 * MB, 2 * MB)), ("slow", (4 * MB,))):
            real.images[name] = write_oci_image(workdir / name, "v1", random_layers(name, *sizes))
            real.push(workdir / name, "v1", f"team/{name}", "v1")
        yield real
    finally:
        real.stop()


def blobs_of(image):
    return [image["config"]] + list(image["layers"])


def blob_sizes(registry, name):
    """{digest: size} of the image's config and layers, from its manifest as pushed."""
    layout = os.path.join(os.path.dirname(registry.workdir), name)
    with open(os.path.join(layout, "blobs", "sha256", registry.images[name]["digest"].split(":")[1]), "rb") as file:
        manifest = json.load(file)
    return {item["digest"]: item["size"] for item in [manifest["config"]] + manifest["layers"]}


def registry_log_synced(registry):
    """The registry's log once every request it answered before this call is in it: a request of
    our own, on a path nobody else asks for, is answered and then waited for in the log."""
    marker = f"sync-{uuid.uuid4().hex}"
    connection = http.client.HTTPConnection(registry.host, timeout=10)
    try:
        connection.request("GET", f"/v2/{marker}/tags/list")
        connection.getresponse().read()
    finally:
        connection.close()
    wait_until(lambda: marker in registry.access_log(), timeout=10, what="the registry's log of our sync request")
    return registry.access_log()


def upstream_requests(registry, since, name):
    """[(method, kind, reference, status)] the registry logged for team/<name> after offset `since`."""
    text = registry_log_synced(registry)[since:]
    return [(m.group("method"), m.group("kind"), m.group("reference"), m.group("status"))
            for m in map(REGISTRY_ACCESS.search, text.splitlines())
            if m and m.group("name") == f"team/{name}"]


def check_oci_copy(directory, image):
    """A skopeo oci: layout holding the image: its manifest, config and layers, each hashing to its name."""
    with open(os.path.join(directory, "index.json")) as file:
        assert [entry["digest"] for entry in json.load(file)["manifests"]] == [image["digest"]]
    blobs = os.path.join(directory, "blobs", "sha256")
    stored = {"sha256:" + name for name in os.listdir(blobs)}
    assert stored == {image["digest"], *blobs_of(image)}
    for digest in stored:
        assert sha256_file(os.path.join(blobs, digest.split(":")[1])) == digest


def get_blob(instance, name, digest, headers=None):
    """GET of a blob through `instance`: (status, headers, body), the body's digest checked when 200."""
    status, answer, body = instance.request("GET", f"/v2/team/{name}/blobs/{digest}", headers)
    if status == 200:
        assert sha256_hex(body) == digest, f"{instance.name} sent {len(body)} bytes that are not {digest}"
    return status, answer, body


def check_bucket(cluster, sizes):
    """Every blob object of the bucket hashes to its key's digest; those of `sizes` have their whole size."""
    objects = cluster.blob_objects()
    assert cluster.bad_blob_objects() == []
    for digest, size in sizes.items():
        assert cluster.s3server.head(cluster.bucket, objects[digest])["size"] == size, digest
    assert cluster.s3server.pending_uploads(cluster.bucket) == []


# 1 #############################################################################

def test_an_image_pulled_through_one_instance_is_a_hit_on_the_others(make_cluster, registry, tmp_path, trap):
    """skopeo through A fills the bucket; skopeo through B and C then gets every digest right with
    no GET upstream of the manifest or any blob, and no HEAD either (one of the tag only once
    MANIFEST_TTL passed); a direct blob GET through B is an X-Cache HIT."""
    image = registry.images["app"]
    cluster = make_cluster(registry.url)
    a, b, c = cluster.start(3)
    before = len(registry_log_synced(registry))
    pulled_at = time.monotonic()
    skopeo("copy", "--src-tls-verify=false", f"docker://{a.host}/team/app:v1", f"oci:{tmp_path / 'a'}:v1",
           env=trap.environ())
    check_oci_copy(tmp_path / "a", image)
    cold = upstream_requests(registry, before, "app")
    assert {("GET", "blobs", digest, "200") for digest in blobs_of(image)} <= set(cold), cold
    # A's uploads settled: the manifest and every blob in the bucket, and the tag's entry.
    cluster.wait_for_blobs([image["digest"], *blobs_of(image)])
    wait_until(lambda: any("/team/app/_tags/v1/" in key for key in cluster.s3server.objects(cluster.bucket)),
               timeout=30, what="the tag's entry in the bucket")

    before = len(registry_log_synced(registry))
    answered_before = {instance.name: len(instance.access_lines()) for instance in (b, c)}
    for instance in (b, c):
        skopeo("copy", "--src-tls-verify=false", f"docker://{instance.host}/team/app:v1",
               f"oci:{tmp_path / instance.name}:v1", env=trap.environ())
        check_oci_copy(tmp_path / instance.name, image)
    status, headers, _ = get_blob(b, "app", image["layers"][0])
    assert status == 200 and headers["X-Cache"] == "HIT", (status, dict(headers))

    warm = upstream_requests(registry, before, "app")
    assert [r for r in warm if r[0] == "GET"] == [], f"B or C fetched from upstream: {warm}\n{b.log()}\n{c.log()}"
    heads = [r for r in warm if r[0] == "HEAD"]
    if time.monotonic() - pulled_at <= MANIFEST_TTL:
        assert heads == [], warm
    else:  # the tag's entry expired on the way: only the tag may have been revalidated
        assert all(r[1:3] == ("manifests", "v1") for r in heads), warm
    # B and C answered every blob and manifest by digest from the shared cache.
    for instance in (b, c):
        answered = [line for line in instance.access_lines()[answered_before[instance.name]:]
                    if line["method"] == "GET" and "/sha256:" in line["path"]]
        assert answered and all(line["cache"] == "hit" and line["status"] == "200" and line["upstream"] == "-"
                                for line in answered), (instance.name, answered)


def test_a_blob_linked_by_another_instance_after_this_one_marked_the_repository_needs_no_upstream(
        make_cluster, registry):
    """What test 1 hits when B served a peer request during A's pull, made deterministic.

    B fills blob X for a peer (so B links X and marks team/app public, and
    remembers its mark for PUBLIC_MARK_TTL); then C, the owner of blob Y,
    fills Y for a client of its own (C links Y, later than B's mark, and
    marks the repository again).  A GET of Y through B, within seconds: Y is
    in the bucket, linked to a repository marked public after the link:
    B must serve it with no request upstream (not even a HEAD)."""
    image = registry.images["app"]
    x, y = image["layers"][1], image["layers"][0]
    cluster = make_cluster(registry.url)
    instances = cluster.start(3)
    [c] = [i for i in instances if i.url == dockerproxy.rendezvous_order(cluster.peers, y)[0]]
    b = next(i for i in instances if i is not c)

    path = f"/v2/docker.io/team/app/blobs/{x}"
    status, _, body = b.request("GET", path, peer_header(cluster.secret, b.url, path))
    assert status == 200 and sha256_hex(body) == x, (status, body[:300])
    status, _, _ = get_blob(c, "app", y)
    assert status == 200
    cluster.wait_for_blobs([x, y])
    before = len(registry_log_synced(registry))
    status, headers, _ = get_blob(b, "app", y)
    assert status == 200 and headers["X-Cache"] == "HIT", (status, dict(headers))
    asked = upstream_requests(registry, before, "app")
    assert asked == [], f"B asked upstream for a blob the bucket had: {asked}\n{b.log()[-2000:]}"


# 2 #############################################################################

def test_concurrent_cold_clients_on_three_instances_cause_one_upstream_get_per_blob(
        make_cluster, registry):
    """8 clients at once over A, B and C, each: the manifest by digest, then every blob (each body hashed).
    Upstream sees exactly one GET per blob; the bucket ends with each object equal to its digest."""
    name, image = "cold", registry.images["cold"]
    cluster = make_cluster(registry.url)
    instances = cluster.start(3)
    before = len(registry_log_synced(registry))
    blobs = blobs_of(image)
    start = threading.Barrier(8)

    def client(number):
        instance = instances[number % 3]
        start.wait(timeout=30)
        status, _, body = instance.request("GET", f"/v2/team/{name}/manifests/{image['digest']}",
                                           {"Accept": OCI_MANIFEST})
        assert status == 200 and sha256_hex(body) == image["digest"], (instance.name, status, body[:300])
        start.wait(timeout=30)  # the blobs asked for at once on all three (a manifest can take longer on one)
        order = blobs[number % len(blobs):] + blobs[:number % len(blobs)]  # not all in the same order
        for digest in order:
            status, _, body = get_blob(instance, name, digest)
            assert status == 200, (instance.name, digest, status, body[:300])
        return instance.name

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        served = [future.result(timeout=120) for future in [pool.submit(client, n) for n in range(8)]]
    assert len(served) == 8 and set(served) == {"a", "b", "c"}

    cluster.wait_for_blobs([image["digest"], *blobs])
    requests = upstream_requests(registry, before, name)
    gets = {digest: [r for r in requests if r[:3] == ("GET", "blobs", digest)] for digest in blobs}
    logs = "\n".join(f"--- {i.name}\n{i.log()[-3000:]}" for i in instances)
    assert {digest: len(found) for digest, found in gets.items()} == {digest: 1 for digest in blobs}, (
        requests, logs)
    check_bucket(cluster, blob_sizes(registry, name))
    # the owners did fill for the others: some blob went from one instance to another
    assert sum(i.metric("dockerproxy_peer_requests_total", result="ok") for i in instances) >= 1, logs


# 3 #############################################################################

class StreamedGet(threading.Thread):
    """A client's GET read to its end or its cut: status, the bytes it got, Content-Length, the error."""

    def __init__(self, instance, path):
        super().__init__(daemon=True)
        self.instance, self.path = instance, path
        self.status = self.length = self.error = None
        self.body = b""

    def run(self):
        connection = http.client.HTTPConnection(self.instance.host, timeout=60)
        try:
            connection.request("GET", self.path)
            response = connection.getresponse()
            self.status, self.length = response.status, response.getheader("Content-Length")
            while True:
                chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
                if not chunk:
                    break
                self.body += chunk
        except (OSError, http.client.HTTPException) as error:
            self.error = error
        finally:
            connection.close()


def test_owner_killed_mid_fill_the_retry_through_another_instance_succeeds(make_cluster, registry):
    """A (the blob's owner by rendezvous_order) is SIGKILLed while its fill for B's client is held
    midway by a relay in front of the registry; the client's new GET through B gets the blob, upstream
    sees at most one more GET of it, the bucket holds nothing partial or wrong, and B marks A down."""
    name, image = "slow", registry.images["slow"]
    digest = image["layers"][0]
    size = blob_sizes(registry, name)[digest]
    relay = HoldingRelay(registry.host)
    try:
        ports = free_ports(3)
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        owner = dockerproxy.rendezvous_order(urls, digest)[0]
        cluster = make_cluster(relay.url)
        instances = cluster.start(3, ports=ports)
        [a] = [i for i in instances if i.url == owner]
        b, c = [i for i in instances if i is not a]
        hold = relay.hold(f"/blobs/{digest}".encode(), after=512 * 1024)
        unreachable_before = b.metric("dockerproxy_peer_requests_total", result="unreachable")

        first = StreamedGet(b, f"/v2/team/{name}/blobs/{digest}")
        first.start()
        assert hold.reached.wait(30), f"no fill of {digest} reached upstream:\n{relay.requests}\n{b.log()}"

        def midway():  # A's fill has bytes, and so has the client (streamed through B's own fill)
            fills = [fill for fill in a.status_json()["cache"]["fills"] if fill["digest"] == digest]
            return bool(fills) and fills[0]["bytes"] > 0 and len(first.body) > 0
        wait_until(midway, timeout=10, what="A's fill of the blob under way, and bytes at the client")
        assert relay.count("GET", digest) == 1
        a.kill()
        first.join(60)
        assert not first.is_alive(), "the client's first GET still hangs after A was killed"
        assert digest not in cluster.blob_objects(), "a blob in the bucket before any fill of it ended"
        if first.status == 200 and first.error is None and len(first.body) == size:
            assert sha256_hex(first.body) == digest  # finished after all: it must be the blob
        else:  # the transfer was cut: never a whole-looking wrong body
            assert len(first.body) < size or first.status != 200, (first.status, len(first.body))

        status, _, body = get_blob(b, name, digest)  # docker's retry: a new GET
        assert status == 200, (status, body[:300], b.log()[-3000:])
        assert relay.count("GET", digest) <= 2, relay.requests
        cluster.wait_for_blobs([digest])  # whoever filled it uploaded it
        status, _, _ = get_blob(c, name, digest)
        assert status == 200
        assert relay.count("GET", digest) <= 2, relay.requests
        gets = [r for r in upstream_requests(registry, 0, name) if r[:3] == ("GET", "blobs", digest)]
        assert len(gets) <= 2, gets
        check_bucket(cluster, {digest: size})

        [seen] = [peer for peer in b.status_json()["shared"]["peers"] if peer["peer"] == a.url]
        assert seen["state"] == "down", seen
        assert b.metric("dockerproxy_peer_requests_total", result="unreachable") > unreachable_before
    finally:
        relay.close()


# 4 #############################################################################

def peer_header(secret, peer, path, timestamp=None, nonce=None):
    """The header a peer sends to `peer` (its PEERS entry) for GET `path`: "<time> <nonce> <signature>"."""
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or os.urandom(16).hex()
    signature = dockerproxy.peer_signature(secret, "GET", peer, path, timestamp, nonce)
    return {dockerproxy.PEER_HEADER: f"{timestamp} {nonce} {signature}"}


def denied(answer, problem):
    status, headers, body = answer
    assert status == 403, (status, body[:300])
    assert headers["Content-Type"].startswith("application/json"), dict(headers)
    [error] = json.loads(body)["errors"]
    assert error["code"] == "DENIED" and problem in error["message"], error


def test_peer_requests_are_checked_and_ignored_without_peers(make_cluster, registry):
    """A wrong PEER_SECRET, a stale timestamp (either way), a proof for another peer, a malformed
    one, a replayed one and a manifest: 403 with a registry error; the right proof: the blob;
    the same header to an instance without PEERS: a client's request like any other."""
    image = registry.images["app"]
    digest = image["layers"][1]
    cluster = make_cluster(registry.url)
    a, b = cluster.start(2)
    [lone] = cluster.start(1, peers=False)
    path = f"/v2/docker.io/team/app/blobs/{digest}"
    wrong = "not-the-peer-secret-at-all"

    denied(a.request("GET", path, peer_header(wrong, a.url, path)), "wrong signature")
    denied(a.request("GET", path, peer_header(cluster.secret, a.url, path, int(time.time()) - 120)),
           "stale timestamp")
    denied(a.request("GET", path, peer_header(cluster.secret, a.url, path, int(time.time()) + 120)),
           "stale timestamp")
    denied(a.request("GET", path, peer_header(cluster.secret, b.url, path)), "wrong signature")  # B's proof
    timestamp = str(int(time.time()))  # the first protocol's form: "<time> <signature>"
    signature = dockerproxy.peer_signature(cluster.secret, "GET", a.url, path, timestamp, "")
    denied(a.request("GET", path, {dockerproxy.PEER_HEADER: f"{timestamp} {signature}"}), "malformed proof")
    assert a.metric("dockerproxy_peer_served_total", result="refused") == 5
    manifest = f"/v2/docker.io/team/app/manifests/{image['digest']}"
    denied(a.request("GET", manifest, {**peer_header(cluster.secret, a.url, manifest), "Accept": OCI_MANIFEST}),
           "blobs only")

    header = peer_header(cluster.secret, a.url, path)
    status, _, body = a.request("GET", path, header)
    assert status == 200 and sha256_hex(body) == digest, (status, body[:300])
    denied(a.request("GET", path, header), "replayed")  # the same proof a second time

    status, _, body = lone.request("GET", path, peer_header(wrong, lone.url, path))
    assert status == 200 and sha256_hex(body) == digest, (status, body[:300])
    status, _, body = lone.request("GET", manifest, {**peer_header(cluster.secret, lone.url, manifest),
                                                     "Accept": OCI_MANIFEST})
    assert status == 200 and sha256_hex(body) == image["digest"], (status, body[:300])


# 5 #############################################################################

def test_a_peer_that_refuses_connections_is_passed_over(make_cluster, registry):
    """PEERS names a port nobody listens on, the owner of the blob: a cold GET on the live instance
    still gets the blob (it asked the dead peer, found it down, filled the blob itself)."""
    image = registry.images["app"]
    digest = image["layers"][0]
    live = free_ports(1)[0]
    for _ in range(200):  # a dead port whose score for the digest beats the live one's (one in two does)
        dead = free_ports(1)[0]
        urls = [f"http://127.0.0.1:{live}", f"http://127.0.0.1:{dead}"]
        if dead != live and dockerproxy.rendezvous_order(urls, digest)[0] == urls[1]:
            break
    else:
        pytest.fail("no free port owning the digest in 200 tries")
    cluster = make_cluster(registry.url)
    [instance] = cluster.start(1, extra_peers=[urls[1]], ports=[live])

    status, _, body = get_blob(instance, "app", digest)
    assert status == 200, (status, body[:300], instance.log()[-3000:])
    assert instance.metric("dockerproxy_peer_requests_total", result="unreachable") == 1
    [dead_peer] = [peer for peer in instance.status_json()["shared"]["peers"] if peer["peer"] == urls[1]]
    assert dead_peer["state"] == "down", dead_peer
