"""Regression tests of the outside audit's findings (issue 9), each named for its defect.

Each was seen to fail on the code before its fix.
"""

import json
import logging
import socket
import threading
import time

import pytest

import dockerproxy
from conftest import RegistryClient
from fakeregistry import DOCKER_MANIFEST
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
        for connection in held:  # both are being served: each answered once, kept alive
            connection.sendall(head("GET", "/healthz"))
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        answer = raw_exchange(proxy, head("GET", "/healthz"))
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
