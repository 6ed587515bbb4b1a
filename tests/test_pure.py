"""Table tests of the pure parts: settings, routing, challenges, scopes, headers."""

import ast
import json
import email.message
import importlib.util
import sysconfig
import os
import subprocess
import sys

import pytest

import dockerproxy
from conftest import ROOT, proxy_config
from dockerproxy import RegistryError


# Standard library only ######################################################

def test_module_imports_only_the_standard_library():
    tree = ast.parse(open(os.path.join(ROOT, "dockerproxy.py"), encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported and all(is_stdlib(name) for name in imported), [n for n in imported if not is_stdlib(n)]


def is_stdlib(name):
    """In the standard library: listed by 3.10+, else built in or found in the stdlib directory."""
    if hasattr(sys, "stdlib_module_names"):
        return name in sys.stdlib_module_names or name == "__future__"
    if name in sys.builtin_module_names:
        return True
    origin = getattr(importlib.util.find_spec(name), "origin", "") or ""
    paths = sysconfig.get_paths()
    return origin.startswith((paths["stdlib"], paths["platstdlib"])) and "site-packages" not in origin


# Settings ###################################################################

def test_defaults_need_no_configuration(tmp_path):
    config = proxy_config(tmp_path)
    assert (config.default_route, config.custom_domain, config.debug) == ("docker", "", False)
    result = subprocess.run(
        [sys.executable, "-c", "import dockerproxy; c = dockerproxy.load_config([], {}); print(c.host, c.port, c.cache_dir)"],
        cwd=tmp_path, env={"PYTHONPATH": ROOT, "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert result.stdout.split() == ["0.0.0.0", "8080", "./cache"], result.stderr


def test_flag_beats_environment_beats_env_file_beats_default(tmp_path):
    env_file = tmp_path / "settings.env"
    env_file.write_text("# comment\nexport PORT=1111\nCUSTOM_DOMAIN='file.example'\nDEBUG=true\n"
                        "UPSTREAM_GHCR=http://127.0.0.1:7000\n")
    load = dockerproxy.load_config
    config = load(["--env-file", str(env_file)], {})
    assert (config.port, config.custom_domain, config.debug) == (1111, "file.example", True)
    config = load(["--env-file", str(env_file)], {"PORT": "2222", "UPSTREAM_GHCR": "http://127.0.0.1:7001"})
    assert config.port == 2222 and config.custom_domain == "file.example"
    assert {r.name: r.upstream for r in config.routes}["ghcr"] == "http://127.0.0.1:7001"
    config = load(["--env-file", str(env_file), "--port", "3333", "--debug", "false",
                   "--upstream", "ghcr=http://127.0.0.1:7002"], {"PORT": "2222"})
    assert (config.port, config.debug) == (3333, False)
    assert {r.name: r.upstream for r in config.routes}["ghcr"] == "http://127.0.0.1:7002"


def test_env_file_in_working_directory_is_read(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("PORT=4444\n")
    monkeypatch.chdir(tmp_path)
    assert dockerproxy.load_config([], {}).port == 4444


def test_upstream_override_keeps_docker_hub_semantics(tmp_path):
    config = proxy_config(tmp_path, UPSTREAM_DOCKER="http://127.0.0.1:5000", UPSTREAM_K8S_GCR="http://127.0.0.1:5001")
    routes = {route.name: route for route in config.routes}
    assert routes["docker"].upstream == "http://127.0.0.1:5000" and routes["docker"].dockerhub
    assert routes["k8s-gcr"].upstream == "http://127.0.0.1:5001"
    assert "docker.io" in routes["docker"].registry_hosts


def test_extra_routes_add_registries(tmp_path):
    config = proxy_config(tmp_path, EXTRA_ROUTES="harbor=https://harbor.corp.example, nexus=http://127.0.0.1:8443")
    routes = {route.name: route for route in config.routes}
    assert routes["harbor"].upstream == "https://harbor.corp.example"
    assert routes["nexus"].registry_hosts == ("127.0.0.1:8443",)
    assert not routes["harbor"].dockerhub


@pytest.mark.parametrize("args, environ, setting", [
    (["--port", "abc"], {}, "PORT"),
    ([], {"PORT": "70000"}, "PORT"),
    ([], {"DEFAULT_ROUTE": "nosuch"}, "DEFAULT_ROUTE"),
    ([], {"UPSTREAM_NOSUCH": "http://127.0.0.1:1"}, "UPSTREAM_NOSUCH"),
    ([], {"UPSTREAM_DOCKER": "ftp://127.0.0.1"}, "UPSTREAM_DOCKER"),
    ([], {"UPSTREAM_DOCKER": "http://user:secret@127.0.0.1"}, "UPSTREAM_DOCKER"),
    ([], {"UPSTREAM_DOCKER": "http://127.0.0.1:99999"}, "UPSTREAM_DOCKER"),
    ([], {"UPSTREAM_DOCKER": "http://127.0.0.1/some/path"}, "UPSTREAM_DOCKER"),
    ([], {"TARGET_UPSTREAM": "not a url", "MODE": "debug"}, "TARGET_UPSTREAM"),
    ([], {"MODE": "debug"}, "MODE"),
    ([], {"MODE": "turbo"}, "MODE"),
    ([], {"DEBUG": "maybe"}, "DEBUG"),
    ([], {"READ_TIMEOUT": "-1"}, "READ_TIMEOUT"),
    ([], {"EXTRA_ROUTES": "docker=http://127.0.0.1:1"}, "EXTRA_ROUTES"),
    ([], {"EXTRA_ROUTES": "no-url"}, "EXTRA_ROUTES"),
    ([], {"CUSTOM_DOMAIN": "bad domain"}, "CUSTOM_DOMAIN"),
])
def test_bad_setting_stops_start_up_with_one_line_and_status_2(run_main, args, environ, setting):
    status, out, err = run_main(["--env-file", os.devnull] + args, environ)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0], err
    assert "secret" not in err


def test_help_lists_every_setting_with_its_default(run_main):
    status, out, _ = run_main(["--help"], {})
    assert status == 0
    text = " ".join(out.split())
    for setting in dockerproxy.SETTINGS:
        if setting.secret:  # named, never a flag: a command line is visible to every user
            assert setting.env in text and setting.flag not in text
            continue
        assert f"env {setting.env}, default {setting.default or 'empty'}" in text
    assert "UPSTREAM_<ROUTE>" in text and "--env-file" in text


def test_a_secret_setting_is_no_flag_and_its_value_never_printed(run_main):
    status, _, err = run_main(["--admin-token", "0123456789abcdef"], {})
    assert status == 2 and "unrecognized arguments: --admin-token" in err
    status, _, err = run_main([], {"ADMIN_TOKEN": "short secret"})
    assert status == 2 and "ADMIN_TOKEN=***: needs at least 16" in err and "short secret" not in err


def test_main_reads_the_environment_it_is_given_not_this_process(run_main, monkeypatch):
    monkeypatch.setenv("PORT", "70000")
    status, _, err = run_main(["--env-file", os.devnull], {"DEBUG": "maybe"})
    assert (status, err) == (2, "dockerproxy.py: error: DEBUG='maybe': not a boolean (true/false)\n")


BAD_PORT = "dockerproxy.py: error: PORT='70000': not a port number (0-65535)"


@pytest.mark.parametrize("argv, environ, env_file, status, stream, text", [
    (["--help"], {}, None, 0, "stdout", "--env-file PATH"),
    (["--env-file", os.devnull], {"PORT": "70000"}, None, 2, "stderr", BAD_PORT + "\n"),
    ([], {}, "PORT=70000\n", 2, "stderr", BAD_PORT + "\n"),
], ids=["help", "bad-environment", "bad-env-file"])
def test_the_script_itself_answers_help_and_stops_on_a_bad_environment_or_env_file(
        tmp_path, argv, environ, env_file, status, stream, text):
    """The real entry point: sys.argv, os.environ, ./.env and the exit status of `python3 dockerproxy.py`."""
    if env_file:
        (tmp_path / ".env").write_text(env_file)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dockerproxy.py")] + argv,
                            env={"PATH": os.environ["PATH"], **environ}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=20)
    output = getattr(result, stream)
    assert result.returncode == status, result.stderr
    assert (text in output) if status == 0 else (output == text)


# Routing ####################################################################

DOMAIN = "example.com"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    config = proxy_config(tmp_path_factory.mktemp("c"), CUSTOM_DOMAIN=DOMAIN,
                          EXTRA_ROUTES="corp=http://127.0.0.1:5999")
    return dockerproxy.RouteTable(config)


DIGEST = "sha256:" + "a" * 64

ROUTING = [
    # host, path, ns -> route, repository, kind, reference, prefix
    ("docker.example.com", "/v2/library/nginx/manifests/latest", None, "docker", "library/nginx", "manifests", "latest", ""),
    ("docker.example.com:443", "/v2/library/nginx/manifests/latest", None, "docker", "library/nginx", "manifests", "latest", ""),
    ("Docker.Example.COM", "/v2/library/nginx/tags/list", None, "docker", "library/nginx", "tags", "list", ""),
    ("ghcr.example.com", "/v2/owner/app/blobs/" + DIGEST, None, "ghcr", "owner/app", "blobs", DIGEST, ""),
    ("quay.example.com", "/v2/org/x/manifests/" + DIGEST, None, "quay", "org/x", "manifests", DIGEST, ""),
    ("k8s.example.com", "/v2/pause/manifests/3.9", None, "k8s", "pause", "manifests", "3.9", ""),
    ("k8s-gcr.example.com", "/v2/pause/manifests/3.9", None, "k8s-gcr", "pause", "manifests", "3.9", ""),
    ("docker-staging.example.com", "/v2/library/a/manifests/1", None, "docker-staging", "library/a", "manifests", "1", ""),
    ("nvcr.example.com", "/v2/nvidia/cuda/manifests/12", None, "nvcr", "nvidia/cuda", "manifests", "12", ""),
    ("mcr.example.com", "/v2/dotnet/sdk/manifests/8.0", None, "mcr", "dotnet/sdk", "manifests", "8.0", ""),
    ("elastic.example.com", "/v2/elasticsearch/elasticsearch/manifests/8", None, "elastic", "elasticsearch/elasticsearch", "manifests", "8", ""),
    ("corp.example.com", "/v2/team/app/manifests/1", None, "corp", "team/app", "manifests", "1", ""),
    # the Go port's old names
    ("registry.docker.example.com", "/v2/library/a/manifests/1", None, "docker", "library/a", "manifests", "1", ""),
    ("quay.registry.docker.example.com", "/v2/org/a/manifests/1", None, "quay", "org/a", "manifests", "1", ""),
    ("ghcr.registry.docker.example.com", "/v2/o/a/manifests/1", None, "ghcr", "o/a", "manifests", "1", ""),
    # containerd's ?ns=
    ("127.0.0.1:8080", "/v2/library/redis/manifests/7", "docker.io", "docker", "library/redis", "manifests", "7", ""),
    ("127.0.0.1:8080", "/v2/owner/app/manifests/1", "ghcr.io", "ghcr", "owner/app", "manifests", "1", ""),
    ("127.0.0.1:8080", "/v2/pause/manifests/3.9", "registry.k8s.io", "k8s", "pause", "manifests", "3.9", ""),
    ("127.0.0.1:8080", "/v2/team/app/manifests/1", "127.0.0.1:5999", "corp", "team/app", "manifests", "1", ""),
    ("docker.example.com", "/v2/library/redis/manifests/7", "docker.io", "docker", "library/redis", "manifests", "7", ""),
    # path prefixes
    ("127.0.0.1:8080", "/v2/ghcr.io/owner/app/manifests/1", None, "ghcr", "owner/app", "manifests", "1", "ghcr.io"),
    ("127.0.0.1:8080", "/v2/docker.io/library/nginx/blobs/" + DIGEST, None, "docker", "library/nginx", "blobs", DIGEST, "docker.io"),
    ("127.0.0.1:8080", "/v2/registry.k8s.io/pause/manifests/3.9", None, "k8s", "pause", "manifests", "3.9", "registry.k8s.io"),
    ("127.0.0.1:8080", "/v2/GHCR.io/owner/app/manifests/1", None, "ghcr", "owner/app", "manifests", "1", "GHCR.io"),
    ("ghcr.example.com", "/v2/ghcr.io/owner/app/manifests/1", None, "ghcr", "owner/app", "manifests", "1", "ghcr.io"),
    # a domain-scoped gcr project is a name, not a prefix, on the gcr route
    ("gcr.example.com", "/v2/example.com/proj/img/manifests/1", None, "gcr", "example.com/proj/img", "manifests", "1", ""),
    # default route
    ("127.0.0.1:8080", "/v2/library/nginx/manifests/latest", None, "docker", "library/nginx", "manifests", "latest", ""),
    ("unknown.other.org", "/v2/library/nginx/manifests/latest", None, "docker", "library/nginx", "manifests", "latest", ""),
    ("127.0.0.1:8080", "/v2/a/manifests/manifests/manifests", None, "docker", "a/manifests", "manifests", "manifests", ""),
    ("127.0.0.1:8080", "/v2/a/b/c/d/referrers/" + DIGEST, None, "docker", "a/b/c/d", "referrers", DIGEST, ""),
]


@pytest.mark.parametrize("host, path, ns, route, repository, kind, reference, prefix", ROUTING)
def test_resolve_routes_by_host_then_ns_then_prefix_then_default(table, host, path, ns, route, repository, kind, reference, prefix):
    target = table.resolve(host, path, ns)
    assert (target.route.name, target.repository, target.kind, target.reference, target.prefix) == (
        route, repository, kind, reference, prefix)


REFUSED = [
    # host, path, ns -> status, code
    ("127.0.0.1", "/v2/library/nginx/manifests/latest", "evil.example.org", 403, "DENIED"),
    ("127.0.0.1", "/v2/evil.example.org/app/manifests/latest", None, 403, "DENIED"),
    ("127.0.0.1", "/v2/localhost/app/manifests/latest", None, 403, "DENIED"),
    ("127.0.0.1", "/v2/169.254.169.254:80/app/manifests/latest", None, 403, "DENIED"),
    ("docker.example.com", "/v2/owner/app/manifests/1", "ghcr.io", 403, "DENIED"),
    ("docker.example.com", "/v2/ghcr.io/owner/app/manifests/1", None, 403, "DENIED"),
    ("127.0.0.1", "/v2/ghcr.io/owner/app/manifests/1", "quay.io", 403, "DENIED"),
    ("127.0.0.1", "/v2/Library/nginx/manifests/latest", None, 400, "NAME_INVALID"),
    ("127.0.0.1", "/v2/library/../secret/manifests/latest", None, 400, "NAME_INVALID"),
    ("127.0.0.1", "/v2/library/ng%2Finx/manifests/latest", None, 400, "NAME_INVALID"),
    ("127.0.0.1", "/v2//manifests/latest", None, 400, "NAME_INVALID"),
    ("127.0.0.1", "/v2/" + "a/" * 130 + "manifests/latest", None, 400, "NAME_INVALID"),
    ("127.0.0.1", "/v2/library/nginx/manifests/-bad", None, 400, "TAG_INVALID"),
    ("127.0.0.1", "/v2/library/nginx/manifests/" + "t" * 129, None, 400, "TAG_INVALID"),
    ("127.0.0.1", "/v2/library/nginx/blobs/latest", None, 400, "DIGEST_INVALID"),
    ("127.0.0.1", "/v2/library/nginx/blobs/sha256:abc", None, 400, "DIGEST_INVALID"),
    ("127.0.0.1", "/v2/library/nginx/blobs/md5:" + "a" * 32, None, 400, "DIGEST_INVALID"),
    ("127.0.0.1", "/v2/library/nginx/blobs/uploads/", None, 404, "UNSUPPORTED"),
    ("127.0.0.1", "/v2/_catalog", None, 404, "UNSUPPORTED"),
]


@pytest.mark.parametrize("host, path, ns, status, code", REFUSED)
def test_resolve_refuses_unknown_registries_and_bad_names(table, host, path, ns, status, code):
    with pytest.raises(RegistryError) as raised:
        table.resolve(host, path, ns)
    assert (raised.value.status, raised.value.code) == (status, code)


def test_without_default_route_an_unknown_host_gets_the_route_list(tmp_path):
    table = dockerproxy.RouteTable(proxy_config(tmp_path, CUSTOM_DOMAIN=DOMAIN, DEFAULT_ROUTE=""))
    with pytest.raises(dockerproxy.NoRoute) as raised:
        table.resolve("127.0.0.1", "/v2/library/a/manifests/1", None)
    routes = raised.value.routes["routes"]
    assert routes["docker.example.com"] == "https://registry-1.docker.io"
    assert routes["quay.example.com"] == "https://quay.io"
    assert raised.value.status == 404


def test_debug_mode_sends_every_host_to_target_upstream(tmp_path):
    table = dockerproxy.RouteTable(proxy_config(
        tmp_path, MODE="debug", TARGET_UPSTREAM="https://registry-1.docker.io", CUSTOM_DOMAIN=DOMAIN))
    for host in ("ghcr.example.com", "127.0.0.1", "anything.org"):
        target = table.resolve(host, "/v2/nginx/manifests/latest", None)
        assert target.route.upstream == "https://registry-1.docker.io" and target.route.dockerhub
    table = dockerproxy.RouteTable(proxy_config(tmp_path, MODE="debug", TARGET_UPSTREAM="http://127.0.0.1:5000"))
    assert not table.resolve("x", "/v2/nginx/manifests/latest", None).route.dockerhub


@pytest.mark.parametrize("host, path, query, location", [
    ("127.0.0.1", "/v2/nginx/manifests/latest", "", "/v2/library/nginx/manifests/latest"),
    ("127.0.0.1", "/v2/nginx/blobs/" + DIGEST, "", "/v2/library/nginx/blobs/" + DIGEST),
    ("127.0.0.1", "/v2/nginx/tags/list", "n=10&last=a", "/v2/library/nginx/tags/list?n=10&last=a"),
    ("127.0.0.1", "/v2/docker.io/nginx/manifests/1", "", "/v2/docker.io/library/nginx/manifests/1"),
    ("127.0.0.1", "/v2/library/nginx/manifests/latest", "", None),
    ("ghcr.example.com", "/v2/nginx/manifests/latest", "", None),
])
def test_library_redirect_only_on_docker_hub(table, host, path, query, location):
    target = table.resolve(host, path, None)
    assert dockerproxy.library_redirect(target, query) == location


@pytest.mark.parametrize("host, ns, scopes, route", [
    ("127.0.0.1", None, ["repository:library/nginx:pull"], "docker"),
    ("127.0.0.1", "ghcr.io", ["repository:owner/app:pull"], "ghcr"),
    ("127.0.0.1", None, ["repository:ghcr.io/owner/app:pull"], "ghcr"),
    ("quay.example.com", None, ["repository:org/app:pull"], "quay"),
    ("127.0.0.1", None, [], "docker"),
])
def test_token_route_follows_host_ns_or_scope_prefix(table, host, ns, scopes, route):
    assert table.for_token(host, ns, scopes).name == route


def test_token_route_refuses_scopes_of_two_registries(table):
    with pytest.raises(RegistryError):
        table.for_token("127.0.0.1", None, ["repository:ghcr.io/a/b:pull", "repository:quay.io/c/d:pull"])


# Scopes and challenges ######################################################

@pytest.mark.parametrize("route, scope, rewritten", [
    ("docker", "repository:nginx:pull", "repository:library/nginx:pull"),
    ("docker", "repository:library/nginx:pull", "repository:library/nginx:pull"),
    ("docker", "repository:user/app:pull,push", "repository:user/app:pull,push"),
    ("docker", "repository:docker.io/nginx:pull", "repository:library/nginx:pull"),
    ("ghcr", "repository:ghcr.io/owner/app:pull", "repository:owner/app:pull"),
    ("ghcr", "repository:nginx:pull", "repository:nginx:pull"),
    ("corp", "repository:127.0.0.1:5999/team/app:pull", "repository:team/app:pull"),
    ("docker", "registry:catalog:*", "registry:catalog:*"),
])
def test_rewrite_scope(table, route, scope, rewritten):
    assert dockerproxy.rewrite_scope(scope, table.routes[route]) == rewritten


@pytest.mark.parametrize("header, scheme, params", [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io"',
     "bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io"}),
    ('Bearer service="registry.docker.io",realm="https://auth.docker.io/token",scope="repository:library/a:pull"',
     "bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                "scope": "repository:library/a:pull"}),
    ('Bearer realm="https://r/t", error="insufficient_scope", scope="repository:a/b:pull,push"',
     "bearer", {"realm": "https://r/t", "error": "insufficient_scope", "scope": "repository:a/b:pull,push"}),
    ('Bearer realm=https://r/t,service=svc', "bearer", {"realm": "https://r/t", "service": "svc"}),
    ('Bearer realm="a\\"b",service="x,y"', "bearer", {"realm": 'a"b', "service": "x,y"}),
    ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
    ('BEARER Realm="https://r"', "bearer", {"realm": "https://r"}),
    ('Bearer', "bearer", {}),
])
def test_parse_challenge_by_key_not_position(header, scheme, params):
    assert dockerproxy.parse_challenge(header) == (scheme, params)


def test_render_challenge_round_trips():
    params = {"realm": 'http://h:1/v2/auth?ns=ghcr.io', "service": 'a"b', "scope": "repository:x:pull"}
    assert dockerproxy.parse_challenge(dockerproxy.render_challenge("bearer", params)) == ("bearer", params)


# Headers ####################################################################

def headers_of(*pairs):
    message = email.message.Message()
    for name, value in pairs:
        message[name] = value
    return message


def test_forwarded_request_headers_keep_what_registries_need():
    headers = headers_of(
        ("Accept", "application/vnd.oci.image.index.v1+json"),
        ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ("Range", "bytes=10-"), ("Authorization", "Bearer abc"), ("Cookie", "x=1"),
        ("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"), ("Proxy-Authorization", "Basic eA=="),
        ("Host", "docker.example.com"), ("User-Agent", "docker/27"))
    forwarded = dockerproxy.forwarded_request_headers(headers)
    assert forwarded == {
        "accept": "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        "range": "bytes=10-", "user-agent": "docker/27", "authorization": "Bearer abc"}
    assert "authorization" not in dockerproxy.forwarded_request_headers(
        headers_of(("Authorization", "Bearer " + dockerproxy.ANONYMOUS_TOKEN)))


def test_response_headers_drop_cookies_and_hop_by_hop():
    headers = headers_of(
        ("Content-Type", "application/json"), ("Docker-Content-Digest", DIGEST), ("Set-Cookie", "s=1"),
        ("Connection", "close"), ("Transfer-Encoding", "chunked"), ("Location", "https://cdn/x"),
        ("ETag", '"x"'), ("Link", '</v2/a/tags/list?n=1&last=b>; rel="next"'), ("RateLimit-Remaining", "99"))
    kept = dict(dockerproxy.response_headers(headers, prefix="ghcr.io"))
    assert kept == {"Content-Type": "application/json", "Docker-Content-Digest": DIGEST, "ETag": '"x"',
                    "Link": '</v2/ghcr.io/a/tags/list?n=1&last=b>; rel="next"', "Ratelimit-Remaining": "99"}


@pytest.mark.parametrize("url, redacted", [
    ("https://cdn.example/blobs/x?X-Amz-Signature=secret", "https://cdn.example/blobs/x"),
    ("http://127.0.0.1:1/v2/", "http://127.0.0.1:1/v2/"),
])
def test_redacted_url_drops_signed_queries(url, redacted):
    assert dockerproxy.redacted_url(url) == redacted


@pytest.mark.parametrize("host, bare", [
    ("docker.example.com", "docker.example.com"), ("Docker.Example.com:8443", "docker.example.com"),
    ("[::1]:8080", "::1"), ("example.com.", "example.com"),
])
def test_split_host(host, bare):
    assert dockerproxy.split_host(host) == bare


# Cache layout and manifest kinds ############################################

DM, DL = "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json"
OM, OI = "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json"


@pytest.mark.parametrize("accept, kind", [
    (f"{DM}, {DL}, {OM}, {OI}", "docker-list+docker-manifest+oci-index+oci-manifest"),
    (f"{OI};q=0.9, {DL}", "docker-list+oci-index"),
    (f"{DL}, {DM}", "docker-list+docker-manifest"),
    (f"{DM}, {DM}", "docker-manifest"),
    (f"{DM}, */*", "docker-manifest+any"),
    ("", "any"),
    ("application/json", "other"),
])
def test_accept_kind_keys_the_tag_index_by_what_a_client_accepts(accept, kind):
    assert dockerproxy.accept_kind(accept) == kind


@pytest.mark.parametrize("accept, media_type, allowed", [
    (f"{DL}, {DM}", OI, False), (f"{DL}, {DM}", DL, True), (f"{OI}; q=0.5", OI, True),
    ("", OI, True), ("*/*", DM, True), ("application/json", DM, False),
])
def test_accepts(accept, media_type, allowed):
    assert dockerproxy.accepts(accept, media_type) is allowed


def test_cache_paths_keep_registries_apart_and_stay_inside_the_root():
    root = "/c"
    assert dockerproxy.object_path(root, "sha256:" + "ab" * 32) == "/c/blobs/sha256/ab/" + "ab" * 32
    docker = dockerproxy.tag_path(root, "https://registry-1.docker.io", "library/nginx", "latest", "any")
    ghcr = dockerproxy.tag_path(root, "https://ghcr.io", "library/nginx", "latest", "any")
    assert docker == "/c/repos/registry-1.docker.io/library/nginx/_tags/latest/any.json" and docker != ghcr
    assert dockerproxy.link_path(root, "http://127.0.0.1:5000", "a/b", "sha256:" + "c" * 64) == \
        "/c/repos/127.0.0.1:5000/a/b/_links/sha256/" + "c" * 64


@pytest.mark.parametrize("header, size, expected", [
    ("bytes=0-9", 100, (0, 9)), ("bytes=90-", 100, (90, 99)), ("bytes=-10", 100, (90, 99)),
    ("bytes=95-200", 100, (95, 99)), ("bytes=0-1,5-6", 100, None), ("items=0-1", 100, None),
    ("", 100, None), ("bytes=-", 100, None), ("bytes=-500", 100, (0, 99)),
    ("bytes=50-10", 100, None), ("bytes=5-2", 100, None),  # last before first: invalid, ignored
    ("bytes = 5 - 9", 100, (5, 9)), ("BYTES=5-", 100, (5, 99)),
    ("bytes=" + " " * 1200 + "-" + " " * 1200 + "x", 100, None),  # cubic for a backtracking pattern
    ("bytes=" + "9" * 5000 + "-", 100, None), ("bytes=1-" + "9" * 20, 100, None),  # int() of 4301+ digits raises
])
def test_parse_byte_range(header, size, expected):
    assert dockerproxy.parse_byte_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0", "bytes=100-200"])
def test_unsatisfiable_range_is_416(header):
    with pytest.raises(RegistryError) as raised:
        dockerproxy.parse_byte_range(header, 100)
    assert raised.value.status == 416


@pytest.mark.parametrize("text, size", [("20G", 20 * 1024 ** 3), ("512m", 512 * 1024 ** 2), ("1.5K", 1536),
                                        ("0", 0), ("3TiB", 3 * 1024 ** 4), ("100", 100)])
def test_parse_size(text, size):
    assert dockerproxy.parse_size(text) == size


@pytest.mark.parametrize("text, seconds", [("30d", 2592000), ("60", 60), ("2h", 7200), ("0.5s", 0.5), ("0", 0)])
def test_parse_duration(text, seconds):
    assert dockerproxy.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-1", "lots", "5X", "1e9"])
def test_bad_size_or_duration_is_refused(text):
    with pytest.raises(ValueError):
        dockerproxy.parse_size(text)


def test_config_repr_shows_no_auth_file_accounts(tmp_path):
    """accounts was repr=False on the dataclass ("never printed"); the namedtuple's repr
    prints every account: host and username (the password stays ***)."""
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {"ghcr.io": {"username": "deploy-bot-7", "password": "s3cret"}}}))
    config = proxy_config(tmp_path, "--registry-auth-file", str(auth))
    assert "s3cret" not in repr(config)
    assert "deploy-bot-7" not in repr(config)
