"""Faults: a broken upstream, a killed registry, a killed proxy and a full disk.

Upstream faults are one table, FAULTS, run through the fake upstream (one test
parameter per fault: "faults tried" is its length).  For every one of them:

  * the client gets a registry error (4xx/5xx with a JSON errors body) or a
    connection closed short of the length it was announced: never a wrong
    body, never a clean short 200, never a byte beyond the announced length;
  * nothing wrong is cached: every stored object hashes to its name and is one
    upstream really has, no temporary file outlives the fill, and
    `dockerproxy.py cache verify` finds nothing bad;
  * other clients are served while the fault lasts (a cached image and one
    pulled for the first time);
  * once the fault clears, the next pull gets the right bytes.

A real docker-registry killed mid-blob is held to the same rules, others aside.
Process faults: the proxy process SIGKILLed at seeded random points of 20 cold
pulls (FAULTS_SEED=<n> replays a run; the seed is in the test id), and a full
disk (RLIMIT_FSIZE), through which pulls still succeed, uncached.
"""

import hashlib
import http.client
import io
import json
import os
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import dockerproxy
from conftest import ROOT, RegistryClient, http_request, start_proxy_process
from fakeregistry import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from realregistry import OPENSSL, REGISTRY_BINARY, RealRegistry, free_port, wait_until

REQUIRED = bool(os.environ.get("REQUIRE_INTEROP"))
ACCEPT_ALL = {"Accept": ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])}
READ_TIMEOUT = "1"            # seconds: a stall past it ends the test's wait quickly
UNTIL_CLEARED = 1000          # a fault count no test exhausts: it lasts until clear_faults()
LAYER_SIZE = 1024 * 1024 + 123
MID_BODY = 300 * 1024         # where mid-body faults strike: past the first reads of 256 KiB
WRONG_DIGEST = "sha256:" + "0" * 64
# The process faults: a new seed each run unless FAULTS_SEED replays one (it is in the test id).
SEED = int(os.environ.get("FAULTS_SEED") or random.SystemRandom().randrange(1 << 32))
PULLS = 20                    # cold pulls, of an image of two layers each
KILLS = 6                     # of them, SIGKILLed at a seeded point: half mid-body, half after an answer


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pattern(label, size):
    """`size` bytes that only `label` gives."""
    return hashlib.shake_256(label.encode()).digest(size)


# What a client received ####################################################

class Received:
    """One answer as the bytes on the wire showed it (http.client hides bytes
    beyond Content-Length and turns a short body into an exception)."""

    def __init__(self, status=None, headers=None, body=b"", complete=False, excess=0,
                 framing="none", hung=False):
        self.status = status          # None: the connection closed before any answer
        self.headers = headers or {}
        self.body = body              # the body as framed (chunks decoded)
        self.complete = complete      # the body ended where its framing said
        self.excess = excess          # bytes after the framed end
        self.framing = framing        # "length", "chunked", "none", "lengths" (several)
        self.hung = hung              # the proxy neither finished nor closed in time

    def describe(self):
        return (f"status {self.status}, framing {self.framing}, {len(self.body)} bytes "
                f"({'complete' if self.complete else 'cut'}, {self.excess} beyond), "
                f"{sha256(self.body)}")


def decode_chunked(raw):
    """(body, complete, bytes after the last chunk) of a chunked body."""
    body, position = b"", 0
    while True:
        line_end = raw.find(b"\r\n", position)
        if line_end < 0:
            return body, False, 0
        try:
            size = int(raw[position:line_end].split(b";")[0], 16)
        except ValueError:
            return body, False, 0
        position = line_end + 2
        if size == 0:
            trailer_end = raw.find(b"\r\n\r\n", position - 2)
            if trailer_end < 0:
                return body, False, 0
            return body, True, len(raw) - (trailer_end + 4)
        if len(raw) < position + size + 2:
            return body + raw[position:position + size], False, 0
        body += raw[position:position + size]
        position += size + 2


def parse_answer(data, method):
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        return Received()
    status_line, _, header_block = head.partition(b"\r\n")
    status = int(status_line.split()[1])
    headers = http.client.parse_headers(io.BytesIO(header_block + b"\r\n\r\n"))
    lengths = headers.get_all("Content-Length") or []
    if method == "HEAD" or status in (204, 304):
        return Received(status, headers, b"", True, len(rest), "length")
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        body, complete, excess = decode_chunked(rest)
        return Received(status, headers, body, complete, excess, "lengths" if lengths else "chunked")
    if len(lengths) == 1:
        announced = int(lengths[0])
        return Received(status, headers, rest[:announced], len(rest) >= announced,
                        max(0, len(rest) - announced), "length")
    return Received(status, headers, rest, False, 0, "lengths" if lengths else "none")


def raw_request(proxy, path, headers=None, method="GET", timeout=30):
    """One request with Connection: close; everything the proxy sends until it closes."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {proxy.host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    data, hung = b"", False
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            for piece in iter(lambda: connection.recv(1 << 16), b""):
                data += piece
        except ConnectionResetError:
            pass  # a reset is an end too: what came before it is what the client has
        except socket.timeout:
            hung = True
    received = parse_answer(data, method)
    received.hung = hung
    return received


def is_registry_error(received):
    try:
        errors = json.loads(received.body)["errors"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(errors, list) and bool(errors)


def what_is_wrong(received, expected, may_succeed=False):
    """None if a client can trust this answer to its request for `expected`,
    else what is wrong with it."""
    if received.hung:
        return "the proxy neither finished the answer nor closed the connection"
    if received.excess:
        return f"{received.excess} bytes beyond the announced length ({received.describe()})"
    if received.status is None:
        return None  # closed before any answer: the client knows it failed
    if received.framing == "lengths":
        return f"several Content-Lengths, or one with chunked ({received.describe()})"
    if received.framing != "none" and not received.complete:
        return None  # closed short of its framing: the client knows it failed
    # Complete, or close-delimited: then the client cannot tell a short body from a whole one.
    if received.status >= 400:
        return None if is_registry_error(received) else f"an error that is no registry error: {received.describe()}"
    if received.status == 200 and received.body == expected:
        return None if may_succeed else f"the whole right body despite the fault ({received.describe()})"
    return (f"a {'close-delimited' if received.framing == 'none' else 'complete'} {received.status} "
            f"that is not what was asked ({received.describe()}, expected {len(expected)} bytes of {sha256(expected)})")


# The cache #################################################################

def temp_files(root):
    return [os.path.join(directory, name) for directory, _, names in os.walk(root)
            for name in names if name.startswith(dockerproxy.TEMP_PREFIX)]


def stored_objects(root):
    """{digest: path} of every object in the store, named by where it lies."""
    stored = {}
    for directory, _, names in os.walk(os.path.join(root, "blobs")):
        algorithm = os.path.basename(os.path.dirname(directory))
        for name in names:
            if not name.startswith(dockerproxy.TEMP_PREFIX) and not name.endswith(".type"):
                stored[f"{algorithm}:{name}"] = os.path.join(directory, name)
    return stored


def wrong_objects(root, known):
    """Stored objects whose bytes do not hash to their name, or that upstream does not have."""
    wrong = []
    for digest, path in stored_objects(root).items():
        with open(path, "rb") as file:
            actual = "sha256:" + hashlib.sha256(file.read()).hexdigest()
        if actual != digest:
            wrong.append(f"{digest} holds bytes of {actual}")
        elif digest not in known:
            wrong.append(f"{digest} ({os.path.getsize(path)} bytes) is nothing upstream has")
    return wrong


def cache_verify(cache_dir):
    """`dockerproxy.py cache verify` as an operator runs it: (exit status, report)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dockerproxy.py"), "cache", "verify",
                             "--cache-dir", str(cache_dir), "--env-file", os.devnull],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def cache_problems(cache_dir, known):
    """Everything wrong in a cache directory no fill is writing to: [] if clean."""
    problems = [f"temporary file left: {path}" for path in temp_files(cache_dir)]
    problems += wrong_objects(cache_dir, known)
    status, report = cache_verify(cache_dir)
    if status != 0 or "bad_removed: 0" not in report:
        problems.append(f"cache verify: exit {status}: {report}")
    return problems


# Pulls #####################################################################

def pull(client, repository, image, tag="1"):
    """A whole pull, as docker does it, each object checked against upstream's bytes."""
    status, _, body = client.request("GET", f"/v2/{repository}/manifests/{tag}", ACCEPT_ALL)
    assert (status, sha256(body)) == (200, image["digest"]), f"{repository}:{tag} manifest: {status} {body[:200]}"
    for digest in [image["config"]] + image["layers"]:
        status, _, body = client.request("GET", f"/v2/{repository}/blobs/{digest}")
        assert (status, sha256(body)) == (200, digest), f"{repository} blob {digest}: {status}"


def token(proxy, repository, params=None):
    """A token from the proxy's /v2/auth for pulling `repository`: one request, as docker
    makes it with the realm and service it remembered from its /v2/ ping."""
    params = dict(params or {"realm": f"{proxy.url}/v2/auth", "service": "fake.registry.test"})
    params["scope"] = f"repository:{repository}:pull"
    return RegistryClient(proxy).fetch_token(params)


def challenge_of(proxy):
    """What docker remembers of its /v2/ ping: the challenge's parameters."""
    status, headers, _ = proxy.request("GET", "/v2/")
    assert status == 401
    return dockerproxy.parse_challenge(headers["WWW-Authenticate"])[1]


# Upstream faults, through the fake #########################################

class Fault:
    """One upstream fault of the table.

    target: what the faulted client asks for: "blob" (the victim's layer, which
    the registry redirects to the CDN), "tag" (the victim's manifest by tag) or
    "token" (a pull from scratch, its token request included).
    arm(scene): arms the fake; returns the fake's Fault, whose hits show that
    the fault was met.
    held: the faulted answer hangs upstream, and the other clients are served
    while it does.  tries: the faulted client asks this many times (a burst).
    may_succeed: the whole right body is a right answer too (the fault is in
    a header the proxy may pass by).  check(scene): what else must hold once
    the faulted client has its answers.  settle: seconds the proxy's clock
    moves on before the other clients come (an upstream 429 is remembered
    for every anonymous client until its Retry-After: the protection issue).
    """

    def __init__(self, name, target, arm, held=False, tries=1, may_succeed=False, check=None, settle=0):
        self.name, self.target, self.arm = name, target, arm
        self.held, self.tries, self.may_succeed, self.check = held, tries, may_succeed, check
        self.settle = settle


class Scene:
    """The fake, the proxy, and three images: library/victim:1 (one layer of
    LAYER_SIZE bytes), which the faults hit; library/steady:1, cached before
    the fault; library/fresh:1, first pulled during the fault by a client
    that pinged /v2/ before it, as docker does."""

    def __init__(self, fake, proxy, tls_hop):
        self.fake, self.proxy, self.tls_hop = fake, proxy, tls_hop
        self.victim = fake.add_image("library/victim", "1", [pattern("victim", LAYER_SIZE)])
        self.layer = self.victim["layers"][0]
        self.steady = fake.add_image("library/steady", "1", [pattern("steady", 200000)])
        self.fresh = fake.add_image("library/fresh", "1", [pattern("fresh", 200000)])
        pull(RegistryClient(proxy), "library/steady", self.steady)
        self.fresh_challenge = challenge_of(proxy)
        self.victim_token = token(proxy, "library/victim")
        assert proxy.cache.wait_idle()

    def at_cdn(self, kind, **options):
        """A fault where the victim's layer comes from: the CDN."""
        return self.fake.fault("cdn", self.layer, kind, **options)

    def at_blob(self, kind, **options):
        """A fault at the registry's blob endpoint, which redirects to the CDN."""
        return self.fake.fault("registry", f"/blobs/{self.layer}", kind, **options)

    def at_tag(self, kind, **options):
        """A fault at the victim's manifest by tag."""
        return self.fake.fault("registry", "/library/victim/manifests/", kind, **options)

    def cdn_url(self, digest):
        return f"{self.fake.cdn_url}/blobs/{digest}?X-Amz-Signature=secret-signature-x"


def www_authenticate(value):
    """The victim's tag answered with a 401 whose challenge is `value`."""
    return lambda s: s.at_tag("status", count=UNTIL_CLEARED, status=401, headers=[("WWW-Authenticate", value)])


def redirect_through_tls_hop(scene):
    """The registry sends the blob to an https host, which sends it on to plain http."""
    target = urllib.parse.quote(scene.cdn_url(scene.layer), safe="")
    return scene.at_blob("redirect", count=UNTIL_CLEARED, location=f"{scene.tls_hop.url}/hop?to={target}")


def downgrade_refused(scene):
    assert scene.tls_hop.requests, "the proxy never reached the https hop (is its certificate trusted?)"
    assert scene.fake.count(server="cdn", path_contains=scene.layer) == 0, "the proxy followed https -> http"


FAULTS = [
    Fault("reset-mid-blob", "blob", lambda s: s.at_cdn("reset", nbytes=MID_BODY)),
    Fault("closed-mid-blob", "blob", lambda s: s.at_cdn("truncate", nbytes=MID_BODY)),
    Fault("closed-mid-manifest", "tag", lambda s: s.at_tag("truncate", nbytes=100)),
    Fault("closed-before-answering", "tag", lambda s: s.at_tag("close", count=UNTIL_CLEARED)),
    Fault("stall-mid-blob-past-read-timeout", "blob",
          lambda s: s.at_cdn("stall", after_headers=True, after_bytes=MID_BODY), held=True),
    Fault("stall-before-headers-past-read-timeout", "tag", lambda s: s.at_tag("stall"), held=True),
    Fault("content-length-shorter-than-body", "blob",
          lambda s: s.at_cdn("framing", content_length=LAYER_SIZE - 1000)),
    Fault("content-length-longer-than-body", "blob",
          lambda s: s.at_cdn("framing", content_length=LAYER_SIZE + 1000)),
    Fault("wrong-blob-bytes", "blob", lambda s: s.at_cdn("corrupt")),
    Fault("wrong-manifest-digest-header", "tag",
          lambda s: s.at_tag("framing", headers={"Docker-Content-Digest": WRONG_DIGEST}), may_succeed=True),
    # Held past its Content-Length, so that the fill cannot fail before a client is sent more.
    Fault("content-length-with-chunked", "blob",
          lambda s: s.at_cdn("framing", chunked=True, content_length=MID_BODY, stall_after=2 * MID_BODY),
          held=True),
    Fault("two-content-lengths", "blob",
          lambda s: s.at_cdn("framing", content_length=[LAYER_SIZE - 1000, LAYER_SIZE])),
    Fault("absurd-content-length", "blob", lambda s: s.at_cdn("framing", content_length=2 ** 63)),
    Fault("manifest-cut-without-digest-header", "tag",
          lambda s: s.at_tag("framing", content_length=None, nbytes=s.victim["size"] // 2,
                             headers={"Docker-Content-Digest": None})),
    Fault("500-burst", "blob", lambda s: s.at_blob("status", count=3, status=500), tries=3),
    Fault("502-burst-from-the-cdn", "blob", lambda s: s.at_cdn("status", count=3, status=502), tries=3),
    Fault("503-burst", "tag", lambda s: s.at_tag("status", count=3, status=503), tries=3),
    Fault("429-burst", "tag", lambda s: s.at_tag("status", count=3, status=429), tries=3, settle=2),
    Fault("redirect-loop", "blob", lambda s: s.at_cdn("redirect", count=UNTIL_CLEARED, location="{target}")),
    Fault("redirect-https-to-http", "blob", redirect_through_tls_hop, check=downgrade_refused),
    Fault("redirect-to-ftp", "blob",
          lambda s: s.at_blob("redirect", count=UNTIL_CLEARED, location=f"ftp://127.0.0.1/blobs/{s.layer}")),
    Fault("invalid-www-authenticate", "tag", www_authenticate('Bearer realm=,service="')),
    Fault("www-authenticate-realm-not-http", "tag",
          www_authenticate('Bearer realm="file:///etc/passwd",service="fake.registry.test"')),
    Fault("token-endpoint-hangs", "token", lambda s: s.fake.fault("auth", "library%2Fvictim", "stall"), held=True),
]


class _HopHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.requests.append(self.path)
        target = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("to", [""])[0]
        self.send_response(307)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def tls_hop(tmp_path_factory):
    """An https server on 127.0.0.1 that redirects every GET to its ?to= URL.
    Its certificate is trusted through SSL_CERT_FILE (see trust_tls_hop)."""
    if not OPENSSL:
        pytest.fail("openssl is required (test.sh installs it)")
    directory = tmp_path_factory.mktemp("hop")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HopHandler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.requests = []
    server.url = f"https://127.0.0.1:{server.server_address[1]}"
    server.cert = cert
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def trust_tls_hop(tls_hop, monkeypatch):
    """The in-process proxy's default TLS context trusts the hop's certificate
    (OpenSSL reads SSL_CERT_FILE when the proxy makes its first context)."""
    monkeypatch.setenv("SSL_CERT_FILE", tls_hop.cert)
    del tls_hop.requests[:]
    return tls_hop


def ask_with_a_new_token(proxy, path, headers):
    """As a client with no token yet: the request, then /v2/auth if challenged, then the request
    again; what it finally received (the token answer if that failed)."""
    received = raw_request(proxy, path, headers)
    if received.status != 401:
        return received
    query = urllib.parse.urlencode({"service": "fake.registry.test", "scope": "repository:library/victim:pull"})
    answer = raw_request(proxy, f"/v2/auth?{query}")
    if answer.status != 200 or not answer.complete:
        return answer
    return raw_request(proxy, path, dict(headers, Authorization=f"Bearer {json.loads(answer.body)['token']}"))


def ask_as_victim(scene, fault):
    """The faulted client's request: (what it received, the bytes it asked for)."""
    tag_path = "/v2/library/victim/manifests/1"
    if fault.target == "token":
        return ask_with_a_new_token(scene.proxy, tag_path, ACCEPT_ALL), scene.victim["manifest"]
    credentials = {"Authorization": f"Bearer {scene.victim_token}"}
    if fault.target == "tag":
        return raw_request(scene.proxy, tag_path, dict(ACCEPT_ALL, **credentials)), scene.victim["manifest"]
    layer_path = f"/v2/library/victim/blobs/{scene.layer}"
    return raw_request(scene.proxy, layer_path, credentials), pattern("victim", LAYER_SIZE)


class OneToken:
    """A client that holds one token and never fetches another: docker, which
    fetches a token per repository with the challenge of its /v2/ ping."""

    def __init__(self, proxy, token):
        self.proxy, self.token = proxy, token

    def request(self, method, path, headers=None):
        return self.proxy.request(method, path, dict(headers or {}, Authorization=f"Bearer {self.token}"))


def others_are_served(scene):
    """The cached image and the new one, each pulled whole by a new client."""
    pull(RegistryClient(scene.proxy), "library/steady", scene.steady)
    fresh_token = token(scene.proxy, "library/fresh", scene.fresh_challenge)
    pull(OneToken(scene.proxy, fresh_token), "library/fresh", scene.fresh)


@pytest.mark.parametrize("fault", FAULTS, ids=[fault.name for fault in FAULTS])
def test_an_upstream_fault_fails_only_its_pull_cleanly_and_caches_nothing(start_proxy, fake, trust_tls_hop, fault):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--read-timeout", READ_TIMEOUT)
    scene = Scene(fake, proxy, trust_tls_hop)
    failures = []

    def criterion(name, check, *args):
        try:
            check(*args)
        except (AssertionError, OSError, http.client.HTTPException) as err:
            failures.append(f"{name}: {err.__class__.__name__}: {err}")

    answers = []

    def ask():
        answers.extend(ask_as_victim(scene, fault) for _ in range(fault.tries))
    armed = fault.arm(scene)
    victim = threading.Thread(target=criterion, args=("the faulted client's requests", ask))
    victim.start()
    if fault.held:  # until upstream holds the faulted answer, or the proxy gave up on it first
        wait_until(lambda: fake.wait_stalled(1, timeout=0.05) or not victim.is_alive(), what="the fault held")
    else:
        victim.join(60)
    proxy.clock.advance(fault.settle)
    criterion("others are served during the fault", others_are_served, scene)
    victim.join(60)
    assert not victim.is_alive(), "the faulted client was never answered"
    if not armed.hits:
        failures.append("the fault was never met")
    if len(answers) != fault.tries:
        failures.append(f"the faulted client has {len(answers)} answers of {fault.tries}")
    for received, expected in answers:
        wrong = what_is_wrong(received, expected, fault.may_succeed)
        if wrong:
            failures.append(f"the faulted client got {wrong}")
    if fault.check:
        criterion("the fault's own check", fault.check, scene)
    fake.clear_faults()
    fake.release.set()
    if not proxy.cache.wait_idle():
        failures.append("a fill never ended")
    failures += [f"nothing wrong is cached: {problem}"
                 for problem in cache_problems(proxy.cache.root, fake.known_digests())]
    criterion("the next pull gets the right bytes", pull, RegistryClient(proxy), "library/victim", scene.victim)
    assert not failures, f"{fault.name}:\n  " + "\n  ".join(failures)


# Upstream faults, through a real registry ##################################

def need_registry():
    if REGISTRY_BINARY:
        return
    if REQUIRED:
        pytest.fail("REQUIRE_INTEROP is set but docker-registry is missing", pytrace=False)
    pytest.skip("FAULT TEST SKIPPED: docker-registry not installed")


class PacedRelay:
    """A TCP relay to `port` that stops passing answers on after `pause_after`
    bytes of a connection, once armed, until resumed.

    Without it a kill cannot land mid-transfer: loopback moves a blob in
    milliseconds.  Paused, it reads nothing more, so the registry behind it
    is blocked mid-answer when it is killed; resumed, it passes on what it
    had and then the end the registry's death gives (EOF or reset).
    """

    def __init__(self, port, pause_after):
        self.port, self.pause_after = port, pause_after
        self.armed, self.paused, self.resume = False, threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source, sink, answers):
        passed = 0
        try:
            for data in iter(lambda: source.recv(1 << 16), b""):
                sink.sendall(data)
                passed += len(data)
                if answers and self.armed and passed >= self.pause_after:
                    self.armed = False
                    self.paused.set()
                    self.resume.wait(60)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self):
        self.resume.set()
        self.listener.close()


def push_blob_image(registry, repository, layer):
    """An image of one layer pushed with plain HTTP (monolithic uploads); its description."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                         "diff_ids": [sha256(layer)]}}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
    try:
        for data in (config, layer):
            connection.request("POST", f"/v2/{repository}/blobs/uploads/", headers={"Content-Length": "0"})
            response = connection.getresponse()
            response.read()
            assert response.status == 202, response.status
            location = urllib.parse.urlsplit(response.getheader("Location"))
            query = urllib.parse.parse_qsl(location.query) + [("digest", sha256(data))]
            connection.request("PUT", f"{location.path}?{urllib.parse.urlencode(query)}", body=data,
                               headers={"Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            response.read()
            assert response.status == 201, response.status
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                        "size": len(layer)}]}).encode()
        connection.request("PUT", f"/v2/{repository}/manifests/1", body=manifest,
                           headers={"Content-Type": OCI_MANIFEST})
        response = connection.getresponse()
        response.read()
        assert response.status == 201, response.status
    finally:
        connection.close()
    return {"digest": sha256(manifest), "config": sha256(config), "layers": [sha256(layer)]}


def restart(registry):
    """The killed registry again, on the same storage and port (its config file names both);
    `registry.stop()` then stops the new process."""
    registry.process = subprocess.Popen([REGISTRY_BINARY, "serve", os.path.join(registry.workdir, "config.yml")],
                                        stdout=registry.log, stderr=subprocess.STDOUT)

    def answers():
        assert registry.process.poll() is None, registry.access_log()[-2000:]
        try:
            return http_request(registry.url + "/v2/", timeout=1)[0] == 200
        except OSError:
            return False
    wait_until(answers, what="docker-registry restarted")


def test_a_registry_killed_mid_blob_caches_nothing_and_the_pull_works_after_its_restart(start_proxy, tmp_path):
    need_registry()
    registry = RealRegistry(tmp_path / "registry")
    relay = PacedRelay(registry.port, pause_after=4 * 1024 * 1024)
    try:
        layer = pattern("real registry layer", 40 * 1024 * 1024)
        image = push_blob_image(registry, "library/big", layer)
        proxy = start_proxy("--upstream", f"docker={relay.url}")
        relay.armed = True
        answer = []
        thread = threading.Thread(target=lambda: answer.append(
            raw_request(proxy, f"/v2/library/big/blobs/{sha256(layer)}")))
        thread.start()
        assert relay.paused.wait(30), "the blob never started to flow"
        registry.process.send_signal(signal.SIGKILL)
        registry.process.wait(10)
        relay.resume.set()
        thread.join(60)
        received = answer[0]
        assert what_is_wrong(received, layer) is None, what_is_wrong(received, layer)
        assert received.status is None or not received.complete, received.describe()
        assert proxy.cache.wait_idle()
        assert not proxy.cache.store.exists(sha256(layer))
        assert cache_problems(proxy.cache.root, {image["digest"], image["config"], sha256(layer)}) == []
        restart(registry)
        status, headers, body = RegistryClient(proxy).request("GET", f"/v2/library/big/blobs/{sha256(layer)}")
        assert status == 200 and sha256(body) == sha256(layer)
        assert proxy.cache.wait_idle() and proxy.cache.store.exists(sha256(layer))
    finally:
        relay.close()
        registry.stop()


# Process faults ############################################################

def drain(process):
    """The process's log lines, read as they come so its stderr pipe never fills."""
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return lines


class Kill:
    """Where a seeded kill strikes: pull `pull`, at its `step`-th object (0: the
    manifest by tag), either while upstream holds that object's body after
    `offset` bytes ("mid-body"), or right after the client got it whole, while
    the proxy fsyncs, renames and records it ("after-answer")."""

    def __init__(self, rng, pull_index, kind, sizes):
        self.pull, self.kind = pull_index, kind
        self.step = rng.randrange(len(sizes))
        self.offset = rng.randrange(1, sizes[self.step])

    def __repr__(self):
        return f"kill at pull {self.pull} object {self.step} {self.kind} (offset {self.offset})"


def cold_images(fake, rng):
    """PULLS images of two layers each, 1 KiB to 2 MiB, from the seeded generator."""
    images = []
    for number in range(PULLS):
        layers = [pattern(f"process {rng.random()}", rng.randrange(1024, 2 * 1024 * 1024)) for _ in range(2)]
        image = fake.add_image(f"library/cold{number}", "1", layers)
        image["repository"] = f"library/cold{number}"
        images.append(image)
    return images


def object_paths(image):
    """The manifest by tag, then each blob: what one pull asks for, in order."""
    return ["/manifests/1"] + [f"/blobs/{digest}" for digest in [image["config"]] + image["layers"]]


def object_sizes(fake, image):
    return [image["size"]] + [fake.blob_size(digest) for digest in [image["config"]] + image["layers"]]


class ProxyProcess:
    """dockerproxy.py as a process on a fixed port and cache dir, killed and started again."""

    def __init__(self, fake, cache_dir):
        self.fake, self.cache_dir, self.port = fake, cache_dir, free_port()
        self.logs = []
        self.start()

    def start(self):
        self.process, self.running = start_proxy_process(self.fake.url, self.cache_dir, self.port)
        self.logs.append(drain(self.process))

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def log(self):
        return "".join(line for lines in self.logs for line in lines)


def pull_killed(proxy, fake, image, kill):
    """Pull `image`, SIGKILLing the proxy where `kill` says; the pull itself fails then."""
    repository = image["repository"]
    client = OneToken(proxy.running, token(proxy.running, repository))
    paths = object_paths(image)
    if kill.kind == "mid-body":
        server, contains = ("registry", f"/{repository}/manifests/") if kill.step == 0 else ("cdn", paths[kill.step])
        fake.fault(server, contains, "stall", after_headers=True, after_bytes=kill.offset)
    for step, path in enumerate(paths):
        if step == kill.step and kill.kind == "mid-body":
            stalled = fake.stalled_count + 1
            url = f"/v2/{repository}{path}"
            thread = threading.Thread(target=swallow, args=(client.request, "GET", url, ACCEPT_ALL))
            thread.start()
            assert fake.wait_stalled(stalled), f"{kill}: upstream never held the body"
            proxy.kill()  # the held answer stays held until the fake closes
            thread.join(30)
            return
        status, _, _ = client.request("GET", f"/v2/{repository}{path}", ACCEPT_ALL)
        assert status == 200, f"{kill}: {path} before the kill: {status}"
        if step == kill.step:
            proxy.kill()
            return


def swallow(function, *args):
    try:
        function(*args)
    except (OSError, http.client.HTTPException):
        pass  # the proxy died under this request, as planned


@pytest.mark.parametrize("seed", [SEED], ids=lambda seed: f"seed={seed}")
def test_sigkill_at_seeded_points_of_cold_pulls_leaves_a_clean_cache(fake, tmp_path, seed):
    rng = random.Random(seed)
    images = cold_images(fake, rng)
    kills = {index: Kill(rng, index, ("mid-body", "after-answer")[number % 2], object_sizes(fake, images[index]))
             for number, index in enumerate(sorted(rng.sample(range(PULLS), KILLS)))}
    cache_dir = str(tmp_path / "cache")
    proxy = ProxyProcess(fake, cache_dir)
    try:
        for number, image in enumerate(images):
            kill = kills.get(number)
            if kill is not None:
                pull_killed(proxy, fake, image, kill)
                proxy.start()
                fake.clear_faults()
                assert cache_problems(cache_dir, fake.known_digests()) == [], f"seed {seed}, {kill}"
            pull(RegistryClient(proxy.running), image["repository"], image)
        # A kill may lose what a client already has but the proxy had not yet stored
        # (the last byte goes out before the fsync and rename); never what it had stored.
        stored = set(stored_objects(cache_dir))
        assert stored, f"seed {seed}: nothing was cached"
        proxy.kill()
        proxy.start()
        assert cache_problems(cache_dir, fake.known_digests()) == [], f"seed {seed}, at the end"
        fake.reset_counters()
        for image in images:  # every image again: the right bytes, what was stored from the cache
            pull(RegistryClient(proxy.running), image["repository"], image)
        fetched = {record["path"].rpartition("/")[2] for record in fake.requests
                   if record["method"] == "GET" and "/blobs/" in record["path"]}
        assert not fetched & stored, f"seed {seed}: stored objects lost: {sorted(fetched & stored)}"
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log(), f"seed {seed}: {proxy.log()[-3000:]}"


# A full disk ###############################################################

def full_disk():
    """In the proxy process: no file may grow (RLIMIT_FSIZE 0, raised again with prlimit)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))


@pytest.mark.parametrize("framing", ["with-length", "chunked"])
def test_a_full_disk_passes_a_tag_and_its_blobs_through_and_caching_resumes_with_space(fake, tmp_path, framing):
    cache_dir = str(tmp_path / "cache")
    os.makedirs(cache_dir)
    image = fake.add_image("library/alpine", "3", [pattern("disk small", 5000), pattern("disk big", 600000)])
    process, running = start_proxy_process(fake.url, cache_dir, free_port(), full_disk)
    log = drain(process)
    if framing == "chunked":
        fake.fault("registry", "/library/alpine/manifests/3", "no_length", count=UNTIL_CLEARED)
        for digest in [image["config"]] + image["layers"]:
            fake.fault("cdn", digest, "no_length", count=UNTIL_CLEARED)
    try:
        for _ in range(2):
            client = RegistryClient(running)
            status, headers, body = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
            assert (status, body, headers["X-Cache"]) == (200, image["manifest"], "MISS")
            for digest in [image["config"]] + image["layers"]:
                status, headers, body = client.request("GET", f"/v2/library/alpine/blobs/{digest}")
                assert (status, sha256(body), headers["X-Cache"]) == (200, digest, "MISS")
        assert stored_objects(cache_dir) == {} and temp_files(cache_dir) == []
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        pull(RegistryClient(running), "library/alpine", image, tag="3")
        fake.reset_counters()
        client = RegistryClient(running)
        status, headers, body = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
        assert (status, body, headers["X-Cache"]) == (200, image["manifest"], "HIT")
        # A blob without a Content-Length is never cached: no room can be reserved for it.
        expected = "HIT" if framing == "with-length" else "MISS"
        for digest in [image["config"]] + image["layers"]:
            status, headers, body = client.request("GET", f"/v2/library/alpine/blobs/{digest}")
            assert (status, sha256(body), headers["X-Cache"]) == (200, digest, expected)
        assert fake.count(method="GET", path_contains="/manifests/") == 0
    finally:
        process.terminate()
        process.wait(10)
    assert cache_problems(cache_dir, fake.known_digests()) == []
    text = "".join(log)
    assert "cache cannot write" in text and "Traceback" not in text, text[-3000:]
