"""HTTPS serving (TLS_CERT/TLS_KEY) and the proxy's own upstream credentials."""

import base64
import hashlib
import http.client
import json
import logging
import os
import ssl
import threading
import warnings

import pytest

import dockerproxy
from conftest import ROOT, RegistryClient, http_request
from fakeregistry import DOCKER_MANIFEST, FakeRegistry
from rawupstream import ScriptedUpstream
from realregistry import wait_until

MANIFEST_ACCEPT = {"Accept": DOCKER_MANIFEST}


def tls_request(proxy, cert, method, path, headers=None):
    context = ssl.create_default_context(cafile=cert)
    return http_request(f"https://127.0.0.1:{proxy.port}{path}", method, headers, context=context)


# TLS ########################################################################

def test_a_fill_followed_over_tls_sends_the_bytes_as_they_land_not_a_stale_read_ahead(start_proxy, certificate):
    """The spool is allocated to its full length: a read-ahead buffer would hold zeros where bytes land later."""
    cert, key = certificate
    data = bytes(range(256)) * 1200
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = f"/v2/library/a/blobs/{digest}"
    upstream, stall = ScriptedUpstream(), threading.Event()
    head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    upstream.script[path] = [head + data[:100], stall, data[100:]]  # a little, then the rest
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--tls-cert", cert, "--tls-key", key)
    answers = []
    client = threading.Thread(target=lambda: answers.append(tls_request(proxy, cert, "GET", path)))
    client.start()
    wait_until(lambda: any(fill.written >= 100 for fill in proxy.cache.fills.in_flight()), what="the first bytes")
    stall.set()
    client.join(30)
    status, headers, body = answers[0]
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest.partition(":")[2]
    upstream.close()


def test_tls_serves_https_and_the_realm_says_https(start_proxy, fake, certificate):
    cert, key = certificate
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--tls-cert", cert, "--tls-key", key)
    status, headers, _ = tls_request(proxy, cert, "GET", "/v2/")
    assert status == 401
    realm = dockerproxy.parse_challenge(headers["WWW-Authenticate"])[1]["realm"]
    assert realm == f"https://127.0.0.1:{proxy.port}/v2/auth"
    digest = fake.add_blob("library/alpine", b"over tls" * 20000)
    status, headers, body = tls_request(proxy, cert, "GET", "/v2/auth?scope=repository:library/alpine:pull")
    token = json.loads(body)["token"]
    for expected in ("MISS", "HIT"):
        status, headers, body = tls_request(proxy, cert, "GET", f"/v2/library/alpine/blobs/{digest}",
                                            {"Authorization": f"Bearer {token}"})
        assert status == 200 and body == b"over tls" * 20000 and headers["X-Cache"] == expected


def test_tls_refuses_plain_http_and_old_protocols(start_proxy, fake, certificate):
    cert, key = certificate
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--tls-cert", cert, "--tls-key", key)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        proxy.request("GET", "/healthz")
    context = ssl.create_default_context(cafile=cert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # asking for TLS 1.1 on purpose
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    connection = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=context, timeout=10)
    with pytest.raises((ssl.SSLError, OSError)):
        connection.request("GET", "/healthz")
    assert tls_request(proxy, cert, "GET", "/healthz")[0] == 200  # still serving


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"], "TLS_CERT"),
    (["--tls-cert", os.path.join(ROOT, "README.md"), "--tls-key", os.path.join(ROOT, "README.md")], "TLS_CERT"),
    (["--tls-cert", os.path.join(ROOT, "README.md")], "TLS_KEY"),
])
def test_bad_tls_settings_stop_start_up(run_main, flags, message):
    status, _, err = run_main(["--env-file", os.devnull] + flags, {})
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


# Upstream credentials #######################################################

@pytest.fixture
def private_fake():
    with FakeRegistry(users={"proxyuser": "pr0xy-pa55"}, private_repos={"team/private"}) as fake:
        fake.image = fake.add_image("team/private", "1", [b"team layer" * 100])
        yield fake


def test_proxy_credentials_serve_clients_that_bring_none(start_proxy, private_fake, caplog):
    fake = private_fake
    caplog.set_level(logging.DEBUG, logger="dockerproxy")
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--debug",
                        UPSTREAM_DOCKER_USERNAME="proxyuser", UPSTREAM_DOCKER_PASSWORD="pr0xy-pa55")
    # /v2/auth never hands out a token of the proxy's account: a client could use it upstream
    status, _, body = proxy.request("GET", "/v2/auth?service=x&scope=repository:team/private:pull,push,delete")
    assert status == 200 and json.loads(body)["token"] == dockerproxy.ANONYMOUS_TOKEN
    assert fake.token_requests == []
    status, _, body = RegistryClient(proxy).request("GET", "/v2/team/private/manifests/1", MANIFEST_ACCEPT)
    assert status == 200 and fake.token_requests[-1]["username"] == "proxyuser"
    assert fake.token_requests[-1]["scopes"] == ["repository:team/private:pull"]
    # a client with no auth at all: the proxy fetches one repository token and keeps it
    fake.reset_counters()
    status, _, body = proxy.request("GET", "/v2/team/private/manifests/1", MANIFEST_ACCEPT)
    assert status == 200 and json.loads(body)["schemaVersion"] == 2
    for digest in fake.image["layers"] + [fake.image["config"]]:
        assert proxy.request("GET", f"/v2/team/private/blobs/{digest}")[0] == 200
    assert fake.token_requests == []  # the repository token fetched above is still good
    status, _, body = proxy.request("GET", "/routes")
    for text in (caplog.text, body.decode()):
        assert "pr0xy-pa55" not in text
        assert base64.b64encode(b"proxyuser:pr0xy-pa55").decode() not in text


def test_docker_config_json_auths_are_used(start_proxy, private_fake, tmp_path):
    fake = private_fake
    host = fake.url.split("//")[1]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {f"http://{host}": {
        "auth": base64.b64encode(b"proxyuser:pr0xy-pa55").decode()}}}))
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--registry-auth-file", str(config))
    status, _, _ = proxy.request("GET", f"/v2/team/private/manifests/{fake.image['digest']}", MANIFEST_ACCEPT)
    assert status == 200


def test_without_proxy_credentials_private_content_needs_the_client_login(proxy, private_fake, start_proxy):
    fake = private_fake
    proxy = start_proxy("--upstream", f"docker={fake.url}")
    assert proxy.request("GET", f"/v2/team/private/manifests/{fake.image['digest']}")[0] == 401


@pytest.mark.parametrize("environ, message", [
    ({"UPSTREAM_DOCKER_USERNAME": "u"}, "go together"),
    ({"UPSTREAM_NOPE_USERNAME": "u", "UPSTREAM_NOPE_PASSWORD": "secretvalue"}, "unknown route"),
    ({"REGISTRY_AUTH_FILE": "/nonexistent/config.json"}, "REGISTRY_AUTH_FILE"),
])
def test_bad_credential_settings_stop_start_up_without_echoing_secrets(run_main, environ, message):
    status, _, err = run_main(["--env-file", os.devnull], environ)
    assert status == 2 and message in err
    assert "secretvalue" not in err


def test_credentials_never_appear_in_the_config_repr(tmp_path):
    from conftest import proxy_config
    config = proxy_config(tmp_path, UPSTREAM_GHCR_USERNAME="me", UPSTREAM_GHCR_PASSWORD="hunter2hunter2")
    assert "hunter2hunter2" not in repr(config)
    assert {r.name: r for r in config.routes}["ghcr"].credentials.username == "me"
