"""Regression tests of the two attacker reviews of the protection work (issue 12).

Each was seen to fail on the code before its fix:
  * a 429 from a CDN (a redirect target) was remembered for the whole route;
  * "busy" (MAX_UPSTREAM_REQUESTS taken, which clients can cause) counted as
    "upstream down", so Access's stale rule served a repository that had turned
    private;
  * a slot was held through the answer's body, so a client reading slowly held
    the host's slots, and a request whose redirect target keeps its realm on its
    own host needed two slots of that host at once;
  * a redirect whose body stalled left the client with no answer at all (older
    than this work);
and of the hostile-client review: bytes of a download cut short were never
charged; a second registry prefix, odd scope forms and long scope names got
past the image policy (Python 3.8's fnmatch took seconds on them); a 429 on a
tag list held back a whole route; made-up credentials could push the
anonymous back-off out; patterns that match nothing were taken silently.
"""

import fnmatch
import hashlib
import http.server
import itertools
import json
import re
import socket
import threading

import pytest

import dockerproxy
from conftest import MovableClock, RegistryClient, proxy_config
from fakeregistry import FakeRegistry
from rawupstream import RawUpstream, response
from realregistry import wait_until
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


# The hostile-client review ###################################################

def sourced_connection(proxy, source):
    """A connection to the proxy from `source`, any 127.x address (its own client)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", proxy.port))
    return sock


def test_a_download_cut_short_by_its_client_is_charged_what_it_received(start_proxy):
    """Bytes sent with sendfile were counted only once the whole part went, so a
    client that hung up near the end was never charged (RATE_LIMIT_BYTES)."""
    with FakeRegistry(auth_required=False) as fake:
        size = 64 * 1024 * 1024
        digest = fake.add_pattern_blob("library/big", size)
        proxy = start_proxy("--upstream", f"docker={fake.url}", "--rate-limit-bytes", "8M",
                            "--rate-limit-exempt", "127.0.0.1")
        path = f"/v2/library/big/blobs/{digest}"
        assert len(proxy.request("GET", path)[2]) == size  # cached by an exempt client
        limits, received = proxy.server.proxy.limits, 0
        with sourced_connection(proxy, "127.0.0.2") as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            while received < 32 * 1024 * 1024:
                received += len(sock.recv(1 << 20))
        wait_until(lambda: limits._budgets["127.0.0.2"].balance < 0, what="the cut download charged")
        assert limits._budgets["127.0.0.2"].balance <= 8 * 1024 * 1024 - received
        with sourced_connection(proxy, "127.0.0.2") as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\n\r\n".encode())
            assert sock.recv(12) == b"HTTP/1.1 429"


def test_a_second_registry_prefix_cannot_slip_a_denied_image_past_the_policy(start_proxy, fake):
    """An upstream that takes path prefixes (another mirror) serves
    docker.io/docker.io/library/evil as docker.io/library/evil."""
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--deny-images", "docker.io/library/evil")
    for path in ("/v2/library/evil/manifests/1", "/v2/docker.io/docker.io/library/evil/manifests/1"):
        status, _, body = proxy.request("GET", path)
        assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED", path
    assert not fake.requests


@pytest.mark.parametrize("scope", [
    "Repository:library/evil:pull",            # the type in another case
    "repository(plugin):library/evil:pull",    # a classed type
    "repository:library//evil:pull",           # names no registry has: 400, never asked upstream
    "repository:library/evil/:pull",
    "repository:" + "a/" * 2000 + "b:pull",    # and a long one, which no glob may backtrack on
], ids=["case", "class", "empty-part", "trailing-slash", "long"])
def test_every_form_of_a_repository_scope_is_judged_before_the_token_service(start_proxy, fake, scope):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--deny-images", "docker.io/*/*/*evil*,"
                        "docker.io/library/evil")
    status, _, body = proxy.request("GET", "/v2/auth?service=x&scope=" + scope)
    assert status in (400, 403), body
    assert not fake.token_requests and not fake.requests


def test_a_429_on_a_tag_list_holds_back_nobody(proxy, fake):
    image = fake.add_image("library/other", "1", [b"o" * 1000])
    fake.fault("registry", "/tags/list", "status", status=429, retry_after=3600)
    client = RegistryClient(proxy)
    assert client.request("GET", "/v2/library/some/tags/list")[0] == 429
    status, _, body = RegistryClient(proxy).request("GET", "/v2/library/other/manifests/1",
                                                    {"Accept": image["media_type"]})
    assert status == 200, body


def test_a_spray_of_made_up_credentials_never_pushes_out_the_anonymous_back_off():
    backoff = dockerproxy.UpstreamBackoff(MovableClock(), limit=10)
    backoff.note("https://hub", None, "600")
    for number in range(100):
        backoff.note("https://hub", f"made-up-{number}", "3600")
    assert backoff.remaining("https://hub", None) > 590


@pytest.mark.parametrize("pattern, message", [
    ("docker.io/evil", "docker.io/library/evil"),       # one segment on Docker Hub: a hint
    ("127.0.0.1:5000/evil/*", "names no registry"),     # not the debug target's name
])
def test_patterns_that_would_match_nothing_stop_start_up(tmp_path, pattern, message):
    with pytest.raises(dockerproxy.ConfigError, match=re.escape(message)):
        proxy_config(tmp_path, "--deny-images", pattern, "--mode", "debug",
                     "--target-upstream", "http://127.0.0.1:6000")


def test_in_debug_mode_patterns_name_the_target(start_proxy, fake):
    target = fake.url.partition("://")[2]
    proxy = start_proxy("--mode", "debug", "--target-upstream", fake.url, "--deny-images", f"{target}/library/evil")
    assert proxy.request("GET", "/v2/library/evil/manifests/1")[0] == 403
    assert not fake.requests


def test_globs_match_as_fnmatch_does_on_the_names_a_pattern_can_meet():
    """Our linear glob against fnmatch's, on every pattern and name of a small alphabet."""
    alphabet, names = "ab/*?[]!", ["", "a", "b", "/", "ab", "a/b", "b/a", "aab/", "a/ab/b", "[", "!", "]"]
    patterns = {"".join(p) for p in itertools.product(alphabet, repeat=3)} | {
        "a*b*a", "*/*", "[!a]*", "[]a]b", "*a?*", "a[b"}
    for pattern in patterns:
        try:
            ours, theirs = re.compile(dockerproxy.glob_regex(pattern)), re.compile(fnmatch.translate(pattern))
        except re.error:
            continue
        for name in names:
            assert bool(ours.match(name)) == bool(theirs.match(name)), (pattern, name)


# The final review ############################################################

@pytest.mark.parametrize("name", ["docker.io/docker.io/library/evil", "docker.io/docker.io/evil",
                                  "docker.io/index.docker.io/library/evil", "docker.io/registry-1.docker.io/evil",
                                  "docker.io/docker.io/docker.io/evil"])
def test_every_spelling_of_a_denied_image_behind_a_second_prefix_is_refused(start_proxy, fake, name):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--deny-images", "docker.io/library/evil")
    assert proxy.request("GET", f"/v2/{name}/manifests/1")[0] == 403
    assert proxy.request("GET", f"/v2/auth?service=x&scope=repository:{name}:pull")[0] == 403
    assert not fake.requests and not fake.token_requests


def test_without_a_byte_limit_a_full_limiter_still_forgets_clients_that_received_bytes():
    limits = dockerproxy.ClientLimits(10, 0, 0, (), MovableClock(), max_clients=4)
    for number in range(3):
        key = limits.admit(limits.key(f"10.0.0.{number}"), False)
        limits.done(key, 100, False)
    limits.clock.advance(dockerproxy.REQUEST_WINDOW)
    newcomer = limits.key("10.0.1.1")
    assert limits.admit(newcomer, False) == newcomer  # its own budget, not the shared overflow
