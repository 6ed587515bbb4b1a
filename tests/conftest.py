"""Fixtures: the fake Docker Hub upstream, and the proxy on port 0 in a thread."""

import http.client
import os
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


class RunningProxy:
    """A ProxyServer serving in a thread, and a small client for it."""

    def __init__(self, server):
        self.server = server
        self.port = server.server_address[1]
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

    def request(self, method, path, headers=None, body=None, host=None):
        """One request on a new connection: (status, headers, body bytes)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = dict(headers or {})
            if host:
                headers["Host"] = host
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()


def proxy_config(tmp_path, *argv, **environ):
    """A Config as the command line would build it, isolated from this machine's .env."""
    base = ["--host", "127.0.0.1", "--port", "0", "--cache-dir", str(tmp_path / "cache"),
            "--env-file", os.devnull]
    return dockerproxy.load_config(base + list(argv), environ)


def start_proxy_process(upstream_url, cache_dir, port, preexec_fn=None):
    """dockerproxy.py as a real process with its docker route on `upstream_url`:
    (Popen with stderr piped, RunningProxy once /healthz answers)."""
    from realregistry import wait_until
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "dockerproxy.py"), "--host", "127.0.0.1", "--port", str(port),
         "--env-file", os.devnull, "--upstream", f"docker={upstream_url}", "--cache-dir", str(cache_dir)],
        stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    running = RunningProxy.__new__(RunningProxy)
    running.port, running.host, running.url = port, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"

    def answers():
        try:
            return running.request("GET", "/healthz")[0] == 200
        except OSError:
            assert process.poll() is None, process.stderr.read()
            return False
    wait_until(answers, what="proxy process start")
    return process, running


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
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return RunningProxy(server)

    yield start
    for server in servers:
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
