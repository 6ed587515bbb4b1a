"""End-to-end tests through real sockets: the proxy in a thread, the fake Docker Hub upstream."""

import hashlib
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import dockerproxy
from conftest import ROOT, RegistryClient, RunningProxy, start_proxy_process
from fakeregistry import DOCKER_MANIFEST, FakeRegistry
from realregistry import free_port, wait_until

MANIFEST_ACCEPT = {"Accept": DOCKER_MANIFEST}


def errors_of(body):
    return [error["code"] for error in json.loads(body)["errors"]]


# Endpoints ##################################################################

def test_root_redirects_to_v2(proxy, fake):
    status, headers, _ = proxy.request("GET", "/")
    assert status == 301 and headers["Location"] == "/v2/"
    assert fake.count() == 0


@pytest.mark.parametrize("path", ["/healthz", "/health"])
def test_health_answers_without_contacting_upstream(proxy, fake, path):
    status, headers, body = proxy.request("GET", path)
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert headers["Content-Type"] == "application/json"
    assert fake.count() == 0


def test_routes_lists_the_route_table(start_proxy, fake):
    proxy = start_proxy("--custom-domain", "example.com", "--upstream", f"docker={fake.url}")
    status, _, body = proxy.request("GET", "/routes")
    table = json.loads(body)
    assert status == 200
    assert table["routes"]["docker.example.com"] == fake.url
    assert table["routes"]["ghcr.example.com"] == "https://ghcr.io"
    assert table["routes"]["registry.docker.example.com"] == fake.url
    assert table["registries"]["ghcr.io"] == "https://ghcr.io"
    assert table["default_route"] == "docker"
    assert fake.count() == 0


def test_unknown_host_without_default_route_gets_404_with_routes(start_proxy, fake):
    proxy = start_proxy("--custom-domain", "example.com", "--default-route", "")
    status, _, body = proxy.request("GET", "/v2/library/a/manifests/1", host="other.org")
    assert status == 404
    assert json.loads(body)["routes"]["quay.example.com"] == "https://quay.io"


# Routing ####################################################################

@pytest.fixture
def two_registries(start_proxy):
    """Docker Hub route -> one fake, ghcr route -> another, on one proxy."""
    with FakeRegistry() as hub, FakeRegistry() as ghcr:
        hub.add_image("library/alpine", "3", [b"hub layer"])
        ghcr.add_image("owner/app", "1", [b"ghcr layer"])
        proxy = start_proxy("--custom-domain", "example.com",
                            "--upstream", f"docker={hub.url}", "--upstream", f"ghcr={ghcr.url}")
        yield proxy, hub, ghcr


@pytest.mark.parametrize("host, path", [
    ("ghcr.example.com:8080", "/v2/owner/app/manifests/1"),
    ("ghcr.registry.docker.example.com", "/v2/owner/app/manifests/1"),
    (None, "/v2/owner/app/manifests/1?ns=ghcr.io"),
    (None, "/v2/ghcr.io/owner/app/manifests/1"),
])
def test_host_ns_and_prefix_routes_reach_their_upstream_and_its_realm(two_registries, host, path):
    proxy, hub, ghcr = two_registries
    client = RegistryClient(proxy, host=host)
    status, headers, body = client.request("GET", path, MANIFEST_ACCEPT)
    assert status == 200, body
    assert json.loads(body)["layers"][0]["digest"] == ghcr.add_blob("owner/app", b"ghcr layer")
    assert hub.count() == 0, "nothing may reach the Docker Hub route"
    assert ghcr.token_requests[-1]["scopes"] == ["repository:owner/app:pull"]


def test_default_route_serves_docker_hub_mirror_requests(two_registries):
    proxy, hub, ghcr = two_registries
    status, _, body = RegistryClient(proxy).request("GET", "/v2/library/alpine/manifests/3", MANIFEST_ACCEPT)
    assert status == 200 and json.loads(body)["schemaVersion"] == 2
    assert ghcr.count() == 0


@pytest.mark.parametrize("path, host", [
    ("/v2/library/alpine/manifests/3?ns=evil.example.org", None),
    ("/v2/evil.example.org/x/manifests/3", None),
    ("/v2/127.0.0.1:1/x/manifests/3", None),
    ("/v2/owner/app/manifests/1?ns=ghcr.io", "docker.example.com"),
    ("/v2/auth?ns=evil.example.org&scope=repository:x:pull&service=x", None),
])
def test_unknown_registry_is_refused_and_nothing_is_contacted(two_registries, path, host):
    proxy, hub, ghcr = two_registries
    status, _, body = proxy.request("GET", path, host=host)
    assert status == 403 and errors_of(body) == ["DENIED"]
    assert hub.count() == 0 and ghcr.count() == 0


def test_query_strings_are_forwarded(proxy, fake):
    for tag in ("a", "b", "c"):
        fake.add_image("library/alpine", tag, [tag.encode()])
    status, headers, body = RegistryClient(proxy).request("GET", "/v2/library/alpine/tags/list?n=1&last=a")
    assert status == 200 and json.loads(body)["tags"] == ["b"]
    assert "last=b" in headers["Link"]
    listed = [r for r in fake.requests if r["path"].endswith("/tags/list")]
    assert listed[-1]["query"] == {"n": ["1"], "last": ["a"]}


def test_path_prefix_is_put_back_in_pagination_links(two_registries):
    proxy, hub, ghcr = two_registries
    ghcr.add_image("owner/app", "2", [b"two"])
    status, headers, _ = RegistryClient(proxy).request("GET", "/v2/ghcr.io/owner/app/tags/list?n=1")
    assert status == 200 and headers["Link"].startswith("</v2/ghcr.io/owner/app/tags/list?")


# Auth #######################################################################

def test_v2_challenge_names_our_realm_at_the_host_and_port_the_client_used(proxy, fake):
    status, headers, body = proxy.request("GET", "/v2/", host="mirror.example:5443")
    assert status == 401 and errors_of(body) == ["UNAUTHORIZED"]
    scheme, params = dockerproxy.parse_challenge(headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params == {"realm": "http://mirror.example:5443/v2/auth", "service": fake.service}


def test_forwarded_headers_are_ignored_unless_trusted(start_proxy, fake):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "docker.example.com"}
    untrusted = start_proxy("--upstream", f"docker={fake.url}")
    _, headers, _ = untrusted.request("GET", "/v2/", forwarded)
    assert dockerproxy.parse_challenge(headers["WWW-Authenticate"])[1]["realm"] == f"http://{untrusted.host}/v2/auth"
    trusted = start_proxy("--upstream", f"docker={fake.url}", "--trust-proxy-headers")
    _, headers, _ = trusted.request("GET", "/v2/", forwarded)
    assert dockerproxy.parse_challenge(headers["WWW-Authenticate"])[1]["realm"] == "https://docker.example.com/v2/auth"


def test_challenge_parsing_does_not_depend_on_parameter_order(start_proxy):
    with FakeRegistry(challenge_order=["scope", "service", "realm"],
                      challenge_extra={"error": "insufficient_scope"}) as fake:
        fake.add_image("library/alpine", "3", [b"x"])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        status, _, _ = RegistryClient(proxy).request("GET", "/v2/library/alpine/manifests/3", MANIFEST_ACCEPT)
        assert status == 200
        assert fake.token_requests[-1]["service"] == fake.service


def test_manifest_401_challenge_carries_scope_and_a_token_works(proxy, fake):
    fake.add_image("library/alpine", "3", [b"x"])
    status, headers, _ = proxy.request("HEAD", "/v2/library/alpine/manifests/3", MANIFEST_ACCEPT)
    assert status == 401
    params = dockerproxy.parse_challenge(headers["WWW-Authenticate"])[1]
    assert params["scope"] == "repository:library/alpine:pull"
    assert params["realm"] == f"http://{proxy.host}/v2/auth"
    status, headers, body = RegistryClient(proxy).request("HEAD", "/v2/library/alpine/manifests/3", MANIFEST_ACCEPT)
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_ns_route_challenge_realm_keeps_the_route(two_registries):
    proxy, hub, ghcr = two_registries
    status, headers, _ = proxy.request("HEAD", "/v2/owner/app/manifests/1?ns=ghcr.io")
    realm = dockerproxy.parse_challenge(headers["WWW-Authenticate"])[1]["realm"]
    assert realm == f"http://{proxy.host}/v2/auth?ns=ghcr.io"


def test_token_keeps_every_scope_and_adds_library(proxy, fake):
    path = "/v2/auth?service=x&scope=repository:library/nginx:pull&scope=repository:nginx:pull&scope=repository:user/app:pull"
    status, headers, body = proxy.request("GET", path)
    assert status == 200 and json.loads(body)["token"]
    assert fake.token_requests[-1]["scopes"] == ["repository:library/nginx:pull", "repository:user/app:pull"]
    assert fake.token_requests[-1]["service"] == fake.service


def test_token_with_path_prefix_scope_goes_to_that_registry(two_registries):
    proxy, hub, ghcr = two_registries
    status, _, _ = proxy.request("GET", "/v2/auth?service=registry.docker.io&scope=repository:ghcr.io/owner/app:pull")
    assert status == 200
    assert ghcr.token_requests[-1]["scopes"] == ["repository:owner/app:pull"]
    assert hub.token_requests == []


@pytest.mark.parametrize("post", [False, True])
def test_client_credentials_reach_the_realm_for_a_private_repository(start_proxy, post):
    with FakeRegistry(users={"alice": "s3cret"}, private_repos={"alice/private"}) as fake:
        fake.add_image("alice/private", "1", [b"secret layer"])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        path = "/v2/alice/private/manifests/1"
        status, _, _ = RegistryClient(proxy, post=post).request("GET", path, MANIFEST_ACCEPT)
        assert status == 401
        wrong = RegistryClient(proxy, "alice", "wrong", post=post)
        assert wrong.request("GET", path, MANIFEST_ACCEPT)[0] == 401
        assert wrong.token_answers[-1][0] == 401
        client = RegistryClient(proxy, "alice", "s3cret", post=post)
        status, _, body = client.request("GET", path, MANIFEST_ACCEPT)
        assert status == 200 and json.loads(body)["schemaVersion"] == 2
        assert fake.token_requests[-1]["username"] == "alice"
        assert fake.token_requests[-1]["method"] == ("POST" if post else "GET")


def test_auth_for_an_upstream_without_auth_gives_a_token_that_is_never_forwarded(start_proxy):
    with FakeRegistry(auth_required=False) as fake:
        fake.add_image("library/alpine", "3", [b"x"])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        status, _, body = proxy.request("GET", "/v2/auth?scope=repository:library/alpine:pull")
        token = json.loads(body)["token"]
        status, _, _ = proxy.request("GET", "/v2/library/alpine/manifests/3",
                                     {"Authorization": f"Bearer {token}", **MANIFEST_ACCEPT})
        assert status == 200
        assert "authorization" not in fake.requests[-1]["headers"]


# Docker Hub library redirect ################################################

@pytest.mark.parametrize("path, location", [
    ("/v2/busybox/manifests/latest", "/v2/library/busybox/manifests/latest"),
    ("/v2/busybox/tags/list?n=5", "/v2/library/busybox/tags/list?n=5"),
    ("/v2/busybox/blobs/sha256:" + "b" * 64 + "?ns=docker.io", "/v2/library/busybox/blobs/sha256:" + "b" * 64 + "?ns=docker.io"),
])
def test_one_segment_docker_hub_names_redirect_to_library(proxy, fake, path, location):
    status, headers, _ = proxy.request("GET", path)
    assert status == 301 and headers["Location"] == location
    assert fake.count() == 0


def test_other_routes_do_not_get_the_library_redirect(two_registries):
    proxy, hub, ghcr = two_registries
    ghcr.add_image("app", "1", [b"x"])
    status, _, _ = RegistryClient(proxy).request("GET", "/v2/ghcr.io/x/manifests/1")
    status, _, _ = RegistryClient(proxy, host="ghcr.example.com").request("GET", "/v2/app/manifests/1", MANIFEST_ACCEPT)
    assert status == 200


# Redirects and streaming ####################################################

def test_blob_redirect_to_cdn_is_followed_without_authorization(proxy, fake):
    digest = fake.add_blob("library/alpine", b"layer bytes" * 1000)
    status, headers, body = RegistryClient(proxy).request("GET", f"/v2/library/alpine/blobs/{digest}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest.split(":")[1]
    cdn = [r for r in fake.requests if r["server"] == "cdn"]
    assert cdn and all("authorization" not in r["headers"] for r in cdn)
    assert "Location" not in headers


@pytest.mark.parametrize("mode", ["relative", "chain"])
def test_relative_and_chained_redirects_are_followed(start_proxy, mode):
    with FakeRegistry(redirect_mode=mode, redirect_hops=3) as fake:
        digest = fake.add_blob("library/alpine", b"z" * 5000)
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        status, _, body = RegistryClient(proxy).request("GET", f"/v2/library/alpine/blobs/{digest}")
        assert status == 200 and len(body) == 5000


def test_endless_redirects_end_in_502(start_proxy):
    with FakeRegistry(redirect_mode="chain", redirect_hops=dockerproxy.MAX_REDIRECTS + 2) as fake:
        digest = fake.add_blob("library/alpine", b"z")
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        status, _, body = RegistryClient(proxy).request("GET", f"/v2/library/alpine/blobs/{digest}")
        assert status == 502 and errors_of(body) == ["UNAVAILABLE"]


def test_range_survives_the_cdn_redirect(proxy, fake):
    digest = fake.add_blob("library/alpine", bytes(range(256)) * 10)
    status, headers, body = RegistryClient(proxy).request(
        "GET", f"/v2/library/alpine/blobs/{digest}", {"Range": "bytes=10-19"})
    assert status == 206 and body == bytes(range(10, 20))
    assert headers["Content-Range"] == "bytes 10-19/2560"
    assert [r for r in fake.requests if r["server"] == "cdn"][-1]["headers"]["range"] == "bytes=10-19"


class ScriptedUpstreams(dockerproxy.Upstreams):
    """Upstreams whose send() answers from a script: tests the redirect policy alone."""

    def __init__(self, script):
        super().__init__(1, 1)
        self.script = script
        self.sent = []

    def send(self, method, url, headers, body=None, purpose=("-", "")):
        self.sent.append((method, url, dict(headers)))
        status, location = self.script[len(self.sent) - 1]
        response = http.client.HTTPResponse(socket.socket())
        response.status = status
        response.headers = http.client.HTTPMessage()
        if location:
            response.headers["Location"] = location
        answer = dockerproxy.UpstreamResponse(response, None, self, url, method)
        answer.read_small = lambda limit=0: b""
        return answer


def test_redirect_policy_drops_authorization_off_host_keeps_range_and_refuses_downgrade():
    upstreams = ScriptedUpstreams([(307, "/other/path"), (302, "https://cdn.example/blob?sig=1"), (200, None)])
    headers = {"authorization": "Bearer t", "range": "bytes=1-", "accept": "x/y"}
    response = upstreams.fetch("GET", "https://registry.example/v2/a/blobs/d", headers)
    assert response.status == 200
    (_, url1, h1), (_, url2, h2), (_, url3, h3) = upstreams.sent
    assert url2 == "https://registry.example/other/path" and h2["authorization"] == "Bearer t"
    assert url3 == "https://cdn.example/blob?sig=1" and "authorization" not in h3
    assert h3["range"] == "bytes=1-" and h3["accept"] == "x/y"
    downgrade = ScriptedUpstreams([(307, "http://cdn.example/blob"), (200, None)])
    with pytest.raises(dockerproxy.UpstreamUnavailable):
        downgrade.fetch("GET", "https://registry.example/v2/a/blobs/d", headers)
    assert len(downgrade.sent) == 1
    elsewhere = ScriptedUpstreams([(307, "file:///etc/passwd")])
    with pytest.raises(dockerproxy.UpstreamUnavailable):
        elsewhere.fetch("GET", "https://registry.example/v2/a/blobs/d", headers)


def test_head_answers_headers_without_body(proxy, fake):
    digest = fake.add_blob("library/alpine", b"q" * 12345)
    status, headers, body = RegistryClient(proxy).request("HEAD", f"/v2/library/alpine/blobs/{digest}")
    assert status == 200 and body == b"" and headers["Content-Length"] == "12345"
    assert headers["Docker-Content-Digest"] == digest


def test_truncated_upstream_body_closes_the_client_connection_short(proxy, fake):
    digest = fake.add_blob("library/alpine", b"t" * 100000)
    client = RegistryClient(proxy)
    client.request("HEAD", f"/v2/library/alpine/blobs/{digest}")
    fake.fault("cdn", digest, "truncate", nbytes=1000)
    with pytest.raises(http.client.IncompleteRead):
        client.request("GET", f"/v2/library/alpine/blobs/{digest}")


def test_upstream_silent_mid_body_closes_the_client_connection_short(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--read-timeout", "0.5")
    digest = fake.add_blob("library/alpine", b"s" * 100000)
    client = RegistryClient(proxy)
    client.request("HEAD", f"/v2/library/alpine/blobs/{digest}")
    fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=500)
    with pytest.raises(http.client.IncompleteRead):
        client.request("GET", f"/v2/library/alpine/blobs/{digest}")
    fake.release.set()


def test_upstream_silent_before_answering_gives_504(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--read-timeout", "0.5")
    fake.fault("registry", "/manifests/", "stall")
    status, _, body = proxy.request("GET", "/v2/library/alpine/manifests/3")
    fake.release.set()
    assert status == 504 and errors_of(body) == ["UNAVAILABLE"]


def test_unreachable_upstream_gives_502(start_proxy):
    proxy = start_proxy("--upstream", f"docker=http://127.0.0.1:{free_port()}")
    status, headers, body = proxy.request("GET", "/v2/library/alpine/manifests/3")
    assert status == 502 and errors_of(body) == ["UNAVAILABLE"]
    assert headers["Content-Type"] == "application/json"


def test_upstream_errors_pass_through(proxy, fake):
    fake.fault("registry", "/manifests/", "status", status=429)
    status, headers, body = RegistryClient(proxy).request("GET", "/v2/library/alpine/manifests/3")
    assert status == 429 and errors_of(body) == ["TOOMANYREQUESTS"] and headers["Retry-After"] == "1"


def test_upstream_without_content_length_is_rechunked_for_the_client(proxy, fake):
    digest = fake.add_blob("library/alpine", b"c" * 70000)
    client = RegistryClient(proxy)
    client.request("HEAD", f"/v2/library/alpine/blobs/{digest}")
    fake.fault("cdn", digest, "no_length")
    status, headers, body = client.request("GET", f"/v2/library/alpine/blobs/{digest}")
    assert status == 200 and headers["Transfer-Encoding"] == "chunked" and body == b"c" * 70000


class DripUpstream(threading.Thread):
    """An upstream that sends its body in small pieces with pauses between them."""

    def __init__(self, pieces, pause):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.pieces, self.pause = pieces, pause

    def run(self):
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(65536)
            body = b"d" * 1000
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                               b"Content-Type: application/octet-stream\r\n\r\n" % (len(body) * self.pieces))
            for _ in range(self.pieces):
                time.sleep(self.pause)  # pacing the upstream, not waiting for the proxy
                connection.sendall(body)


def test_a_slow_transfer_longer_than_read_timeout_completes(start_proxy):
    upstream = DripUpstream(pieces=6, pause=0.3)
    upstream.start()
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--read-timeout", "1")
    started = time.monotonic()
    digest = "sha256:" + hashlib.sha256(b"d" * 6000).hexdigest()
    status, _, body = proxy.request("GET", "/v2/library/a/blobs/" + digest)
    assert status == 200 and len(body) == 6000
    assert time.monotonic() - started > 1.5  # longer than READ_TIMEOUT in total


# Errors #####################################################################

@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE", "OPTIONS"])
def test_writes_are_refused_with_405_and_never_reach_upstream(proxy, fake, method):
    for path in ("/v2/library/alpine/blobs/uploads/", "/v2/library/alpine/manifests/1", "/healthz"):
        status, headers, body = proxy.request(method, path, body=b"data")
        assert status == 405 and errors_of(body) == ["UNSUPPORTED"] and headers["Allow"] == "GET, HEAD"
    assert fake.count() == 0 and fake.disallowed_requests == []


def test_unknown_method_and_garbage_get_registry_errors_not_tracebacks(proxy, fake):
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        raw.sendall(b"BREW /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = raw.recv(65536)
    assert answer.startswith(b"HTTP/1.1 405") and b'"UNSUPPORTED"' in answer
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        raw.sendall(b"GET /v2/ HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n")
        answer = raw.recv(65536)
    assert answer.startswith(b"HTTP/1.1 4") and b'"errors"' in answer and b"Traceback" not in answer
    assert fake.count() == 0


@pytest.mark.parametrize("path, code", [
    ("/v2/library/Alpine/manifests/3", "NAME_INVALID"),
    ("/v2/library/alpine/manifests/%2e%2e", "TAG_INVALID"),
    ("/v2/library/alpine/blobs/sha256:xyz", "DIGEST_INVALID"),
])
def test_bad_names_get_400_registry_errors(proxy, fake, path, code):
    status, _, body = proxy.request("GET", path)
    assert status == 400 and errors_of(body) == [code]
    assert fake.count() == 0


def test_host_header_that_could_inject_into_the_realm_is_refused(proxy, fake):
    status, _, body = proxy.request("GET", "/v2/", host='evil",x="y')
    assert status == 400 and b"Host" in body
    assert fake.count() == 0


# Logging ####################################################################

def test_access_log_has_one_line_per_request_and_no_secret(start_proxy, caplog):
    with FakeRegistry(users={"alice": "pa55word"}, private_repos={"alice/private"}) as fake:
        digest = fake.add_blob("alice/private", b"private bytes")
        fake.add_image("alice/private", "1", [b"private bytes"])
        proxy = start_proxy("--upstream", f"docker={fake.url}", "--debug")
        caplog.set_level(logging.DEBUG, logger="dockerproxy")
        client = RegistryClient(proxy, "alice", "pa55word")
        assert client.request("GET", "/v2/alice/private/manifests/1", MANIFEST_ACCEPT)[0] == 200
        assert client.request("GET", f"/v2/alice/private/blobs/{digest}")[0] == 200
        post = RegistryClient(proxy, "alice", "pa55word", post=True)
        assert post.request("GET", "/v2/alice/private/manifests/1", MANIFEST_ACCEPT)[0] == 200
    text = caplog.text
    access = [r for r in caplog.records if "route=docker" in r.getMessage() and r.levelno == logging.INFO]
    assert len(access) >= 6
    assert any("status=200" in r.getMessage() and digest in r.getMessage() for r in access)
    assert any(r.levelno == logging.DEBUG and "upstream GET" in r.getMessage() for r in caplog.records)
    assert any("redirect 307" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("token ") for r in caplog.records)
    for secret in ["pa55word", "YWxpY2U6cGE1NXdvcmQ=", client.token, post.token, "X-Amz-Signature", "secret-signature"]:
        assert secret not in text


# A real process #############################################################

def test_real_process_runs_as_docker_hub_mirror_and_stops_on_sigterm(fake, tmp_path):
    fake.add_image("library/alpine", "3", [b"x"])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAM_")}
    env.update(PORT=str(port), HOST="127.0.0.1", UPSTREAM_DOCKER=fake.url)
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "dockerproxy.py")], cwd=tmp_path, env=env,
                               stderr=subprocess.PIPE, text=True)
    running = RunningProxy(port=port)
    try:
        def answers():
            try:
                return running.request("GET", "/healthz", timeout=1)[0] == 200
            except OSError:
                assert process.poll() is None, process.stderr.read()
                return False
        wait_until(answers, what="proxy start")
        status, _, _ = RegistryClient(running).request("GET", "/v2/alpine/manifests/3", MANIFEST_ACCEPT)
        assert status == 301
        status, _, body = RegistryClient(running).request("GET", "/v2/library/alpine/manifests/3", MANIFEST_ACCEPT)
        assert status == 200
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert "listening on 127.0.0.1:%d" % port in stderr
    assert "Traceback" not in stderr


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_streaming_a_blob_much_larger_than_the_chunk_keeps_memory_flat(fake, tmp_path):
    small = fake.add_blob("library/big", b"warm-up" * 1000)
    size = 256 * 1024 * 1024  # 1024 times CHUNK_SIZE
    large = fake.add_pattern_blob("library/big", size, seed=7)
    port = free_port()
    process, running = start_proxy_process(fake.url, tmp_path / "c", port)
    try:
        client = RegistryClient(running)
        assert client.request("GET", f"/v2/library/big/blobs/{small}")[0] == 200
        baseline = peak_rss_kib(process.pid)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", f"/v2/library/big/blobs/{large}", headers={"Authorization": f"Bearer {client.token}"})
        response = connection.getresponse()
        digest, received = hashlib.sha256(), 0
        while True:
            chunk = response.read(1024 * 1024)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        assert response.status == 200 and received == size
        assert "sha256:" + digest.hexdigest() == large
        growth_mib = (peak_rss_kib(process.pid) - baseline) / 1024
        assert growth_mib < 16, f"peak memory grew by {growth_mib:.1f} MiB for a 256 MiB blob"
    finally:
        process.terminate()
        process.wait(10)


def test_v2_challenges_a_client_without_credentials_even_when_the_upstream_needs_none(start_proxy):
    """skopeo and podman keep the challenge of their one /v2/ ping for every registry behind us."""
    with FakeRegistry(auth_required=False) as fake:
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        status, headers, _ = proxy.request("GET", "/v2/")
        assert status == 401 and "/v2/auth" in headers["WWW-Authenticate"]
        status, _, body = proxy.request("GET", "/v2/auth?service=docker&scope=repository:library/a:pull")
        token = json.loads(body)["token"]
        status, headers, _ = proxy.request("GET", "/v2/", {"Authorization": f"Bearer {token}"})
        assert status == 200 and headers["Docker-Distribution-Api-Version"] == "registry/2.0"
