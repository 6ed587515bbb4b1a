#!/usr/bin/env python3
"""Smoke checks of a running proxy, the seed's test procedure made exact.

  python3 tests/smoke.py --url http://proxy.example:8080   check a deployed proxy
  python3 tests/smoke.py --local                           start dockerproxy.py as a real
        process with every route pointed at a local fake registry, and check it

Checks: health, the / redirect, the /v2/ answer, the route table, and /v2/
on every registry route (by host name when CUSTOM_DOMAIN is set, by ?ns=).
Prints one line per check and "N passed, M failed"; exits 1 on any failure.
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import urllib.parse

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


class Checker:
    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        self.scheme, self.netloc = parts.scheme, parts.netloc
        self.passed = self.failed = 0

    def get(self, path, host=None):
        connection_class = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(self.netloc, timeout=30)
        try:
            connection.request("GET", path, headers={"Host": host} if host else {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def check(self, name, predicate):
        try:
            ok, detail = predicate()
        except Exception as err:  # a smoke check reports, it does not crash
            ok, detail = False, f"{err.__class__.__name__}: {err}"
        print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)}")
        if ok:
            self.passed += 1
        else:
            self.failed += 1

    def registry_answers(self, path, host=None):
        status, headers, _ = self.get(path, host)
        challenge = headers.get("WWW-Authenticate", "")
        ok = status == 200 or (status == 401 and "/v2/auth" in challenge) or (
            status == 401 and challenge.lower().startswith("basic"))
        return ok, f"status {status}, challenge {challenge!r}"

    def run(self):
        def health():
            status, _, body = self.get("/healthz")
            return status == 200 and json.loads(body)["status"] == "ok", status
        self.check("health: /healthz answers 200", health)

        def root():
            status, headers, _ = self.get("/")
            return status == 301 and headers["Location"] == "/v2/", (status, headers.get("Location"))
        self.check("redirect: / answers 301 to /v2/", root)
        self.check("/v2/ answers 200 or a challenge to /v2/auth", lambda: self.registry_answers("/v2/"))
        table = {}

        def routes():
            status, _, body = self.get("/routes")
            table.update(json.loads(body))
            return status == 200 and "routes" in table, status
        self.check("route query: /routes lists the routes", routes)
        for host in sorted(table.get("routes", {})):
            if host != "*":
                self.check(f"route {host}", lambda host=host: self.registry_answers("/v2/", host))
        for registry in sorted(table.get("registries", {})):
            self.check(f"route ?ns={registry}", lambda r=registry: self.registry_answers("/v2/?ns=" + r))
        print(f"smoke: {self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1


def run_local():
    """A real dockerproxy.py process, every route pointed at a fake registry here."""
    sys.path[:0] = [ROOT, TESTS]
    import dockerproxy
    from fakeregistry import FakeRegistry
    from realregistry import free_port, wait_until
    with FakeRegistry() as fake:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAM_")}
        env.update(HOST="127.0.0.1", PORT=str(port), CUSTOM_DOMAIN="example.test", DEBUG="true")
        for route in dockerproxy.BUILTIN_ROUTES:
            env["UPSTREAM_" + dockerproxy.env_name(route.name)] = fake.url
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "dockerproxy.py"), "--env-file", os.devnull],
                                   env=env, stderr=subprocess.PIPE, text=True)
        checker = Checker(f"http://127.0.0.1:{port}")
        try:
            def listening():
                try:
                    return checker.get("/healthz")[0] == 200
                except OSError:
                    if process.poll() is not None:
                        raise RuntimeError("dockerproxy.py exited: " + process.stderr.read())
                    return False
            wait_until(listening, what="dockerproxy.py listening")
            code = checker.run()
        finally:
            process.terminate()
            _, log = process.communicate(timeout=10)
        if "Traceback" in log:
            print("FAIL the proxy logged a traceback:\n" + log)
            code = 1
        if not any(r["server"] == "registry" for r in fake.requests):
            print("FAIL the fake upstream saw no request")
            code = 1
        return code


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--url", help="base URL of a running proxy")
    group.add_argument("--local", action="store_true", help="start and check a local proxy process")
    args = parser.parse_args()
    return run_local() if args.local else Checker(args.url).run()


if __name__ == "__main__":
    sys.exit(main())
