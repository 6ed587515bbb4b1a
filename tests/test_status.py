"""The operator's pages (issue 11) from outside: who /status, /status.json,
/metrics and /admin/ admit, the login and its cookie, the CSRF rule, purge and
evict against the cache's files and the upstream's request log, the status
page's figures against /metrics', and what a client cannot make either grow.

The pure parts (AdminGate, cookie_value, purge_target, page_refresh,
dispatch, status_page) are table-tested; the rest runs a real proxy on
127.0.0.1 against the fake Docker Hub, or against a bare upstream of its own
where a test sends thousands of requests."""

import base64
import hashlib
import html.parser
import http
import http.client
import http.server
import json
import logging
import os
import re
import socket
import time
import urllib.parse

import pytest

import dockerproxy
from conftest import MovableClock, RegistryClient, proxy_config
from dockerproxy import RegistryError
from fakeregistry import DOCKER_MANIFEST
from realregistry import LoopbackServer, wait_until
from test_cache import ACCEPT_ALL, blob_gets, settled

TOKEN = "status-test-token-0123456789abcdef"
OTHER_TOKEN = "another-admin-token-9876543210"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_BODY = {"Content-Type": "application/json"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"
ADMIN_PATHS = ("/admin/login", "/admin/logout", "/admin/purge", "/admin/evict")
SECTIONS = ("traffic", "cache", "routes", "images", "clients", "pulls", "actions")


# Helpers ###################################################################

def counted(proxy):
    """Every request answered so far is counted: a request is counted after its
    last byte, and its connection's slot is given back after that."""
    wait_until(lambda: proxy.server.proxy.connections.count == 0, what="earlier requests counted")


def scrape(proxy, headers=BEARER):
    """/metrics as {(name, ((label, value), ...)): float}, and its text."""
    counted(proxy)
    status, answer, body = proxy.request("GET", "/metrics", headers)
    assert status == 200 and answer["Content-Type"] == EXPOSITION, body
    text = body.decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        key = (name, tuple(sorted(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))))
        assert key not in samples, f"series twice: {line!r}"
        samples[key] = float(value)
    return samples, text


def sample(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def status_json(proxy, headers=BEARER):
    counted(proxy)
    status, answer, body = proxy.request("GET", "/status.json", headers)
    assert status == 200 and answer["Content-Type"] == "application/json", body
    return json.loads(body)


def error_code(body):
    return json.loads(body)["errors"][0]["code"]


def login(proxy, token=TOKEN):
    """A browser's login: the session cookie as a Cookie header value."""
    status, headers, body = proxy.request("POST", "/admin/login", {**FORM, **BROWSER},
                                          body=f"token={token}".encode())
    assert status == 303, body
    return headers["Set-Cookie"].split(";")[0]


def page_csrf(proxy, headers):
    """The CSRF token the status page's forms carry, for this session or peer."""
    status, _, body = proxy.request("GET", "/status", {**headers, **BROWSER})
    assert status == 200, body
    values = {attrs.get("value") for attrs in Page(body.decode()).inputs if attrs.get("name") == "csrf"}
    assert len(values) == 1, values
    return values.pop()


def post(proxy, path, fields=None, headers=None, json_body=False):
    if json_body:
        return proxy.request("POST", path, {**JSON_BODY, **(headers or {})}, body=json.dumps(fields or {}).encode())
    body = urllib.parse.urlencode(fields or {}).encode()
    return proxy.request("POST", path, {**FORM, **(headers or {})}, body=body)


def cookie_attributes(set_cookie):
    """'name=value; Path=/; HttpOnly' -> ('name', 'value', {'path': '/', 'httponly': ''})."""
    pair, *attributes = [part.strip() for part in set_cookie.split(";")]
    name, _, value = pair.partition("=")
    found = {}
    for attribute in attributes:
        key, _, setting = attribute.partition("=")
        found[key.lower()] = setting
    return name, value, found


class Page(html.parser.HTMLParser):
    """A page as the tests read it: every start tag, the forms' inputs, and per
    <section id>, its text, its cards' texts and its tables' body rows (cell texts)."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags = []
        self.attributes = []
        self.inputs = []
        self.meta = []
        self.sections = {}
        self.text = []
        self._section = self._row = self._cell = self._card = None
        self._card_depth = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attributes.append((tag, attrs))
        if tag == "input":
            self.inputs.append(attrs)
        if tag == "meta":
            self.meta.append(attrs)
        if tag == "section" and attrs.get("id"):
            self._section = self.sections.setdefault(attrs["id"], {"text": [], "cards": [], "rows": []})
        elif tag == "div" and self._card is not None:
            self._card_depth += 1
        elif tag == "div" and attrs.get("class") == "card":
            self._card, self._card_depth = [], 1
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = [] if tag == "td" else None

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        elif tag == "div" and self._card is not None:
            self._card_depth -= 1
            if not self._card_depth:
                self._section["cards"].append(" ".join(" ".join(self._card).split()))
                self._card = None
        elif tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            if self._row and self._section is not None:
                self._section["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        for collector in (self._cell, self._card, self._section and self._section["text"]):
            if collector is not None:
                collector.append(data)

    def section_text(self, section_id):
        return " ".join("".join(self.sections[section_id]["text"]).split())


# 1. Pure: AdminGate ########################################################

def no_cookie(session):
    return ""


def cookie(session):
    return f"{dockerproxy.SESSION_COOKIE}={session}"


def with_others(session):
    return f"theme=dark; {dockerproxy.SESSION_COOKIE}={session}; lang=en"


def expiry_moved(session):
    expiry, rest = session.split(".", 1)
    return cookie(f"{int(expiry) + 86400}.{rest}")


def nonce_changed(session):
    expiry, nonce, signature = session.split(".")
    return cookie(f"{expiry}.{'0' * 16 if nonce != '0' * 16 else '1' * 16}.{signature}")


def signature_flipped(session):
    return cookie(session[:-1] + ("0" if session[-1] != "0" else "1"))


def quoted(session):
    return f'{dockerproxy.SESSION_COOKIE}="{session}"'


def under_another_name(session):
    return f"other_session={session}"


ADMITS = [
    # gate's token, ADMIN_ALLOW, peer, Authorization, Cookie (from a session of TOKEN), seconds later -> admitted
    pytest.param(TOKEN, "", "192.0.2.1", f"Bearer {TOKEN}", no_cookie, 0, "bearer", id="bearer right"),
    pytest.param(TOKEN, "", "192.0.2.1", f"bearer {TOKEN}", no_cookie, 0, "bearer", id="bearer scheme any case"),
    pytest.param(TOKEN, "", "192.0.2.1", f"Bearer {TOKEN} ", no_cookie, 0, "bearer", id="bearer trailing space"),
    pytest.param(TOKEN, "", "192.0.2.1", f"Bearer {OTHER_TOKEN}", no_cookie, 0, None, id="bearer wrong"),
    pytest.param(TOKEN, "", "192.0.2.1", f"Bearer {TOKEN[:-1]}", no_cookie, 0, None, id="bearer prefix"),
    pytest.param(TOKEN, "", "192.0.2.1", f"Bearer {TOKEN}0", no_cookie, 0, None, id="bearer longer"),
    pytest.param(TOKEN, "", "192.0.2.1", f"Bearer {TOKEN.upper()}", no_cookie, 0, None, id="bearer other case"),
    pytest.param(TOKEN, "", "192.0.2.1", "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode(),
                 no_cookie, 0, None, id="basic"),
    pytest.param(TOKEN, "", "192.0.2.1", f"Basic {TOKEN}", no_cookie, 0, None, id="other scheme"),
    pytest.param(TOKEN, "", "192.0.2.1", f"Token {TOKEN}", no_cookie, 0, None, id="token scheme"),
    pytest.param(TOKEN, "", "192.0.2.1", TOKEN, no_cookie, 0, None, id="no scheme"),
    pytest.param(TOKEN, "", "192.0.2.1", "", no_cookie, 0, None, id="empty"),
    pytest.param(TOKEN, "", "192.0.2.1", "Bearer ", no_cookie, 0, None, id="bearer empty"),
    pytest.param("", "", "192.0.2.1", "Bearer ", no_cookie, 0, None, id="no token set, bearer empty"),
    pytest.param("", "", "192.0.2.1", "Bearer", no_cookie, 0, None, id="no token set, bare bearer"),
    # the session cookie
    pytest.param(TOKEN, "", "192.0.2.1", "", cookie, 0, "session", id="session"),
    pytest.param(TOKEN, "", "192.0.2.1", "", with_others, 0, "session", id="session among other cookies"),
    pytest.param(TOKEN, "", "192.0.2.1", "", cookie, dockerproxy.SESSION_LIFETIME - 60, "session",
                 id="session near its end"),
    pytest.param(TOKEN, "", "192.0.2.1", "", cookie, dockerproxy.SESSION_LIFETIME + 1, None, id="session expired"),
    pytest.param(TOKEN, "", "192.0.2.1", "", expiry_moved, 0, None, id="session expiry moved"),
    pytest.param(TOKEN, "", "192.0.2.1", "", nonce_changed, 0, None, id="session nonce changed"),
    pytest.param(TOKEN, "", "192.0.2.1", "", signature_flipped, 0, None, id="session signature flipped"),
    pytest.param(TOKEN, "", "192.0.2.1", "", quoted, 0, None, id="session quoted"),
    pytest.param(TOKEN, "", "192.0.2.1", "", under_another_name, 0, None, id="session under another name"),
    pytest.param(OTHER_TOKEN, "", "192.0.2.1", "", cookie, 0, None, id="session of another token"),
    pytest.param("", "0.0.0.0/0", "192.0.2.1", "", cookie, 0, "peer", id="session when no token set: peer only"),
    pytest.param("", "", "192.0.2.1", "", cookie, 0, None, id="session when no token set"),
    # the socket peer against ADMIN_ALLOW
    pytest.param("", "10.0.0.0/8", "10.1.2.3", "", no_cookie, 0, "peer", id="peer in network"),
    pytest.param("", "10.0.0.0/8", "11.0.0.1", "", no_cookie, 0, None, id="peer out of network"),
    pytest.param("", "127.0.0.1", "127.0.0.1", "", no_cookie, 0, "peer", id="peer the one address"),
    pytest.param("", "127.0.0.1", "127.0.0.2", "", no_cookie, 0, None, id="peer next to the one address"),
    pytest.param("", "10.0.0.0/8, fd00::/8", "fd12:3456::1", "", no_cookie, 0, "peer", id="ipv6 peer in"),
    pytest.param("", "10.0.0.0/8, fd00::/8", "fe80::1", "", no_cookie, 0, None, id="ipv6 peer out"),
    pytest.param("", "::1", "::1", "", no_cookie, 0, "peer", id="ipv6 loopback"),
    pytest.param("", "127.0.0.0/8", "::1", "", no_cookie, 0, None, id="ipv6 loopback against ipv4 loopback"),
    pytest.param("", "10.0.0.0/8", "::ffff:10.0.0.1", "", no_cookie, 0, "peer", id="ipv4-mapped peer in"),
    pytest.param("", "10.0.0.0/8", "::ffff:11.0.0.1", "", no_cookie, 0, None, id="ipv4-mapped peer out"),
    pytest.param("", "fe80::/10", "fe80::1%eth0", "", no_cookie, 0, "peer", id="scoped peer in"),
    pytest.param("", "fd00::/8", "fe80::1%eth0", "", no_cookie, 0, None, id="scoped peer out"),
    pytest.param("", "0.0.0.0/0", "", "", no_cookie, 0, None, id="empty peer"),
    pytest.param("", "0.0.0.0/0", "garbage", "", no_cookie, 0, None, id="garbage peer"),
    pytest.param("", "0.0.0.0/0", "10.0.0.1:80", "", no_cookie, 0, None, id="peer with port"),
    pytest.param("", "0.0.0.0/0", "10.0.0.1/8", "", no_cookie, 0, None, id="peer as network"),
    pytest.param("", "0.0.0.0/0", "[::1]", "", no_cookie, 0, None, id="bracketed peer"),
    pytest.param("", "0.0.0.0/0", "1" * 1000, "", no_cookie, 0, None, id="huge peer"),
    pytest.param("", "0.0.0.0/0", "%eth0", "", no_cookie, 0, None, id="only a zone"),
    pytest.param(TOKEN, "", "127.0.0.1", "", no_cookie, 0, None, id="token only: peer is nothing"),
    # together
    pytest.param(TOKEN, "10.0.0.0/8", "10.0.0.1", f"Bearer {TOKEN}", no_cookie, 0, "bearer", id="bearer before peer"),
    pytest.param(TOKEN, "10.0.0.0/8", "10.0.0.1", "Bearer wrong-token-0123456789", no_cookie, 0, "peer",
                 id="a wrong bearer from an allowed peer"),
    pytest.param(TOKEN, "10.0.0.0/8", "10.0.0.1", "", cookie, 0, "session", id="session before peer"),
]


@pytest.mark.parametrize("token, allow, peer, authorization, make_cookie, later, admitted", ADMITS)
def test_admin_gate_admits(token, allow, peer, authorization, make_cookie, later, admitted):
    clock = MovableClock()
    gate = dockerproxy.AdminGate(token, dockerproxy.parse_networks(allow), clock)
    issuer = gate if token == TOKEN else dockerproxy.AdminGate(TOKEN, (), clock)
    session = issuer.new_session()
    clock.advance(later)
    expected = f"session:{session}" if admitted == "session" else admitted
    assert gate.admits(peer, authorization, make_cookie(session)) == expected


def test_a_revoked_session_is_refused_and_the_others_are_not():
    gate = dockerproxy.AdminGate(TOKEN, (), MovableClock())
    kept, revoked = gate.new_session(), gate.new_session()
    gate.revoke(revoked)
    assert gate.admits("192.0.2.1", "", cookie(revoked)) is None
    assert gate.admits("192.0.2.1", "", cookie(kept)) == f"session:{kept}"


def test_a_session_lasts_twelve_hours_and_is_signed_with_the_token():
    clock = MovableClock()
    gate = dockerproxy.AdminGate(TOKEN, (), clock)
    session = gate.new_session()
    expiry, nonce, signature = session.split(".")
    assert abs(int(expiry) - (clock.time() + 12 * 3600)) <= 1
    assert re.fullmatch(r"[0-9a-f]{16}", nonce) and re.fullmatch(r"[0-9a-f]{64}", signature)
    assert TOKEN not in session
    assert dockerproxy.AdminGate(TOKEN, (), clock).session_valid(session)          # another instance, same token
    assert not dockerproxy.AdminGate(OTHER_TOKEN, (), clock).session_valid(session)  # the token changed


def csrf_case(gate, other_gate, session, other_session, case):
    """(admitted, the form's csrf value) for one row of CSRF."""
    admitted = f"session:{session}"
    return {
        "bearer, none": ("bearer", ""),
        "bearer, any": ("bearer", "whatever"),
        "peer, its own": ("peer", gate.csrf_token("peer")),
        "peer, none": ("peer", ""),
        "peer, a session's": ("peer", gate.csrf_token(admitted)),
        "session, its own": (admitted, gate.csrf_token(admitted)),
        "session, none": (admitted, ""),
        "session, another session's": (admitted, gate.csrf_token(f"session:{other_session}")),
        "session, the peer's": (admitted, gate.csrf_token("peer")),
        "session, upper case": (admitted, gate.csrf_token(admitted).upper()),
        "session, truncated": (admitted, gate.csrf_token(admitted)[:-1]),
        "session, non-ascii": (admitted, "é" * 64),
        "session, of another token": (admitted, other_gate.csrf_token(admitted)),
        "session, the session itself": (admitted, session),
    }[case]


CSRF = [("bearer, none", True), ("bearer, any", True), ("peer, its own", True), ("peer, none", False),
        ("peer, a session's", False), ("session, its own", True), ("session, none", False),
        ("session, another session's", False), ("session, the peer's", False), ("session, upper case", False),
        ("session, truncated", False), ("session, non-ascii", False), ("session, of another token", False),
        ("session, the session itself", False)]


@pytest.mark.parametrize("case, ok", CSRF, ids=[case for case, _ in CSRF])
def test_csrf_ok(case, ok):
    clock = MovableClock()
    gate, other_gate = dockerproxy.AdminGate(TOKEN, (), clock), dockerproxy.AdminGate(OTHER_TOKEN, (), clock)
    admitted, value = csrf_case(gate, other_gate, gate.new_session(), gate.new_session(), case)
    assert gate.csrf_ok(admitted, value) is ok


def test_the_peer_csrf_token_of_two_processes_without_a_token_differs():
    """Without ADMIN_TOKEN the key is random: a page of one process says nothing of another's token."""
    first = dockerproxy.AdminGate("", dockerproxy.parse_networks("127.0.0.1"), MovableClock())
    second = dockerproxy.AdminGate("", dockerproxy.parse_networks("127.0.0.1"), MovableClock())
    assert first.csrf_token("peer") != second.csrf_token("peer")
    assert not second.csrf_ok("peer", first.csrf_token("peer"))


COOKIES = [
    ("", ""),
    ("dockerproxy_session=abc", "abc"),
    ("a=1; dockerproxy_session=abc; b=2", "abc"),
    ("a=1;dockerproxy_session=abc", "abc"),
    ("dockerproxy_session=abc ", "abc"),
    ("dockerproxy_session=", ""),
    ("dockerproxy_session", ""),
    ("xdockerproxy_session=abc", ""),
    ("dockerproxy_session_old=abc", ""),
    ("DOCKERPROXY_SESSION=abc", ""),
    ("dockerproxy_session=a=b", "a=b"),
    ("dockerproxy_session=first; dockerproxy_session=second", "first"),
    (";;;", ""),
    ("a=1; b", ""),
]


@pytest.mark.parametrize("header, value", COOKIES)
def test_cookie_value(header, value):
    assert dockerproxy.cookie_value(header, dockerproxy.SESSION_COOKIE) == value


# 1. Pure: purge_target, page_refresh, dispatch #############################

@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    return dockerproxy.RouteTable(proxy_config(tmp_path_factory.mktemp("routes")))


@pytest.fixture(scope="module")
def routes_without_default(tmp_path_factory):
    return dockerproxy.RouteTable(proxy_config(tmp_path_factory.mktemp("routes"), DEFAULT_ROUTE=""))


DIGEST = "sha256:" + "c" * 64

PURGE_TARGETS = [
    # name -> route, repository, tag
    ("alpine", "docker", "library/alpine", None),
    ("alpine:3.20", "docker", "library/alpine", "3.20"),
    ("  alpine:3.20\n", "docker", "library/alpine", "3.20"),
    ("library/alpine", "docker", "library/alpine", None),
    ("docker.io/alpine", "docker", "library/alpine", None),
    ("docker.io/library/alpine:3.20", "docker", "library/alpine", "3.20"),
    ("index.docker.io/library/alpine", "docker", "library/alpine", None),
    ("registry-1.docker.io/bitnami/redis:7.2", "docker", "bitnami/redis", "7.2"),
    ("bitnami/redis", "docker", "bitnami/redis", None),
    ("ghcr.io/owner/app:1.0", "ghcr", "owner/app", "1.0"),
    ("ghcr.io/owner/app", "ghcr", "owner/app", None),
    ("ghcr.io/app", "ghcr", "app", None),                      # library/ is Docker Hub's alone
    ("quay.io/org/team/img:v1_2-3", "quay", "org/team/img", "v1_2-3"),
    ("registry.k8s.io/pause:3.9", "k8s", "pause", "3.9"),
    ("ghcr.io", "docker", "library/ghcr.io", None),            # one component is never a host (docker's rule)
]


@pytest.mark.parametrize("name, route, repository, tag", PURGE_TARGETS)
def test_purge_target(routes, name, route, repository, tag):
    found_route, found_repository, found_tag = dockerproxy.purge_target(routes, name)
    assert (found_route.name, found_repository, found_tag) == (route, repository, tag)


PURGE_REFUSALS = [
    # name -> status, code
    ("evil.example.com/owner/app", 403, "DENIED"),
    ("localhost:5000/app:1", 403, "DENIED"),
    ("localhost/app", 403, "DENIED"),
    (f"alpine@{DIGEST}", 400, "NAME_INVALID"),
    (f"docker.io/library/alpine:3.20@{DIGEST}", 400, "NAME_INVALID"),
    ("", 400, "NAME_INVALID"),
    ("   ", 400, "NAME_INVALID"),
    ("Alpine", 400, "NAME_INVALID"),
    ("alpine:", 400, "TAG_INVALID"),
    ("alpine:-x", 400, "TAG_INVALID"),
    ("alpine:" + "a" * 129, 400, "TAG_INVALID"),
    ("alpine:3.20:x", 400, "NAME_INVALID"),
    ("/alpine", 400, "NAME_INVALID"),
    ("alpine/", 400, "NAME_INVALID"),
    ("library//alpine", 400, "NAME_INVALID"),
    ("../../etc", 403, "DENIED"),                              # ".." has a dot: docker reads it as a host
    ("library/..", 400, "NAME_INVALID"),
    ("docker.io/..", 400, "NAME_INVALID"),
    (".", 400, "NAME_INVALID"),
    ("ghcr.io/", 400, "NAME_INVALID"),
    ("ali pine", 400, "NAME_INVALID"),
    ("<script>", 400, "NAME_INVALID"),
    ("a" * 256, 400, "NAME_INVALID"),
]


@pytest.mark.parametrize("name, status, code", PURGE_REFUSALS)
def test_purge_target_refuses(routes, name, status, code):
    with pytest.raises(RegistryError) as raised:
        dockerproxy.purge_target(routes, name)
    assert (raised.value.status, raised.value.code) == (status, code)


@pytest.mark.parametrize("name, outcome", [
    ("alpine", 400), ("library/alpine:3.20", 400),
    ("docker.io/alpine", ("docker", "library/alpine", None)),
    ("ghcr.io/owner/app:1.0", ("ghcr", "owner/app", "1.0")),
])
def test_purge_target_without_a_default_route(routes_without_default, name, outcome):
    if outcome == 400:
        with pytest.raises(RegistryError) as raised:
            dockerproxy.purge_target(routes_without_default, name)
        assert raised.value.status == 400 and "DEFAULT_ROUTE" in raised.value.message
    else:
        route, repository, tag = dockerproxy.purge_target(routes_without_default, name)
        assert (route.name, repository, tag) == outcome


@pytest.mark.parametrize("query, seconds", [
    ("refresh=10", 10), ("refresh=2", 2), ("refresh=3600", 3600), ("refresh=0010", 10),
    ("refresh=1", 0), ("refresh=0", 0), ("refresh=3601", 0), ("refresh=9999", 0), ("refresh=99999", 0),
    ("refresh=-5", 0), ("refresh=10.5", 0), ("refresh=1e3", 0), ("refresh=+10", 0), ("refresh=%2010", 0),
    ("refresh=%D9%A1%D9%A0", 0), ("refresh=%C2%B2", 0), ("refresh=", 0), ("refresh", 0), ("", 0),
    ("x=1&refresh=30", 30), ("refresh=30&refresh=5", 30), ("refresh=10&x=%3Cscript%3E", 10),
])
def test_page_refresh_bounds(query, seconds):
    assert dockerproxy.page_refresh(query) == seconds


OWN_DISPATCH = [
    # method, path, query, host -> endpoint
    ("GET", "/metrics", "", "127.0.0.1:8080", "metrics"),
    ("GET", "/metrics", "", "bad host!", "metrics"),
    ("GET", "/metrics", "", "", "metrics"),
    ("HEAD", "/metrics", "", "ghcr.example.com", "metrics"),
    ("GET", "/status", "refresh=5", "anything.example", "status"),
    ("HEAD", "/status", "", "bad host!", "status"),
    ("GET", "/status.json", "", "x", "status.json"),
    ("GET", "/readyz", "", "bad host!", "ready"),
    ("GET", "/healthz", "", "bad host!", "health"),
    ("POST", "/admin/login", "", "bad host!", "login"),
    ("POST", "/admin/logout", "", "127.0.0.1", "logout"),
    ("POST", "/admin/purge", "image=x", "127.0.0.1", "purge"),
    ("POST", "/admin/evict", "", "[::1]:8080", "evict"),
]


@pytest.mark.parametrize("method, path, query, host, name", OWN_DISPATCH)
def test_dispatch_of_the_operators_paths(routes, method, path, query, host, name):
    endpoint = dockerproxy.dispatch(routes, method, path, query, host)
    assert endpoint.name == name and name in dockerproxy.ENDPOINTS
    assert endpoint.route is None and endpoint.target is None
    if name.startswith("status"):
        assert endpoint.query == query
    if name in dockerproxy.SERVING_PARTS:
        part = dockerproxy.SERVING_PARTS[name]
        assert issubclass(part, dockerproxy.AdminPart) is (name not in ("ready",))


OWN_REFUSED = [
    # method, path -> status, Allow
    ("GET", "/admin/purge", 405, "POST"),
    ("GET", "/admin/login", 405, "POST"),
    ("HEAD", "/admin/evict", 405, "POST"),
    ("GET", "/admin/logout", 405, "POST"),
    ("PUT", "/admin/purge", 405, "POST"),
    ("DELETE", "/admin/evict", 405, "POST"),
    ("POST", "/status", 405, "GET, HEAD"),
    ("POST", "/status.json", 405, "GET, HEAD"),
    ("POST", "/metrics", 405, "GET, HEAD"),
    ("POST", "/readyz", 405, "GET, HEAD"),
    ("POST", "/admin/", 405, "GET, HEAD"),
    ("GET", "/admin/purge/", 404, None),
    ("GET", "/admin", 404, None),
    ("GET", "/Status", 404, None),
    ("GET", "/status/", 404, None),
    ("GET", "/metrics/", 404, None),
]


@pytest.mark.parametrize("method, path, status, allow", OWN_REFUSED)
def test_dispatch_refuses(routes, method, path, status, allow):
    with pytest.raises(RegistryError) as raised:
        dockerproxy.dispatch(routes, method, path, "", "127.0.0.1:8080")
    assert raised.value.status == status
    assert dict(raised.value.headers).get("Allow") == allow


# 2. Admission over HTTP ####################################################

def test_without_admin_settings_the_operators_pages_are_off(start_proxy):
    proxy = start_proxy(READY_MIN_FREE="1")
    for path in ("/status", "/status.json", "/metrics"):
        for headers in ({}, BEARER, BROWSER):
            status, _, body = proxy.request("GET", path, headers)
            assert status == 404 and error_code(body) == "UNSUPPORTED", (path, body)
    for path in ADMIN_PATHS:
        status, _, body = post(proxy, path, {"token": TOKEN, "image": "alpine"}, BEARER)
        assert status == 404, (path, body)
    assert proxy.request("GET", "/healthz")[0] == 200
    assert proxy.request("GET", "/readyz")[0] == 200


def test_metrics_public_serves_metrics_to_anyone_and_nothing_else(start_proxy):
    proxy = start_proxy(METRICS_PUBLIC="true")
    status, headers, _ = proxy.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"] == EXPOSITION
    assert proxy.request("GET", "/status.json")[0] == 404
    guarded = start_proxy(METRICS_PUBLIC="true", ADMIN_TOKEN=TOKEN)
    assert guarded.request("GET", "/metrics")[0] == 200
    for path in ("/status", "/status.json"):
        assert guarded.request("GET", path)[0] == 401
    assert post(guarded, "/admin/evict")[0] == 401


@pytest.mark.parametrize("path", ["/status", "/status.json", "/metrics"])
def test_admin_token_pages(start_proxy, path):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    status, headers, body = proxy.request("GET", path)
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="dockerproxy admin"'
    assert headers["Content-Type"] == "application/json" and error_code(body) == "UNAUTHORIZED"
    status, headers, body = proxy.request("GET", path, BROWSER)
    assert status == 401 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["WWW-Authenticate"] == 'Bearer realm="dockerproxy admin"'
    form = Page(body.decode())
    assert ("form", {"method": "post", "action": "/admin/login"}) in form.attributes
    assert any(attrs.get("name") == "token" and attrs.get("type") == "password" for attrs in form.inputs)
    for wrong in (f"Bearer {OTHER_TOKEN}", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN[:-1]}"):
        assert proxy.request("GET", path, {"Authorization": wrong})[0] == 401, wrong
    assert proxy.request("GET", path, BEARER)[0] == 200


@pytest.mark.parametrize("path", ["/admin/purge", "/admin/evict", "/admin/logout"])
def test_admin_token_actions(start_proxy, path):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    for headers in ({}, {"Authorization": f"Bearer {OTHER_TOKEN}"}):
        status, answer, body = post(proxy, path, {"image": "alpine"}, headers)
        assert status == 401 and answer["WWW-Authenticate"] == 'Bearer realm="dockerproxy admin"', body
    status, _, body = post(proxy, path, {"image": "alpine"}, BEARER)
    assert status == (303 if path == "/admin/logout" else 200), body


def test_admin_allow_admits_this_connection(start_proxy):
    proxy = start_proxy(ADMIN_ALLOW="127.0.0.1")
    for path in ("/status", "/status.json", "/metrics"):
        assert proxy.request("GET", path)[0] == 200, path
    assert proxy.request("GET", "/status.json", host="localhost")[0] == 200
    # no token: there is nothing to log in with
    assert post(proxy, "/admin/login", {"token": TOKEN})[0] == 404


@pytest.mark.parametrize("path", ["/status", "/status.json", "/metrics"])
def test_admin_allow_counts_the_peer_never_x_forwarded_for(start_proxy, path):
    proxy = start_proxy(ADMIN_ALLOW="10.0.0.0/8", TRUST_PROXY_HEADERS="true", READY_MIN_FREE="1")
    for forwarded in ({}, {"X-Forwarded-For": "10.0.0.1"}, {"X-Forwarded-For": "127.0.0.1, 10.0.0.1"},
                      {"X-Real-IP": "10.0.0.1", "Forwarded": "for=10.0.0.1"}):
        status, _, body = proxy.request("GET", path, forwarded)
        assert status == 403 and error_code(body) == "DENIED", (forwarded, body)
        status, _, body = post(proxy, "/admin/evict", {}, forwarded)
        assert status == 403 and error_code(body) == "DENIED", (forwarded, body)
    assert proxy.request("GET", "/healthz", {"X-Forwarded-For": "10.0.0.1"})[0] == 200
    assert proxy.request("GET", "/readyz")[0] == 200


def test_metrics_off_is_404_to_everyone(start_proxy):
    proxy = start_proxy(METRICS="off", METRICS_PUBLIC="true", ADMIN_TOKEN=TOKEN, ADMIN_ALLOW="127.0.0.1")
    for headers in ({}, BEARER):
        status, _, body = proxy.request("GET", "/metrics", headers)
        assert status == 404 and b"METRICS=off" in body
    assert proxy.request("GET", "/status.json", BEARER)[0] == 200


def test_health_and_readiness_answer_anyone(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN, ADMIN_ALLOW="10.0.0.0/8", READY_MIN_FREE="1")
    for path in ("/healthz", "/readyz"):
        status, headers, body = proxy.request("GET", path)
        assert status == 200 and headers["Content-Type"] == "application/json", body
    assert json.loads(proxy.request("GET", "/readyz")[2]) == {"status": "ready", "problems": []}


# 3. Login ##################################################################

def test_login_sets_a_strict_http_only_cookie_that_admits_the_pages(start_proxy, caplog):
    caplog.set_level(logging.INFO, logger="dockerproxy")
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    status, headers, body = proxy.request("POST", "/admin/login", {**FORM, **BROWSER},
                                          body=f"token={TOKEN}".encode())
    assert status == 303 and headers["Location"] == "/status" and body == b""
    name, value, attributes = cookie_attributes(headers["Set-Cookie"])
    assert name == dockerproxy.SESSION_COOKIE and TOKEN not in value
    assert attributes == {"path": "/", "max-age": "43200", "httponly": "", "samesite": "Strict"}
    assert headers["Cache-Control"] == "no-store"
    session = {"Cookie": f"{name}={value}"}
    status, _, body = proxy.request("GET", "/status", {**session, **BROWSER})
    assert status == 200
    assert ("form", {"method": "post", "action": "/admin/logout"}) in Page(body.decode()).attributes
    assert proxy.request("GET", "/status.json", session)[0] == 200
    assert proxy.request("GET", "/metrics", session)[0] == 200
    proxy.clock.advance(dockerproxy.SESSION_LIFETIME + 1)
    assert proxy.request("GET", "/status.json", session)[0] == 401
    counted(proxy)
    assert_no_secret_logged(caplog, TOKEN, value)


def test_login_over_https_as_a_trusted_proxy_says_sets_a_secure_cookie(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN, TRUST_PROXY_HEADERS="true")
    status, headers, _ = proxy.request("POST", "/admin/login", {**FORM, "X-Forwarded-Proto": "https"},
                                       body=f"token={TOKEN}".encode())
    assert status == 303 and "secure" in cookie_attributes(headers["Set-Cookie"])[2]


def test_login_takes_a_json_body_too(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    status, headers, _ = post(proxy, "/admin/login", {"token": TOKEN}, json_body=True)
    assert status == 303 and headers["Set-Cookie"].startswith(dockerproxy.SESSION_COOKIE + "=")


@pytest.mark.parametrize("fields, headers", [
    ({"token": OTHER_TOKEN}, {}),
    ({"token": TOKEN[:-1]}, {}),
    ({"token": ""}, {}),
    ({}, {}),
    ({"password": TOKEN}, {}),
    ({"token": TOKEN}, {"Origin": "http://evil.example"}),
    ({"token": TOKEN}, {"Origin": "null"}),
], ids=["other token", "prefix", "empty", "no field", "other field", "foreign origin", "null origin"])
def test_a_refused_login_gets_the_form_and_a_warning(start_proxy, caplog, fields, headers):
    caplog.set_level(logging.INFO, logger="dockerproxy")
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    status, answer, body = post(proxy, "/admin/login", fields, {**BROWSER, **headers})
    assert status == 401 and "Set-Cookie" not in answer
    assert answer["Content-Type"] == "text/html; charset=utf-8"
    assert "That is not the admin token." in "".join(Page(body.decode()).text)
    counted(proxy)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "dockerproxy"]
    assert [r.getMessage() for r in warnings] == ["admin login refused from 127.0.0.1"]
    assert_no_secret_logged(caplog, OTHER_TOKEN, TOKEN)


def test_login_from_the_proxys_own_origin_is_fine(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    status, _, _ = post(proxy, "/admin/login", {"token": TOKEN}, {"Origin": f"http://{proxy.host}"})
    assert status == 303


def test_logout_clears_the_cookie_and_ends_the_session(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    session = {"Cookie": login(proxy)}
    csrf = page_csrf(proxy, session)
    assert post(proxy, "/admin/logout", {}, session)[0] == 403  # no CSRF token: a foreign page's form
    status, headers, _ = post(proxy, "/admin/logout", {"csrf": csrf}, session)
    assert status == 303 and headers["Location"] == "/status"
    name, value, attributes = cookie_attributes(headers["Set-Cookie"])
    assert (name, value, attributes["max-age"]) == (dockerproxy.SESSION_COOKIE, "", "0")
    assert proxy.request("GET", "/status.json", session)[0] == 401
    assert post(proxy, "/admin/evict", {"csrf": csrf}, session)[0] == 401


def test_a_session_of_a_proxy_with_another_token_is_refused(start_proxy):
    first, second = start_proxy(ADMIN_TOKEN=TOKEN), start_proxy(ADMIN_TOKEN=OTHER_TOKEN)
    session = {"Cookie": login(first)}
    assert first.request("GET", "/status.json", session)[0] == 200
    assert second.request("GET", "/status.json", session)[0] == 401
    same_token = start_proxy(ADMIN_TOKEN=TOKEN)  # instances sharing the token share sessions
    assert same_token.request("GET", "/status.json", session)[0] == 200


# 4. CSRF ###################################################################

CSRF_POSTS = [
    # what the form carries, Origin -> status
    pytest.param("session", "none", None, 403, id="session, no csrf"),
    pytest.param("session", "wrong", None, 403, id="session, wrong csrf"),
    pytest.param("session", "other session's", None, 403, id="session, another session's csrf"),
    pytest.param("session", "page", None, 200, id="session, the page's csrf"),
    pytest.param("session", "page", "own", 200, id="session, the page's csrf, own origin"),
    pytest.param("session", "page", "foreign", 403, id="session, the page's csrf, foreign origin"),
    pytest.param("session", "page", "null", 403, id="session, the page's csrf, null origin"),
    pytest.param("session", "page", "other port", 403, id="session, the page's csrf, another port"),
    pytest.param("bearer", "none", None, 200, id="bearer, no csrf"),
    pytest.param("bearer", "wrong", None, 200, id="bearer, wrong csrf"),
    pytest.param("bearer", "none", "foreign", 403, id="bearer, foreign origin"),
]


@pytest.mark.parametrize("by, csrf, origin, expected", CSRF_POSTS)
@pytest.mark.parametrize("path", ["/admin/evict", "/admin/purge"])
def test_a_form_post_needs_the_pages_csrf_token_and_our_origin(start_proxy, path, by, csrf, origin, expected):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    credentials = BEARER if by == "bearer" else {"Cookie": login(proxy)}
    values = {"none": None, "wrong": "0" * 64, "page": page_csrf(proxy, credentials),
              "other session's": page_csrf(proxy, {"Cookie": login(proxy)})}
    origins = {None: {}, "own": {"Origin": f"http://{proxy.host}"}, "foreign": {"Origin": "https://evil.example"},
               "null": {"Origin": "null"}, "other port": {"Origin": f"http://127.0.0.1:{proxy.port + 1}"}}
    fields = {"image": "nosuch"}
    if values[csrf] is not None:
        fields["csrf"] = values[csrf]
    status, _, body = post(proxy, path, fields, {**credentials, **origins[origin]})
    assert status == expected, body


def test_a_peer_admitted_form_needs_the_pages_csrf_token(start_proxy):
    proxy = start_proxy(ADMIN_ALLOW="127.0.0.1")
    assert post(proxy, "/admin/evict", {})[0] == 403
    assert post(proxy, "/admin/evict", {"csrf": "0" * 64})[0] == 403
    csrf = page_csrf(proxy, {})
    assert post(proxy, "/admin/evict", {"csrf": csrf})[0] == 200
    assert post(proxy, "/admin/evict", {"csrf": csrf}, {"Origin": "http://evil.example"})[0] == 403
    # the same page's token from another proxy (another random key) is no good here
    assert post(start_proxy(ADMIN_ALLOW="127.0.0.1"), "/admin/evict", {"csrf": csrf})[0] == 403


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_get_on_an_admin_action_is_405(start_proxy, path, method):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    status, headers, _ = proxy.request(method, path, BEARER)
    assert status == 405 and headers["Allow"] == "POST"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_a_body_sent_with_a_refused_admin_method_is_never_read_as_a_request(start_proxy, method):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    smuggled = b"GET /routes HTTP/1.1\r\nHost: a\r\n\r\n"
    request = (f"{method} /admin/purge HTTP/1.1\r\nHost: a\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
               + smuggled + b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 405 ")
    assert b'"default_route"' not in received  # the smuggled GET /routes was never answered


# 5. Purge and evict, end to end ############################################

def pull_image(client, repository, tag, headers=None):
    """A client's pull, every object hashed: (digests, body bytes, X-Cache of each answer)."""
    headers = dict(headers or {})
    status, answer, body = client.request("GET", f"/v2/{repository}/manifests/{tag}", {**ACCEPT_ALL, **headers})
    assert status == 200, body
    manifest = json.loads(body)
    digests = ["sha256:" + hashlib.sha256(body).hexdigest()]
    total, caches = len(body), [answer["X-Cache"]]
    for digest in [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]:
        status, answer, blob = client.request("GET", f"/v2/{repository}/blobs/{digest}", headers)
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == digest
        digests.append(digest)
        total += len(blob)
        caches.append(answer["X-Cache"])
    settled(client.proxy)
    return digests, total, caches


def on_disk(proxy, digests):
    return {digest for digest in digests if os.path.exists(dockerproxy.object_path(proxy.cache.root, digest))}


def tag_gets(fake, repository, tag):
    """Upstream GETs of a tag that were answered (a 401 asking for a token is not an answer)."""
    path = f"/v2/{repository}/manifests/{tag}"
    return sum(1 for r in list(fake.requests) if r["server"] == "registry" and r["method"] == "GET"
               and r["path"] == path and r.get("status") != 401)


def assert_no_secret_logged(caplog, *secrets):
    """No record, as text, as JSON (LOG_FORMAT=json) or in its fields, carries a secret."""
    assert caplog.records
    as_json = dockerproxy.JsonLines()
    for record in caplog.records:
        text = record.getMessage() + as_json.format(record) + repr(record.__dict__)
        for secret in secrets:
            assert secret not in text, record.getMessage()


def test_purge_and_evict_end_to_end(start_proxy, fake, caplog):
    caplog.set_level(logging.INFO, logger="dockerproxy")
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    upstream = proxy.config.routes[0].upstream
    shared = b"a base layer three images share" * 500
    fake.add_image("library/alpine", "3.20", [shared, b"alpine 3.20's own layer" * 300])
    fake.add_image("library/alpine", "3.19", [shared, b"alpine 3.19's own layer" * 300])
    fake.add_image("library/busybox", "1", [shared, b"busybox's own layer" * 300])
    client = RegistryClient(proxy)
    alpine_320, _, _ = pull_image(client, "library/alpine", "3.20")
    alpine_319, _, _ = pull_image(client, "library/alpine", "3.19")
    busybox, _, _ = pull_image(client, "library/busybox", "1")
    alpine = set(alpine_320) | set(alpine_319)
    assert len(alpine) == 7 and set(busybox) & alpine == {alpine_320[2]}
    everything = alpine | set(busybox)
    assert on_disk(proxy, everything) == everything

    # warm: tags are answered from the cache, upstream is not asked
    before = (tag_gets(fake, "library/alpine", "3.19"), tag_gets(fake, "library/alpine", "3.20"))
    for tag in ("3.19", "3.20"):
        assert client.request("GET", f"/v2/library/alpine/manifests/{tag}", ACCEPT_ALL)[1]["X-Cache"] == "HIT"
    assert (tag_gets(fake, "library/alpine", "3.19"), tag_gets(fake, "library/alpine", "3.20")) == before

    # one tag: its entries go, nothing else
    status, _, body = post(proxy, "/admin/purge", {"image": "alpine:3.19"}, BEARER)
    assert status == 200, body
    assert json.loads(body) == {"image": "docker.io/library/alpine:3.19", "tags_removed": 1,
                                "objects_unlinked": 0}
    assert proxy.cache.tag_entries(upstream, "library/alpine", "3.19") == []
    assert proxy.cache.tag_entries(upstream, "library/alpine", "3.20") != []
    assert on_disk(proxy, everything) == everything
    client.request("GET", "/v2/library/alpine/manifests/3.20", ACCEPT_ALL)
    client.request("GET", "/v2/library/alpine/manifests/3.19", ACCEPT_ALL)
    assert (tag_gets(fake, "library/alpine", "3.19"), tag_gets(fake, "library/alpine", "3.20")) == (
        before[0] + 1, before[1])
    settled(proxy)

    # the whole image (a JSON body this time): tags and links go; the files wait for a sweep
    status, _, body = post(proxy, "/admin/purge", {"image": "docker.io/library/alpine"}, BEARER, json_body=True)
    assert status == 200, body
    assert json.loads(body) == {"image": "docker.io/library/alpine", "tags_removed": 2, "objects_unlinked": 7}
    for tag in ("3.19", "3.20"):
        assert proxy.cache.tag_entries(upstream, "library/alpine", tag) == []
    assert on_disk(proxy, everything) == everything
    sizes = {digest: os.path.getsize(dockerproxy.object_path(proxy.cache.root, digest)) for digest in everything}
    evictions = proxy.server.proxy.metrics.value("dockerproxy_cache_evictions_total")

    status, _, body = post(proxy, "/admin/evict", {}, BEARER)
    assert status == 200, body
    only_alpine = alpine - set(busybox)
    assert json.loads(body) == {"removed": 6, "freed_bytes": sum(sizes[d] for d in only_alpine), "tags_dropped": 0,
                                "size_bytes": sum(sizes[d] for d in set(busybox))}
    assert on_disk(proxy, everything) == set(busybox)  # the shared layer stays: busybox links it
    assert proxy.server.proxy.metrics.value("dockerproxy_cache_evictions_total") == evictions + 6
    assert proxy.cache.tag_entries(upstream, "library/busybox", "1") != []

    # busybox is still whole in the cache; alpine comes from upstream again, but the shared layer
    fake.reset_counters()
    _, _, caches = pull_image(RegistryClient(proxy), "library/busybox", "1")
    assert caches == ["HIT"] * 4 and fake.count(server="registry", path_contains="/library/busybox/") == 0
    _, _, caches = pull_image(RegistryClient(proxy), "library/alpine", "3.20")
    assert tag_gets(fake, "library/alpine", "3.20") == 1
    assert [blob_gets(fake, digest) for digest in alpine_320[1:]] == [1, 0, 1]  # config, shared, own layer
    assert caches[2] == "HIT"

    # the log names each action and who asked, never the token
    counted(proxy)
    actions = [r.getMessage().split(": ", 1) for r in caplog.records if r.getMessage().startswith("admin ")]
    assert [who for who, _ in actions] == [
        "admin purge from 127.0.0.1", "admin purge from 127.0.0.1", "admin evict from 127.0.0.1"]
    reports = [json.loads(report.replace('\\"', '"')) for _, report in actions]
    assert [reports[0]["image"], reports[1]["image"], reports[2]["removed"]] == [
        "docker.io/library/alpine:3.19", "docker.io/library/alpine", 6]
    assert_no_secret_logged(caplog, TOKEN)


def test_purging_what_is_not_cached_reports_nothing_removed(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    status, _, body = post(proxy, "/admin/purge", {"image": "nosuch"}, BEARER)
    assert status == 200 and json.loads(body) == {"image": "docker.io/library/nosuch", "tags_removed": 0,
                                                  "objects_unlinked": 0}
    status, _, body = post(proxy, "/admin/purge", {"image": "ghcr.io/owner/app:1.0"}, BEARER, json_body=True)
    assert status == 200 and json.loads(body) == {"image": "ghcr.io/owner/app:1.0", "tags_removed": 0,
                                                  "objects_unlinked": 0}
    status, _, body = post(proxy, "/admin/evict", {}, BEARER)
    assert status == 200 and json.loads(body) == {"removed": 0, "freed_bytes": 0, "tags_dropped": 0,
                                                  "size_bytes": 0}


@pytest.mark.parametrize("fields, json_body, status, code", [
    ({"image": "alpine@" + DIGEST}, False, 400, "NAME_INVALID"),
    ({"image": "evil.example.com/x/y"}, False, 403, "DENIED"),
    ({"image": "../../etc"}, True, 403, "DENIED"),
    ({"image": "library/../../x"}, True, 400, "NAME_INVALID"),
    ({}, False, 400, "NAME_INVALID"),
    ({"image": 5}, True, 400, "NAME_INVALID"),
])
def test_a_purge_of_a_bad_name_is_refused(start_proxy, fields, json_body, status, code):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    answer_status, _, body = post(proxy, "/admin/purge", fields, BEARER, json_body=json_body)
    assert (answer_status, error_code(body)) == (status, code)


def test_a_body_that_is_not_a_json_object_is_400(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    for body in (b"[1]", b"not json", b'"alpine"'):
        assert proxy.request("POST", "/admin/purge", {**JSON_BODY, **BEARER}, body=body)[0] == 400


def test_purge_and_evict_without_a_cache_are_404(start_proxy):
    proxy = start_proxy("--cache-dir", "", ADMIN_TOKEN=TOKEN)
    for path in ("/admin/purge", "/admin/evict"):
        status, _, body = post(proxy, path, {"image": "alpine"}, BEARER)
        assert status == 404 and b"CACHE_DIR" in body
    document = status_json(proxy)
    assert document["cache"] == {"enabled": False}
    page = Page(proxy.request("GET", "/status", {**BEARER, **BROWSER})[2].decode())
    assert "No cache (CACHE_DIR is empty)." in page.section_text("cache")
    assert not [a for a in page.attributes if a[0] == "form" and a[1].get("action") in ("/admin/purge", "/admin/evict")]


def test_a_browser_purge_gets_a_page_back(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    session = {"Cookie": login(proxy)}
    status, headers, body = post(proxy, "/admin/purge", {"image": "alpine", "csrf": page_csrf(proxy, session)},
                                 {**session, **BROWSER})
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    assert "docker.io/library/alpine" in "".join(Page(body.decode()).text)


# 6. The status page's content ##############################################

def test_the_status_page_and_its_json_report_the_same_figures_as_the_metrics(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN, TRUST_PROXY_HEADERS="true")
    fake.add_image("library/alpine", "3.20", [b"alpine layer one" * 700, b"alpine layer two" * 900])
    cold_digests, cold_bytes, cold = pull_image(RegistryClient(proxy), "library/alpine", "3.20",
                                                {"X-Forwarded-For": "10.1.1.1"})
    _, warm_bytes, warm = pull_image(RegistryClient(proxy), "library/alpine", "3.20",
                                     {"X-Forwarded-For": "10.1.1.2"})
    assert (cold, warm) == (["MISS"] * 4, ["HIT"] * 4)
    samples, _ = scrape(proxy)
    document = status_json(proxy)

    # the figures: what the clients saw, and what the metrics count
    since_start = document["traffic"]["since_start"]
    assert since_start == {"requests": {"hit": 4, "miss": 4, "stale": 0, "bypass": 0},
                           "bytes": {"cache": warm_bytes, "upstream": cold_bytes}}
    for result, count in since_start["requests"].items():
        assert sum(sample(samples, "dockerproxy_cache_requests_total", type=type_, result=result)
                   for type_ in ("blob", "manifest")) == count
    for source, count in since_start["bytes"].items():
        assert sample(samples, "dockerproxy_cache_bytes_served_total", source=source) == count
    assert document["traffic"]["last_hour"] == since_start
    image = "docker.io/library/alpine:3.20"
    assert [(p["client"], p["image"], p["outcome"], p["bytes"], p["requests"]) for p in document["recent_pulls"]] == [
        ("10.1.1.2", image, "hit", warm_bytes, {"hit": 4}), ("10.1.1.1", image, "miss", cold_bytes, {"miss": 4})]
    assert document["top_images"] == [{"image": image, "pulls": 2, "bytes": cold_bytes + warm_bytes}]
    assert document["top_clients"] == [{"client": "10.1.1.1", "pulls": 1, "bytes": cold_bytes},
                                       {"client": "10.1.1.2", "pulls": 1, "bytes": warm_bytes}]
    cache = document["cache"]
    stored = sum(os.path.getsize(dockerproxy.object_path(proxy.cache.root, d)) for d in cold_digests)
    assert (cache["enabled"], cache["objects"], cache["size_bytes"], cache["fills"]) == (True, 4, stored, [])
    assert sample(samples, "dockerproxy_cache_size_bytes") == stored
    docker = next(route for route in document["routes"] if route["name"] == "docker")
    assert docker["upstream"] == fake.url and docker["last_status"] == 200
    assert document["version"] == dockerproxy.SERVER_VERSION

    # the page: every section, and the same figures
    status, headers, body = proxy.request("GET", "/status", {**BEARER, **BROWSER})
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    page = Page(body.decode())
    assert set(SECTIONS) <= set(page.sections)
    traffic = page.sections["traffic"]["cards"]
    assert "Hit ratio, since start 50.0% 4 of 8 blob and manifest requests" in traffic
    assert "Hit ratio, last hour 50.0% 4 of 8 blob and manifest requests" in traffic
    assert (f"Saved, since start {dockerproxy.human_bytes(warm_bytes)} sent from the cache; "
            f"{dockerproxy.human_bytes(cold_bytes)} from upstream") in traffic
    assert page.sections["images"]["rows"] == [[e["image"], str(e["pulls"]), dockerproxy.human_bytes(e["bytes"])]
                                               for e in document["top_images"]]
    assert page.sections["clients"]["rows"] == [[e["client"], str(e["pulls"]), dockerproxy.human_bytes(e["bytes"])]
                                                for e in document["top_clients"]]
    assert [row[1:5] for row in page.sections["pulls"]["rows"]] == [
        [p["client"], p["image"], p["outcome"], dockerproxy.human_bytes(p["bytes"])] for p in document["recent_pulls"]]
    assert f"{cache['objects']} objects" in page.section_text("cache")
    route_rows = {row[0]: row for row in page.sections["routes"]["rows"]}
    assert route_rows["docker"][1] == fake.url and route_rows["docker"][2].startswith("200 ")
    assert dockerproxy.SERVER_VERSION in "".join(page.text)


def test_the_page_headers_forbid_framing_scripts_and_caching(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    for path, headers in (("/status", BEARER), ("/status", {}), ("/status?refresh=5", BEARER)):
        status, answer, _ = proxy.request("GET", path, {**headers, **BROWSER})
        assert status in (200, 401)
        policy = answer["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "form-action 'self'" in policy and "script-src" not in policy
        assert answer["X-Frame-Options"] == "DENY" and answer["Cache-Control"] == "no-store"
        assert answer["X-Content-Type-Options"] == "nosniff"
    assert proxy.request("GET", "/status.json", BEARER)[1]["Cache-Control"] == "no-store"
    assert proxy.request("GET", "/metrics", BEARER)[1]["Cache-Control"] == "no-store"


@pytest.mark.parametrize("query, refresh", [("refresh=10", "10"), ("refresh=1", None), ("refresh=%3Cb%3E", None),
                                            ("", None)])
def test_the_refresh_query_sets_the_pages_meta_refresh(start_proxy, query, refresh):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    body = proxy.request("GET", "/status?" + query, BEARER)[2].decode()
    found = [m["content"] for m in Page(body).meta if m.get("http-equiv") == "refresh"]
    assert found == ([refresh] if refresh else [])


EVIL = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>&amp;"
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "span", "nav", "a", "main",
             "section", "div", "b", "p", "table", "thead", "tbody", "tr", "th", "td", "form", "input", "label",
             "button"}


def test_every_value_on_the_page_is_escaped():
    """status_page() with a hostile string in every field that is a string."""
    now = time.time()
    pull = {"time": now, "client": EVIL, "image": EVIL, "outcome": EVIL, "requests": {}, "bytes": 1,
            "duration_seconds": 1.0}
    document = {
        "version": EVIL, "python": EVIL, "now": now, "started": now - 10, "uptime_seconds": 10,
        "routes": [{"name": EVIL, "upstream": EVIL, "last_status": 200, "last_latency_seconds": 0.1,
                    "last_seen": now, "ratelimit_remaining": 5, "ratelimit_limit": 10}],
        "cache": {"enabled": True, "size_bytes": 1, "limit_bytes": 10, "objects": 1, "free_bytes": 1,
                  "fills": [{"image": EVIL, "digest": EVIL, "bytes": 1, "length": 2, "clients": 1,
                             "rate_bytes_per_second": 1}]},
        "traffic": {period: {"requests": {"hit": 1, "miss": 1, "stale": 0, "bypass": 0},
                             "bytes": {"cache": 1, "upstream": 1}} for period in ("since_start", "last_hour")},
        "top_images": [{"image": EVIL, "pulls": 1, "bytes": 1}],
        "top_clients": [{"client": EVIL, "pulls": 1, "bytes": 1}],
        "recent_pulls": [pull],
    }
    text = dockerproxy.status_page(document, csrf=EVIL, refresh=5, logout=True)
    assert "<script" not in text and "<img" not in text
    page = Page(text)
    assert set(page.tags) <= PAGE_TAGS
    assert not [attrs for _, attrs in page.attributes if any(name.startswith("on") for name in attrs)]
    assert page.sections["routes"]["rows"][0][:2] == [EVIL, EVIL]
    assert page.sections["cache"]["rows"][0][:2] == [EVIL, EVIL[:19]]
    assert page.sections["images"]["rows"][0][0] == EVIL
    assert page.sections["clients"]["rows"][0][0] == EVIL
    assert page.sections["pulls"]["rows"][0][1:4] == [EVIL, EVIL, EVIL]
    assert "".join(page.text).count(EVIL) == 9  # and the version in the header
    assert {attrs["value"] for attrs in page.inputs if attrs.get("name") == "csrf"} == {EVIL}
    login_page = Page(dockerproxy.login_page(EVIL))
    assert set(login_page.tags) <= PAGE_TAGS and EVIL in "".join(login_page.text)
    message = Page(dockerproxy.message_page(EVIL, EVIL))
    assert set(message.tags) <= PAGE_TAGS and "".join(message.text).count(EVIL) == 3


def test_what_a_client_sends_never_becomes_markup(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN, TRUST_PROXY_HEADERS="true")
    fake.add_image("library/alpine", "A_b.c-D9", [b"layer" * 100])
    pull_image(RegistryClient(proxy), "library/alpine", "A_b.c-D9", {"X-Forwarded-For": "<script>alert(1)</script>"})
    pull_image(RegistryClient(proxy), "library/alpine", "A_b.c-D9", {"X-Forwarded-For": "10.0.0.1\"'><b>"})
    for host in ("<script>alert(1)</script>", "\"'><img src=x>", "a.example\"onmouseover=x"):
        status = proxy.request("GET", "/v2/library/alpine/manifests/A_b.c-D9", ACCEPT_ALL, host=host)[0]
        assert status == 400
        assert proxy.request("GET", "/status", {**BEARER, **BROWSER}, host=host)[0] == 200
    proxy.request("GET", "/v2/library/alpine/manifests/%3Cscript%3E", ACCEPT_ALL)
    proxy.request("GET", "/v2/%3Cscript%3E/manifests/x", ACCEPT_ALL)
    body = proxy.request("GET", "/status", {**BEARER, **BROWSER})[2].decode()
    page = Page(body)
    assert "<script" not in body and set(page.tags) <= PAGE_TAGS
    # a forwarded value that is not an address is not shown: both pulls are the peer's, so one
    assert [row[1:3] for row in page.sections["pulls"]["rows"]] == [["127.0.0.1", "docker.io/library/alpine:A_b.c-D9"]]


# 7. Cardinality: nothing a client sends adds a series or grows a table ######

SMALL_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": {
    "mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
    "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"}, "layers": []}).encode()
NOT_FOUND = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'


class SparseRegistry(http.server.BaseHTTPRequestHandler):
    """An upstream without auth: lib/n<even> have the tag latest, nothing else exists."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        number = re.fullmatch(r"/v2/lib/n([0-9]+)/manifests/latest", self.path)
        if self.path in ("/v2/", "/v2"):
            status, body, kind = 200, b"{}", "application/json"
        elif number and int(number.group(1)) % 2 == 0:
            status, body, kind = 200, SMALL_MANIFEST, DOCKER_MANIFEST
        else:
            status, body, kind = 404, NOT_FOUND, "application/json"
        head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nDocker-Distribution-Api-Version: registry/2.0\r\n\r\n")
        # one write: headers and body apart would wait for the proxy's delayed ACK (40 ms each)
        self.wfile.write(head.encode() + (body if self.command != "HEAD" else b""))

    do_HEAD = do_GET


def test_ten_thousand_repository_names_add_no_series_and_no_rows(start_proxy):
    upstream = LoopbackServer(SparseRegistry)
    try:
        proxy = start_proxy("--upstream", f"docker={upstream.url}", "--cache-dir", "", ADMIN_TOKEN=TOKEN,
                            TRUST_PROXY_HEADERS="true")
        connection = http.client.HTTPConnection(proxy.host, timeout=30)

        def get(number, client):
            connection.request("GET", f"/v2/lib/n{number}/manifests/latest",
                               headers={"Accept": DOCKER_MANIFEST, "X-Forwarded-For": client,
                                        "User-Agent": f"client/{number}"})
            response = connection.getresponse()
            response.read()
            return response.status

        # warm up every label value the run can bring: a 200 (bypass) and a 404, a scrape
        assert [get(0, "192.0.2.1"), get(1, "192.0.2.1")] == [200, 404]
        connection.close()
        scrape(proxy)
        before, _ = scrape(proxy)

        started = time.monotonic()
        for number in range(2, 10002):
            client = f"10.{number >> 16}.{(number >> 8) & 255}.{number & 255}"
            assert get(number, client) == (200 if number % 2 == 0 else 404)
        elapsed = time.monotonic() - started
        connection.close()
        after, _ = scrape(proxy)
        assert set(after) == set(before), set(after) ^ set(before)  # names and labels, not values
        route = dict(route="docker", method="GET", endpoint="manifest")
        assert sample(after, "dockerproxy_http_requests_total", **route, code="200") == 5001
        assert sample(after, "dockerproxy_http_requests_total", **route, code="404") == 5001
        assert sample(after, "dockerproxy_cache_requests_total", type="manifest", result="bypass") == 5001

        # the page's tables are bounded by count, whatever the names
        document = status_json(proxy)
        assert len(document["recent_pulls"]) == dockerproxy.RECENT_PULLS
        assert len(document["top_images"]) == len(document["top_clients"]) == dockerproxy.TOP_ROWS
        assert document["top_images"][0]["image"] == dockerproxy.OTHER
        assert document["top_clients"][0]["client"] == dockerproxy.OTHER
        assert document["recent_pulls"][0]["image"] == "docker.io/lib/n10000:latest"
        page = Page(proxy.request("GET", "/status", {**BEARER, **BROWSER})[2].decode())
        assert len(page.sections["images"]["rows"]) == len(page.sections["clients"]["rows"]) == dockerproxy.TOP_ROWS
        assert len(page.sections["pulls"]["rows"]) == dockerproxy.RECENT_PULLS
        activity = proxy.server.proxy.activity
        assert len(activity._open) == dockerproxy.MAX_OPEN_PULLS
        assert len(activity.recent) == dockerproxy.RECENT_PULLS
        for hour in activity._hours:
            assert len(hour.images) <= dockerproxy.TOP_KEYS + 1 and len(hour.clients) <= dockerproxy.TOP_KEYS + 1
        assert sum(len(hour.images) for hour in activity._hours) >= dockerproxy.TOP_KEYS  # the bound was reached
        print(f"10,000 requests through the proxy in {elapsed:.1f} s")
    finally:
        upstream.stop()


def test_activity_stays_bounded_when_fed_directly():
    """Activity alone, faster than HTTP: 50,000 pulls of distinct images by distinct clients."""
    clock = MovableClock()
    activity = dockerproxy.Activity(clock)
    route = dockerproxy.BUILTIN_ROUTES[0]
    now = clock.time()
    for number in range(50_000):
        served = dockerproxy.Served(now + number * 0.001, f"client-{number}", "GET", "tag", "docker", 200, 10, 0.01,
                                    "miss", "upstream", False, f"lib/n{number}", "latest", 200)
        activity.served(served, route)
    assert len(activity._open) == dockerproxy.MAX_OPEN_PULLS and len(activity.recent) == dockerproxy.RECENT_PULLS
    for hour in activity._hours:
        assert len(hour.images) <= dockerproxy.TOP_KEYS + 1 and len(hour.clients) <= dockerproxy.TOP_KEYS + 1
    document = activity.document(now + 60)
    assert len(document["top_images"]) == dockerproxy.TOP_ROWS and document["top_images"][0]["image"] == "(other)"
    assert sum(entry["pulls"] for entry in document["top_images"]) <= 50_000


# 8. The exposition's basics ################################################

def test_the_first_scrape_has_every_fixed_series_at_zero_and_help_and_type_for_each(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    samples, text = scrape(proxy)
    helps = re.findall(r"^# HELP (\S+) (.+)$", text, re.M)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert len(types) == len(helps) == len(dict(helps))  # one HELP and one TYPE per family
    for name, kind in types.items():
        assert kind == dockerproxy.METRIC_FAMILIES[name][0]
        assert dict(helps)[name] == dockerproxy.METRIC_FAMILIES[name][1]
    family = None
    for line in text.splitlines():  # each sample comes after its family's HELP and TYPE
        if line.startswith("# TYPE "):
            family = line.split()[2]
        elif not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            base = re.sub(r"_(bucket|sum|count)$", "", name) if types.get(family) == "histogram" else name
            assert base == family, line

    zero = {}
    for type_ in ("blob", "manifest"):
        for result in ("hit", "miss", "stale", "bypass"):
            zero[("dockerproxy_cache_requests_total", (("result", result), ("type", type_)))] = 0
        for name in ("requests", "hits", "misses", "pulled_bytes", "pushed_bytes"):
            zero[(f"registry_proxy_{name}_total", (("type", type_),))] = 0
    for source in ("cache", "upstream"):
        zero[("dockerproxy_cache_bytes_served_total", (("source", source),))] = 0
    for name in ("evictions", "fill_waiters", "verify_failures"):
        zero[(f"dockerproxy_cache_{name}_total", ())] = 0
    route_names = [route.name for route in proxy.server.proxy.all_routes()]
    assert {"docker", "ghcr", "quay"} <= set(route_names)
    for route in route_names:
        zero[("dockerproxy_upstream_requests_total", (("code", "200"), ("method", "GET"), ("route", route)))] = 0
        zero[("dockerproxy_upstream_bytes_total", (("route", route),))] = 0
        for kind in ("timeout", "refused", "reset", "tls", "5xx", "429", "other"):
            zero[("dockerproxy_upstream_errors_total", (("kind", kind), ("route", route)))] = 0
    for endpoint in ("manifest", "blob", "tags", "referrers", "auth", "base", "other"):
        zero[("dockerproxy_http_request_duration_seconds_count", (("endpoint", endpoint),))] = 0
        zero[("dockerproxy_http_request_duration_seconds_bucket", (("endpoint", endpoint), ("le", "+Inf")))] = 0
    missing = set(zero) - set(samples)
    assert not missing, sorted(missing)
    assert {key: samples[key] for key in zero} == zero
    for name in ("dockerproxy_start_time_seconds", "dockerproxy_cache_size_bytes", "dockerproxy_cache_limit_bytes",
                 "dockerproxy_cache_objects", "dockerproxy_cache_disk_free_bytes", "dockerproxy_threads",
                 "dockerproxy_connections_open", "dockerproxy_fills_in_flight"):
        assert (name, ()) in samples, name
    assert [key for key in samples if key[0] == "dockerproxy_build_info"] == [
        ("dockerproxy_build_info", (("python", dockerproxy.platform_python()), ("version", dockerproxy.__version__)))]


def test_a_scrape_is_counted_as_an_other_endpoint_request(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    scrape(proxy)
    samples, _ = scrape(proxy)
    assert sample(samples, "dockerproxy_http_requests_total", route="-", method="GET", endpoint="other",
                  code="200") == 1


# Doubtful configuration ####################################################

@pytest.mark.parametrize("peer", ["::ffff:10.0.0.1", "10.0.0.1"])
def test_an_ipv4_mapped_admin_allow_entry_admits_its_addresses(peer):
    gate = dockerproxy.AdminGate("", dockerproxy.parse_networks("::ffff:10.0.0.0/104"), MovableClock())
    assert gate.admits(peer, "", "") == "peer"


def test_a_refused_login_behind_a_trusted_proxy_names_the_client(start_proxy, caplog):
    caplog.set_level(logging.INFO, logger="dockerproxy")
    proxy = start_proxy(ADMIN_TOKEN=TOKEN, TRUST_PROXY_HEADERS="true")
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    assert post(proxy, "/admin/evict", {}, {**BEARER, **forwarded})[0] == 200
    assert post(proxy, "/admin/login", {"token": OTHER_TOKEN}, forwarded)[0] == 401
    counted(proxy)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin ")]
    assert messages[0].startswith("admin evict from 203.0.113.9: ")
    assert messages[1] == "admin login refused from 203.0.113.9"
