"""Regression tests of a hostile client's review of CACHE_S3, S3_REDIRECT and PEERS (commit e529c27).

Each test is named for the behaviour it expects and failed on e529c27.

1. (high) A repository that was pulled anonymously and then turned private
   opens again to anonymous clients when the cache copies one of its old
   blobs from the bucket, or from a peer: that copy is recorded as if
   upstream had just served the repository to an anonymous client (a new
   anonymous-pull mark), so content pushed after the repository turned
   private, cached by its owner's pull, goes to anyone.
2. (low) A peer proof whose signature holds a non-ASCII byte is an internal
   error (500 and a traceback in the log), not a refused proof.
3. (low) A client ALLOW_CLIENTS refuses gets another answer, a logged
   warning, and learns PEERS is on, by adding any X-Dockerproxy-Peer header.
4. (low) A peer proof seen on the wire between two instances is accepted
   again, by that instance and by every other one, for PEER_SKEW: ALLOW_CLIENTS
   and the rate limits do not apply to whoever replays it.
5. (medium) Uploads to the bucket are not bounded by MAX_FILLS: a fill ends
   before its upload, so a client pulling many blobs while the bucket is slow
   has as many uploads (threads, open files, connections) in flight.
6. (low) Each HEAD of a tag whose manifest is not cached writes the tag's
   entry to the bucket again: one S3 PUT per client HEAD.

Tests 1 (bucket) and 6 need the real S3 server (SeaweedFS, conftest's s3bucket):
a missing one skips loudly, or fails under REQUIRE_INTEROP=1.  The others run
the proxy in this process with the fake upstream (and, for 5, a stand-in S3
server that holds uploads).
"""

import hashlib
import http.server
import socket
import threading
import time

import dockerproxy
from conftest import RegistryClient, raw_request
from fakeregistry import DOCKER_MANIFEST, FakeRegistry
from realregistry import free_port, wait_until

PREFIX = "px"


# Helpers ###################################################################

def s3_settings(server, bucket, **extra):
    return {"CACHE_S3": f"s3://{bucket}/{PREFIX}", "S3_ENDPOINT": server.endpoint,
            "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key, **extra}


def key_of(digest):
    return dockerproxy.blob_key(PREFIX + "/", digest)


def client(proxy, repository, username=None, password=None):
    """A client holding a token for `repository` before its first request (as docker
    does after its /v2/ ping): anonymous without a username, the proxy notes its token
    as anonymous.  (A request without a token would be refused upstream, which
    drops the repository's anonymous-pull mark: not what these tests are about.)"""
    registry_client = RegistryClient(proxy, username, password)
    registry_client.token = registry_client.fetch_token(
        {"realm": f"{proxy.url}/v2/auth", "service": FakeRegistry.service, "scope": f"repository:{repository}:pull"})
    assert registry_client.token, registry_client.token_answers
    return registry_client


def owned_by(peers, owner, label):
    """Blob bytes whose digest the rendezvous order gives to `owner` among `peers`."""
    for number in range(10_000):
        data = f"{label} {number} ".encode() * 100
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if dockerproxy.rendezvous_order(peers, digest)[0] == owner:
            return data
    raise AssertionError("no digest for that owner")


def stays_false(predicate, seconds):
    """True if `predicate` never held while polled for `seconds` (a bound on something that must not happen)."""
    try:
        wait_until(predicate, timeout=seconds, interval=0.02)
    except TimeoutError:
        return True
    return False


def peer_settings(peers, secret, **extra):
    return {"PEERS": ",".join(peers), "PEER_SECRET": secret, **extra}


SECRET = "review-peer-secret-0123456789"


# 1. What a private repository added never reaches anonymous clients #########

def test_a_blob_copied_from_the_bucket_does_not_reopen_a_repository_that_turned_private(
        s3bucket, start_proxy, tmp_path):
    """The Access rule: what is added to a repository after it turned private never
    reaches an anonymous client from the cache.  A copy from the bucket (allowed by
    the cache alone) was recorded as an anonymous pull, a new mark, after which the
    new content went to anyone."""
    server, bucket = s3bucket
    with FakeRegistry(users={"alice": "s3cret"}) as fake:
        old = fake.add_blob("acme/app", b"a layer of the public days " * 100)
        settings = s3_settings(server, bucket)
        a = start_proxy("--cache-dir", str(tmp_path / "a"), "--upstream", f"docker={fake.url}", **settings)
        b = start_proxy("--cache-dir", str(tmp_path / "b"), "--upstream", f"docker={fake.url}", **settings)

        assert client(a, "acme/app").request("GET", f"/v2/acme/app/blobs/{old}")[0] == 200  # public: marked
        assert a.cache.wait_idle(60)
        assert server.head(bucket, key_of(old)) is not None

        fake.add_private_repo("acme/app")                                  # then private,
        new = fake.add_blob("acme/app", b"never public: the release signing key " * 50)
        status, _, _ = client(a, "acme/app", "alice", "s3cret").request("GET", f"/v2/acme/app/blobs/{new}")
        assert status == 200                                               # its owner pulls a new layer
        assert a.cache.wait_idle(60)
        assert server.head(bucket, key_of(new)) is not None

        anonymous = client(b, "acme/app")
        # The old layer, which the repository held while public, may still go out
        # (within ACCESS_TTL): B copies it from the bucket.
        status, _, body = anonymous.request("GET", f"/v2/acme/app/blobs/{old}")
        assert status in (200, 401)
        assert b.cache.wait_idle(60)
        # The new one must not, from either instance.
        for proxy in (b, a):
            status, _, body = proxy.request("GET", f"/v2/acme/app/blobs/{new}",
                                            {"Authorization": f"Bearer {anonymous.token}"})
            assert status == 401 and b"signing key" not in body, (proxy.url, status, body[:80])


def test_a_blob_a_peer_served_does_not_reopen_a_repository_that_turned_private(start_proxy, tmp_path):
    """The same with PEERS (no bucket): B copies an old layer from its owner A, which
    A may serve from its cache; B recorded that as an anonymous pull of its own."""
    with FakeRegistry(users={"alice": "s3cret"}) as fake:
        ports = [free_port(), free_port()]
        peers = tuple(sorted(f"http://127.0.0.1:{port}" for port in ports))
        url_a, url_b = (f"http://127.0.0.1:{port}" for port in ports)
        old = fake.add_blob("acme/app", owned_by(peers, url_a, "a layer of the public days"))

        def start(port, name):
            return start_proxy("--port", str(port), "--cache-dir", str(tmp_path / name),
                               "--upstream", f"docker={fake.url}", **peer_settings(peers, SECRET))
        a, b = start(ports[0], "a"), start(ports[1], "b")

        assert client(a, "acme/app").request("GET", f"/v2/acme/app/blobs/{old}")[0] == 200  # public: marked on A
        assert a.cache.wait_idle(60)

        fake.add_private_repo("acme/app")
        new = fake.add_blob("acme/app", owned_by(peers, url_b, "never public: the release signing key"))
        status, _, _ = client(b, "acme/app", "alice", "s3cret").request("GET", f"/v2/acme/app/blobs/{new}")
        assert status == 200                                              # its owner pulls it through B
        assert b.cache.wait_idle(60)

        anonymous = client(b, "acme/app")
        status, _, _ = anonymous.request("GET", f"/v2/acme/app/blobs/{old}")  # B asks A, which may serve it
        assert status in (200, 401)
        assert b.cache.wait_idle(60)
        status, _, body = anonymous.request("GET", f"/v2/acme/app/blobs/{new}")
        assert status == 401 and b"signing key" not in body, (status, body[:80])


# 2-4. Peer proofs ##########################################################

def test_a_peer_proof_with_a_non_ascii_signature_is_refused_not_an_internal_error(start_proxy, fake, caplog, tmp_path):
    port = free_port()
    proxy = start_proxy("--port", str(port), "--upstream", f"docker={fake.url}",
                        **peer_settings([f"http://127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}"], SECRET))
    digest = fake.add_blob("library/pub", b"public bytes")
    answer = raw_request(proxy, (f"GET /v2/docker.io/library/pub/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 f"X-Dockerproxy-Peer: {int(time.time())} ").encode() + b"\xe9" * 64 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text


def test_a_forged_peer_header_changes_nothing_for_a_client_allow_clients_refuses(start_proxy, fake):
    port = free_port()
    proxy = start_proxy("--port", str(port), "--upstream", f"docker={fake.url}", ALLOW_CLIENTS="10.9.9.9/32",
                        **peer_settings([f"http://127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}"], SECRET))
    digest = fake.add_blob("library/pub", b"public bytes")
    path = f"/v2/docker.io/library/pub/blobs/{digest}"
    plain = proxy.request("GET", path)
    forged = proxy.request("GET", path, {"X-Dockerproxy-Peer": f"{int(time.time())} {'0' * 64}"})
    assert plain[0] == 403 and b"does not serve your address" in plain[2]
    assert (forged[0], forged[2]) == (plain[0], plain[2]), forged[2]


class Recorder:
    """A TCP relay on a free loopback port to 127.0.0.1:`port` that keeps every
    request head it passes on (what anyone on the network between two peers sees)."""

    def __init__(self, port):
        self.target = ("127.0.0.1", port)
        self.heads = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                incoming, _ = self.listener.accept()
                outgoing = socket.create_connection(self.target, timeout=10)
            except OSError:
                return
            outgoing.settimeout(None)
            self.sockets += [incoming, outgoing]
            threading.Thread(target=self._pipe, args=(incoming, outgoing, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(outgoing, incoming, False), daemon=True).start()

    def _pipe(self, source, sink, requests):
        pending = b""
        try:
            for data in iter(lambda: source.recv(65536), b""):
                if requests:
                    pending += data
                    while b"\r\n\r\n" in pending:
                        head, pending = pending.split(b"\r\n\r\n", 1)
                        self.heads.append(head.decode("latin-1"))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        for sock in [self.listener] + self.sockets:
            sock.close()


def test_a_peer_proof_seen_on_the_wire_is_not_accepted_again(start_proxy, fake, tmp_path):
    """Anyone who sees B's request to A (plain HTTP between instances) could send
    the same request again for PEER_SKEW, to A or to any other instance, from an
    address ALLOW_CLIENTS refuses and past the rate limits."""
    port_a, port_b = free_port(), free_port()
    wire = Recorder(port_a)                 # A's entry of PEERS is the relay: B's requests to A pass through it
    try:
        url_a, url_b = wire.url, f"http://127.0.0.1:{port_b}"
        peers = tuple(sorted((url_a, url_b)))
        digest = fake.add_blob("library/pub", owned_by(peers, url_a, "public bytes"))
        closed = {"ALLOW_CLIENTS": "10.9.9.9/32", "RATE_LIMIT_REQUESTS": "1"}   # this test's client: refused
        a = start_proxy("--port", str(port_a), "--cache-dir", str(tmp_path / "a"), "--upstream",
                        f"docker={fake.url}", **peer_settings(peers, SECRET, PEER_SELF=url_a, **closed))
        b = start_proxy("--port", str(port_b), "--cache-dir", str(tmp_path / "b"), "--upstream",
                        f"docker={fake.url}", **peer_settings(peers, SECRET))
        assert a.request("GET", f"/v2/library/pub/blobs/{digest}")[0] == 403    # A refuses this client

        status, headers, _ = client(b, "library/pub").request("GET", f"/v2/library/pub/blobs/{digest}")
        assert status == 200 and b.server.proxy.metrics.value("dockerproxy_peer_requests_total", ("ok",)) == 1
        seen = [head for head in wire.heads if "x-dockerproxy-peer:" in head.lower()]
        assert len(seen) == 1, wire.heads
        target = seen[0].split("\r\n")[0].split(" ")[1]
        proof = [line.split(":", 1)[1].strip() for line in seen[0].split("\r\n")[1:]
                 if line.lower().startswith("x-dockerproxy-peer:")][0]

        for proxy in (a, a, b):             # replayed to A, again, and to B
            status, _, body = proxy.request("GET", target, {"X-Dockerproxy-Peer": proof})
            assert status == 403, (proxy.url, status, body[:80])
    finally:
        wire.close()


# 5. Uploads in flight ######################################################

class HoldingS3(http.server.BaseHTTPRequestHandler):
    """Just enough S3 for the proxy's start (an empty bucket, no uploads), answering
    at once but for blob uploads (PUT .../blobs/...), held until `release` is set."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if "uploads" in self.path:
            return self.answer(200, b"<ListMultipartUploadsResult><IsTruncated>false</IsTruncated>"
                                    b"</ListMultipartUploadsResult>")
        if "list-type=2" in self.path:
            return self.answer(200, b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>")
        self.answer(404, b"<Error><Code>NoSuchKey</Code></Error>")

    def do_HEAD(self):
        self.answer(404)

    def do_DELETE(self):
        self.answer(204)

    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        state = self.server.state
        if "/blobs/" in self.path:
            with state["lock"]:
                state["held"] += 1
                state["most"] = max(state["most"], state["held"])
            state["release"].wait(60)
            with state["lock"]:
                state["held"] -= 1
                state["uploaded"].add(hashlib.sha256(body).hexdigest())
        self.answer(200, headers=[("ETag", '"etag"')])


def test_uploads_in_flight_are_bounded_by_max_fills(start_proxy, fake):
    state = {"lock": threading.Lock(), "held": 0, "most": 0, "release": threading.Event(), "uploaded": set()}
    s3 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HoldingS3)
    s3.daemon_threads = True
    s3.state = state
    threading.Thread(target=s3.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        proxy = start_proxy("--upstream", f"docker={fake.url}", MAX_FILLS="2",
                            CACHE_S3="s3://bucket/px", S3_ENDPOINT=f"http://127.0.0.1:{s3.server_address[1]}",
                            AWS_ACCESS_KEY_ID="AKIAREVIEW", AWS_SECRET_ACCESS_KEY="review-secret-key")
        digests = [fake.add_blob("library/pub", f"blob {number} ".encode() * 100) for number in range(6)]
        anonymous = client(proxy, "library/pub")
        for digest in digests:              # one after the other: never more than one fill at once
            assert anonymous.request("GET", f"/v2/library/pub/blobs/{digest}")[0] == 200
            # (its fsync and rename end after the client's last byte: the next one gets a fill too)
            assert proxy.cache.fills.wait_idle(30)
        wait_until(lambda: state["held"] >= 1, timeout=30, what="a first upload")
        assert stays_false(lambda: state["most"] > 2, 2.0), f"{state['most']} uploads in flight with MAX_FILLS=2"
        state["release"].set()
        wait_until(lambda: {digest.partition(":")[2] for digest in digests} <= state["uploaded"], timeout=60,
                   what="every blob uploaded once the bucket answers")
        assert proxy.cache.wait_idle(60)
    finally:
        state["release"].set()
        s3.shutdown()
        s3.server_close()


# 6. Bucket writes per client request #######################################

def test_heads_of_an_uncached_tag_do_not_write_the_bucket_each_time(s3bucket, start_proxy, fake):
    server, bucket = s3bucket
    fake.add_image("library/pub", "v1", [b"public layer"])
    proxy = start_proxy("--upstream", f"docker={fake.url}", **s3_settings(server, bucket))
    metrics = proxy.server.proxy.metrics
    anonymous = client(proxy, "library/pub")
    before = metrics.value("dockerproxy_s3_requests_total", ("put", "ok"))
    for _ in range(5):
        status, headers, _ = anonymous.request("HEAD", "/v2/library/pub/manifests/v1", {"Accept": DOCKER_MANIFEST})
        assert status == 200 and headers["Docker-Content-Digest"]
    puts = metrics.value("dockerproxy_s3_requests_total", ("put", "ok")) - before
    assert puts <= 1, f"{puts:g} PUTs to the bucket for 5 HEADs of one tag"
