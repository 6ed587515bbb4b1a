"""The admin pages against a hostile client: the findings of the review of
issue 11, each a test that failed before its fix."""

import json

import pytest

import dockerproxy
from conftest import MovableClock, RegistryClient, raw_request
from test_cache import pull

TOKEN = "admin-test-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("path", [b"/status", b"/status.json", b"/metrics"])
def test_a_cookie_of_superscript_digits_is_refused_not_an_internal_error(start_proxy, path, caplog):
    """'\\xb2' is latin-1 '²', which passes str.isdigit() and fails int()."""
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    answer = raw_request(proxy, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nCookie: dockerproxy_session=\xb2.00\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("query, seconds", [
    ("refresh=10", 10), ("refresh=2", 2), ("refresh=3600", 3600), ("refresh=1", 0), ("refresh=3601", 0),
    ("refresh=%C2%B2", 0), pytest.param("refresh=" + "9" * 5000, 0, id="5000 nines"), ("refresh=-5", 0),
    ("refresh=", 0), ("", 0),
])
def test_page_refresh(query, seconds):
    assert dockerproxy.page_refresh(query) == seconds


def test_the_readme_evict_command_works_without_a_body(start_proxy):
    """curl -X POST sends no Content-Length: an empty body (RFC 9112 6.3), not a 400."""
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    answer = raw_request(proxy, f"POST /admin/evict HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_refused_requests_add_no_pulls_to_the_page(start_proxy, fake):
    """Strangers' 401s under names they chose filled the top images and pushed real pulls out."""
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    for number in range(60):
        assert proxy.request("HEAD", f"/v2/attacker/junk{number}/manifests/latest")[0] == 401
    fake.add_image("library/alpine", "3.20", [b"layer"])
    pull(RegistryClient(proxy), "library/alpine", "3.20")
    status = json.loads(proxy.request("GET", "/status.json", BEARER)[2])
    assert [p["image"] for p in status["recent_pulls"]] == ["docker.io/library/alpine:3.20"]
    assert [entry["image"] for entry in status["top_images"]] == ["docker.io/library/alpine:3.20"]


@pytest.mark.parametrize("host, admitted", [
    ("127.0.0.1:8080", True), ("[::1]:8080", True), ("localhost:8080", True), ("LOCALHOST", True),
    ("proxy.example.com", True), ("docker.proxy.example.com:443", True), ("this-machine", True),
    ("rebind.evil.example:8080", False), ("example.com", False), ("evilproxy.example.com", False),
])
def test_admin_allow_admits_only_requests_naming_this_proxy(host, admitted):
    """DNS rebinding: a page of the attacker's name, re-pointed at the proxy, is
    "same origin" to the browser on an allowed network."""
    assert dockerproxy.own_host_name(dockerproxy.split_host(host), "proxy.example.com", "this-machine") is admitted


def test_a_rebinding_host_gets_nothing_from_an_allowed_address(start_proxy):
    proxy = start_proxy(ADMIN_ALLOW="127.0.0.1")
    rebound = {"Origin": "http://rebind.evil.example:8080"}
    assert proxy.request("GET", "/status.json")[0] == 200
    assert proxy.request("GET", "/status.json", host="rebind.evil.example:8080")[0] == 403
    status, _, body = proxy.request("POST", "/admin/evict", rebound, host="rebind.evil.example:8080")
    assert status == 403 and b"DNS-rebinding" in body


def login(proxy):
    status, headers, _ = proxy.request("POST", "/admin/login", {"Content-Type": "application/x-www-form-urlencoded"},
                                       body=f"token={TOKEN}".encode())
    assert status == 303
    return headers["Set-Cookie"].split(";")[0]


def test_logout_ends_the_session_not_only_the_cookie(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    cookie, other = login(proxy), login(proxy)
    assert cookie != other  # two logins in one second are two sessions
    page = proxy.request("GET", "/status", {"Cookie": cookie, "Accept": "text/html"})[2].decode()
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    status, _, _ = proxy.request("POST", "/admin/logout", {"Cookie": cookie,
                                 "Content-Type": "application/x-www-form-urlencoded"}, body=f"csrf={csrf}".encode())
    assert status == 303
    assert proxy.request("GET", "/status.json", {"Cookie": cookie})[0] == 401   # a copied cookie is dead
    assert proxy.request("GET", "/status.json", {"Cookie": other})[0] == 200    # the other session lives


def test_revoked_sessions_are_bounded_and_forgotten_when_they_expire(monkeypatch):
    monkeypatch.setattr(dockerproxy, "MAX_REVOKED_SESSIONS", 3)
    clock = MovableClock()
    gate = dockerproxy.AdminGate(TOKEN, (), clock)
    sessions = [gate.new_session() for _ in range(4)]
    for session in sessions:
        gate.revoke(session)
    assert len(gate.revoked) == 3 and sessions[0] not in gate.revoked
    clock.advance(dockerproxy.SESSION_LIFETIME + 1)
    gate.revoke(gate.new_session())
    assert len(gate.revoked) == 1


def test_a_refused_form_gets_a_page_a_script_gets_json(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, headers, body = proxy.request("POST", "/admin/purge", {**BEARER, **form, "Accept": "text/html"},
                                          body=b"image=no..such")
    assert status == 400 and headers["Content-Type"].startswith("text/html")
    assert b"Back to the status page" in body and headers["Content-Security-Policy"]
    status, headers, body = proxy.request("POST", "/admin/purge", {**BEARER, **form}, body=b"image=no..such")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "NAME_INVALID"


def test_metrics_without_any_admin_setting_says_how_to_open_it(start_proxy):
    status, _, body = start_proxy().request("GET", "/metrics")
    assert status == 404 and "METRICS_PUBLIC=true" in json.loads(body)["errors"][0]["message"]


@pytest.mark.parametrize("path, headers, body", [
    ("/admin/login", {"Origin": "http://["}, b"token=x"),                       # no admission needed
    ("/admin/evict", {**BEARER, "Origin": "http://[::1"}, b""),
    ("/admin/login", {"Content-Type": "application/json"}, b"[" * 60000),        # past the parser's depth
])
def test_an_unparseable_origin_or_body_is_refused_not_an_internal_error(start_proxy, caplog, path, headers, body):
    """The final review: both were 500s with a logged traceback, for anyone."""
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    status, _, _ = proxy.request("POST", path, headers, body=body)
    assert status in (400, 401, 403) and "Traceback" not in caplog.text
