"""dispatch(), table-tested without sockets: (method, path, query, host) -> endpoint and target, or an error."""

import email.message

import pytest

import dockerproxy
from conftest import proxy_config
from dockerproxy import RegistryError

DIGEST = "sha256:" + "b" * 64
LOCAL = "127.0.0.1:8080"


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    config = proxy_config(tmp_path_factory.mktemp("c"), CUSTOM_DOMAIN="example.com")
    return dockerproxy.RouteTable(config)


DISPATCH = [
    # method, path, query, host -> endpoint, route, repository, reference, location
    ("GET", "/", "", LOCAL, "redirect", None, None, None, "/v2/"),
    ("GET", "/healthz", "", LOCAL, "health", None, None, None, ""),
    ("HEAD", "/health", "", "bad host!", "health", None, None, None, ""),   # no Host is echoed: not checked
    ("GET", "/routes", "", LOCAL, "routes", None, None, None, ""),
    ("GET", "/v2/", "", LOCAL, "base", "docker", None, None, ""),
    ("GET", "/v2", "", LOCAL, "base", "docker", None, None, ""),
    ("GET", "/v2/", "ns=ghcr.io", LOCAL, "base", "ghcr", None, None, ""),
    ("GET", "/v2/", "", "quay.example.com", "base", "quay", None, None, ""),
    ("GET", "/v2/auth", "scope=repository:library/a:pull", LOCAL, "token", None, None, None, ""),
    ("POST", "/v2/auth", "", LOCAL, "token", None, None, None, ""),
    ("GET", "/v2/library/nginx/manifests/latest", "", LOCAL, "tag", "docker", "library/nginx", "latest", ""),
    ("HEAD", "/v2/library/nginx/manifests/" + DIGEST, "", LOCAL, "manifest", "docker", "library/nginx", DIGEST, ""),
    ("GET", "/v2/library/nginx/blobs/" + DIGEST, "", LOCAL, "blob", "docker", "library/nginx", DIGEST, ""),
    ("GET", "/v2/library/nginx/tags/list", "n=5", LOCAL, "tags", "docker", "library/nginx", "list", ""),
    ("GET", "/v2/library/nginx/referrers/" + DIGEST, "", LOCAL, "referrers", "docker", "library/nginx", DIGEST, ""),
    ("GET", "/v2/owner/app/manifests/1", "ns=ghcr.io", LOCAL, "tag", "ghcr", "owner/app", "1", ""),
    ("GET", "/v2/ghcr.io/owner/app/blobs/" + DIGEST, "", LOCAL, "blob", "ghcr", "owner/app", DIGEST, ""),
    ("GET", "/v2/owner/app/manifests/1", "", "ghcr.example.com:5000", "tag", "ghcr", "owner/app", "1", ""),
    # Docker Hub's official images: a redirect to library/, query kept
    ("GET", "/v2/nginx/manifests/latest", "", LOCAL, "redirect", "docker", None, None, "/v2/library/nginx/manifests/latest"),
    ("GET", "/v2/nginx/tags/list", "n=1", LOCAL, "redirect", "docker", None, None, "/v2/library/nginx/tags/list?n=1"),
]


@pytest.mark.parametrize("method, path, query, host, name, route, repository, reference, location", DISPATCH)
def test_dispatch(routes, method, path, query, host, name, route, repository, reference, location):
    endpoint = dockerproxy.dispatch(routes, method, path, query, host)
    assert endpoint.name == name and endpoint.name in dockerproxy.ENDPOINTS
    assert (endpoint.route.name if endpoint.route else None) == route
    target = endpoint.target
    assert (target.repository if target else None, target.reference if target else None) == (repository, reference)
    assert endpoint.location == location
    if target:
        assert endpoint.query == query


REFUSED = [
    # method, path, query, host -> status, code, connection closed
    ("PUT", "/v2/library/a/manifests/1", "", LOCAL, 405, "UNSUPPORTED", True),
    ("POST", "/v2/library/a/blobs/uploads/", "", LOCAL, 405, "UNSUPPORTED", True),
    ("DELETE", "/v2/library/a/manifests/" + DIGEST, "", LOCAL, 405, "UNSUPPORTED", True),
    ("PATCH", "/v2/auth", "", LOCAL, 405, "UNSUPPORTED", True),
    ("POST", "/healthz", "", LOCAL, 405, "UNSUPPORTED", True),
    ("GET", "/metrics.php", "", LOCAL, 404, "UNSUPPORTED", False),
    ("GET", "/v2x/", "", LOCAL, 404, "UNSUPPORTED", False),
    ("GET", "/v2/_catalog", "", LOCAL, 404, "UNSUPPORTED", False),
    ("GET", "/v2/", "", "evil\r\nSet-Cookie: x", 400, "UNSUPPORTED", False),
    ("GET", "/v2/auth", "", 'a"b', 400, "UNSUPPORTED", False),
    ("GET", "/v2/library/a/manifests/1", "", "x y", 400, "UNSUPPORTED", False),
    ("GET", "/v2/", "ns=evil.example.org", LOCAL, 403, "DENIED", False),
    ("GET", "/v2/owner/app/manifests/1", "ns=ghcr.io", "docker.example.com", 403, "DENIED", False),
    ("GET", "/v2/evil.example.org/app/manifests/1", "", LOCAL, 403, "DENIED", False),
    ("GET", "/v2/library/a/blobs/sha256:00", "", LOCAL, 400, "DIGEST_INVALID", False),
    ("GET", "/v2/library/A/manifests/1", "", LOCAL, 400, "NAME_INVALID", False),
]


@pytest.mark.parametrize("method, path, query, host, status, code, close", REFUSED)
def test_dispatch_refuses(routes, method, path, query, host, status, code, close):
    with pytest.raises(RegistryError) as raised:
        dockerproxy.dispatch(routes, method, path, query, host)
    assert (raised.value.status, raised.value.code, raised.value.close) == (status, code, close)


def test_push_refusal_names_the_methods_allowed(routes):
    with pytest.raises(RegistryError) as raised:
        dockerproxy.dispatch(routes, "PUT", "/v2/a/b/manifests/1", "", LOCAL)
    assert ("Allow", "GET, HEAD") in raised.value.headers


def message(headers):
    """Headers as the handler has them: case-insensitive, like an http.client.HTTPMessage."""
    parsed = email.message.Message()
    for name, value in headers.items():
        parsed[name] = value
    return parsed


@pytest.mark.parametrize("headers, trust, host", [
    ({"host": "mirror:5000"}, False, "mirror:5000"),
    ({}, False, "0.0.0.0:8080"),
    ({"Host": "mirror", "X-Forwarded-Host": "public.example, inner"}, True, "public.example"),
    ({"Host": "mirror", "X-Forwarded-Host": "public.example"}, False, "mirror"),
])
def test_requested_host(headers, trust, host):
    assert dockerproxy.requested_host(message(headers), trust, ("0.0.0.0", 8080)) == host


@pytest.mark.parametrize("tls, headers, trust, scheme", [
    (False, {}, False, "http"),
    (True, {}, False, "https"),
    (False, {"X-Forwarded-Proto": "https"}, False, "http"),
    (False, {"X-Forwarded-Proto": "https, http"}, True, "https"),
    (True, {"X-Forwarded-Proto": "gopher"}, True, "https"),
])
def test_requested_scheme(tls, headers, trust, scheme):
    assert dockerproxy.requested_scheme(tls, message(headers), trust) == scheme


@pytest.mark.parametrize("route, implied, params, prefix, challenge", [
    ("docker", "docker", {"service": "registry.docker.io", "scope": "repository:library/a:pull"}, "",
     'Bearer realm="http://m:1/v2/auth",service="registry.docker.io",scope="repository:library/a:pull"'),
    ("ghcr", "docker", {"service": "ghcr.io", "scope": "repository:o/a:pull"}, "ghcr.io",
     'Bearer realm="http://m:1/v2/auth?ns=ghcr.io",service="ghcr.io",scope="repository:ghcr.io/o/a:pull"'),
    ("ghcr", None, {"service": "ghcr.io"}, "",
     'Bearer realm="http://m:1/v2/auth?ns=ghcr.io",service="ghcr.io"'),
    ("ghcr", "ghcr", {"service": "ghcr.io"}, "", 'Bearer realm="http://m:1/v2/auth",service="ghcr.io"'),
])
def test_own_challenge_names_our_realm_and_the_route(routes, route, implied, params, prefix, challenge):
    route = routes.routes[route]
    implied = routes.routes[implied] if implied else None
    assert dockerproxy.own_challenge(route, params, prefix, "http://m:1", implied) == challenge


@pytest.mark.parametrize("target, logged", [
    ("/v2/auth?refresh_token=s3cret&scope=x", "/v2/auth"),
    ("http://user:pa@ss@evil.example/v2/?token=t", "http://***@evil.example/v2/"),
    ("/v2/\x1b[2J", "/v2/\\x1b[2J"),
    ("http://[x/v2/?refresh_token=s3cret", "http://[x/v2/"),
])
def test_a_logged_target_keeps_no_secret_and_no_control_byte(target, logged):
    assert dockerproxy.logged_target(target) == logged


@pytest.mark.parametrize("target, split", [
    ("/v2/a/manifests/1?ns=ghcr.io", ("", "/v2/a/manifests/1", "ns=ghcr.io")),
    ("http://mirror:5000/v2/a/tags/list?n=1", ("mirror:5000", "/v2/a/tags/list", "n=1")),
    ("HTTPS://mirror/v2/", ("mirror", "/v2/", "")),
])
def test_split_target(target, split):
    assert dockerproxy.split_target(target) == split


@pytest.mark.parametrize("target", ["http://[x/v2/", "*", "mirror:443", "/v2/?x=\x07", "/v2/\u00e9", "/v2/ a"])
def test_split_target_refuses_what_is_not_a_request_target(target):
    with pytest.raises(RegistryError) as raised:
        dockerproxy.split_target(target)
    assert raised.value.status == 400 and raised.value.close
