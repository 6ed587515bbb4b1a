"""The handler and its answer helpers, driven over in-memory streams (no network),
as CPython's test_httpservers drives BaseHTTPRequestHandler; what the handler
writes goes through an in-process socket pair, since os.sendfile needs one."""

import hashlib
import http.client
import io
import json
import os
import socket
import threading

import pytest

import dockerproxy
from conftest import MovableClock, proxy_config

UPSTREAM = "http://127.0.0.1:9"   # never contacted: the tests hand the proxy canned answers


class KeptOpen(io.BytesIO):
    """A byte stream that survives http.client closing it between responses."""

    def close(self):
        pass


class MemorySocket:
    """A client connection: what it sent, as a byte stream the handler reads with
    recv_into, and what the handler wrote, collected from an in-process socket
    pair (os.sendfile needs a real descriptor)."""

    family = socket.AF_UNIX

    def __init__(self, sent):
        self.sent = io.BytesIO(sent)
        self.pair = socket.socketpair()
        self.collected = KeptOpen()
        self.drain = threading.Thread(target=self._collect, daemon=True)
        self.drain.start()

    def _collect(self):
        while True:
            data = self.pair[1].recv(65536)
            if not data:
                return
            self.collected.write(data)

    @property
    def written(self):
        """All the handler wrote (once it is done: the write side is closed here)."""
        if self.drain.is_alive():
            self.pair[0].close()
            self.drain.join(10)
        return self.collected

    def makefile(self, mode, buffering=None):
        return io.BytesIO()  # replaced by the handler's own reader over recv_into

    def recv_into(self, buffer):
        return self.sent.readinto(buffer)

    def sendall(self, data):
        self.pair[0].sendall(data)

    def fileno(self):
        return self.pair[0].fileno()

    def gettimeout(self):
        return None

    def settimeout(self, timeout):
        pass

    def setsockopt(self, *args):
        pass


class RawAnswer:
    """An upstream's answer as raw bytes, for http.client to parse."""

    def __init__(self, raw):
        self.raw = raw

    def makefile(self, mode, buffering=None):
        return io.BufferedReader(io.BytesIO(self.raw))


class MemoryServer:
    """What the handler needs of its server: the shared parts and the listening address."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.server_address = ("127.0.0.1", 8080)


class CannedUpstreams:
    """Upstream answers given in advance, as raw HTTP; records what was asked."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.asked = []

    def fetch(self, method, url, headers, body=None, purpose=("-", "")):
        self.asked.append((method, url, headers))
        raw = self.answers.pop(0)
        response = http.client.HTTPResponse(RawAnswer(raw), method=method)
        response.begin()
        return dockerproxy.UpstreamResponse(response, None, None, url, method)


@pytest.fixture
def proxy(tmp_path):
    config = proxy_config(tmp_path, "--upstream", f"docker={UPSTREAM}")
    return dockerproxy.Proxy(config, MovableClock())


def exchange(proxy, *requests):
    """Send raw requests on one connection; the parsed answers, one per request answered."""
    connection = MemorySocket(b"".join(requests))
    dockerproxy.ProxyHandler(connection, ("127.0.0.1", 40000), MemoryServer(proxy))
    answers, stream = [], connection.written
    stream.seek(0)
    for request in requests:
        if stream.tell() == len(stream.getvalue()):
            break
        method = request.split(b" ", 1)[0].decode()
        response = http.client.HTTPResponse(MemorySocket(b""), method=method)
        response.fp = stream
        response.begin()
        body = response.read()
        answers.append((response.status, response.headers, body))
    return answers, connection


def request(method, path, *headers, host="mirror.example:5000", version="HTTP/1.1"):
    lines = [f"{method} {path} {version}", f"Host: {host}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def canned(status, headers, body=b""):
    head = [f"HTTP/1.1 {status} X"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# Small answers and errors ##################################################

def test_a_small_answer_has_its_length_and_head_gets_no_body(proxy):
    answers, _ = exchange(proxy, request("GET", "/healthz"), request("HEAD", "/healthz"))
    (get_status, get_headers, body), (head_status, head_headers, head_body) = answers
    assert (get_status, json.loads(body)) == (200, {"status": "ok"})
    assert head_status == 200 and head_body == b""
    assert get_headers["Content-Length"] == head_headers["Content-Length"] == str(len(body))


def test_an_unknown_path_gets_a_registry_error_and_the_connection_goes_on(proxy):
    answers, _ = exchange(proxy, request("GET", "/v2/_catalog"), request("GET", "/healthz"))
    status, headers, body = answers[0]
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert answers[1][0] == 200


def test_a_push_is_refused_and_its_body_is_never_read_as_a_request(proxy):
    push = request("PUT", "/v2/library/a/manifests/1", "Content-Length: 38")
    smuggled = request("GET", "/healthz")  # the "body" of the PUT
    answers, _ = exchange(proxy, push, smuggled)
    assert len(answers) == 1
    status, headers, body = answers[0]
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_what_http_server_refuses_gets_a_registry_error(proxy):
    answers, _ = exchange(proxy, request("GET", "/v2/", "X-Long: " + "a" * 70000))
    status, _, body = answers[0]
    assert status == 431 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_an_internal_error_is_a_500_in_registry_form_without_a_traceback(proxy, monkeypatch):
    def broken():
        raise KeyError("secret internals")
    monkeypatch.setattr(proxy.routes, "describe", broken)
    answers, _ = exchange(proxy, request("GET", "/routes"))
    status, _, body = answers[0]
    assert status == 500 and json.loads(body)["errors"][0]["code"] == "UNKNOWN"
    assert b"secret" not in body and b"Traceback" not in body


# Relayed upstream answers ##################################################

TAGS = "/v2/library/a/tags/list"


def test_a_relayed_answer_carries_exactly_its_length_and_only_forwarded_headers(proxy):
    body = b'{"tags":["1"]}'
    proxy.upstreams = CannedUpstreams(canned(200, [("Content-Length", len(body)), ("Content-Type", "application/json"),
                                                   ("Set-Cookie", "session=1")], body))
    answers, _ = exchange(proxy, request("GET", TAGS), request("GET", "/healthz"))
    status, headers, received = answers[0]
    assert (status, received, headers["X-Cache"]) == (200, body, "MISS")
    assert "Set-Cookie" not in headers and len(answers) == 2
    assert proxy.upstreams.asked[0][:2] == ("GET", UPSTREAM + TAGS)


def test_a_short_upstream_body_ends_the_connection_short(proxy):
    proxy.upstreams = CannedUpstreams(canned(200, [("Content-Length", 100)], b"x" * 10))
    connection = MemorySocket(request("GET", TAGS) + request("GET", "/healthz"))
    dockerproxy.ProxyHandler(connection, ("127.0.0.1", 40000), MemoryServer(proxy))
    head, _, body = connection.written.getvalue().partition(b"\r\n\r\n")
    assert b"Content-Length: 100" in head and body == b"x" * 10  # and nothing after: closed


@pytest.mark.parametrize("version, framing", [("HTTP/1.1", "chunked"), ("HTTP/1.0", "close")])
def test_an_answer_of_unknown_length_is_chunked_or_close_delimited(proxy, version, framing):
    proxy.upstreams = CannedUpstreams(canned(200, [("Connection", "close")], b"tags"))
    connection = MemorySocket(request("GET", TAGS, version=version))
    dockerproxy.ProxyHandler(connection, ("127.0.0.1", 40000), MemoryServer(proxy))
    head, _, body = connection.written.getvalue().partition(b"\r\n\r\n")
    if framing == "chunked":
        assert b"Transfer-Encoding: chunked" in head and body == b"4\r\ntags\r\n0\r\n\r\n"
    else:
        assert b"Transfer-Encoding" not in head and b"Content-Length" not in head and body == b"tags"


def test_an_upstream_bearer_challenge_becomes_ours(proxy):
    challenge = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/a:pull"'
    proxy.upstreams = CannedUpstreams(canned(401, [("Content-Length", 2), ("WWW-Authenticate", challenge)], b"{}"))
    answers, _ = exchange(proxy, request("GET", TAGS))
    status, headers, body = answers[0]
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert headers["WWW-Authenticate"] == ('Bearer realm="http://mirror.example:5000/v2/auth",'
                                           'service="registry.docker.io",scope="repository:library/a:pull"')


# Cached objects ############################################################

def store_blob(proxy, data, public=True):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    spool = proxy.cache.store.new_spool(digest)
    spool.write(data)
    spool.finish(len(data))
    proxy.cache.store.put(spool, digest, None)
    spool.close()
    if public:
        proxy.access.record(None, UPSTREAM, "library/a", [digest])
    return digest


def test_a_cached_blob_goes_out_with_sendfile_and_its_headers(proxy, monkeypatch):
    data = os.urandom(300 * 1024)
    digest = store_blob(proxy, data)
    calls, real = [], os.sendfile
    monkeypatch.setattr(os, "sendfile", lambda *args: calls.append(args) or real(*args))
    answers, connection = exchange(proxy, request("GET", f"/v2/library/a/blobs/{digest}"))
    status, headers, body = answers[0]
    assert (status, body, headers["X-Cache"]) == (200, data, "HIT")
    assert headers["Docker-Content-Digest"] == digest and headers["ETag"] == f'"{digest}"'
    assert len(calls) == 1


@pytest.mark.parametrize("header, status, start, end", [
    ("bytes=100-199", 206, 100, 199),
    ("bytes=-10", 206, 300 * 1024 - 10, 300 * 1024 - 1),
    ("bytes=1000-", 206, 1000, 300 * 1024 - 1),
    ("bytes=0-0,5-6", 200, 0, 300 * 1024 - 1),
])
def test_a_range_of_a_cached_blob(proxy, header, status, start, end):
    data = os.urandom(300 * 1024)
    digest = store_blob(proxy, data)
    answers, _ = exchange(proxy, request("GET", f"/v2/library/a/blobs/{digest}", f"Range: {header}"))
    got_status, headers, body = answers[0]
    assert (got_status, body) == (status, data[start:end + 1])
    if status == 206:
        assert headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"


def test_an_unsatisfiable_range_is_416_with_the_size(proxy):
    digest = store_blob(proxy, b"0123456789")
    answers, _ = exchange(proxy, request("GET", f"/v2/library/a/blobs/{digest}", "Range: bytes=10-"))
    status, headers, _ = answers[0]
    assert status == 416 and headers["Content-Range"] == "bytes */10"


def test_a_cached_private_blob_is_checked_upstream_and_a_refusal_relayed(proxy):
    digest = store_blob(proxy, b"private bytes", public=False)
    proxy.upstreams = CannedUpstreams(canned(404, [("Content-Length", 0)]))
    answers, _ = exchange(proxy, request("GET", f"/v2/library/a/blobs/{digest}"))
    status, _, body = answers[0]
    assert status == 404 and b"private" not in body
    assert [asked[0] for asked in proxy.upstreams.asked] == ["HEAD"]


@pytest.mark.parametrize("raw, status", [
    (b"GET /v2/ HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /v2/ FOO/1.1\r\n\r\n", 400),
    (b"GET /v2/library/a/tags/list?x=\x07 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v2/a/tags/list?n=\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
])
def test_every_refused_request_line_gets_a_status_line(proxy, raw, status):
    connection = MemorySocket(raw)
    dockerproxy.ProxyHandler(connection, ("127.0.0.1", 40000), MemoryServer(proxy))
    assert connection.written.getvalue().startswith(b"HTTP/1.")
    assert int(connection.written.getvalue().split()[1]) == status
