"""Edge cases of the cache and the proxy's own credentials, found in review."""
import http.server
import json
import os
import threading
import time

import pytest

import dockerproxy
from fakeregistry import DOCKER_MANIFEST, FakeRegistry

ACCEPT = {"Accept": DOCKER_MANIFEST}


class Evil:
    """A host the upstream redirects a blob to, answering 401 with its own realm."""

    def __init__(self):
        self.seen = []
        evil = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                evil.seen.append((self.path, self.headers.get("Authorization")))
                if self.path.startswith("/token"):
                    body = json.dumps({"token": "evil"}).encode()
                    self.send_response(200)
                else:
                    body = b"{}"
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="{evil.url}/token",service="x"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_401_from_a_redirect_target_never_chooses_where_credentials_go(start_proxy):
    evil = Evil()
    with FakeRegistry(users={"proxyuser": "pr0xy-pa55"}, private_repos={"team/private"}) as fake:
        fake.add_image("team/private", "1", [b"private layer"])
        public = fake.add_blob("library/alpine", b"public blob")
        fake.redirect_location = lambda digest, repo: f"{evil.url}/blobs/{digest}"
        proxy = start_proxy("--upstream", f"docker={fake.url}",
                            UPSTREAM_DOCKER_USERNAME="proxyuser", UPSTREAM_DOCKER_PASSWORD="pr0xy-pa55")
        status, headers, _ = proxy.request("GET", f"/v2/library/alpine/blobs/{public}")
        assert status == 401 and "WWW-Authenticate" not in headers  # relayed, not our challenge
        status, _, _ = proxy.request("GET", "/v2/team/private/manifests/1", ACCEPT)
        assert status == 200  # the token came from the registry's own realm
        basic = dockerproxy.Credentials("proxyuser", "pr0xy-pa55").basic()
        # At most an anonymous token request to its realm, and its own token back: never ours.
        assert all(auth is None for path, auth in evil.seen if path.startswith("/token")), evil.seen
        assert {auth for _, auth in evil.seen} <= {None, "Bearer evil"}, evil.seen
        assert basic not in str(evil.seen)


@pytest.fixture
def slow_fsync(monkeypatch):
    real = os.fsync

    def fsync(fd):
        time.sleep(1.0)  # a slow disk, injected; not a wait for background work
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_client_asking_on_right_after_its_last_byte_costs_no_upstream_request(start_proxy, slow_fsync):
    with FakeRegistry(auth_required=False) as fake:
        shared = b"shared base layer" * 1000
        fake.add_image("library/a", "1", [shared])
        b = fake.add_image("library/b", "1", [shared, b"own layer"])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        # repository a pulled earlier: the shared layer is cached
        status, _, body = proxy.request("GET", "/v2/library/a/manifests/1", ACCEPT)
        layer = json.loads(body)["layers"][0]["digest"]
        assert proxy.request("GET", f"/v2/library/a/blobs/{layer}")[0] == 200
        assert proxy.cache.wait_idle(), "settled"
        fake.reset_counters()
        # b's manifest by tag, then (as soon as it is complete) the same manifest by digest and the shared layer
        status, _, body = proxy.request("GET", "/v2/library/b/manifests/1", ACCEPT)
        assert status == 200
        status, headers, _ = proxy.request("GET", f"/v2/library/b/manifests/{b['digest']}", ACCEPT)
        assert status == 200
        status, headers, _ = proxy.request("GET", f"/v2/library/b/blobs/{layer}")
        assert status == 200
        manifest_gets = fake.count(method="GET", path_contains="/manifests/")
        layer_heads = fake.count(method="HEAD", path_contains=f"/library/b/blobs/{layer}")
        layer_gets = fake.count(method="GET", path_contains=f"/blobs/{layer}")
        # b's manifest naming the layer proves nothing: one HEAD for b, no download
        assert (manifest_gets, layer_heads, layer_gets) == (1, 1, 0)


def test_a_tag_is_served_with_the_stored_type_not_the_one_a_head_claimed(start_proxy):
    with FakeRegistry(auth_required=False) as fake:
        image = fake.add_image("library/a", "1", [b"layer"])
        real = fake._serve_manifest

        def serve(request, repo, reference):
            reply = real(request, repo, reference)
            if request.method == "HEAD":
                reply.headers = [(k, "application/json" if k == "Content-Type" else v) for k, v in reply.headers]
            return reply
        fake._serve_manifest = serve
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        assert proxy.request("HEAD", "/v2/library/a/manifests/1", ACCEPT)[0] == 200      # containerd resolve
        assert proxy.request("GET", f"/v2/library/a/manifests/{image['digest']}", ACCEPT)[0] == 200
        assert proxy.cache.wait_idle(), "settled"
        status, headers, body = proxy.request("GET", "/v2/library/a/manifests/1", ACCEPT)  # docker
        assert status == 200 and headers["X-Cache"] == "HIT"
        assert headers["Content-Type"] == DOCKER_MANIFEST, headers["Content-Type"]


def test_v2_accepts_the_placeholder_token_on_a_route_with_proxy_credentials(start_proxy):
    with FakeRegistry(users={"proxyuser": "pr0xy-pa55"}) as fake:
        proxy = start_proxy("--upstream", f"docker={fake.url}",
                            UPSTREAM_DOCKER_USERNAME="proxyuser", UPSTREAM_DOCKER_PASSWORD="pr0xy-pa55")
        assert proxy.request("GET", "/v2/")[0] == 401
        status, _, body = proxy.request("GET", "/v2/auth?service=x&scope=repository:library/a:pull")
        token = json.loads(body)["token"]
        status, headers, _ = proxy.request("GET", "/v2/", {"Authorization": f"Bearer {token}"})
        assert status == 200


def test_a_failed_fsync_after_verification_still_serves_every_client(start_proxy, monkeypatch):
    import errno
    with FakeRegistry(auth_required=False) as fake:
        data = b"q" * 3_000_000
        digest = fake.add_blob("library/a", data)
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        real, calls = os.fsync, []

        def fsync(fd):
            calls.append(fd)
            if len(calls) == 1:
                time.sleep(0.5)  # a slow, failing disk, injected
                raise OSError(errno.EIO, "I/O error")
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        results = []
        def get():
            results.append(proxy.request("GET", f"/v2/library/a/blobs/{digest}"))
        threads = [threading.Thread(target=get) for _ in range(3)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert all(s == 200 and b == data for s, _, b in results)
        status, headers, body = proxy.request("GET", f"/v2/library/a/blobs/{digest}")
        assert status == 200 and body == data, status
        assert proxy.cache.wait_idle(), "settled"
        status, headers, body = proxy.request("GET", f"/v2/library/a/blobs/{digest}")
        assert status == 200 and headers["X-Cache"] == "HIT"
        root = proxy.cache.root
        assert not [f for d, _, fs in os.walk(root) for f in fs if f.startswith(".tmp-")]


def test_head_of_a_tag_on_a_full_disk_is_passed_through(start_proxy, monkeypatch):
    import errno
    with FakeRegistry(auth_required=False) as fake:
        fake.add_image("library/a", "1", [b"layer"])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        def write_atomic(path, data):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(dockerproxy, "write_atomic", write_atomic)
        status, headers, body = proxy.request("HEAD", "/v2/library/a/manifests/1", ACCEPT)
        status2, _, _ = proxy.request("GET", "/v2/library/a/manifests/1", ACCEPT)
        assert (status, status2) == (200, 200)


@pytest.mark.parametrize("kind", ["blobs", "manifests", "tags"])
def test_an_object_stored_after_the_request_looked_is_a_hit_not_a_second_fill(start_proxy, monkeypatch, kind):
    """A first client's fill ends (object renamed in, fill removed) between a second
    client's look at the store (or tag index) and its own begin(): the second is
    served from the store, not by a second upstream GET (with a bucket, the look at
    the bucket in between made this window wide enough for the cluster test to hit it)."""
    with FakeRegistry(auth_required=False) as fake:
        image = fake.add_image("library/a", "1", [b"layer" * 1000])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        digest = {"blobs": image["layers"][0], "manifests": image["digest"], "tags": "1"}[kind]
        path = f"/v2/library/a/{'blobs' if kind == 'blobs' else 'manifests'}/{digest}"
        fills = proxy.cache.fills
        looked, method, position = {"blobs": (proxy.cache.store, "exists", 0),
                                    "manifests": (proxy.cache.store, "media_type", 0),
                                    "tags": (proxy.cache, "tag", 2)}[kind]
        real_look, real_copy = getattr(looked, method), fills._copy_verified
        first_looked, go, lookers = threading.Event(), threading.Event(), []

        def look(*args):
            if args[position] != digest or threading.get_ident() in lookers or threading.current_thread().name == "fill":
                return real_look(*args)
            lookers.append(threading.get_ident())
            if len(lookers) == 1:
                first_looked.set()
                return real_look(*args)
            seen = real_look(*args)     # the second client's look: not stored yet...
            go.set()
            assert fills.wait_idle(30)  # ...and the first client's fill ends before it begins its own
            return seen

        def held_copy(*args):
            assert go.wait(30), "the second client looked"
            return real_copy(*args)
        monkeypatch.setattr(looked, method, look)
        monkeypatch.setattr(fills, "_copy_verified", held_copy)
        answers = {}
        first = threading.Thread(target=lambda: answers.setdefault("first", proxy.request("GET", path, ACCEPT)))
        first.start()
        assert first_looked.wait(30)
        status, headers, body = proxy.request("GET", path, ACCEPT)
        first.join(30)
        assert answers["first"][0] == 200 and len(lookers) == 2
        assert status == 200 and body == answers["first"][2]
        gets = fake.count(server="registry", method="GET", path_contains=path.rsplit("/", 1)[0])
        assert (headers["X-Cache"], gets) == ("HIT", 1)
