"""Regression tests of the outside audit's findings (issue 9), each named for its defect.

Each was seen to fail on the code before its fix.
"""

import base64
import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time

import pytest

import dockerproxy
from conftest import RegistryClient, proxy_config
from fakeregistry import DOCKER_MANIFEST, FakeRegistry
from rawupstream import ScriptedUpstream
from realregistry import wait_until


def raw_exchange(proxy, data, timeout=10):
    """Send raw bytes on one connection; everything the proxy sent back until it closed."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as connection:
        connection.sendall(data)
        received = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received


def statuses(received):
    """The status codes of the answers in a byte stream, in order."""
    return [int(line.split()[1]) for line in received.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def head(method, target, *lines, host="127.0.0.1"):
    return ("\r\n".join([f"{method} {target} HTTP/1.1", f"Host: {host}", *lines]) + "\r\n\r\n").encode()


SMUGGLED = head("GET", "/routes")


# 3: request desync #########################################################

@pytest.mark.parametrize("request_bytes", [
    head("GET", "/healthz", f"Content-Length: {len(SMUGGLED)}") + SMUGGLED,
    head("HEAD", "/v2/", f"Content-Length: {len(SMUGGLED)}") + SMUGGLED,
    head("GET", "/healthz", "Transfer-Encoding: chunked") + b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
    head("POST", "/v2/auth", f"Content-Length: {len(SMUGGLED)}", "Transfer-Encoding: chunked") + SMUGGLED,
    head("POST", "/v2/auth", f"Content-Length: {len(SMUGGLED)}", "Content-Length: 5") + SMUGGLED,
    head("POST", "/v2/auth", f"Content-Length: {len(SMUGGLED)}", host="bad host!") + SMUGGLED,
    head("POST", "/v2/auth?ns=evil.example.org", f"Content-Length: {len(SMUGGLED)}") + SMUGGLED,
], ids=["get-body", "head-body", "chunked-get", "cl-and-te", "two-lengths", "post-bad-host", "post-refused-route"])
def test_a_request_body_is_never_read_as_the_next_request(proxy, request_bytes):
    received = raw_exchange(proxy, request_bytes + head("GET", "/healthz", "Connection: close"))
    answers = statuses(received)
    assert answers and answers[0] >= 400
    assert b'"default_route"' not in received, answers  # the smuggled GET /routes was never answered


def test_a_get_with_an_empty_body_is_fine(proxy):
    assert statuses(raw_exchange(proxy, head("GET", "/healthz", "Content-Length: 0", "Connection: close"))) == [200]


# 4: bounded heads, slow clients, idle connections, connection count #########

def test_a_request_head_is_bounded_in_bytes_not_only_per_line(proxy):
    lines = [f"X-Filler-{n}: {'a' * 30000}" for n in range(3)]  # each line is fine, the head is not
    answer = raw_exchange(proxy, head("GET", "/healthz", *lines))
    assert statuses(answer) == [431] and b'"errors"' in answer


def test_a_client_sending_its_head_byte_by_byte_is_cut_off(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--header-timeout", "1")
    request = head("GET", "/healthz", "X-Slow: " + "s" * 60)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as connection:
        closed_early = False
        for byte in request[:-1]:  # pacing the client: one byte every 0.1 s, never finishing
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                closed_early = True
                break
            time.sleep(0.1)
            if peer_closed(connection):
                closed_early = True
                break
    assert closed_early, "the proxy waited for the whole head, one byte at a time"


def peer_closed(connection):
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_an_idle_keep_alive_connection_is_closed_after_client_timeout(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--client-timeout", "1")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as connection:
        connection.sendall(head("GET", "/healthz"))
        received = b""
        while True:
            chunk = connection.recv(65536)  # the answer, then the close: not 300 s of keep-alive
            if not chunk:
                break
            received += chunk
    assert statuses(received) == [200]


def test_connections_beyond_max_connections_get_503_with_retry_after(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--max-connections", "2")
    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(2)]
    try:
        for connection in held:  # both are busy: half a request head each, still coming
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        wait_until(lambda: proxy.server.connections.count == 2 and not any(
            reader.idle_since for reader in proxy.server.connections.readers), what="both heads begun")
        # The refusal goes out at once; a request sent before it arrives may be reset away
        # with the connection (the proxy reads what came, not what comes later), so send none.
        answer = raw_exchange(proxy, b"")
        assert statuses(answer) == [503] and b"Retry-After: 1" in answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        for connection in held:
            connection.close()
    wait_until(lambda: statuses(raw_exchange(proxy, head("GET", "/healthz", "Connection: close"))) == [200],
               what="a slot free again")


# 11-13, 17: what a client sends, and what reaches the log ##################

@pytest.mark.parametrize("line", ["X-A: one\r\n two", "X-A: a\rb", "X-A: a\x00b", "Host : x"],
                         ids=["obs-fold", "bare-cr", "nul", "space-before-colon"])
def test_malformed_header_lines_get_400_and_go_nowhere(proxy, fake, line):
    fake.reset_counters()
    answer = raw_exchange(proxy, head("GET", "/v2/library/a/tags/list", line))
    assert statuses(answer) == [400]
    assert fake.count(server="registry", path_contains="/tags/list") == 0


def test_a_content_length_of_other_digits_is_a_400_not_a_500(proxy):
    superscript_two = b"\xb2"  # read as latin-1: "\u00b2", which str.isdigit() accepts and int() does not
    answer = raw_exchange(proxy, b"POST /v2/auth HTTP/1.1\r\nHost: x\r\nContent-Length: " + superscript_two
                          + b"\r\n\r\n12")
    assert statuses(answer) == [400]


def test_no_log_line_carries_a_query_secret_or_a_raw_control_byte(proxy, caplog, monkeypatch):
    def broken(self):
        raise RuntimeError("boom")
    monkeypatch.setattr(dockerproxy.TokenEndpoint, "serve", broken)
    with caplog.at_level(logging.INFO, logger="dockerproxy"):
        assert statuses(raw_exchange(proxy, head("GET", "/v2/auth?refresh_token=S3CRET&scope=x",
                                                 "Connection: close"))) == [500]
        raw_exchange(proxy, b"G\x1b[2JET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = raw_exchange(proxy, head("GET", "http://[x/v2/?refresh_token=S3CRET"))
    assert statuses(answer) == [400]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "S3CRET" not in logged
    assert "\x1b" not in logged and "\\x1b" in logged
    assert "http://[x/v2/" in logged  # the unparsable request is logged too


def test_a_password_with_an_at_sign_is_masked_whole():
    shown = dockerproxy.shown("https://user:p@ss@w0rd@registry.example:5000")
    assert "ss" not in shown and "w0rd" not in shown and "registry.example:5000" in shown


# 15: Range ###################################################################

def test_an_invalid_range_or_a_stale_if_range_gets_the_whole_blob(proxy, fake):
    data = bytes(range(256)) * 400
    digest = fake.add_blob("library/alpine", data)
    client = RegistryClient(proxy)
    path = f"/v2/library/alpine/blobs/{digest}"
    assert client.request("GET", path)[2] == data
    assert proxy.cache.wait_idle()
    for headers in ({"Range": "bytes=5-2"}, {"Range": "bytes=5-9", "If-Range": '"sha256:other"'},
                    {"Range": "bytes=5-9", "If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"}):
        status, answer, body = client.request("GET", path, headers)
        assert (status, body, answer["X-Cache"]) == (200, data, "HIT"), headers
    status, _, body = client.request("GET", path, {"Range": "bytes=5-9", "If-Range": f'"{digest}"'})
    assert (status, body) == (206, data[5:10])


# 19: a GET client never gets a HEAD's answer ################################

def test_a_get_of_a_cached_tag_deleted_upstream_gets_a_whole_404(proxy, fake):
    fake.add_image("library/gone", "1", [b"layer"])
    client = RegistryClient(proxy)
    accept = {"Accept": DOCKER_MANIFEST}
    assert client.request("GET", "/v2/library/gone/manifests/1", accept)[0] == 200
    assert proxy.cache.wait_idle()
    fake.delete_tag("library/gone", "1")
    proxy.clock.advance(proxy.config.manifest_ttl + 1)
    status, headers, body = client.request("GET", "/v2/library/gone/manifests/1", accept)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert headers["Content-Length"] == str(len(body))


def test_a_get_of_a_cached_blob_refused_upstream_gets_a_whole_answer(proxy, fake):
    digest = fake.add_blob("library/pub", b"shared bytes" * 100)
    client = RegistryClient(proxy)
    assert client.request("GET", f"/v2/library/pub/blobs/{digest}")[0] == 200
    assert proxy.cache.wait_idle()
    status, headers, body = client.request("GET", f"/v2/library/other/blobs/{digest}")  # not there upstream
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert b"shared bytes" not in body


# Upstreams that break the protocol ########################################

@pytest.fixture
def scripted(start_proxy):
    upstream = ScriptedUpstream()
    yield upstream, start_proxy("--upstream", f"docker={upstream.url}", "--read-timeout", "5")
    upstream.close()


BLOB = b"b" * 300000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
BLOB_PATH = f"/v2/library/a/blobs/{BLOB_DIGEST}"
MANIFEST_PATH = "/v2/library/a/manifests/1"


def answer(*headers, body=b""):
    return ("\r\n".join(["HTTP/1.1 200 OK", *headers]) + "\r\n\r\n").encode() + body


def temp_files(root):
    return [name for _, _, files in os.walk(root) for name in files if name.startswith(dockerproxy.TEMP_PREFIX)]


@pytest.mark.parametrize("raw", [
    answer("Content-Length: 10", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"),
    answer("Content-Length: 10", "Content-Length: 11", body=b"x" * 11),
    answer(f"Content-Length: {2 ** 63}", body=b"x" * 100),
    answer("Content-Length: 10", "Transfer-Encoding: gzip, chunked", body=b"x" * 10),
], ids=["cl-and-chunked", "two-lengths", "2-to-the-63", "not-chunked"])
def test_framing_a_proxy_must_not_guess_is_a_502_and_leaks_nothing(scripted, raw):
    upstream, proxy = scripted
    upstream.script[BLOB_PATH] = raw
    descriptors = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        status, _, body = proxy.request("GET", BLOB_PATH)
        assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert proxy.cache.wait_idle()
    assert temp_files(proxy.cache.root) == [] and proxy.cache.store.objects() == []
    # no file or socket left open per request (the last connection closes just after its answer)
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= descriptors + 1, what="descriptors closed")


def received_while_stalled(proxy, path, headers, stall, enough):
    """Bytes of the body a client had received while the upstream stalled; then the stall ends."""
    connection = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    lines = [f"GET {path} HTTP/1.1", "Host: x", *headers]
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    received = b""
    deadline = time.monotonic() + 10
    try:
        while len(received.partition(b"\r\n\r\n")[2]) < enough and time.monotonic() < deadline:
            connection.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = connection.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            received += chunk
    finally:
        stall.set()
        connection.close()
    return len(received.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("arrived", [1000, 100000])
@pytest.mark.parametrize("headers", [[], ["Range: bytes=0-"]], ids=["fill", "pass-through"])
def test_a_slow_upstream_has_its_bytes_passed_on_as_they_arrive(scripted, headers, arrived):
    upstream, proxy = scripted
    stall = threading.Event()
    head = answer(f"Content-Length: {len(BLOB)}", f"Docker-Content-Digest: {BLOB_DIGEST}")
    upstream.script[BLOB_PATH] = [head + BLOB[:arrived], stall, BLOB[arrived:]]
    # what arrived upstream (with the head, or after it), the client gets (bar the held last
    # byte) before any more comes
    assert received_while_stalled(proxy, BLOB_PATH, headers, stall, arrived - 1) >= arrived - 1


MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": {}, "layers": []}).encode()


def test_a_manifest_nothing_proves_complete_is_served_but_never_cached(scripted):
    upstream, proxy = scripted
    whole = answer(f"Content-Type: {DOCKER_MANIFEST}", "Connection: close", body=MANIFEST)  # no length, no digest
    upstream.script[MANIFEST_PATH] = whole
    status, _, body = proxy.request("GET", MANIFEST_PATH, {"Accept": DOCKER_MANIFEST})
    assert (status, body) == (200, MANIFEST)
    assert proxy.cache.wait_idle() and proxy.cache.store.objects() == []
    cut = answer(f"Content-Type: {DOCKER_MANIFEST}", "Connection: close", body=MANIFEST[:40])
    upstream.script[MANIFEST_PATH] = cut  # the close came mid-document: no client may take it as whole
    status, _, body = proxy.request("GET", MANIFEST_PATH, {"Accept": DOCKER_MANIFEST})
    assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert proxy.cache.wait_idle() and proxy.cache.store.objects() == []
    upstream.script[MANIFEST_PATH] = b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n"
    status, headers, body = proxy.request("GET", MANIFEST_PATH, {"Accept": DOCKER_MANIFEST})
    assert status == 503 and headers.get("X-Cache") != "STALE"


def chunked(data, size=65536):
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


def test_a_chunked_manifest_over_4_mib_is_passed_through_whole(scripted):
    upstream, proxy = scripted
    big = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                      "annotations": {"padding": "p" * (4 * 1024 * 1024 + 300000)}}).encode()
    upstream.script[MANIFEST_PATH] = answer(f"Content-Type: {DOCKER_MANIFEST}", "Transfer-Encoding: chunked",
                                            body=chunked(big))
    status, _, body = proxy.request("GET", MANIFEST_PATH, {"Accept": DOCKER_MANIFEST})
    assert status == 200 and body == big
    assert proxy.cache.wait_idle() and proxy.cache.store.objects() == []


def test_a_signed_schema_1_manifest_is_sent_whole_not_announced_and_withheld(scripted):
    upstream, proxy = scripted
    signed = json.dumps({"schemaVersion": 1, "name": "library/a", "tag": "1",
                         "signatures": [{"signature": "s" * 1500}]}).encode()
    payload_digest = "sha256:" + hashlib.sha256(signed[:100]).hexdigest()  # schema 1: without the signatures
    media_type = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    upstream.script[MANIFEST_PATH] = answer(f"Content-Type: {media_type}", f"Content-Length: {len(signed)}",
                                            f"Docker-Content-Digest: {payload_digest}", body=signed)
    for _ in range(2):
        status, headers, body = proxy.request("GET", MANIFEST_PATH, {"Accept": media_type})
        assert (status, body) == (200, signed) and headers["Content-Type"] == media_type
    assert proxy.cache.wait_idle() and proxy.cache.store.objects() == []


def test_beyond_max_fills_a_request_is_passed_through_uncached(start_proxy):
    upstream = ScriptedUpstream()
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--max-fills", "1")
    stall = threading.Event()
    other = b"o" * 5000
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    head = answer(f"Content-Length: {len(BLOB)}", f"Docker-Content-Digest: {BLOB_DIGEST}")
    upstream.script[BLOB_PATH] = [head + BLOB[:1000], stall, BLOB[1000:]]
    upstream.script[f"/v2/library/a/blobs/{other_digest}"] = answer(f"Content-Length: {len(other)}", body=other)
    first = threading.Thread(target=proxy.request, args=("GET", BLOB_PATH))
    first.start()
    wait_until(lambda: proxy.cache.fills.in_flight(), what="the first fill running")
    status, _, body = proxy.request("GET", f"/v2/library/a/blobs/{other_digest}")
    assert (status, body) == (200, other)
    stall.set()
    first.join(30)
    assert proxy.cache.wait_idle()
    assert proxy.cache.store.exists(BLOB_DIGEST) and not proxy.cache.store.exists(other_digest)
    upstream.close()


def test_a_blob_larger_than_the_cache_is_passed_through_without_reserving_space(start_proxy):
    upstream = ScriptedUpstream()
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--cache-max-size", "100K")
    stall = threading.Event()
    head = answer(f"Content-Length: {len(BLOB)}", f"Docker-Content-Digest: {BLOB_DIGEST}")
    upstream.script[BLOB_PATH] = [head + BLOB[:1000], stall, BLOB[1000:]]
    assert received_while_stalled(proxy, BLOB_PATH, [], stall, 999) >= 999  # what arrived, passed on
    assert temp_files(proxy.cache.root) == []  # nothing written, nothing reserved: a pass-through
    assert proxy.cache.wait_idle() and not proxy.cache.store.exists(BLOB_DIGEST)
    upstream.close()


# 1, 2, 18: whose bytes, whose credentials ###################################

def test_a_manifest_naming_someone_elses_private_layer_does_not_open_it(start_proxy):
    with FakeRegistry(users={"alice": "alice-pw"}, private_repos={"team/secret"}) as fake:
        secret = fake.add_image("team/secret", "1", [b"private layer bytes"])
        layer = secret["layers"][0]
        lure = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                           "config": {"mediaType": "application/json", "digest": secret["config"], "size": 1},
                           "layers": [{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                                       "digest": layer, "size": 19, "urls": ["https://example.org/x"]}]}).encode()
        fake.add_manifest("evil/app", "1", lure, DOCKER_MANIFEST)
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        alice = RegistryClient(proxy, "alice", "alice-pw")
        assert alice.request("GET", f"/v2/team/secret/blobs/{layer}")[0] == 200
        attacker = RegistryClient(proxy)
        assert attacker.request("GET", "/v2/evil/app/manifests/1", {"Accept": DOCKER_MANIFEST})[0] == 200
        assert proxy.cache.wait_idle()
        for path in (f"/v2/evil/app/blobs/{layer}", f"/v2/docker.io/evil/app/blobs/{layer}"):
            status, _, body = attacker.request("GET", path)
            assert status == 404 and b"private layer" not in body, path


def test_the_first_pull_of_a_cached_blob_through_another_repository_costs_one_head(start_proxy):
    with FakeRegistry(auth_required=False) as fake:
        shared = b"shared base layer" * 100
        fake.add_image("library/one", "1", [shared])
        two = fake.add_image("library/two", "1", [shared])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        layer = two["layers"][0]
        assert proxy.request("GET", f"/v2/library/one/blobs/{layer}")[0] == 200
        assert proxy.cache.wait_idle()
        fake.reset_counters()
        status, headers, body = proxy.request("GET", f"/v2/library/two/blobs/{layer}")
        assert (status, body, headers["X-Cache"]) == (200, shared, "HIT")
        assert fake.count(method="HEAD", path_contains=layer) == 1
        assert fake.count(method="GET", path_contains=layer) == 0


def test_docker_hub_credentials_of_the_auth_file_never_go_to_an_overridden_upstream(start_proxy, tmp_path):
    import base64
    with FakeRegistry(users={"hubuser": "hub-secret"}) as fake:
        fake.add_image("library/a", "1", [b"public"])
        auth = tmp_path / "config.json"
        entry = base64.b64encode(b"hubuser:hub-secret").decode()
        auth.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": entry}}}))
        proxy = start_proxy("--upstream", f"docker={fake.url}", "--registry-auth-file", str(auth))
        status, _, _ = RegistryClient(proxy).request("GET", "/v2/library/a/manifests/1", {"Accept": DOCKER_MANIFEST})
        assert status == 200
        sent = json.dumps(fake.requests)
        assert entry not in sent and "hub-secret" not in sent


def test_a_registry_the_upstream_redirects_to_gets_an_anonymous_token_of_its_own(start_proxy):
    with FakeRegistry() as target:
        data = b"a layer served by the registry redirected to"
        digest = target.add_blob("images/pause", data)
        location = lambda digest, repo: f"{target.url}/v2/images/pause/blobs/{digest}"  # noqa: E731
        with FakeRegistry(auth_required=False, redirect_location=location) as front:
            front.add_blob("library/pause", data)
            proxy = start_proxy("--upstream", f"docker={front.url}")
            status, _, body = proxy.request("GET", f"/v2/library/pause/blobs/{digest}")
            assert (status, body) == (200, data)
            assert target.token_requests and all(
                not request.get("authorization") for request in target.token_requests), target.token_requests


def test_an_upstream_connection_to_a_link_local_address_is_refused(monkeypatch):
    class Socket:
        def getpeername(self):
            return ("169.254.169.254", 80)

        def settimeout(self, timeout):
            pass

        def setsockopt(self, *args):
            pass

    def connect(connection):
        connection.sock = Socket()
    monkeypatch.setattr(http.client.HTTPConnection, "connect", connect)
    monkeypatch.setattr(http.client.HTTPConnection, "close", lambda connection: None)
    upstreams = dockerproxy.Upstreams(1, 1, configured_hosts={"metadata.internal"})
    with pytest.raises(dockerproxy.UpstreamUnavailable):
        upstreams._new_connection("http", "cdn.example", 80)  # a redirect target: refused
    assert upstreams._new_connection("http", "metadata.internal", 80)  # the operator's own choice
    assert dockerproxy.is_link_local("fe80::1%eth0") and dockerproxy.is_link_local("::ffff:169.254.1.1")
    assert not dockerproxy.is_link_local("10.0.0.1")


def test_a_token_request_body_sent_byte_by_byte_is_cut_off(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--header-timeout", "1")
    body = b"grant_type=password&username=a&password=" + b"p" * 60
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as connection:
        connection.sendall(head("POST", "/v2/auth", f"Content-Length: {len(body)}"))
        closed_early = False
        for byte in body[:-1]:  # pacing the client: one byte every 0.1 s
            time.sleep(0.1)
            try:
                if peer_closed(connection):
                    raise ConnectionResetError
                connection.sendall(bytes([byte]))
            except OSError:
                closed_early = True
                break
    assert closed_early, "the proxy waited for the whole body, one byte at a time"


class RefusingUpstreams:
    """Upstreams that fail the test if asked anything."""

    def fetch(self, *args, **kwargs):
        raise AssertionError(f"asked upstream: {args[:2]}")


@pytest.mark.parametrize("target, realm, trusted", [
    ("http://registry.example/v2/a/manifests/1", "http://registry.example/token", ()),
    ("https://registry.example/v2/a/manifests/1", "http://registry.example/token", ()),
    ("https://registry.example/v2/a/manifests/1", "ftp://registry.example/token", ()),
    ("https://registry.example/v2/a/manifests/1", "", ()),
    ("http://registry.example/v2/a/manifests/1", "http://registry.example/token", ("other=http://other.example",)),
])
def test_a_redirect_targets_realm_in_the_clear_is_never_asked(tmp_path, target, realm, trusted):
    config = proxy_config(tmp_path, *[flag for route in trusted for flag in ("--extra-routes", route)])
    auth = dockerproxy.UpstreamAuth(RefusingUpstreams(), dockerproxy.Clock(), config)
    assert auth.target_token(target, {"realm": realm}) is None



def test_at_max_connections_the_longest_idle_connection_makes_room(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--max-connections", "3")
    silent = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(3)]
    try:
        wait_until(lambda: proxy.server.connections.count == 3, what="three silent connections admitted")
        for _ in range(5):  # real clients keep getting in, one silent socket closed for each
            assert statuses(raw_exchange(proxy, head("GET", "/healthz", "Connection: close"))) == [200]
        wait_until(lambda: any(peer_closed(connection) for connection in silent),
                   what="a silent connection closed to make room")
    finally:
        for connection in silent:
            connection.close()


class TokenRealm:
    """Upstreams whose only answer is a token, recording what was asked."""

    def __init__(self):
        self.asked = []

    def fetch(self, method, url, headers, body=None, purpose=("-", "")):
        self.asked.append((url, headers))
        raise dockerproxy.UpstreamUnavailable("no network in this test")


@pytest.mark.parametrize("upstream, realm, auth_file_hosts, sent", [
    ("http://mirror.local", "http://mirror.local:5001/token", (), True),     # the same host: ports aside
    ("http://mirror.local", "http://tokens.example/token", (), False),       # named in the clear: not there
    ("http://mirror.local", "http://tokens.example/token", ("tokens.example",), True),  # the auth file names it
    ("https://registry.example", "https://auth.example/token", (), True),    # named over https
])
def test_the_proxys_account_goes_to_a_realm_on_another_host_only_when_that_is_safe(
        tmp_path, upstream, realm, auth_file_hosts, sent):
    auth = tmp_path / "auth.json"
    entries = {host: {"auth": base64.b64encode(b"u:p").decode()} for host in auth_file_hosts}
    auth.write_text(json.dumps({"auths": entries}))
    config = proxy_config(tmp_path, "--upstream", f"docker={upstream}", "--registry-auth-file", str(auth),
                          UPSTREAM_DOCKER_USERNAME="proxyuser", UPSTREAM_DOCKER_PASSWORD="pr0xy-pa55")
    realms = TokenRealm()
    route = {route.name: route for route in config.routes}["docker"]
    auth = dockerproxy.UpstreamAuth(realms, dockerproxy.Clock(), config)
    try:
        auth.account_token(route, {"realm": realm, "service": "s"}, "library/a")
    except dockerproxy.UpstreamUnavailable:
        pass
    assert bool(realms.asked) is sent
