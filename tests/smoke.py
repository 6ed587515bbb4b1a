#!/usr/bin/env python3
"""Smoke checks of a running proxy, the seed's test procedure made exact.

  python3 tests/smoke.py --url http://proxy.example:8080   check a deployed proxy
  python3 tests/smoke.py --url http://docker.example.com:8080 --resolve docker.example.com:192.0.2.5
        the same, connecting to 192.0.2.5 while sending Host: docker.example.com (as curl's --resolve)
  python3 tests/smoke.py --local                           start dockerproxy.py as a real
        process with its routes pointed at local fake registries, and check it through
        its IP address and through one of its route host names

Checks: health, the / redirect, the route table, the /v2/ answer, and /v2/ on
every registry route: by host name (Host: <route host>:<port of the URL>, sent
to the URL's address) and by ?ns=.  The URL may be any address of the proxy,
including a route host name such as docker.{CUSTOM_DOMAIN}; see Checker.ns_host
for how the ?ns= checks are made then.
Prints one line per check and last "smoke: N passed, M failed" (", K skipped"
when some could not be made); exits 1 on any failure.
"""

import argparse
import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.parse

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


class Results:
    """Counts shared by every Checker of one smoke run, so there is one summary."""

    def __init__(self):
        self.passed = self.failed = self.skipped = 0

    def summary(self):
        line = f"smoke: {self.passed} passed, {self.failed} failed"
        return line + (f", {self.skipped} skipped" if self.skipped else "")


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to `address`, with SNI and certificate checked for the URL's host name."""

    def __init__(self, address, server_name, port, timeout):
        super().__init__(server_name, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def bracketed(address):
    return f"[{address}]" if ":" in address else address


def route_host_of(host):
    """A Host value as the proxy compares it with its host routes: no port, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0].rstrip(".")


class Checker:
    def __init__(self, url, resolve=None, results=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.hostname = parts.hostname  # lower case, no brackets
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.port_suffix = f":{parts.port}" if parts.port else ""  # Host carries what the URL says
        self.host = parts.netloc.rpartition("@")[2]  # the Host header of the URL itself
        self.resolve = resolve  # connect here instead of resolving the URL's host name
        self.address = None  # the address every connection goes to, fixed by the first one
        self.results = results or Results()

    # Connections -------------------------------------------------------------

    def pick_address(self):
        """The URL's address: --resolve's, else the first of the host name's addresses that
        accepts a connection (as http.client would pick).  Every request then goes there,
        so a check with another Host header still reaches the same server."""
        if self.resolve:
            return self.resolve
        error = None
        for *_, sockaddr in socket.getaddrinfo(self.hostname, self.port, type=socket.SOCK_STREAM):
            try:
                socket.create_connection(sockaddr[:2], timeout=30).close()
                return sockaddr[0]
            except OSError as err:
                error = err
        raise error or OSError(f"{self.hostname} has no address")

    def get(self, path, host=None):
        if self.address is None:
            self.address = self.pick_address()
        if self.scheme == "https":
            connection = _PinnedHTTPSConnection(self.address, self.hostname, self.port, timeout=30)
        else:
            connection = http.client.HTTPConnection(self.address, self.port, timeout=30)
        try:
            connection.request("GET", path, headers={"Host": host or self.host})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    # Reporting ---------------------------------------------------------------

    def check(self, name, predicate):
        try:
            ok, detail = predicate()
        except Exception as err:  # a smoke check reports, it does not crash
            ok, detail = False, f"{err.__class__.__name__}: {err}"
        print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)}")
        if ok:
            self.results.passed += 1
        else:
            self.results.failed += 1

    def skip(self, name):
        print(f"skip {name}")
        self.results.skipped += 1

    def registry_answers(self, path, host=None):
        status, headers, _ = self.get(path, host)
        challenge = headers.get("WWW-Authenticate", "")
        ok = status == 200 or (status == 401 and "/v2/auth" in challenge) or (
            status == 401 and challenge.lower().startswith("basic"))
        return ok, f"status {status}, challenge {challenge!r}"

    # The ?ns= checks ----------------------------------------------------------

    def ns_host(self, table):
        """The Host header for the ?ns= checks: (host or None for the URL's own, note), or
        (None, reason) with a reason they are skipped.

        A ?ns= request on a route host may name only that route's registry: the proxy
        refuses docker.{d}/v2/?ns=ghcr.io with 403 (host and ns name different registries),
        rightly.  So ?ns= routing can only be checked through an address that is not a
        route host.  When the URL's host is one, the checks are sent over the same
        connection target (the address the URL's name resolved to, or --resolve's) with
        Host: <that address>:<port>, but only after GET /routes with that Host has answered
        the very route table the URL's host name answered.  Sending Host: <IP> is honest
        when the proxy itself listens there: it routes by Host, and the IP is what a
        containerd client configured with the IP would send.  It is not safe to assume for
        a deployment behind a front server (nginx, Caddy, a load balancer) that picks the
        site by Host: Host: <IP> goes to its default site, which may be another service
        (a false FAIL) or answer 200 by itself (a false ok).  The /routes comparison tells
        the two apart: only a dockerproxy with this route table answers it, and when it
        does not, the checks are skipped with the reason, not failed.  A front whose
        default site is this proxy passes it, and then Host: <IP> does reach the proxy.
        """
        routes = table.get("routes", {})
        if "*" in routes or route_host_of(self.host) not in routes:
            return None, ""
        if self.address is None:
            self.address = self.pick_address()
        other = bracketed(self.address) + self.port_suffix
        why = (f"{self.hostname} is a host route, where the proxy refuses ?ns= of another "
               f"registry by design, and")
        if route_host_of(other) in routes:
            return None, f"{why} its address {other} is a host route too"
        status, _, body = self.get("/routes", other)
        try:
            same = status == 200 and json.loads(body) == table
        except ValueError:
            same = False
        if not same:
            return None, (f"{why} Host: {other} (its address) reaches something else (GET /routes: "
                          f"status {status}{', another table' if status == 200 else ''}), e.g. "
                          f"a front server's default site; check ?ns= through an address of "
                          f"the proxy without a host route (--url with that address)")
        return other, (f"{self.hostname} is a host route, where the proxy refuses ?ns= of another "
                       f"registry by design: the ?ns= checks go to the same address with "
                       f"Host: {other}, which answers /routes with the same table")

    # The checks --------------------------------------------------------------

    def run(self):
        """Every check once; the counts go to self.results.  True when none failed."""
        failed_before = self.results.failed

        def health():
            status, _, body = self.get("/healthz")
            return status == 200 and json.loads(body)["status"] == "ok", status
        self.check("health: /healthz answers 200", health)

        def root():
            status, headers, _ = self.get("/")
            return status == 301 and headers["Location"] == "/v2/", (status, headers.get("Location"))
        self.check("redirect: / answers 301 to /v2/", root)
        table = {}

        def routes():
            status, _, body = self.get("/routes")
            table.update(json.loads(body))
            return status == 200 and "routes" in table, status
        self.check("route query: /routes lists the routes", routes)

        host_routes = table.get("routes", {})
        if (table and "*" not in host_routes and route_host_of(self.host) not in host_routes
                and table.get("default_route") is None):
            def no_route():  # DEFAULT_ROUTE= (empty): an unrouted /v2/ is a 404 with the table
                status, _, body = self.get("/v2/")
                return status == 404 and "routes" in json.loads(body), f"status {status}"
            self.check("/v2/ answers 404 with the route list (no host route, no default route)", no_route)
        else:
            self.check("/v2/ answers 200 or a challenge to /v2/auth", lambda: self.registry_answers("/v2/"))

        for host in sorted(host_routes):
            if host != "*":
                self.check(f"route {host}",
                           lambda host=host: self.registry_answers("/v2/", host + self.port_suffix))

        registries = sorted(table.get("registries", {}))
        if registries:
            try:
                ns_host, note = self.ns_host(table)
            except Exception as err:
                ns_host, note = None, f"the ?ns= checks could not be prepared: {err.__class__.__name__}: {err}"
            if note:
                print(f"note: {note}")
            if note and not ns_host:
                for registry in registries:
                    self.skip(f"route ?ns={registry}")
            else:
                label = f" (Host: {ns_host})" if ns_host else ""
                for registry in registries:
                    self.check(f"route ?ns={registry}{label}",
                               lambda r=registry: self.registry_answers("/v2/?ns=" + r, ns_host))
        return self.results.failed == failed_before


def run_url(url, resolve=None):
    results = Results()
    Checker(url, resolve, results).run()
    print(results.summary())
    return 0 if results.failed == 0 else 1


class LocalProxy:
    """What local_proxy() started: the port, the fakes by upstream, and, once
    stopped, the process's log."""

    def __init__(self, port, fakes):
        self.port, self.fakes, self.log = port, fakes, ""


@contextlib.contextmanager
def local_proxy(*flags):
    """A real dockerproxy.py process on 127.0.0.1 with CUSTOM_DOMAIN=example.test and each
    distinct upstream of its built-in routes on a fake registry of its own: routes that
    name different registries must differ here as they do in production, or the proxy's
    refusal of a host route with another registry's ?ns= cannot show.  `flags` are added
    to its command line."""
    sys.path[:0] = [path for path in (ROOT, TESTS) if path not in sys.path]
    import dockerproxy
    from fakeregistry import FakeRegistry
    from realregistry import free_port, wait_until
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="smoke-cache-"))
        fakes = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAM_")}
        env["DEBUG"] = "true"
        for route in dockerproxy.BUILTIN_ROUTES:
            if route.upstream not in fakes:
                fakes[route.upstream] = stack.enter_context(FakeRegistry())
            env["UPSTREAM_" + dockerproxy.env_name(route.name)] = fakes[route.upstream].url
        running = LocalProxy(free_port(), fakes)
        # the log goes to a file: a pipe read only at the end fills up (64 KiB)
        # and then blocks the proxy's next log line, and with it a request
        log_file = stack.enter_context(tempfile.TemporaryFile("w+", prefix="smoke-log-"))
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "dockerproxy.py"), "--env-file", os.devnull,
             "--host", "127.0.0.1", "--port", str(running.port), "--custom-domain", "example.test",
             "--default-route", "docker", "--cache-dir", cache, *flags],
            env=env, stderr=log_file, text=True)
        try:
            probe = Checker(f"http://127.0.0.1:{running.port}")

            def listening():
                try:
                    return probe.get("/healthz")[0] == 200
                except OSError:
                    if process.poll() is not None:
                        log_file.seek(0)
                        raise RuntimeError("dockerproxy.py exited: " + log_file.read())
                    return False
            wait_until(listening, what="dockerproxy.py listening")
            yield running
        finally:
            process.terminate()
            process.wait(timeout=10)
            log_file.seek(0)
            running.log = log_file.read()


def run_local():
    """local_proxy() checked through 127.0.0.1 and through the route host
    docker.example.test (by --resolve), with one summary line at the end."""
    results = Results()
    with local_proxy() as running:
        port = running.port
        checker = Checker(f"http://127.0.0.1:{port}", results=results)
        print(f"== through its address: --url http://127.0.0.1:{port}")
        checker.run()
        print(f"== through a route host: --url http://docker.example.test:{port} "
              f"--resolve docker.example.test:127.0.0.1")
        Checker(f"http://docker.example.test:{port}", resolve="127.0.0.1", results=results).run()
    print("== the proxy process and its upstreams")
    checker.check("the proxy logged no traceback", lambda: ("Traceback" not in running.log, "\n" + running.log))
    silent = sorted(upstream for upstream, fake in running.fakes.items()
                    if not any(r["server"] == "registry" for r in fake.requests))
    checker.check(f"each of the {len(running.fakes)} fake upstreams saw a request",
                  lambda: (not silent, f"no request reached the fakes of {', '.join(silent)}"))
    print(results.summary())
    return 0 if results.failed == 0 else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--url", help="base URL of a running proxy (any of its addresses or host names)")
    group.add_argument("--local", action="store_true", help="start and check a local proxy process")
    parser.add_argument("--resolve", metavar="HOST:ADDRESS",
                        help="connect to ADDRESS when the URL's host is HOST, sending Host: HOST (as curl)")
    args = parser.parse_args()
    if args.local:
        if args.resolve:
            parser.error("--resolve goes with --url")
        return run_local()
    resolve = None
    if args.resolve:
        name, sep, address = args.resolve.partition(":")
        address = address.strip("[]")
        if not (sep and name and address):
            parser.error("--resolve wants HOST:ADDRESS")
        hostname = urllib.parse.urlsplit(args.url).hostname or ""
        if name.lower().rstrip(".") != hostname.rstrip("."):
            parser.error(f"--resolve names {name}, the URL's host is {hostname}")
        resolve = address
    try:
        Checker(args.url)
    except ValueError as err:
        parser.error(str(err))
    return run_url(args.url, resolve)


if __name__ == "__main__":
    sys.exit(main())
