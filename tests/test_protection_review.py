"""Regression tests of the broken-upstream review of the protection work (issue 12).

Each was seen to fail on the code before its fix:
  * a 429 from a CDN (a redirect target) was remembered for the whole route;
  * "busy" (MAX_UPSTREAM_REQUESTS taken, which clients can cause) counted as
    "upstream down", so Access's stale rule served a repository that had turned
    private;
  * a slot was held through the answer's body, so a client reading slowly held
    the host's slots, and a request whose redirect target keeps its realm on its
    own host needed two slots of that host at once;
  * a redirect whose body stalled left the client with no answer at all (older
    than this work).
"""

import hashlib
import http.client
import json
import socket
import threading
import http.server

from conftest import RegistryClient
from fakeregistry import FakeRegistry
from rawupstream import RawUpstream, response
from test_cache import pull

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_cdn_429_for_one_blob_does_not_hold_back_the_route(proxy, fake):
    first = fake.add_image("library/first", "1", [b"a" * 1000])
    other = fake.add_image("library/other", "1", [b"b" * 1000])
    fake.fault("cdn", first["layers"][0], "status", status=429, retry_after=999999)
    status = RegistryClient(proxy).request("GET", f"/v2/library/first/blobs/{first['layers'][0]}")[0]
    assert status == 429  # the CDN's own answer, relayed
    asked = len(fake.requests)
    status, _, body = RegistryClient(proxy).request("GET", "/v2/library/other/manifests/1",
                                                    {"Accept": other["media_type"]})
    assert status == 200, body
    assert len(fake.requests) > asked  # the registry was asked: its quota is not the CDN's


def turned_private(start_proxy, fake):
    """A public image pulled whole, then made private upstream, ACCESS_TTL ago."""
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--max-upstream-requests", "1",
                        "--connect-timeout", "2")
    image = fake.add_image("library/turned", "1", [b"secret later" * 5000])
    pull(RegistryClient(proxy), "library/turned", "1")
    fake.add_private_repo("library/turned")
    proxy.clock.advance(601)
    return proxy, f"/v2/library/turned/blobs/{image['layers'][0]}"


def test_a_busy_upstream_never_opens_the_cache_to_a_repository_that_turned_private(start_proxy, fake):
    proxy, path = turned_private(start_proxy, fake)
    fake.fault("registry", "/v2/library/other/", "stall")
    holder = threading.Thread(target=proxy.request, args=("GET", "/v2/library/other/tags/list",
                                                          {"Authorization": "Bearer x"}))
    holder.start()  # holds the registry host's only slot, waiting for its answer's head
    try:
        assert fake.wait_stalled(1)
        status, headers, _ = proxy.request("GET", path)
        assert status == 503 and headers["Retry-After"] == "1"
    finally:
        fake.release.set()
        holder.join(30)
    assert proxy.request("GET", path)[0] == 401  # and upstream, asked, refuses


class Upstream(http.server.ThreadingHTTPServer):
    """A registry on 127.0.0.1 whose answers a function writes: handle(handler)."""

    daemon_threads = True

    def __init__(self, handle):
        super().__init__(("127.0.0.1", 0), UpstreamHandler)
        self.handle = handle
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class UpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.handle(self)

    do_HEAD = do_GET


def send(handler, status, body=b"", headers=()):
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": digest_of(b"{}"), "size": 2}, "layers": []}).encode()


def test_a_redirect_target_with_its_realm_on_its_own_host_needs_one_slot(start_proxy):
    """registry.k8s.io's shape: the registry redirects to a host that asks for a
    token from a realm on that same host, while the proxy holds its 401."""
    def target(handler):
        if handler.path.startswith("/token"):
            return send(handler, 200, b'{"token": "good", "expires_in": 300}', [("Content-Type", "application/json")])
        if handler.headers.get("Authorization") == "Bearer good":
            return send(handler, 200, MANIFEST, [("Content-Type", OCI_MANIFEST),
                                                 ("Docker-Content-Digest", digest_of(MANIFEST))])
        realm = f'Bearer realm="http://127.0.0.1:{handler.server.server_address[1]}/token",service="t"'
        send(handler, 401, b'{"errors": []}', [("WWW-Authenticate", realm), ("Content-Type", "application/json")])
    redirected = Upstream(target)

    def origin(handler):
        if handler.path == "/v2/":
            return send(handler, 200, b"{}")
        send(handler, 307, b"", [("Location", redirected.url + handler.path)])
    registry = Upstream(origin)
    proxy = start_proxy("--upstream", f"docker={registry.url}", "--max-upstream-requests", "1",
                        "--connect-timeout", "2")
    status, _, body = proxy.request("GET", "/v2/x/y/manifests/1", {"Accept": OCI_MANIFEST})
    assert status == 200 and body == MANIFEST
    for server in (registry, redirected):
        server.shutdown()
        server.server_close()


def test_a_client_reading_slowly_holds_no_upstream_slot(start_proxy):
    with FakeRegistry(auth_required=False) as fake:
        proxy = start_proxy("--upstream", f"docker={fake.url}", "--max-upstream-requests", "1",
                            "--connect-timeout", "2", "--cache-dir", "")
        big = fake.add_pattern_blob("library/big", 64 * 1024 * 1024, seed=3)
        small = fake.add_image("library/small", "1", [b"s" * 1000])
        reader = socket.create_connection(("127.0.0.1", proxy.port))
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:  # asks for 64 MiB and reads only the head: the relay blocks on the socket
            reader.sendall(f"GET /v2/library/big/blobs/{big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert reader.recv(12) == b"HTTP/1.1 200"
            status, _, body = proxy.request("GET", f"/v2/library/small/blobs/{small['layers'][0]}")
            assert status == 200 and digest_of(body) == small["layers"][0]
        finally:
            reader.close()


def test_a_redirect_whose_body_stalls_is_answered_504(start_proxy):
    release = threading.Event()

    def answer(request, connection):
        connection.sendall(response("307 Temporary Redirect", ["Location: /elsewhere", "Content-Length: 10"], b"x"))
        release.wait(30)
        return False
    with RawUpstream(answer) as upstream:
        proxy = start_proxy("--upstream", f"docker={upstream.url}", "--read-timeout", "1")
        try:
            status, _, body = proxy.request("GET", "/v2/a/b/manifests/1", {"Accept": "*/*"})
        finally:
            release.set()
    assert status == 504 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
