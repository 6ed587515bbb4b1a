"""A seeded fuzzer: thousands of hostile requests, sent over raw sockets, at a proxy
whose every route leads to a local fake registry (built-in routes moved by
UPSTREAM_<ROUTE>, host routes under CUSTOM_DOMAIN, an EXTRA_ROUTES route, one
route with the proxy's own account), its cache warmed by a pull of every image.

The requests are made with the standard library's `random`, from FUZZ_SEED (a
fixed default), so a failure is reproduced by running this file again with the
seed its message names:

    FUZZ_SEED=1234 FUZZ_REQUESTS=3000 python3 -m pytest -s tests/test_fuzz.py

They aim at the parser, the router and the cache: odd paths (`../`, `%2e%2e`,
`%2F`, NUL and control bytes, overlong names and tags, other digest algorithms,
bad hex), cached objects asked for through other repositories, absolute-form
targets (`http://[x/v2/`), invalid methods and versions, HTTP/0.9, HTTP/1.0,
pipelines, header floods and oversized heads, malformed header lines (obs-fold,
bare CR, NUL), smuggling shapes (a GET whose body is another request,
Content-Length with Transfer-Encoding, two Content-Lengths), the push endpoints
and the token endpoint.  Every upstream stays up, so any 5xx is the proxy's own.

The run happens once (the `fuzz` fixture), watching what clients get, the
proxy's log, its outgoing connections and the files around CACHE_DIR; each test
then judges one figure.  FIGURES holds them all after the run, which prints them
(see them with -s): the README's security section quotes them.
"""
import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import pathlib
import random
import re
import socket
import stat
import tempfile
import threading
import time
import traceback

import pytest

import dockerproxy
from conftest import MovableClock, RegistryClient, RunningProxy, proxy_config
from fakeregistry import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, FakeRegistry

SEED = int(os.environ.get("FUZZ_SEED", "20260509"))
CASES = int(os.environ.get("FUZZ_REQUESTS", "3000"))

DOMAIN = "fuzz.test"
SECRET_MARK = "FUZZSECRET"      # what the fuzzer puts in query secrets; no log line may hold it
ANSWER_TIMEOUT = 10.0           # a connection the proxy leaves open this long after our EOF "hangs"
MAX_HANGS = 5                   # then the run stops: the proxy is stuck, the rest would only wait
MAX_ANSWER_BYTES = 4 << 20      # more than any fake holds: read no further
BIG_HEAD = 66 * 1024            # a request head at least this large must be refused (64 KiB limit)
REFUSAL_STATUSES = (400, 413, 414, 431)
MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)
USER, PASSWORD = "fuzzuser", "fuzz-pa55word"
PROXY_USER, PROXY_PASSWORD = "fuzzproxy", "fuzz-proxy-pa55"

# What FUZZ_SEED made this run find: filled by the `fuzz` fixture, quoted by the README.
FIGURES = {}


def reproduce():
    return f"(FUZZ_SEED={SEED} FUZZ_REQUESTS={CASES} reproduces this run)"


# The world: fake upstreams behind every route #################################

class Image:
    """An image one fake holds, and how a client reaches it through the proxy."""

    def __init__(self, fake, repository, tag, layers, host=None, prefix="", credentials=None):
        self.repository = repository
        self.tag = tag
        self.added = fake.add_image(repository, tag, layers)
        self.host = host                # the Host header of a host route, None: the default route
        self.prefix = prefix            # a registry host before the name ("ghcr.io/")
        self.credentials = credentials  # (user, password) for a private repository

    @property
    def name(self):
        return self.prefix + self.repository

    @property
    def blobs(self):
        return [self.added["config"]] + self.added["layers"]


class World:
    """Four fake registries: every built-in route goes to one of the first three,
    EXTRA_ROUTES adds the fourth, one route has the proxy's own account."""

    def __init__(self, stack):
        self.hub = stack.enter_context(FakeRegistry())
        self.open = stack.enter_context(FakeRegistry(auth_required=False, redirect_mode="relative"))
        self.private = stack.enter_context(FakeRegistry(
            users={USER: PASSWORD, PROXY_USER: PROXY_PASSWORD}, private_repos={"team/secret"}))
        self.extra = stack.enter_context(FakeRegistry(redirect_mode="none"))
        self.fakes = [self.hub, self.open, self.private, self.extra]
        rotation = [self.hub, self.open, self.private]
        self.route_fakes = {"docker": self.hub, "docker-staging": self.hub}
        others = [route.name for route in dockerproxy.BUILTIN_ROUTES if route.name not in self.route_fakes]
        for index, name in enumerate(others):
            self.route_fakes[name] = rotation[(index + 1) % len(rotation)]
        self.route_fakes["extra"] = self.extra
        self.private_route = next(name for name, fake in self.route_fakes.items() if fake is self.private)
        self.open_route = next(name for name, fake in self.route_fakes.items() if fake is self.open)
        self.registry_hosts = sorted(host for route in dockerproxy.BUILTIN_ROUTES for host in route.registry_hosts)
        self.images = self.add_images()
        self.tokens = []  # clients' tokens, fetched once the proxy runs

    def flags(self):
        flags = ["--custom-domain", DOMAIN, "--extra-routes", f"extra={self.extra.url}"]
        for name, fake in self.route_fakes.items():
            if name != "extra":
                flags += ["--upstream", f"{name}={fake.url}"]
        return flags

    def environment(self):
        route = dockerproxy.env_name(self.private_route)
        return {f"UPSTREAM_{route}_USERNAME": PROXY_USER, f"UPSTREAM_{route}_PASSWORD": PROXY_PASSWORD}

    def add_images(self):
        """An image or two on each fake, reached by the default route, a host route, a path prefix."""
        open_host = f"{self.open_route}.{DOMAIN}"
        private_prefix = next(route.registry_hosts[0] for route in dockerproxy.BUILTIN_ROUTES
                              if route.name == self.private_route)
        return [
            Image(self.hub, "library/alpine", "3", [b"alpine layer" * 50, b"second layer"]),
            Image(self.hub, "someone/app", "1.0", [b"app layer" * 10]),
            Image(self.open, "owner/tool", "latest", [b"tool layer" * 20], host=open_host),
            Image(self.private, "team/secret", "1", [b"secret layer" * 30],
                  prefix=private_prefix + "/", credentials=(USER, PASSWORD)),
            Image(self.private, "team/public", "2", [b"public layer"], prefix=private_prefix + "/"),
            Image(self.extra, "project/thing", "v2", [b"thing layer" * 7], host="extra." + DOMAIN),
        ]

    def addresses(self):
        """Every (host, port) the proxy may connect to: registries, their CDNs and realms."""
        urls = [url for fake in self.fakes for url in (fake.url, fake.cdn_url, fake.auth_url)]
        return {("127.0.0.1", int(url.rsplit(":", 1)[1])) for url in urls}

    def fake_ports(self):
        return sorted(port for _, port in self.addresses())


# Watching the proxy: connections, logs, files ###################################

class Connections:
    """Every connection and name lookup made by the run: by this thread and every thread
    started from it or from one of those (the proxy's), none by other tests' leftovers.

    The proxy runs in this process, so patching socket.socket.connect and
    socket.getaddrinfo sees every connection it opens and every name it resolves."""

    def __init__(self):
        self.connected = []   # (thread name, (host, port))
        self.looked_up = []   # host names passed to getaddrinfo
        self._lock = threading.Lock()

    def install(self, patch):
        real_start = threading.Thread.start
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
        real_getaddrinfo = socket.getaddrinfo

        def start(thread):
            thread.fuzz_run = self._watched()
            return real_start(thread)

        def connect(sock, address):
            self._note(address)
            return real_connect(sock, address)

        def connect_ex(sock, address):
            self._note(address)
            return real_connect_ex(sock, address)

        def getaddrinfo(host, *args, **kwargs):
            if self._watched():
                with self._lock:
                    self.looked_up.append(host)
            return real_getaddrinfo(host, *args, **kwargs)
        patch.setattr(threading.Thread, "start", start)
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)

    @staticmethod
    def _watched():
        current = threading.current_thread()
        return current is threading.main_thread() or getattr(current, "fuzz_run", False)

    def _note(self, address):
        if self._watched():
            with self._lock:
                self.connected.append((threading.current_thread().name, tuple(address[:2])))

    def elsewhere(self, allowed, proxy_address):
        """Connections to anything but `allowed`; this thread (the clients) may reach the proxy."""
        client = threading.main_thread().name
        return [f"{thread} -> {address}" for thread, address in self.connected
                if address not in allowed and not (thread == client and address == proxy_address)]


class LogRecords(logging.Handler):
    """Every record of the "dockerproxy" logger, at DEBUG, kept here only: thousands
    of lines would otherwise fill the report of the first test that fails."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    @contextlib.contextmanager
    def attached(self):
        logger = logging.getLogger("dockerproxy")
        level, propagate = logger.level, logger.propagate
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate


def tree(root, skip):
    """{relative path: (type, size, mtime)} of everything under `root` but `skip`
    (a directory by its type alone: what changes in it is listed itself)."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(directory, d) != skip]
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            kind = stat.S_IFMT(info.st_mode)
            entries[os.path.relpath(path, root)] = (kind,) if kind == stat.S_IFDIR else (
                kind, info.st_size, info.st_mtime_ns)
    return entries


def symlinks(root):
    return [os.path.join(d, name) for d, dirs, files in os.walk(root)
            for name in dirs + files if os.path.islink(os.path.join(d, name))]


# Requests ######################################################################

class Case:
    """One connection's worth of bytes, and what may come back.

    `requests` are the (method, target) of the requests in `raw`, in order;
    the proxy may answer fewer (it closes after an error) but never more.
    `limit` is that bound, None for bytes that are not meant as requests."""

    def __init__(self, kind, raw, requests, limit="count", http09=False):
        self.kind = kind
        self.raw = raw
        # A request line of more than three words (whitespace in the target) names
        # no method the server can trust: its answer may carry a body even to "HEAD".
        self.requests = [(method if not any(c.isspace() for c in method + target) else "?", target)
                         for method, target in requests]
        self.limit = len(requests) if limit == "count" else limit
        self.http09 = http09
        self.head_size = len(raw.split(b"\r\n\r\n", 1)[0])

    def excerpt(self):
        return repr(self.raw[:160]) + (f"... ({len(self.raw)} bytes)" if len(self.raw) > 160 else "")


def request_bytes(method, target, headers=(), version="HTTP/1.1", body=b""):
    line = f"{method} {target}" + (f" {version}" if version else "")
    head = line + "\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1") + body


def hex_digits(rng, count, alphabet="0123456789abcdef"):
    return "".join(rng.choice(alphabet) for _ in range(count))


def word(rng, size=None):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(size or rng.randint(1, 12)))


def odd_text(rng):
    """A short string with whatever a parser may trip on."""
    pieces = ["..", "%2e%2e", "%2F", "%00", "\x00", "\x1b[31m", "\x07", "\x7f", "\x9b", "%", "%%", "~",
              "é", "\xff", ";", "?", "#", "*", "\\", "'", '"', "<", ">", "$(id)", " ", "\t", "%0d%0a"]
    return "".join(rng.choice(pieces + [word(rng)]) for _ in range(rng.randint(1, 6)))


def random_name(rng, world):
    image = rng.choice(world.images)
    return rng.choice([
        lambda: image.name,
        lambda: image.repository,
        lambda: word(rng),
        lambda: "/".join(word(rng) for _ in range(rng.randint(2, 5))),
        lambda: image.name.upper(),
        lambda: "../" * rng.randint(1, 6) + "etc/passwd",
        lambda: "%2e%2e/" * rng.randint(1, 4) + image.repository,
        lambda: image.repository.replace("/", "%2F"),
        lambda: image.repository + "/..",
        lambda: "a//b",
        lambda: "a" * rng.choice([200, 256, 300, 5000]),
        lambda: "/".join(["x"] * rng.randint(60, 140)),
        lambda: rng.choice(["_tags/x", "x/_links", "repos/x", "blobs/sha256", ".tmp-x", "x/.."]),
        lambda: rng.choice(world.registry_hosts) + "/" + image.repository,
        lambda: rng.choice(["evil.example", "localhost:5000", "169.254.169.254", "[::1]", "127.0.0.1",
                            f"127.0.0.1:{rng.choice(world.fake_ports())}"]) + "/" + word(rng),
        lambda: odd_text(rng) + "/" + word(rng),
        lambda: image.repository + odd_text(rng),
    ])()


def random_digest(rng, world):
    known = rng.choice(rng.choice(world.images).blobs)
    return rng.choice([
        lambda: known,
        lambda: rng.choice(world.images).added["digest"],
        lambda: "sha256:" + hex_digits(rng, 64),
        lambda: "sha512:" + hex_digits(rng, 128),
        lambda: "sha384:" + hex_digits(rng, 96),
        lambda: "md5:" + hex_digits(rng, 32),
        lambda: "sha256:" + hex_digits(rng, rng.choice([0, 1, 63, 65, 200])),
        lambda: known.upper(),
        lambda: "sha256:" + hex_digits(rng, 64, "0123456789abcdefghijklmnopqrstuvwxyz"),
        lambda: known.replace(":", "%3A"),
        lambda: known + "/../../" + word(rng),
        lambda: "sha256:../../../../" + word(rng),
        lambda: known[:-1] + odd_text(rng),
    ])()


def random_tag(rng, world):
    return rng.choice([
        lambda: rng.choice(world.images).tag,
        lambda: "latest",
        lambda: word(rng),
        lambda: "t" * rng.choice([128, 129, 300]),
        lambda: rng.choice(["-bad", ".", "..", "%2e%2e", "_", "v1.0-rc.1", "A" * 5]),
        lambda: word(rng) + odd_text(rng),
    ])()


def random_query(rng, world):
    return rng.choice([
        lambda: "",
        lambda: "",
        lambda: "?ns=" + rng.choice(world.registry_hosts),
        lambda: "?ns=" + rng.choice(["evil.example", "169.254.169.254", f"127.0.0.1:{rng.choice(world.fake_ports())}",
                                     "", odd_text(rng)]),
        lambda: f"?n={rng.choice(['5', '-1', 'x', '99999999999999999999'])}&last={word(rng)}",
        lambda: f"?refresh_token={SECRET_MARK}-{word(rng)}&password={SECRET_MARK}",
        lambda: "?" + "&".join(f"{word(rng)}={odd_text(rng)}" for _ in range(rng.randint(1, 5))),
        lambda: "?" + "a=b&" * rng.randint(100, 800),
    ])()


def random_target(rng, world):
    name = random_name(rng, world)
    path = rng.choice([
        lambda: f"/v2/{name}/manifests/{random_tag(rng, world)}",
        lambda: f"/v2/{name}/manifests/{random_digest(rng, world)}",
        lambda: f"/v2/{name}/blobs/{random_digest(rng, world)}",
        lambda: f"/v2/{name}/tags/list",
        lambda: f"/v2/{name}/referrers/{random_digest(rng, world)}",
        lambda: f"/v2/{name}/blobs/uploads/",
        lambda: f"/v2/{name}/manifests/",
        lambda: rng.choice(["/", "/v2", "/v2/", "/v2/_catalog", "/healthz", "/routes", "/v2/auth", "/v1/",
                            "//v2/", "/v2//", "/v2/../v2/", "/%76%32/", "/v2/%2e%2e/%2e%2e/", "/v2/auth/..",
                            "/favicon.ico", "/v2/" + odd_text(rng)]),
    ])()
    return path + random_query(rng, world)


def random_host(rng, world, proxy_host):
    return rng.choice([
        proxy_host, proxy_host, proxy_host,
        "docker." + DOMAIN, "registry.docker." + DOMAIN, f"{world.open_route}.{DOMAIN}:443",
        "extra." + DOMAIN, f"{world.private_route}.{DOMAIN}", "unknown." + DOMAIN,
        "evil.example", f"127.0.0.1:{rng.choice(world.fake_ports())}", "[::1]:80", "[::1", 'x"y', "a b",
        "", "h" * 300, "a\x00b", "docker." + DOMAIN + ":99999", "169.254.169.254",
    ])


def random_authorization(rng, world):
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return rng.choice([
        lambda: None,
        lambda: None,
        lambda: "Bearer " + rng.choice(world.tokens) if world.tokens else None,
        lambda: "Bearer " + word(rng, 40),
        lambda: "Bearer " + dockerproxy.ANONYMOUS_TOKEN,
        lambda: "Basic " + basic,
        lambda: "Basic " + rng.choice(["!!!", "", "Og==", word(rng)]),
        lambda: rng.choice(["Digest x", "Bearer", "bearer  " + word(rng), odd_text(rng)]),
    ])()


def random_headers(rng, world, proxy_host):
    headers = []
    if rng.random() < 0.9:
        headers.append(("Host", random_host(rng, world, proxy_host)))
    authorization = random_authorization(rng, world)
    if authorization is not None:
        headers.append(("Authorization", authorization))
    if rng.random() < 0.5:
        accept = rng.choice(list(MANIFEST_TYPES) + ["*/*", ",,,", "a/b;q=0", odd_text(rng),
                                                   ", ".join(MANIFEST_TYPES)])
        headers.append(("Accept", accept))
    if rng.random() < 0.2:
        headers.append(("Range", rng.choice(["bytes=0-10", "bytes=5-2", "bytes=-5", "bytes=0-",
                                             "bytes=99999999999999999999-", "bytes=0-1,2-3", "bytes=\xb2-",
                                             "items=1-2", odd_text(rng)])))
    if rng.random() < 0.05:
        headers.append(("If-Range", rng.choice(['"x"', '"' + random_digest(rng, world) + '"', odd_text(rng)])))
    if rng.random() < 0.3:
        headers.append(("User-Agent", rng.choice(["docker/27.0", "containerd/1.7", odd_text(rng), "u" * 2000])))
    if rng.random() < 0.05:
        headers.append(("Expect", "100-continue"))
    if rng.random() < 0.1:
        headers.append(("Connection", rng.choice(["close", "keep-alive", "Upgrade", "x, close"])))
    if rng.random() < 0.05:
        headers.append(("X-Forwarded-Host", random_host(rng, world, proxy_host)))
    return headers


# Case makers: each returns one Case -------------------------------------------

def plain_request(rng, world, proxy_host):
    method = rng.choice(["GET", "GET", "GET", "HEAD", "HEAD", "POST"])
    target = random_target(rng, world)
    headers = random_headers(rng, world, proxy_host)
    return Case("request", request_bytes(method, target, headers), [(method, target)])


def path_attack(rng, world, proxy_host):
    image = rng.choice(world.images)
    target = rng.choice([
        f"/v2/{image.name}/blobs/../../../../etc/passwd",
        f"/v2/{image.name}/manifests/..%2F..%2F..%2Fetc%2Fpasswd",
        f"/v2/%2e%2e/%2e%2e/{image.repository}/manifests/{image.tag}",
        f"/v2/{image.repository}/blobs/sha256:{'../' * 8}tmp",
        f"/v2/{image.repository}/manifests/{image.tag}%00.json",
        f"/v2/{image.repository}/manifests/{image.tag}\x00x",
        f"/v2/{image.repository}%2F..%2F..%2Fx/tags/list",
        f"/v2/{image.repository}/manifests/{'t' * 129}",
        f"/v2/{'n' * 300}/manifests/{image.tag}",
        f"/v2/{image.repository}/blobs/sha512:{hex_digits(rng, 128)}",
        f"/v2/{image.repository}/blobs/sha256:{hex_digits(rng, 64).upper()}",
        f"/v2/{image.repository}/blobs/SHA256:{hex_digits(rng, 64)}",
        "/" + "../" * rng.randint(1, 20) + "etc/passwd",
        "/v2/" + "/".join([".."] * rng.randint(1, 10)) + "/manifests/x",
        "/v2/" + odd_text(rng) + "/manifests/" + odd_text(rng),
    ])
    method = rng.choice(["GET", "HEAD"])
    headers = [("Host", proxy_host)]
    if world.tokens and rng.random() < 0.5:
        headers.append(("Authorization", "Bearer " + rng.choice(world.tokens)))
    return Case("path", request_bytes(method, target, headers), [(method, target)])


def cross_repository(rng, world, proxy_host):
    """A cached object asked for through another repository: the proxy must ask that upstream."""
    owner, other = rng.sample(world.images, 2)
    digest = rng.choice(owner.blobs + [owner.added["digest"]])
    kind = "manifests" if digest == owner.added["digest"] and rng.random() < 0.8 else "blobs"
    method = rng.choice(["GET", "GET", "HEAD"])
    target = f"/v2/{other.name}/{kind}/{digest}"
    headers = [("Host", other.host or proxy_host), ("Accept", DOCKER_MANIFEST)]
    if world.tokens and rng.random() < 0.5:
        headers.append(("Authorization", "Bearer " + rng.choice(world.tokens)))
    return Case("cross", request_bytes(method, target, headers), [(method, target)])


def header_flood(rng, world, proxy_host):
    """Many header lines, or one huge one; heads past 64 KiB must be refused."""
    method, target = "GET", random_target(rng, world)
    headers = [("Host", proxy_host)]
    shape = rng.choice(["many", "many", "wide", "huge_line", "huge_name"])
    if shape == "many":
        headers += [(f"X-Flood-{i}", "v" * rng.randint(0, 40)) for i in range(rng.randint(50, 140))]
    elif shape == "wide":  # under 100 lines, over 64 KiB: the head limit, not the line count
        headers += [(f"X-Wide-{i}", "w" * 1000) for i in range(rng.randint(60, 98))]
    elif shape == "huge_line":
        headers.append(("X-Huge", "h" * rng.choice([8000, 65000, 70000])))
    else:
        headers.append(("X" * rng.choice([1000, 70000]), "v"))
    return Case("flood", request_bytes(method, target, headers), [(method, target)])


def invalid_method(rng, world, proxy_host):
    method = rng.choice([
        "FOO", "get", "Get", "PROPFIND", "TRACE", "OPTIONS", "CONNECT", "PRI", "M" * 1000,
        "G\x1bET", "GET\x00", "\x7fGET", "\x9bGET", "G\x07E\x08T", "\x1b[2J\x1b[H", "GE\x1b]0;owned\x07T",
        "\xffGET", odd_text(rng).replace(" ", "").replace("\t", "") or "X",
    ])
    target = rng.choice(["/v2/", "*", random_target(rng, world)])
    return Case("method", request_bytes(method, target, [("Host", proxy_host)]), [(method, target)])


def push_endpoint(rng, world, proxy_host):
    name = rng.choice(world.images).name
    method = rng.choice(["PUT", "POST", "PATCH", "DELETE"])
    target = rng.choice([
        f"/v2/{name}/blobs/uploads/", f"/v2/{name}/blobs/uploads/{word(rng, 32)}?digest={random_digest(rng, world)}",
        f"/v2/{name}/manifests/{random_tag(rng, world)}", f"/v2/{name}/blobs/{random_digest(rng, world)}",
        f"/v2/{name}/blobs/uploads/?mount={random_digest(rng, world)}&from=library/alpine", "/v2/auth",
    ])
    body = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 10, 1000, 4000])))
    headers = [("Host", proxy_host), ("Content-Type", "application/octet-stream")]
    if rng.random() < 0.3:
        headers.append(("Expect", "100-continue"))
    if rng.random() < 0.3:
        chunked = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        raw = request_bytes(method, target, headers + [("Transfer-Encoding", "chunked")], body=chunked)
    else:
        raw = request_bytes(method, target, headers + [("Content-Length", str(len(body)))], body=body)
    return Case("push", raw, [(method, target)])


def smuggling(rng, world, proxy_host):
    """A request whose body is another request: the proxy may answer the first, never the second."""
    inner = request_bytes("GET", "/v2/smuggled/manifests/" + word(rng), [("Host", "smuggled." + DOMAIN)])
    method = rng.choice(["GET", "HEAD"])
    target = random_target(rng, world)
    host = [("Host", proxy_host)]
    shape = rng.choice(["cl", "te", "cl_te", "te_cl", "two_cl", "odd_cl", "odd_te", "auth_post"])
    if shape == "cl":
        headers, body = host + [("Content-Length", str(len(inner)))], inner
    elif shape == "te":
        headers, body = host + [("Transfer-Encoding", "chunked")], b"0\r\n\r\n" + inner
    elif shape == "cl_te":
        headers = host + [("Content-Length", str(len(inner) + 5)), ("Transfer-Encoding", "chunked")]
        body = b"0\r\n\r\n" + inner
    elif shape == "te_cl":
        headers = host + [("Transfer-Encoding", "chunked"), ("Content-Length", "0")]
        body = b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
    elif shape == "two_cl":
        headers, body = host + [("Content-Length", "0"), ("Content-Length", str(len(inner)))], inner
    elif shape == "odd_cl":
        value = rng.choice([f"+{len(inner)}", f" {len(inner)} ", f"{len(inner)}, {len(inner)}", f"0{len(inner)}",
                            f"{len(inner)}\xb2", "-1"])
        headers, body = host + [("Content-Length", value)], inner
    elif shape == "odd_te":
        value = rng.choice(["xchunked", "chunked, identity", "identity", " chunked", "CHUNKED"])
        headers, body = host + [("Transfer-Encoding", value)], b"0\r\n\r\n" + inner
    else:  # a POST to /v2/auth refused before its form is read: the form must not become a request
        method, target = "POST", "/v2/auth?scope=repository:library/alpine:pull"
        host_value = rng.choice(['x"y', "evil.example", proxy_host])
        headers, body = [("Host", host_value), ("Content-Length", str(len(inner)))], inner
    return Case("smuggle", request_bytes(method, target, headers, body=body), [(method, target)])


def malformed_headers(rng, world, proxy_host):
    image = rng.choice(world.images)
    target = rng.choice([f"/v2/{image.name}/manifests/{image.tag}", f"/v2/{image.name}/tags/list", "/v2/",
                         random_target(rng, world)])  # mostly targets that reach upstream
    bad = rng.choice([
        "Accept: a\r\n b", "User-Agent: docker\r\n\tfolded", "Accept: " + DOCKER_MANIFEST + "\rX-Injected: 1",
        "User-Agent: a\rb", "User-Agent: a\x00b", "Accept: \x00", "Range: bytes=0-1\r\n 2",
        "NoColon", " Host: leading-space", "Host : " + proxy_host, "X\x01Y: z", "X Y: z", ": empty-name",
        "Host: " + proxy_host + "\r\nHost: evil.example", "Accept:\x1b[31mred", "User-Agent: \x7f\x9b",
    ])
    head = f"GET {target} HTTP/1.1\r\nHost: {proxy_host}\r\n{bad}\r\n\r\n"
    if rng.random() < 0.2:
        head = head.replace("\r\n", "\n")  # bare LF line ends
    return Case("header", head.encode("latin-1"), [("GET", target)])


def token_request(rng, world, proxy_host):
    scope = f"repository:{rng.choice(world.images).name}:{rng.choice(['pull', 'push', 'pull,push,delete', '*', ''])}"
    query = "?" + rng.choice([
        f"scope={scope}&service=x", f"scope={scope}&scope={odd_text(rng)}", "service=" + odd_text(rng),
        f"scope={scope}&ns={rng.choice(world.registry_hosts)}", f"refresh_token={SECRET_MARK}-{word(rng)}",
        f"account={odd_text(rng)}&scope={scope}", "",
    ])
    headers = [("Host", random_host(rng, world, proxy_host))]
    authorization = random_authorization(rng, world)
    if authorization:
        headers.append(("Authorization", authorization))
    if rng.random() < 0.5:
        return Case("token", request_bytes("GET", "/v2/auth" + query, headers), [("GET", "/v2/auth" + query)])
    form = rng.choice([
        f"grant_type=password&username={USER}&password={PASSWORD}&service=x&scope={scope}&client_id=fuzz",
        f"grant_type=refresh_token&refresh_token={SECRET_MARK}-{word(rng)}&service=x&scope={scope}",
        f"grant_type={odd_text(rng)}", "%%%", "a=" + "b" * 70000, "",
    ]).encode("latin-1", "replace")
    length = rng.choice([str(len(form)), str(len(form)), "\xb2", "\xb9\xb2", "-1", "1e3", "0x10", "",
                         "9" * 30, "00000000000000000000000" + str(len(form)), "\u0663".encode().decode("latin-1")])
    headers += [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", length)]
    target = "/v2/auth" + query
    return Case("token", request_bytes("POST", target, headers, body=form), [("POST", target)])


def absolute_form(rng, world, proxy_host):
    image = rng.choice(world.images)
    path = f"/v2/{image.repository}/manifests/{image.tag}"
    target = rng.choice([
        f"http://[x/v2/?refresh_token={SECRET_MARK}", "http://[x" + path, f"http://evil.example{path}",
        f"http://127.0.0.1:{rng.choice(world.fake_ports())}{path}", f"https://ghcr.io{path}",
        f"http://user:{SECRET_MARK}@evil.example{path}", f"//evil.example{path}", "*", "v2/", "http://",
        f"http://[::1]:99999{path}", "http://a:b/v2/", f"http://{proxy_host}{path}", f"HTTP://EVIL.EXAMPLE{path}",
        f"ftp://evil.example{path}", f"http://169.254.169.254/latest/meta-data?{SECRET_MARK}",
    ])
    method = rng.choice(["GET", "HEAD"])
    return Case("absolute", request_bytes(method, target, [("Host", proxy_host)]), [(method, target)])


def versions(rng, world, proxy_host):
    target = random_target(rng, world)
    version = rng.choice(["HTTP/1.0", "HTTP/1.0", "HTTP/0.9", "", "HTTP/2.0", "HTTP/1.2", "HTTP/1.1x",
                          "HTTPS/1.1", "HTTP/1", "HTTP/11", "http/1.1", "HTTP/1.1 extra"])
    headers = [("Host", proxy_host)] + ([("Connection", "keep-alive")] if rng.random() < 0.5 else [])
    if version == "":  # HTTP/0.9: a request line of two words, no headers, an answer without a status line
        raw = f"GET {target}\r\n".encode("latin-1")
    else:
        raw = request_bytes("GET", target, headers, version)
    return Case("version", raw, [("GET", target)], http09=version in ("", "HTTP/0.9"))


def pipeline(rng, world, proxy_host):
    cases = [plain_request(rng, world, proxy_host) for _ in range(rng.randint(2, 6))]
    requests = [request for case in cases for request in case.requests]
    return Case("pipeline", b"".join(case.raw for case in cases), requests)


def garbage(rng, world, proxy_host):
    raw = rng.choice([
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000))),
        lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rng.getrandbits(8) for _ in range(64)),
        lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        lambda: b"\r\n" * rng.randint(1, 50),
        lambda: b"GET",
        lambda: b"GET / HTTP/1.1\r\nHost: " + proxy_host.encode(),  # a head that never ends
        lambda: b"",
    ])()
    return Case("garbage", raw, [("GET", "?")], limit=None)


CASE_MAKERS = (  # (weight, maker)
    (30, plain_request), (9, path_attack), (4, cross_repository), (6, header_flood), (7, invalid_method),
    (7, push_endpoint), (9, smuggling), (7, malformed_headers), (8, token_request), (5, absolute_form),
    (5, versions), (6, pipeline), (3, garbage),
)


# Answers #######################################################################

STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [\x20-\x7e]*\r\n")
CHUNK_SIZE_LINE = re.compile(rb"([0-9a-fA-F]{1,16})\r\n")
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x20-\x7e\t\x80-\xff]*)\r\n")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")   # C0, DEL and C1: terminal escapes among them
ACCESS_STATUS = re.compile(r" status=([0-9]{3}) ")


def server_error(status):
    """A 5xx that is the proxy's fault.  505 is not: it is what RFC 9110 prescribes for a
    request line naming HTTP/2.0, which only the client chose."""
    return status >= 500 and status != 505


def exchange(address, raw):
    """Send `raw` on a new connection, end our side, read until the proxy closes.

    Returns (bytes received, "closed" | "reset" | "hung")."""
    with socket.create_connection(address, timeout=ANSWER_TIMEOUT) as sock:
        with contextlib.suppress(OSError):  # the proxy may refuse and close before reading it all
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while len(received) < MAX_ANSWER_BYTES:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return bytes(received), "hung"
            except ConnectionResetError:
                return bytes(received), "reset"
            if not chunk:
                break
            received += chunk
        return bytes(received), "closed"


def parse_answers(data, requests):
    """Split what came back into answers: (list of (status, headers, body), problem or None).

    Strict HTTP/1.1 framing: a status line, header lines of a token and a value
    without control bytes, then a body framed by Transfer-Encoding: chunked,
    one Content-Length, or the end of the connection.  1xx answers are
    interim and belong to the next request's final answer."""
    answers, position = [], 0
    while position < len(data):
        if b"\r\n\r\n" not in data[position:]:
            return answers, f"answer cut short in its head: {data[position:position + 60]!r}"
        status_line = STATUS_LINE.match(data, position)
        if not status_line:
            return answers, f"malformed status line {data[position:position + 60]!r}"
        status, position = int(status_line.group(1)), status_line.end()
        headers = {}
        while not data.startswith(b"\r\n", position):
            line = HEADER_LINE.match(data, position)
            if not line:
                return answers, f"malformed header line {data[position:position + 60]!r} after {status}"
            headers.setdefault(line.group(1).decode().lower(), []).append(line.group(2).decode("latin-1").strip())
            position = line.end()
        position += 2
        if status < 200:
            if status != 100 or headers:
                return answers, f"unexpected interim answer {status}"
            continue
        method = requests[len(answers)][0] if len(answers) < len(requests) else "GET"
        if method == "?":  # the server could not know it was a HEAD: a body may follow, or not
            method = "HEAD" if data.startswith(b"HTTP/", position) or position == len(data) else "GET"
        body, position, problem = answer_body(data, position, status, headers, method)
        answers.append((status, headers, body))
        if problem:
            return answers, problem
    return answers, None


def answer_body(data, position, status, headers, method):
    """(body, position after it, problem or None) for one answer."""
    lengths = set(headers.get("content-length", []))
    chunked = headers.get("transfer-encoding", [])
    if lengths and chunked:
        return b"", position, f"{status} has both Content-Length and Transfer-Encoding"
    if len(lengths) > 1 or not all(re.fullmatch(r"[0-9]{1,18}", value) for value in lengths):
        return b"", position, f"{status} has Content-Length {sorted(lengths)}"
    if method == "HEAD" or status in (204, 304):
        return b"", position, None
    if chunked:
        if chunked != ["chunked"]:
            return b"", position, f"{status} has Transfer-Encoding {chunked}"
        return dechunk(data, position, status)
    if lengths:
        end = position + int(lengths.pop())
        if end > len(data):
            return data[position:], len(data), f"{status} body ended {end - len(data)} bytes short"
        return data[position:end], end, None
    return data[position:], len(data), None  # ends with the connection


def dechunk(data, position, status):
    body = bytearray()
    while True:
        if b"\r\n" not in data[position:]:
            return bytes(body), len(data), f"{status} chunked body cut short"
        size_line = CHUNK_SIZE_LINE.match(data, position)
        if not size_line:
            return bytes(body), len(data), f"{status} chunked body broken at {data[position:position + 20]!r}"
        size, position = int(size_line.group(1), 16), size_line.end()
        if size == 0:
            if not data.startswith(b"\r\n", position):
                return bytes(body), len(data), f"{status} chunked body without its final CRLF (or cut short)"
            return bytes(body), position + 2, None
        if not data.startswith(b"\r\n", position + size):
            return bytes(body), len(data), f"{status} chunk of {size} bytes cut short"
        body += data[position:position + size]
        position += size + 2


def error_body_problem(status, headers, body, target):
    """A 4xx/5xx body must be JSON: registry errors, or the token service's own answer."""
    if status < 400 or not body:
        return None
    content_type = (headers.get("content-type") or [""])[0].split(";")[0]
    try:
        document = json.loads(body)
    except ValueError:
        return f"{status} body is not JSON: {body[:80]!r}"
    if content_type != "application/json":
        return f"{status} JSON body sent as {content_type!r}"
    if target.startswith("/v2/auth"):
        return None  # the upstream token service's error, relayed as it came
    errors = document.get("errors") if isinstance(document, dict) else None
    if not (isinstance(errors, list) and errors and all(isinstance(e, dict) and "code" in e for e in errors)):
        return f"{status} body is not a registry error: {body[:80]!r}"
    return None


# The run #######################################################################

# Findings counted per answer, named as FIGURES names them.
SERVER_ERRORS = "5xx answers received"
MALFORMED = "malformed answers"
SMUGGLED = "answers to requests never sent (a body parsed as a request)"
BIG_HEADS_SERVED = "request heads over 64 KiB served"
HUNG = "connections left open after the client's end"


FIGURE_ORDER = (
    SERVER_ERRORS, "5xx in the access log", MALFORMED, SMUGGLED, BIG_HEADS_SERVED, HUNG,
    "files written outside CACHE_DIR", "connections to other hosts", "name lookups", "tracebacks",
    "log lines with raw control characters", "log lines with a query secret",
    "upstream requests with CR, LF or NUL in a header", "normal pulls failing afterwards",
)


class Findings:
    """What the answers showed: counts, and the first few examples of each."""

    SHOWN = 5

    def __init__(self):
        self.counts = dict.fromkeys([SERVER_ERRORS, MALFORMED, SMUGGLED, BIG_HEADS_SERVED, HUNG], 0)
        self.examples = {name: [] for name in self.counts}

    def add(self, name, example):
        self.counts[name] += 1
        if len(self.examples[name]) < self.SHOWN:
            self.examples[name].append(example)


def judge(case, index, data, outcome, findings):
    """One case's answers against the rules every answer keeps; returns the answers."""
    def note(name, what):
        findings.add(name, f"case {index} ({case.kind}): {what}; sent {case.excerpt()}")
    if outcome == "hung":
        note(HUNG, "no end")
    if case.http09:
        return []  # no status line to judge; the access log still counts its 5xx
    answers, problem = parse_answers(data, case.requests)
    if problem and not (outcome == "reset" and "short" in problem):  # a reset may cut what was sent
        note(MALFORMED, problem)
    for number, (status, headers, body) in enumerate(answers):
        target = case.requests[number][1] if number < len(case.requests) else ""
        if server_error(status):
            note(SERVER_ERRORS, f"{status} {body[:100]!r} to request {number + 1} ({target[:80]!r})")
        problem = error_body_problem(status, headers, body, target)
        if problem:
            note(MALFORMED, problem)
    if case.limit is not None and len(answers) > case.limit:
        note(SMUGGLED, f"{len(answers)} answers {[status for status, _, _ in answers]} to {case.limit}")
    if case.head_size >= BIG_HEAD and answers and answers[0][0] not in REFUSAL_STATUSES:
        note(BIG_HEADS_SERVED, f"{answers[0][0]} to a head of {case.head_size} bytes")
    return answers


def run_cases(rng, world, running, findings):
    """Send CASES cases, each on its own connection; (cases, requests, answers) counted."""
    makers = [maker for weight, maker in CASE_MAKERS for _ in range(weight)]
    address = ("127.0.0.1", running.port)
    sent = {"cases": 0, "requests": 0, "answers": 0}
    for index in range(CASES):
        case = rng.choice(makers)(rng, world, running.host)
        data, outcome = exchange(address, case.raw)
        answers = judge(case, index, data, outcome, findings)
        sent["cases"] += 1
        sent["requests"] += len(case.requests)
        sent["answers"] += len(answers)
        if findings.counts[HUNG] >= MAX_HANGS:
            break
    return sent


def normal_pull(running, image):
    """What docker does, through the proxy: the manifest by tag, then every blob, verified."""
    user, password = image.credentials or (None, None)
    client = RegistryClient(running, user, password, host=image.host)
    status, _, body = client.request("GET", f"/v2/{image.name}/manifests/{image.tag}", {"Accept": DOCKER_MANIFEST})
    if status != 200 or body != image.added["manifest"]:
        return f"{image.name}:{image.tag} manifest: {status} {body[:100]!r}"
    for digest in image.blobs:
        status, _, blob = client.request("GET", f"/v2/{image.name}/blobs/{digest}")
        if status != 200 or hashlib.sha256(blob).hexdigest() != digest.partition(":")[2]:
            return f"{image.name} blob {digest}: {status}"
    return None


def anonymous_tokens(running, world):
    """Tokens clients fetch through the proxy, for the fuzzer to send."""
    tokens = []
    for image in world.images:
        client = RegistryClient(running, host=image.host)
        client.request("GET", f"/v2/{image.name}/manifests/{image.tag}", {"Accept": DOCKER_MANIFEST})
        if client.token:
            tokens.append(client.token)
    return tokens


def start_server(root, world):
    """The proxy in a thread, as conftest's start_proxy runs it; (server, tracebacks of its threads)."""
    config = proxy_config(pathlib.Path(root), *world.flags(), **world.environment())
    server = dockerproxy.ProxyServer(config, proxy=dockerproxy.Proxy(config, MovableClock()))
    crashes = []

    def handle_error(request, client_address):  # socketserver would print these to stderr
        crashes.append(traceback.format_exc())
    server.handle_error = handle_error
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, crashes


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """Run the fuzzer once, watching the proxy; the tests below each judge one figure.

    The proxy's cwd and tempfile's directory are inside the snapshotted tree, next
    to CACHE_DIR, so a file written anywhere but the cache shows up."""
    root = str(tmp_path_factory.mktemp("fuzz"))
    cache_dir, cwd, temp = (os.path.join(root, name) for name in ("cache", "cwd", "tmp"))
    os.mkdir(cwd)
    os.mkdir(temp)
    before = tree(root, cache_dir)
    findings, started = Findings(), time.monotonic()
    with contextlib.ExitStack() as stack:
        world = World(stack)
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.chdir(cwd)
        patch.setattr(tempfile, "tempdir", temp)
        connections = Connections()
        connections.install(patch)
        logs = stack.enter_context(LogRecords().attached())
        server, crashes = start_server(root, world)
        stack.callback(server.server_close)
        stack.callback(server.shutdown)
        running = RunningProxy(server)
        warm_up = [problem for problem in map(functools.partial(normal_pull, running), world.images) if problem]
        assert not warm_up, f"the proxy cannot even pull before the fuzzing: {warm_up}"  # a cache to hit
        world.tokens = anonymous_tokens(running, world)
        sent = run_cases(random.Random(SEED), world, running, findings)
        assert server.proxy.cache.wait_idle(60), "fills settled"
        pull_failures = [problem for problem in map(functools.partial(normal_pull, running), world.images) if problem]
        after = tree(root, cache_dir)
    report = Report(
        findings=findings, sent=sent, seconds=time.monotonic() - started, records=logs.records,
        crashes=crashes, pull_failures=pull_failures,
        stray_files=sorted(path for path, entry in after.items() if before.get(path) != entry) + symlinks(cache_dir),
        elsewhere=connections.elsewhere(world.addresses(), ("127.0.0.1", running.port)),
        lookups=sorted({host for host in connections.looked_up if host not in ("127.0.0.1", b"127.0.0.1")}),
        upstream_records=[record for fake in world.fakes for record in fake.requests])
    FIGURES.clear()
    FIGURES.update(report.figures())
    print("\n" + describe_figures())
    return report


class Report:
    """One run and its figures.  Its parts: findings (from the answers), sent, seconds,
    records (the log), crashes (connection threads that died), pull_failures,
    stray_files, elsewhere (connections), lookups, upstream_records (the fakes')."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    def lines(self, predicate):
        return [record.getMessage() for record in self.records if predicate(record.getMessage())]

    def logged_server_errors(self):
        """Access lines with a 5xx of the proxy's own (HTTP/0.9 answers have no other trace)."""
        return self.lines(lambda line: server_error(int((ACCESS_STATUS.search(line) or [0, 0])[1])))

    def tracebacks(self):
        """Logged exceptions and connection threads that died, each as its first and last lines."""
        logged = [f"{record.getMessage()}\n{logging.Formatter().formatException(record.exc_info)}"
                  for record in self.records if record.exc_info]
        died = [f"a connection thread died:\n{crash}" for crash in self.crashes]
        return [summary(text) for text in logged + died]

    def forwarded_control_bytes(self):
        """Header values that reached upstream with CR, LF or NUL, "invalid and dangerous" (RFC 9110 5.5)."""
        return [f"{record['method']} {record['path']}: {name}={value!r}"
                for record in self.upstream_records for name, value in record["headers"].items()
                if re.search(r"[\x00\r\n]", value)]

    def examples(self):
        """{figure name: the examples behind it}."""
        return {
            "5xx in the access log": self.logged_server_errors(),
            "files written outside CACHE_DIR": self.stray_files,
            "connections to other hosts": self.elsewhere,
            "name lookups": self.lookups,
            "tracebacks": self.tracebacks(),
            "log lines with raw control characters": [repr(line) for line in self.lines(CONTROL.search)],
            "log lines with a query secret": self.lines(lambda line: SECRET_MARK in line),
            "upstream requests with CR, LF or NUL in a header": self.forwarded_control_bytes(),
            "normal pulls failing afterwards": self.pull_failures,
            **self.findings.examples,
        }

    def figures(self):
        counted = {name: len(examples) for name, examples in self.examples().items()}
        counted.update(self.findings.counts)
        run = {"seed": SEED, "cases (connections)": self.sent["cases"], "requests sent": self.sent["requests"],
               "answers received": self.sent["answers"], "seconds": round(self.seconds, 1)}
        return {**run, **{name: counted[name] for name in FIGURE_ORDER}}


def summary(traceback_text):
    """A traceback in one line: what was logged, the proxy's innermost frame, the exception."""
    lines = traceback_text.strip().splitlines()
    frames = [line.strip() for line in lines if line.strip().startswith("File ")]
    frames = [frame for frame in frames if "dockerproxy.py" in frame] or frames
    return " ... ".join([lines[0]] + frames[-1:] + [lines[-1]])


def describe_figures():
    return "fuzz figures:\n" + "\n".join(f"  {name}: {value}" for name, value in FIGURES.items())


def failure(report, name):
    """The message of a figure that is not 0: the seed and its first examples
    (every figure is printed by the run, under "Captured stdout setup")."""
    shown = "\n  ".join(str(example)[:400] for example in report.examples()[name][:5])
    return f"{name}: {FIGURES[name]} {reproduce()}\n  {shown}"


# The figures, judged #############################################################

def test_fuzzed_requests_get_no_5xx_from_the_proxy(fuzz):
    assert FIGURES[SERVER_ERRORS] == 0, failure(fuzz, SERVER_ERRORS)
    assert FIGURES["5xx in the access log"] == 0, failure(fuzz, "5xx in the access log")


def test_every_fuzzed_answer_is_well_formed(fuzz):
    """A status line, clean header lines, one framing, and a JSON error body for a 4xx/5xx."""
    assert FIGURES[MALFORMED] == 0, failure(fuzz, MALFORMED)


def test_no_request_body_is_ever_answered_as_a_request(fuzz):
    assert FIGURES[SMUGGLED] == 0, failure(fuzz, SMUGGLED)


def test_request_heads_over_64_kib_are_refused(fuzz):
    assert FIGURES[BIG_HEADS_SERVED] == 0, failure(fuzz, BIG_HEADS_SERVED)


def test_every_connection_is_closed_once_the_client_has_sent_everything(fuzz):
    assert FIGURES[HUNG] == 0, failure(fuzz, HUNG)


def test_fuzzing_writes_nothing_outside_the_cache_dir(fuzz):
    assert FIGURES["files written outside CACHE_DIR"] == 0, failure(fuzz, "files written outside CACHE_DIR")


def test_the_proxy_connects_only_to_its_upstreams_their_redirect_targets_and_realms(fuzz):
    assert FIGURES["connections to other hosts"] == 0, failure(fuzz, "connections to other hosts")
    assert FIGURES["name lookups"] == 0, failure(fuzz, "name lookups")


def test_fuzzing_leaves_no_traceback(fuzz):
    assert FIGURES["tracebacks"] == 0, failure(fuzz, "tracebacks")


def test_log_lines_hold_no_raw_control_character(fuzz):
    name = "log lines with raw control characters"
    assert FIGURES[name] == 0, failure(fuzz, name)


def test_log_lines_hold_no_query_secret(fuzz):
    assert FIGURES["log lines with a query secret"] == 0, failure(fuzz, "log lines with a query secret")


def test_no_cr_lf_or_nul_of_a_client_header_reaches_upstream(fuzz):
    name = "upstream requests with CR, LF or NUL in a header"
    assert FIGURES[name] == 0, failure(fuzz, name)


def test_a_normal_pull_of_every_route_still_works_after_fuzzing(fuzz):
    assert FIGURES["normal pulls failing afterwards"] == 0, failure(fuzz, "normal pulls failing afterwards")
