"""Regression tests of the second review's findings about a hostile or broken upstream.

Each test is named for the behaviour it proves and was seen to fail on the code
before its fix.  The upstreams are RawUpstreams (tests/rawupstream.py): they
write raw bytes, and keep their connections open where the finding needs the
proxy's connection pool.

Covered elsewhere, so not here: framing faults (lengths that disagree,
chunks, resets, stalls, redirect loops and refused schemes) in
tests/test_faults.py and tests/test_hardening.py; a redirect to a link-local
address (169.254.0.0/16, fe80::/10) in tests/test_hardening.py.
"""

import base64
import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading

import pytest

import dockerproxy
from conftest import RegistryClient
from fakeregistry import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, FakeRegistry
from rawupstream import RawUpstream, response
from realregistry import wait_until

REQUIRED = bool(os.environ.get("REQUIRE_INTEROP"))
ACCEPT = {"Accept": DOCKER_MANIFEST}


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_of(name):
    """A manifest only `name` has."""
    return json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": {}, "layers": [],
                       "annotations": {"name": name}}).encode()


def manifest_answer(body, method="GET"):
    return response(headers=[f"Content-Type: {DOCKER_MANIFEST}", f"Docker-Content-Digest: {sha256(body)}",
                             f"Content-Length: {len(body)}"], body=b"" if method == "HEAD" else body)


def whole_answer(proxy, path, headers=None):
    """(status, headers, body) of an answer that arrived whole, as its framing
    says; None if it was cut off, which its client knows for a failure."""
    try:
        return proxy.request("GET", path, headers)
    except (http.client.IncompleteRead, ConnectionError):
        return None


# Interim answers and cut heads ##############################################

@pytest.mark.parametrize("interim", [
    response("102 Processing"),
    response("103 Early Hints", ["Link: </style.css>; rel=preload"]),
    response("101 Switching Protocols", ["Upgrade: h2c", "Connection: Upgrade"]),
], ids=["102", "103", "unsolicited-101"])
def test_an_interim_answer_is_never_taken_for_the_final_one(start_proxy, interim):
    """RFC 9110 section 15.2: a client must parse 1xx answers before the final
    one.  Taking a 102 or 103 for it also left the real answer on the pooled
    connection, for the next request (another client's) to read.  A 101 the
    proxy never asked for (it sends no Upgrade) ends the answer: a 502."""
    switching = interim.startswith(b"HTTP/1.1 101")

    def answer(request, connection):
        connection.sendall(interim)
        if switching:
            connection.sendall(b"\x00" * 64)  # another protocol: no answer follows
            return False
        name = request.path.split("/")[3]  # /v2/library/<name>/manifests/1
        connection.sendall(manifest_answer(manifest_of(name), request.method))
        return True
    with RawUpstream(answer) as upstream:
        proxy = start_proxy("--upstream", f"docker={upstream.url}")
        for name in ("one", "two"):  # the second goes on the connection the first left in the pool
            status, _, body = proxy.request("GET", f"/v2/library/{name}/manifests/1", ACCEPT)
            if switching:
                assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
            else:
                assert (status, body) == (200, manifest_of(name))


BLOB = b"layer bytes " * 100
MANIFEST = manifest_of("library/a")
ASKED = {  # what a client asks for: the path, the Content-Type of its answer
    "blob": (f"/v2/library/a/blobs/{sha256(BLOB)}", "application/octet-stream"),
    "manifest-by-digest": (f"/v2/library/a/manifests/{sha256(MANIFEST)}", DOCKER_MANIFEST),
    "tag": ("/v2/library/a/manifests/1", DOCKER_MANIFEST),
}


@pytest.mark.parametrize("cut", ["after-a-header-line", "inside-a-header-line"])
@pytest.mark.parametrize("asked", list(ASKED))
def test_an_answer_whose_head_was_cut_off_is_a_502(start_proxy, asked, cut):
    """RFC 9112 section 8: a body that ends with the connection is complete only
    "if the header section was received intact"; a head cut before its blank
    line was read as a whole one with an empty body: a clean, empty 200."""
    path, media_type = ASKED[asked]
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {media_type}\r\n".encode()  # then a digest, a length, the body
    cut_head = head if cut == "after-a-header-line" else head + b"Docker-Content-Dig"

    def answer(request, connection):
        connection.sendall(cut_head)
        return False  # the connection ends inside the head
    with RawUpstream(answer) as upstream:
        proxy = start_proxy("--upstream", f"docker={upstream.url}")
        status, _, received = proxy.request("GET", path, ACCEPT)
    assert status == 502 and json.loads(received)["errors"][0]["code"] == "UNAVAILABLE"


# What the proxy tells clients about bytes ###################################

@pytest.mark.parametrize("first_type", [OCI_INDEX, f"{OCI_MANIFEST}; charset=utf-8"],
                         ids=["another-type", "with-a-parameter"])
def test_a_cached_manifest_goes_out_as_the_type_its_bytes_say_whoever_filled_it(start_proxy, first_type):
    """The stored media type was the first fill's Content-Type: for a manifest
    that names no mediaType (optional in OCI 1.0), anyone who pushed the same
    bytes to a repository of their own under another type, and pulled them
    first, chose what every other repository's clients were told; and a type
    with a parameter never matched an Accept, so it was never a hit."""
    with FakeRegistry(auth_required=False) as fake:
        config = fake.add_blob("victim/app", b'{"architecture":"amd64","os":"linux"}')
        body = json.dumps({"schemaVersion": 2, "config": {  # no "mediaType"
            "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 37},
            "layers": []}).encode()
        digest = fake.add_manifest("victim/app", "1", body, OCI_MANIFEST)
        fake.add_manifest("attacker/x", "bait", body, first_type)
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        accept = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
        assert proxy.request("GET", f"/v2/attacker/x/manifests/{digest}", accept)[0] == 200  # the first fill
        assert proxy.cache.wait_idle()
        assert proxy.request("GET", "/v2/victim/app/manifests/1", accept)[0] == 200
        status, headers, got = proxy.request("GET", f"/v2/victim/app/manifests/{digest}", accept)
        assert (status, got, headers["X-Cache"], headers["Content-Type"]) == (200, body, "HIT", OCI_MANIFEST)


def chunked(data):
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


OTHER_MANIFEST = manifest_of("not what was asked for")
MANIFEST_PATH, BLOB_PATH = f"/v2/library/a/manifests/{sha256(MANIFEST)}", f"/v2/library/a/blobs/{sha256(BLOB)}"
BY_DIGEST = {  # what a client asks for, the bytes it names, what upstream sends
    "manifest-of-other-bytes": (MANIFEST_PATH, MANIFEST, response(headers=[
        f"Content-Type: {DOCKER_MANIFEST}", f"Docker-Content-Digest: {sha256(MANIFEST)}",
        f"Content-Length: {len(OTHER_MANIFEST)}"], body=OTHER_MANIFEST)),
    "blob-chunked-of-other-bytes": (BLOB_PATH, BLOB, response(headers=["Transfer-Encoding: chunked"],
                                                              body=chunked(BLOB[:-1] + b"X"))),
    "blob-close-delimited-cut-short": (BLOB_PATH, BLOB, response(headers=["Connection: close"], body=BLOB[:-3])),
    "blob-naming-another-digest": (BLOB_PATH, BLOB, response(headers=[
        f"Content-Length: {len(BLOB)}", "Docker-Content-Digest: sha256:" + "f" * 64], body=BLOB)),
}


@pytest.mark.parametrize("asked", list(BY_DIGEST))
def test_what_is_asked_for_by_digest_is_never_a_whole_200_of_other_bytes_or_another_digest(start_proxy, asked):
    """A client that names a digest gets those bytes or a failure it can see:
    a manifest of other bytes went out whole, a blob passed through uncached
    (no length: nothing to reserve) was relayed with a clean end whatever its
    bytes, and the first answer for a blob named upstream's digest."""
    path, expected, raw = BY_DIGEST[asked]

    def answer(request, connection):
        connection.sendall(raw)
        return False
    with RawUpstream(answer) as upstream:
        proxy = start_proxy("--upstream", f"docker={upstream.url}")
        received = whole_answer(proxy, path, ACCEPT)
    if received is not None and received[0] == 200:
        _, headers, body = received
        assert sha256(body) == sha256(expected), f"a whole 200 of {len(body)} bytes of {sha256(body)}"
        assert headers.get("Docker-Content-Digest") in (None, sha256(expected))


# Whose credentials, and where ###############################################

def test_a_redirect_cannot_borrow_the_operators_account_for_a_repository_the_upstream_names(start_proxy, tmp_path):
    """The auth file's account for a redirect target's host went with whatever
    path the redirecting upstream named: an upstream could redirect its own
    evil/app to the operator's private repository on that host, which no
    route reaches, and have it served to anonymous clients as evil/app."""
    with FakeRegistry(users={"operator": "op-pw"}, private_repos={"operator/private"}) as target:
        secret = target.add_image("operator/private", "1", [b"operator's private layer"])
        target_host = target.url.split("//", 1)[1]
        auth_file = tmp_path / "auth.json"
        auth_file.write_text(json.dumps({"auths": {target_host: {
            "auth": base64.b64encode(b"operator:op-pw").decode()}}}))

        def answer(request, connection):
            prefix = "/v2/evil/app/"
            if request.path.startswith(prefix):
                location = f"{target.url}/v2/operator/private/{request.path[len(prefix):]}"
                connection.sendall(response("307 Temporary Redirect", [f"Location: {location}", "Content-Length: 0"]))
            else:
                connection.sendall(response("404 Not Found", ["Content-Length: 0"]))
            return True
        with RawUpstream(answer) as upstream:
            proxy = start_proxy("--upstream", f"docker={upstream.url}", "--registry-auth-file", str(auth_file))
            # no route leads to the target host: nobody reaches operator/private through the proxy
            assert proxy.request("GET", f"/v2/operator/private/manifests/1?ns={target_host}")[0] == 403
            _, _, manifest = proxy.request("GET", "/v2/evil/app/manifests/1", ACCEPT)
            _, _, layer = proxy.request("GET", f"/v2/evil/app/blobs/{secret['layers'][0]}")
        assert manifest != secret["manifest"] and b"operator's private layer" not in layer
        assert [asked for asked in target.token_requests if asked.get("username") == "operator"] == []


@pytest.fixture(params=["fd00:ec2::254", "100.100.100.200"], ids=["aws-ipv6", "alibaba-cloud"])
def metadata_service(request):
    """(URL, the requests it received) of a server on a cloud metadata
    address, which is put on lo for the test (root only) and removed after it."""
    address = request.param
    if os.geteuid() != 0 or not shutil.which("ip"):
        if REQUIRED:
            pytest.fail("REQUIRE_INTEROP is set: root and ip(8) are needed for an address on lo", pytrace=False)
        pytest.skip("needs root and ip(8) to put a metadata address on lo")
    family, prefix, options = (socket.AF_INET6, "128", ["nodad"]) if ":" in address else (socket.AF_INET, "32", [])
    with open(os.path.join(tempfile.gettempdir(), "dockerproxy-tests-lo.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run on this host may have the address on lo now
        added = subprocess.run(["ip", "addr", "add", f"{address}/{prefix}", "dev", "lo", *options],
                               capture_output=True, text=True)
        if added.returncode != 0:
            pytest.fail(f"ip addr add {address}/{prefix} dev lo: {added.stderr.strip()}", pytrace=False)
        try:
            with metadata_server(address, family) as (url, asked):
                yield url, asked
        finally:
            subprocess.run(["ip", "addr", "del", f"{address}/{prefix}", "dev", "lo"], capture_output=True)


@contextlib.contextmanager
def metadata_server(address, family):
    """(URL, requests received) of a metadata service on `address`, which hands out a credential."""
    with socket.create_server((address, 0), family=family) as listener:
        asked = []

        def serve():
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return  # the listener closed: the test is over
                with connection:
                    try:
                        asked.append(connection.recv(4096))
                        connection.sendall(response(headers=["Content-Length: 19"], body=b"instance-credential"))
                    except OSError:
                        pass  # the proxy hung up
        threading.Thread(target=serve, daemon=True).start()
        host = f"[{address}]" if family == socket.AF_INET6 else address
        yield f"http://{host}:{listener.getsockname()[1]}/latest/meta-data/iam/security-credentials/", asked


def test_an_upstream_cannot_redirect_the_proxy_to_a_cloud_metadata_service(start_proxy, metadata_service):
    """Only 169.254.0.0/16 and fe80::/10 were refused; AWS's IPv6 endpoint is a
    unique local address and Alibaba Cloud's is in the shared address space."""
    url, asked = metadata_service

    def answer(request, connection):
        connection.sendall(response("307 Temporary Redirect", [f"Location: {url}", "Content-Length: 0"]))
        return True
    with RawUpstream(answer) as upstream:
        proxy = start_proxy("--upstream", f"docker={upstream.url}")
        received = whole_answer(proxy, f"/v2/library/a/blobs/sha256:{'a' * 64}")
    assert not any(asked), asked  # connected to at most (to learn its address), never asked
    assert received is not None and received[0] == 502


@pytest.mark.parametrize("token", ["abc\r\n X-Injected: yes", "abc\r X-Injected: yes", "abc\r\n\tX-Injected: yes"],
                         ids=["obs-fold", "bare-cr", "obs-fold-tab"])
def test_a_token_from_an_upstream_realm_never_breaks_a_line_of_an_upstream_request(start_proxy, token):
    """The proxy's own token (its account on a route) went into the next
    upstream request as the realm gave it; http.client lets a CR LF followed
    by a space or tab through, and a bare CR before a space."""
    def answer(request, connection):
        if request.path == "/token":
            body = json.dumps({"token": token, "expires_in": 300}).encode()
            connection.sendall(response(headers=[f"Content-Length: {len(body)}"], body=body))
        elif not (request.header("Authorization") or "").startswith("Bearer "):
            connection.sendall(response("401 Unauthorized", [
                f'WWW-Authenticate: Bearer realm="{upstream.url}/token",service="registry"', "Content-Length: 0"]))
        elif request.path == "/v2/":
            connection.sendall(response(headers=["Content-Length: 2"], body=b"{}"))
        else:
            connection.sendall(manifest_answer(MANIFEST, request.method))
        return True
    with RawUpstream(answer, ping=False) as upstream:  # its /v2/ wants a token too
        proxy = start_proxy("--upstream", f"docker={upstream.url}", "--cache-dir", "",  # no cache: all goes upstream
                            UPSTREAM_DOCKER_USERNAME="proxy-user", UPSTREAM_DOCKER_PASSWORD="proxy-pw")
        proxy.request("GET", "/v2/library/a/manifests/1", ACCEPT)
    heads = upstream.heads("/manifests/")
    assert heads
    for head in heads:
        lines = head[:-4].split(b"\r\n")
        assert [line for line in lines if b"\r" in line or b"\n" in line or line[:1].isspace()] == [], head


PASSWORD = "cdn-s3cret-pw"


@pytest.mark.parametrize("location", [
    "ftp://cdnuser:{password}@cdn.example/blob",          # a refused scheme
    "http://cdnuser:{password}@127.0.0.1:1/blob",         # nothing listens there
    "http://cdnuser:{password}@127.0.0.1:{port}/short",   # its body ends short
], ids=["refused-scheme", "unreachable", "short-body"])
def test_credentials_in_a_redirect_url_reach_neither_the_client_nor_the_log(start_proxy, caplog, location):
    """URLs an upstream names went into error bodies and log lines whole,
    though the operator's own upstream URLs may carry no credentials for
    exactly that reason."""
    def answer(request, connection):
        if request.path == "/short":
            connection.sendall(response(headers=["Content-Length: 100"], body=b"x" * 10))
            return False
        target = location.format(password=PASSWORD, port=upstream.port)
        connection.sendall(response("307 Temporary Redirect", [f"Location: {target}", "Content-Length: 0"]))
        return True
    with RawUpstream(answer) as upstream, caplog.at_level(logging.INFO, logger="dockerproxy"):
        proxy = start_proxy("--upstream", f"docker={upstream.url}")
        # a pass-through (Range): the redirect is followed while the client waits
        received = whole_answer(proxy, f"/v2/library/a/blobs/sha256:{'a' * 64}", {"Range": "bytes=0-"})
    assert received is None or PASSWORD.encode() not in received[2]
    assert [record.getMessage() for record in caplog.records if PASSWORD in record.getMessage()] == []


# An upstream that announces what it never sends ############################

@pytest.fixture
def trickling_upstream():
    """trickling_upstream(length) -> a RawUpstream whose every blob announces
    `length` bytes, then sends one byte every 0.1 s: never silent for
    READ_TIMEOUT, never done."""
    stop = threading.Event()
    upstreams = []

    def start(length):
        def answer(request, connection):
            connection.sendall(response(headers=[f"Content-Length: {length}"]))
            while not stop.wait(0.1):  # pacing the upstream: a byte every 0.1 s
                connection.sendall(b"x")
            return False
        upstreams.append(RawUpstream(answer))
        return upstreams[-1]
    yield start
    stop.set()
    for upstream in upstreams:
        upstream.close()


def ask_and_leave(proxy, path):
    """A client that asks for `path`, reads the start of a 200 and goes."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode())
        assert connection.recv(12) == b"HTTP/1.1 200"


def test_a_fill_announcing_more_than_the_free_room_evicts_nothing(start_proxy, fake, trickling_upstream):
    """A fill's reservation made the evictor empty the cache, for bytes an
    upstream only announced (one request, its client gone at once)."""
    upstream = trickling_upstream(1_000_000)
    image = fake.add_image("library/app", "1", [os.urandom(200_000) for _ in range(3)])
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--extra-routes", f"slow={upstream.url}",
                        "--cache-max-size", "1M")
    client = RegistryClient(proxy)
    for layer in image["layers"]:
        assert client.request("GET", f"/v2/library/app/blobs/{layer}")[0] == 200
    assert proxy.cache.wait_idle()

    def evicted():
        return [layer for layer in image["layers"] if not proxy.cache.store.exists(layer)]
    ask_and_leave(proxy, f"/v2/x/y/blobs/sha256:{'e' * 64}?ns={upstream.host}")
    wait_until(lambda: evicted() or not proxy.cache.fills.in_flight(), what="the lying fill given up")
    assert evicted() == []


def test_a_trickling_fill_nobody_waits_for_is_given_up_after_orphan_grace(start_proxy, fake, trickling_upstream,
                                                                        monkeypatch):
    """A fill whose client left goes on if it fits without eviction; one that
    trickled kept its reservation for as long as it liked, and every fill
    that did not fit beside it, on every route, went uncached."""
    monkeypatch.setattr(dockerproxy, "ORPHAN_GRACE", 0.5)
    upstream = trickling_upstream(500_000)  # fits: finishing it would evict nothing
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--extra-routes", f"slow={upstream.url}",
                        "--cache-max-size", "1M")
    ask_and_leave(proxy, f"/v2/x/y/blobs/sha256:{'e' * 64}?ns={upstream.host}")
    wait_until(lambda: not proxy.cache.fills.in_flight(), what="the trickling fill given up")
    layer = fake.add_blob("library/app", os.urandom(600_000))  # fits only without the trickle's reservation
    assert RegistryClient(proxy).request("GET", f"/v2/library/app/blobs/{layer}")[0] == 200
    assert proxy.cache.wait_idle() and proxy.cache.store.exists(layer)
