"""tests/smoke.py itself: it must pass against a healthy proxy whichever of its
addresses it is given (issue 8, item 10: a route host name made every ?ns= check
of another registry fail), and skip, not fail nor falsely pass, the ?ns= checks
it cannot make honestly."""

import http.client
import http.server
import os
import re
import subprocess
import sys
import threading

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)

import smoke  # noqa: E402

SMOKE = os.path.join(TESTS, "smoke.py")
BUILTIN_HOST_ROUTES = 24
BUILTIN_REGISTRIES = 13
ALL_CHECKS = 4 + BUILTIN_HOST_ROUTES + BUILTIN_REGISTRIES
SUMMARY = re.compile(r"smoke: \d+ passed, \d+ failed(, \d+ skipped)?\Z")


@pytest.fixture(scope="module")
def local():
    with smoke.local_proxy() as running:
        yield running
    assert "Traceback" not in running.log, running.log


class Front:
    """A front server on 127.0.0.1 that picks the site by Host, as nginx with
    server_name *.example.test does: those hosts are relayed to the proxy (Host
    kept), any other goes to the default site, which is `default`: "proxy" (relay
    too), "404", or "200" (another service that answers everything with 200 JSON)."""

    def __init__(self, proxy_port, default):
        front = self
        self.hosts = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                host = self.headers.get("Host", "")
                front.hosts.append(host)
                if smoke.route_host_of(host).endswith(".example.test") or default == "proxy":
                    upstream = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
                    upstream.request("GET", self.path, headers={"Host": host})
                    answer = upstream.getresponse()
                    status, body = answer.status, answer.read()
                    headers = [(k, v) for k, v in answer.getheaders()
                               if k.lower() not in ("connection", "transfer-encoding", "content-length")]
                    upstream.close()
                elif default == "200":
                    status, body, headers = 200, b'{"routes": {}}', [("Content-Type", "application/json")]
                else:
                    status, body, headers = 404, b"no such site", []
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def front(local):
    fronts = []

    def start(default):
        fronts.append(Front(local.port, default))
        return fronts[-1]
    yield start
    for started in fronts:
        started.close()


def run(url, capsys, resolve=None):
    results = smoke.Results()
    smoke.Checker(url, resolve, results).run()
    return results, capsys.readouterr().out


def test_the_fixture_tells_registries_apart(local):
    """The proxy refuses a route host with another registry's ?ns= (what broke the
    checks): only with distinct upstreams per route, as here, can a test see it."""
    checker = smoke.Checker(f"http://127.0.0.1:{local.port}")
    assert checker.get("/v2/?ns=ghcr.io", f"docker.example.test:{local.port}")[0] == 403
    assert len(set(fake.url for fake in local.fakes.values())) == len(local.fakes) == 11


def test_through_the_ip_address(local, capsys):
    results, out = run(f"http://127.0.0.1:{local.port}", capsys)
    assert (results.passed, results.failed, results.skipped) == (ALL_CHECKS, 0, 0), out
    assert "note:" not in out


@pytest.mark.parametrize("name", ["docker.example.test", "ghcr.example.test", "Quay.Registry.Docker.Example.Test"])
def test_through_a_route_host(local, capsys, name):
    """The issue's case: ./test.sh --url http://docker.example.test:PORT failed 10 of 41."""
    results, out = run(f"http://{name}:{local.port}", capsys, resolve="127.0.0.1")
    assert (results.passed, results.failed, results.skipped) == (ALL_CHECKS, 0, 0), out
    assert out.count(f"(Host: 127.0.0.1:{local.port})") == BUILTIN_REGISTRIES


@pytest.mark.parametrize("default", ["404", "200"])
def test_behind_a_front_that_routes_by_host_the_ns_checks_are_skipped(front, capsys, default):
    """Host: <IP> reaches the front's default site, not the proxy: neither a false
    FAIL (404) nor a false ok (a default site answering 200) but a skip with a reason."""
    started = front(default)
    results, out = run(f"http://docker.example.test:{started.port}", capsys, resolve="127.0.0.1")
    assert (results.passed, results.failed, results.skipped) == (
        ALL_CHECKS - BUILTIN_REGISTRIES, 0, BUILTIN_REGISTRIES), out
    assert "reaches something else" in out and "skip route ?ns=ghcr.io" in out
    # only the /routes probe went to the default site, no ?ns= check
    assert [h for h in started.hosts if not h.endswith(f".example.test:{started.port}")] == [
        f"127.0.0.1:{started.port}"]


def test_behind_a_front_whose_default_site_is_the_proxy(front, capsys):
    started = front("proxy")
    results, out = run(f"http://docker.example.test:{started.port}", capsys, resolve="127.0.0.1")
    assert (results.passed, results.failed, results.skipped) == (ALL_CHECKS, 0, 0), out


def test_host_route_checks_carry_the_port_of_the_url(front, capsys):
    started = front("404")
    run(f"http://docker.example.test:{started.port}", capsys, resolve="127.0.0.1")
    assert f"ghcr.example.test:{started.port}" in started.hosts
    assert f"registry.docker.example.test:{started.port}" in started.hosts
    assert "ghcr.example.test" not in started.hosts


def test_without_a_default_route(capsys):
    """DEFAULT_ROUTE= (empty): /v2/ on an address without a host route is a 404 with
    the route list, which is healthy, and the ?ns= checks still route."""
    with smoke.local_proxy("--default-route", "") as running:
        results, out = run(f"http://127.0.0.1:{running.port}", capsys)
        assert (results.passed, results.failed, results.skipped) == (ALL_CHECKS, 0, 0), out
        assert "/v2/ answers 404 with the route list" in out
        results, out = run(f"http://docker.example.test:{running.port}", capsys, resolve="127.0.0.1")
        assert (results.passed, results.failed, results.skipped) == (ALL_CHECKS, 0, 0), out


def test_the_last_line_is_the_summary_with_the_skips(front, capsys):
    started = front("404")
    assert smoke.run_url(f"http://docker.example.test:{started.port}", "127.0.0.1") == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"smoke: {ALL_CHECKS - BUILTIN_REGISTRIES} passed, 0 failed, {BUILTIN_REGISTRIES} skipped"


def test_resolve_must_name_the_url_host():
    done = subprocess.run([sys.executable, SMOKE, "--url", "http://docker.example.test:1",
                           "--resolve", "ghcr.example.test:127.0.0.1"], capture_output=True, text=True)
    assert done.returncode == 2 and "--resolve names ghcr.example.test" in done.stderr


def test_local_covers_both_addresses_with_one_summary():
    done = subprocess.run([sys.executable, SMOKE, "--local"], capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert SUMMARY.match(lines[-1]) and sum(bool(SUMMARY.match(line)) for line in lines) == 1
    assert "--url http://docker.example.test:" in done.stdout
    assert done.stdout.count("route ?ns=ghcr.io") == 2
