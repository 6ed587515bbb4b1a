#!/usr/bin/env python3
"""dockerproxy: a pull-through proxy for container registries, in one file.

It answers the registry API (``/v2/``) for docker, containerd, podman and
Kubernetes and fetches what they ask for from the upstream registries of its
route table: Docker Hub, ghcr.io, quay.io, gcr.io, registry.k8s.io, nvcr.io,
mcr.microsoft.com, docker.elastic.co and any registry an operator adds.  It is
compatible with the Cloudflare Worker ciiiii/cloudflare-docker-proxy: the same
``docker.{CUSTOM_DOMAIN}`` host names, the same ``/v2/auth`` token flow, the
same ``MODE=debug`` with ``TARGET_UPSTREAM``.

What it does:
  * routes a request by host name (``ghcr.{CUSTOM_DOMAIN}``), by containerd's
    ``?ns=ghcr.io``, by path prefix (``/v2/ghcr.io/owner/app/...``), else to
    ``DEFAULT_ROUTE``;
  * turns every upstream 401 into its own Bearer challenge whose realm is its
    own ``/v2/auth``, and fetches tokens from the upstream's realm there;
  * redirects one-segment Docker Hub names to ``library/``;
  * follows upstream redirects (CDNs) itself, never sending Authorization to
    another host;
  * streams bodies in fixed-size chunks, whatever their size.

What it never does:
  * accept a push: PUT, POST, PATCH and DELETE on the registry API get 405;
  * connect to a host outside its route table, except where a configured
    upstream redirects it (CDNs) or names its token realm;
  * write outside CACHE_DIR, or log an Authorization header, token or password.

Settings (command-line flag > environment > .env file > default):
  HOST=0.0.0.0              address to listen on
  PORT=8080                 TCP port to listen on
  CACHE_DIR=./cache         directory of the disk cache
  CUSTOM_DOMAIN=            domain of the host routes (empty: none)
  DEFAULT_ROUTE=docker      route of requests nothing else routes (empty: 404)
  UPSTREAM_<ROUTE>=         another URL for a route (UPSTREAM_DOCKER=http://...)
  EXTRA_ROUTES=             more routes: name=https://registry.example,...
  MODE=                     "debug": every request goes to TARGET_UPSTREAM
  TARGET_UPSTREAM=          the upstream of MODE=debug
  TRUST_PROXY_HEADERS=false honour X-Forwarded-Proto/X-Forwarded-Host
  CONNECT_TIMEOUT=10        seconds to connect to an upstream
  READ_TIMEOUT=60           seconds an upstream may stay silent mid-answer
  DEBUG=false               log upstream requests, redirects, token fetches

Run ``python3 dockerproxy.py --help`` for the same list with the flags.
"""

from __future__ import annotations

# Imports and limits ########################################################

import argparse
import dataclasses
import http.client
import http.server
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse

__version__ = "0.1.0"

log = logging.getLogger("dockerproxy")

# Bodies are relayed through one buffer of this size per thread.  256 KiB
# keeps a socket busy on a fast link while a hundred parallel layer pulls
# still cost only 25 MiB; nginx's proxy buffers are 4-8 KiB, but Python pays
# per call, so fewer, larger calls are faster here.
CHUNK_SIZE = 256 * 1024

# Docker Hub needs one hop (registry -> CDN), S3 pre-signing chains two.
# Go's client stops at 10 and curl at 50; five is plenty and bounds a loop.
MAX_REDIRECTS = 5

# Small bodies read whole: redirect bodies, the OAuth2 form a client posts to
# /v2/auth.  A token request is well under 4 KiB; 64 KiB refuses abuse.
MAX_SMALL_BODY = 64 * 1024

# distribution limits a repository name to 255 characters.
MAX_NAME_LENGTH = 255

# How long an upstream's realm and service are remembered.  They change only
# when a registry moves its auth service; one /v2/ probe an hour is cheap.
CHALLENGE_TTL = 3600.0

# Idle keep-alive connections kept per upstream host.  Eight covers the
# parallel layer downloads of one docker pull (it uses three) several times.
IDLE_CONNECTIONS_PER_HOST = 8

# A client connection idle this long is closed (slowloris guard).  Generous,
# because a client may pause between layers while it extracts.
CLIENT_IDLE_TIMEOUT = 300.0

# The listen backlog: socketserver's default of 5 drops connections when a
# node pulls many layers of many images at once.
LISTEN_BACKLOG = 128

# Returned by /v2/auth when an upstream needs no token, so that clients that
# always fetch one (podman pings the default route) can go on.  It is never
# forwarded upstream.
ANONYMOUS_TOKEN = "dockerproxy-anonymous"

# OCI distribution spec: repository name components and tags.
NAME_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
DIGEST = re.compile(r"(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})\Z")

# A Host header (or X-Forwarded-Host) is echoed into the realm of our
# challenges: anything outside these characters could inject a header.
HOST_HEADER = re.compile(r"[A-Za-z0-9.\-]+(?::[0-9]{1,5})?\Z|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?\Z")

# Headers a client's request carries upstream.  A list of what is needed, not
# of what is forbidden: cookies, proxy headers and hop-by-hop headers stay.
FORWARDED_REQUEST_HEADERS = ("accept", "range", "if-range", "user-agent")

# Headers an upstream answer carries back to the client, for the same reason
# (no Set-Cookie, no upstream Location, no hop-by-hop headers).
FORWARDED_RESPONSE_HEADERS = (
    "content-type", "content-range", "accept-ranges", "docker-content-digest",
    "docker-distribution-api-version", "etag", "last-modified", "link",
    "retry-after", "ratelimit-limit", "ratelimit-remaining",
    "docker-ratelimit-source", "oci-subject", "oci-filters-applied", "warning",
)

REDIRECT_STATUSES = (301, 302, 303, 307, 308)


# Errors ####################################################################

class RegistryError(Exception):
    """An answer in the registry's error format, raised from any depth.

    The handler catches it in one place and renders it as
    ``{"errors": [{"code", "message", "detail"}]}`` with its status.
    """

    def __init__(self, status: int, code: str, message: str,
                 detail: object = None, headers: tuple = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = tuple(headers)

    def body(self) -> bytes:
        error = {"code": self.code, "message": self.message, "detail": self.detail}
        return json.dumps({"errors": [error]}).encode()


class UpstreamUnavailable(RegistryError):
    """The upstream could not be reached or broke the protocol: 502."""

    def __init__(self, message: str) -> None:
        super().__init__(502, "UNAVAILABLE", message)


class UpstreamTimeout(RegistryError):
    """The upstream stayed silent longer than READ_TIMEOUT: 504."""

    def __init__(self, message: str) -> None:
        super().__init__(504, "UNAVAILABLE", message)


class NoRoute(RegistryError):
    """No route for the request: 404 with the route list, as the Worker."""

    def __init__(self, routes: dict) -> None:
        super().__init__(404, "NAME_UNKNOWN", "no route for this host")
        self.routes = routes

    def body(self) -> bytes:
        return json.dumps(self.routes).encode()


class ConfigError(Exception):
    """A bad setting: start-up stops with this one-line message, status 2."""


# Configuration #############################################################

@dataclasses.dataclass(frozen=True)
class Route:
    """One upstream registry and the names clients use for it."""

    name: str                       # "ghcr": host route ghcr.{CUSTOM_DOMAIN}
    upstream: str                   # "https://ghcr.io", no path
    registry_hosts: tuple = ()      # names for ?ns= and path prefixes
    dockerhub: bool = False         # library/ redirect and scope rewrite


DOCKER_HUB = "https://registry-1.docker.io"

# The Worker's routes (ciiiii/cloudflare-docker-proxy), then the registries
# its users ask for most.  registry_hosts are the names docker, containerd and
# podman put in ?ns= or a path prefix for that registry.
BUILTIN_ROUTES = (
    Route("docker", DOCKER_HUB,
          ("docker.io", "registry-1.docker.io", "index.docker.io"), True),
    Route("docker-staging", DOCKER_HUB, (), True),
    Route("quay", "https://quay.io", ("quay.io",)),
    Route("gcr", "https://gcr.io", ("gcr.io",)),
    Route("k8s-gcr", "https://k8s.gcr.io", ("k8s.gcr.io",)),
    Route("k8s", "https://registry.k8s.io", ("registry.k8s.io",)),
    Route("ghcr", "https://ghcr.io", ("ghcr.io",)),
    Route("cloudsmith", "https://docker.cloudsmith.io", ("docker.cloudsmith.io",)),
    Route("ecr", "https://public.ecr.aws", ("public.ecr.aws",)),
    Route("nvcr", "https://nvcr.io", ("nvcr.io",)),
    Route("mcr", "https://mcr.microsoft.com", ("mcr.microsoft.com",)),
    Route("elastic", "https://docker.elastic.co", ("docker.elastic.co",)),
)

ROUTE_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*\Z")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting, parsed and checked.  Build it with load_config()."""

    host: str = "0.0.0.0"
    port: int = 8080
    cache_dir: str = "./cache"
    custom_domain: str = ""
    default_route: str = "docker"
    mode: str = ""
    target_upstream: str = ""
    trust_proxy_headers: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    debug: bool = False
    routes: tuple = BUILTIN_ROUTES


def parse_port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError("not a port number (0-65535)")
    return int(text)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean (true/false)")


def parse_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not 0 < seconds < 86400:
        raise ValueError("must be between 0 and 86400 seconds")
    return seconds


def parse_upstream_url(text: str) -> str:
    """An upstream is scheme://host[:port], nothing more.

    A path would silently be dropped by the registry API; credentials in a URL
    would reach /routes and the logs, so they are refused here.
    """
    url = urllib.parse.urlsplit(text.strip())
    try:
        url.port
    except ValueError:
        raise ValueError("malformed URL: bad port") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("malformed URL: expected http(s)://host[:port]")
    if url.username or url.password:
        raise ValueError("credentials do not belong in the URL")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError("malformed URL: an upstream has no path or query")
    return f"{url.scheme}://{url.netloc.lower()}"


def parse_optional_url(text: str) -> str:
    return parse_upstream_url(text) if text.strip() else ""


def parse_domain(text: str) -> str:
    domain = text.strip().lower().strip(".")
    if domain and not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", domain):
        raise ValueError("not a domain name")
    return domain


def parse_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("", "debug", "production"):
        raise ValueError('expected "debug" or empty')
    return "" if mode == "production" else mode


def parse_route_name(text: str) -> str:
    name = text.strip().lower()
    if name and not ROUTE_NAME.match(name):
        raise ValueError("not a route name")
    return name


def parse_extra_routes(text: str) -> tuple:
    """EXTRA_ROUTES: name=url pairs, separated by commas or spaces."""
    routes = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        name, sep, url = item.partition("=")
        name = name.strip().lower()
        if not sep or not ROUTE_NAME.match(name):
            raise ValueError(f"{item!r} is not name=http(s)://host[:port]")
        upstream = parse_upstream_url(url)
        routes.append(Route(name, upstream, (urllib.parse.urlsplit(upstream).netloc,)))
    return tuple(routes)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its environment name, default, parser and help."""

    env: str
    default: str
    parse: object
    help: str

    @property
    def field(self) -> str:
        return self.env.lower()

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


SETTINGS = (
    Setting("HOST", "0.0.0.0", str.strip, "address to listen on"),
    Setting("PORT", "8080", parse_port, "TCP port to listen on"),
    Setting("CACHE_DIR", "./cache", str.strip, "directory of the disk cache"),
    Setting("CUSTOM_DOMAIN", "", parse_domain,
            "domain of the host routes docker.DOMAIN, ghcr.DOMAIN, ... (empty: none)"),
    Setting("DEFAULT_ROUTE", "docker", parse_route_name,
            "route of requests no host, ns or path prefix routes (empty: 404 with the route list)"),
    Setting("EXTRA_ROUTES", "", parse_extra_routes,
            "more routes, name=https://registry.example.com, comma-separated"),
    Setting("MODE", "", parse_mode, "debug: send every request to TARGET_UPSTREAM"),
    Setting("TARGET_UPSTREAM", "", parse_optional_url, "the upstream of MODE=debug"),
    Setting("TRUST_PROXY_HEADERS", "false", parse_bool,
            "honour X-Forwarded-Proto/-Host (only behind a TLS-terminating reverse proxy)"),
    Setting("CONNECT_TIMEOUT", "10", parse_seconds, "seconds to connect to an upstream"),
    Setting("READ_TIMEOUT", "60", parse_seconds,
            "seconds an upstream may stay silent mid-answer (a whole transfer has no limit)"),
    Setting("DEBUG", "false", parse_bool,
            "log every upstream request, redirect and token fetch"),
)

UPSTREAM_PREFIX = "UPSTREAM_"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dockerproxy.py",
        description="Pull-through proxy for container registries.",
        epilog="Each setting is read from its flag, else the environment, else the "
               ".env file, else its default.  UPSTREAM_<ROUTE>=URL (or --upstream "
               "ROUTE=URL) points a route at another registry, e.g. "
               "UPSTREAM_DOCKER=http://127.0.0.1:5000 for a local mirror of Docker Hub.")
    for setting in SETTINGS:
        default = setting.default or "empty"
        # A boolean flag alone means true (--debug), or takes a value (--debug false).
        switch = {"nargs": "?", "const": "true"} if setting.parse is parse_bool else {}
        parser.add_argument(setting.flag, dest=setting.field, metavar=setting.env, **switch,
                            help=f"{setting.help} (env {setting.env}, default {default})")
    parser.add_argument("--upstream", action="append", default=[], metavar="ROUTE=URL",
                        help="point a route at another URL (env UPSTREAM_<ROUTE>, "
                             "default the registry's own)")
    parser.add_argument("--env-file", metavar="PATH",
                        help="read settings from this file (default ./.env if it exists)")
    parser.add_argument("--version", action="version", version=f"dockerproxy {__version__}")
    return parser


def read_env_file(path: str) -> dict:
    """KEY=VALUE lines, as docker compose and systemd read them."""
    values = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):]
            key, sep, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            if sep:
                values[key.strip()] = value
    return values


def load_config(argv: list, environ: dict) -> Config:
    """Settings from argv, environ and the .env file; raises ConfigError."""
    args = build_parser().parse_args(argv)
    env_file = args.env_file or ".env"
    try:
        dotenv = read_env_file(env_file) if args.env_file or os.path.exists(env_file) else {}
    except OSError as err:
        raise ConfigError(f"--env-file {env_file}: {err.strerror}") from None
    values = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.field)
        if raw is None:
            raw = environ.get(setting.env, dotenv.get(setting.env, setting.default))
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as err:
            raise ConfigError(f"{setting.env}={shown(raw)}: {err}") from None
    extra_routes = values.pop("extra_routes")
    overrides = {**upstream_overrides(dotenv), **upstream_overrides(environ)}
    for item in args.upstream:
        name, _, url = item.partition("=")
        overrides[name.strip().lower()] = url
    routes = build_routes(extra_routes, overrides)
    config = Config(routes=routes, **values)
    check_config(config)
    return config


def upstream_overrides(variables: dict) -> dict:
    """UPSTREAM_K8S_GCR=url -> {"k8s-gcr": url}."""
    return {
        key[len(UPSTREAM_PREFIX):].lower().replace("_", "-"): value
        for key, value in variables.items()
        if key.startswith(UPSTREAM_PREFIX) and value.strip()
    }


def build_routes(extra_routes: tuple, overrides: dict) -> tuple:
    routes = {route.name: route for route in BUILTIN_ROUTES}
    for route in extra_routes:
        if route.name in routes:
            raise ConfigError(f"EXTRA_ROUTES: {route.name!r} is a built-in route; "
                              f"use UPSTREAM_{env_name(route.name)} to move it")
        routes[route.name] = route
    for name, url in overrides.items():
        if name not in routes:
            raise ConfigError(f"UPSTREAM_{env_name(name)}: unknown route {name!r} "
                              f"(known: {', '.join(routes)}; add one with EXTRA_ROUTES)")
        try:
            upstream = parse_upstream_url(url)
        except ValueError as err:
            raise ConfigError(f"UPSTREAM_{env_name(name)}={shown(url)}: {err}") from None
        routes[name] = dataclasses.replace(routes[name], upstream=upstream)
    return tuple(routes.values())


def shown(value: str) -> str:
    """A setting's value for an error message, with any URL password hidden."""
    return repr(re.sub(r"//[^/@]*@", "//***@", value))


def env_name(route_name: str) -> str:
    return route_name.upper().replace("-", "_")


def check_config(config: Config) -> None:
    names = [route.name for route in config.routes]
    if config.default_route and config.default_route not in names:
        raise ConfigError(f"DEFAULT_ROUTE={config.default_route!r}: unknown route "
                          f"(known: {', '.join(names)})")
    if config.mode == "debug" and not config.target_upstream:
        raise ConfigError("MODE='debug': needs TARGET_UPSTREAM")
    seen = {}
    for route in config.routes:
        for host in route.registry_hosts:
            if host in seen:
                raise ConfigError(f"EXTRA_ROUTES: {route.name!r} and {seen[host]!r} "
                                  f"both claim registry host {host!r}")
            seen[host] = route.name


# Routing (pure: no I/O) ####################################################

@dataclasses.dataclass(frozen=True)
class Target:
    """What a registry API request asks for, once routed."""

    route: Route
    kind: str                 # "manifests", "blobs", "tags" or "referrers"
    repository: str           # the name the upstream knows ("library/nginx")
    reference: str            # tag or digest; "list" for tags
    prefix: str = ""          # registry host the client put before the name

    @property
    def upstream_path(self) -> str:
        return f"/v2/{self.repository}/{self.kind}/{self.reference}"

    def client_path(self, repository: str) -> str:
        """The path a client uses for `repository` on this same route."""
        name = f"{self.prefix}/{repository}" if self.prefix else repository
        return f"/v2/{name}/{self.kind}/{self.reference}"


def split_host(host: str) -> str:
    """'Docker.Example.com:443' -> 'docker.example.com'; '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0].rstrip(".")


def looks_like_registry_host(component: str) -> bool:
    """docker's rule for the first name component: a host has . or : or is localhost."""
    return "." in component or ":" in component or component == "localhost"


def split_api_path(path: str) -> tuple:
    """'/v2/a/b/manifests/x' -> (['a', 'b'], 'manifests', 'x')."""
    parts = path[len("/v2/"):].split("/")
    if len(parts) >= 3 and parts[-2] in ("manifests", "blobs", "referrers"):
        return parts[:-2], parts[-2], parts[-1]
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return parts[:-2], "tags", "list"
    raise RegistryError(404, "UNSUPPORTED", "not a registry pull endpoint", path)


def check_repository(components: list) -> str:
    name = "/".join(components)
    if not components or len(name) > MAX_NAME_LENGTH or not all(
            NAME_COMPONENT.match(part) for part in components):
        raise RegistryError(400, "NAME_INVALID", "invalid repository name", name)
    return name


def check_reference(kind: str, reference: str) -> None:
    if kind in ("blobs", "referrers") and not DIGEST.match(reference):
        raise RegistryError(400, "DIGEST_INVALID", "invalid digest", reference)
    if kind == "manifests" and not (DIGEST.match(reference) or TAG.match(reference)):
        raise RegistryError(400, "TAG_INVALID", "invalid tag or digest", reference)


class RouteTable:
    """Which upstream serves a request; built once from the Config."""

    def __init__(self, config: Config) -> None:
        self.routes = {route.name: route for route in config.routes}
        self.by_registry = {
            host: route for route in config.routes for host in route.registry_hosts}
        self.by_host = {}
        if config.custom_domain:
            for route in config.routes:
                self.by_host[f"{route.name}.{config.custom_domain}"] = route
                legacy = "registry.docker" if route.name == "docker" else f"{route.name}.registry.docker"
                self.by_host.setdefault(f"{legacy}.{config.custom_domain}", route)
        self.default = self.routes.get(config.default_route)
        self.debug_target = None
        if config.mode == "debug":
            upstream = config.target_upstream
            self.debug_target = Route("debug", upstream, (), upstream == DOCKER_HUB)

    def for_host(self, host: str) -> Route | None:
        if self.debug_target:
            return self.debug_target
        return self.by_host.get(split_host(host))

    def implied(self, host: str) -> Route | None:
        """The route of a request on `host` that names no registry."""
        return self.for_host(host) or self.default

    def for_registry(self, name: str) -> Route:
        route = self.by_registry.get(name.lower())
        if route is None:
            raise RegistryError(403, "DENIED",
                                f"registry {name!r} is not in this proxy's route table")
        return route

    def choose(self, by_host: Route | None, *explicit: Route | None) -> Route:
        """The host route wins, but never silently against an explicit ns or prefix."""
        if self.debug_target:
            return self.debug_target
        named = [route for route in explicit if route is not None]
        for route in named:  # docker-staging and ns=docker.io are the same registry
            if named[0].upstream != route.upstream or (by_host and by_host.upstream != route.upstream):
                raise RegistryError(403, "DENIED", "host, ns and path prefix name different registries")
        route = by_host or (named[0] if named else self.default)
        if route is None:
            raise NoRoute(self.describe())
        return route

    def for_base(self, host: str, ns: str | None) -> Route:
        by_ns = self.for_registry(ns) if ns and not self.debug_target else None
        return self.choose(self.for_host(host), by_ns)

    def resolve(self, host: str, path: str, ns: str | None) -> Target:
        """Route a /v2/<name>/<kind>/<reference> request."""
        components, kind, reference = split_api_path(path)
        by_host = self.for_host(host)
        by_ns = self.for_registry(ns) if ns and not self.debug_target else None
        by_prefix, prefix = None, ""
        if len(components) >= 2 and not self.debug_target:
            first = components[0].lower()
            if first in self.by_registry:
                by_prefix, prefix, components = self.by_registry[first], components[0], components[1:]
            elif looks_like_registry_host(first) and not (by_host or by_ns):
                self.for_registry(first)  # raises: an unknown host is never contacted
        route = self.choose(by_host, by_ns, by_prefix)
        repository = check_repository(components)
        check_reference(kind, reference)
        return Target(route, kind, repository, reference, prefix)

    def for_token(self, host: str, ns: str | None, scopes: list) -> Route:
        """The route a /v2/auth request is for.

        podman fetches every token from the realm its /v2/ ping gave, so the
        registry of a path-prefix route is known only from the scope.
        """
        by_ns = self.for_registry(ns) if ns and not self.debug_target else None
        prefixes = {scope_prefix(scope, self.by_registry) for scope in scopes} - {""}
        by_prefix = [self.by_registry[prefix.lower()] for prefix in sorted(prefixes)]
        return self.choose(self.for_host(host), by_ns, *by_prefix)

    def describe(self) -> dict:
        """The route table as /routes and the 404 answer show it."""
        if self.debug_target:
            return {"routes": {"*": self.debug_target.upstream}, "mode": "debug"}
        return {
            "routes": {host: route.upstream for host, route in self.by_host.items()},
            "registries": {host: route.upstream for host, route in self.by_registry.items()},
            "default_route": self.default.name if self.default else None,
        }


def library_redirect(target: Target, query: str) -> str | None:
    """Docker Hub's official images live under library/: 'nginx' -> 'library/nginx'."""
    if not target.route.dockerhub or "/" in target.repository:
        return None
    location = target.client_path("library/" + target.repository)
    return f"{location}?{query}" if query else location


def split_scope(scope: str) -> tuple:
    """'repository:127.0.0.1:5000/app:pull' -> ('repository', '127.0.0.1:5000/app', 'pull')."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return kind, name, actions


def scope_prefix(scope: str, registries: dict) -> str:
    """The registry host a scope's repository starts with, if it names one."""
    kind, name, _ = split_scope(scope)
    first, sep, _ = name.partition("/")
    if kind == "repository" and sep and first.lower() in registries:
        return first
    return ""


def rewrite_scope(scope: str, route: Route) -> str:
    """A client's scope as the upstream's token service expects it.

    A path prefix goes (the upstream knows 'owner/app', not
    'ghcr.io/owner/app'); on Docker Hub a one-segment name gets library/.
    """
    kind, name, actions = split_scope(scope)
    if kind != "repository" or not name:
        return scope
    first, sep, rest = name.partition("/")
    if sep and first.lower() in route.registry_hosts:
        name = rest
    if route.dockerhub and "/" not in name:
        name = "library/" + name
    return f"{kind}:{name}:{actions}"


def client_scope(scope: str, prefix: str) -> str:
    """An upstream's challenge scope as the client knows the name (prefix back on)."""
    kind, name, actions = split_scope(scope)
    if kind != "repository" or not prefix:
        return scope
    return f"{kind}:{prefix}/{name}:{actions}"


# RFC 7235 auth-param: token "=" ( token / quoted-string ), comma-separated.
AUTH_PARAM = re.compile(
    r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|\Z)')


def parse_challenge(header: str) -> tuple:
    """'Bearer realm="r",service="s"' -> ('bearer', {'realm': 'r', 'service': 's'}).

    Parameters are read by name, in any order, quoted or not, so an upstream
    that puts service before realm (or adds error=) is read right.
    """
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    position = 0
    while position < len(rest):
        match = AUTH_PARAM.match(rest, position)
        if not match:
            break
        key, quoted, bare = match.groups()
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params.setdefault(key.lower(), value)
        position = match.end()
    return scheme.lower(), params


def render_challenge(scheme: str, params: dict) -> str:
    quoted = ",".join(
        '{}="{}"'.format(key, value.replace("\\", "\\\\").replace('"', '\\"'))
        for key, value in params.items() if value)
    return f"{scheme.capitalize()} {quoted}"


def forwarded_request_headers(headers, same_host: bool = True) -> dict:
    """The client headers that go upstream (see FORWARDED_REQUEST_HEADERS).

    Several Accept headers are joined: docker sends one per media type.
    """
    forwarded = {}
    for name in FORWARDED_REQUEST_HEADERS:
        values = headers.get_all(name) or []
        if values:
            forwarded[name] = ", ".join(values)
    authorization = headers.get("authorization", "")
    if same_host and authorization and authorization != f"Bearer {ANONYMOUS_TOKEN}":
        forwarded["authorization"] = authorization
    return forwarded


def same_origin(url_a: str, url_b: str) -> bool:
    a, b = urllib.parse.urlsplit(url_a), urllib.parse.urlsplit(url_b)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def redacted_url(url: str) -> str:
    """A URL fit for a log line: CDN query strings carry signatures."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def printable(text: str) -> str:
    """Control characters escaped, as http.server does, so a log line stays one line."""
    return text.encode("unicode_escape", "backslashreplace").decode("ascii").replace('"', '\\"')


# Upstream client ###########################################################

class UpstreamResponse:
    """An upstream answer whose connection goes back to the pool when done."""

    def __init__(self, response: http.client.HTTPResponse, connection, pool, url: str) -> None:
        self.response = response
        self.status = response.status
        self.headers = response.headers
        self.url = url
        self._connection = connection
        self._pool = pool

    def readinto(self, buffer) -> int:
        return self.response.readinto(buffer)

    def read_small(self, limit: int = MAX_SMALL_BODY) -> bytes:
        """A body known to be small (JSON errors, tokens, redirects)."""
        data = self.response.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise UpstreamUnavailable(f"upstream answer larger than {limit} bytes")
        return data

    def release(self) -> None:
        """Reuse the connection if the answer was read to its end, else close it."""
        if self._connection is None:
            return
        if self.response.isclosed() and not self.response.will_close:
            self._pool.put_back(self._connection)
        else:
            self._connection.close()
        self._connection = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Upstreams:
    """HTTP/1.1 client for the upstreams: keep-alive pools, timeouts, redirects."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls = ssl.create_default_context()
        self._idle = {}
        self._lock = threading.Lock()

    def _new_connection(self, scheme: str, host: str, port: int | None):
        if scheme == "https":
            connection = http.client.HTTPSConnection(
                host, port, timeout=self.connect_timeout, context=self.tls)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        connection.connect()
        # Connecting may wait CONNECT_TIMEOUT; after that only silence counts,
        # never the length of the whole transfer.
        connection.sock.settimeout(self.read_timeout)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.pool_key = (scheme, host, port)
        return connection

    def _idle_connection(self, key: tuple):
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def put_back(self, connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(connection.pool_key, [])
            if len(idle) < IDLE_CONNECTIONS_PER_HOST:
                idle.append(connection)
                return
        connection.close()

    def send(self, method: str, url: str, headers: dict, body: bytes | None = None) -> UpstreamResponse:
        """One request, one answer; a stale pooled connection is retried once."""
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.hostname, parts.port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection = self._idle_connection(key)
        try:
            if connection is not None:
                try:
                    return self._exchange(connection, method, url, target, headers, body)
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    connection.close()  # the server closed it while idle: reconnect
            connection = self._new_connection(*key)
            return self._exchange(connection, method, url, target, headers, body)
        except socket.timeout:
            raise UpstreamTimeout(f"upstream {parts.netloc} did not answer in time") from None
        except (OSError, http.client.HTTPException) as err:
            raise UpstreamUnavailable(f"upstream {parts.netloc} unreachable: {err.__class__.__name__}") from None

    def _exchange(self, connection, method, url, target, headers, body) -> UpstreamResponse:
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        log.debug("upstream %s %s -> %d", method, redacted_url(url), response.status)
        return UpstreamResponse(response, connection, self, url)

    def fetch(self, method: str, url: str, headers: dict, body: bytes | None = None) -> UpstreamResponse:
        """send(), following redirects the way a registry client must.

        Authorization never goes to another host (S3 and R2 refuse it with
        400), Range and Accept go everywhere, https never downgrades to http.
        """
        for _ in range(MAX_REDIRECTS + 1):
            response = self.send(method, url, headers, body)
            location = response.headers.get("location")
            if response.status not in REDIRECT_STATUSES or not location:
                return response
            response.read_small()
            response.release()
            next_url = urllib.parse.urljoin(url, location)
            scheme = urllib.parse.urlsplit(next_url).scheme
            if scheme not in ("http", "https") or (url.startswith("https:") and scheme == "http"):
                raise UpstreamUnavailable(f"refused redirect from {redacted_url(url)} to {redacted_url(next_url)}")
            if not same_origin(url, next_url):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if response.status == 303:
                method, body = ("HEAD" if method == "HEAD" else "GET"), None
            log.debug("redirect %d %s -> %s", response.status, redacted_url(url), redacted_url(next_url))
            url = next_url
        raise UpstreamUnavailable(f"more than {MAX_REDIRECTS} redirects from upstream")


class Challenges:
    """Each route's upstream realm and service, remembered for CHALLENGE_TTL."""

    def __init__(self) -> None:
        self._known = {}
        self._lock = threading.Lock()

    def remember(self, route: Route, header: str) -> tuple:
        scheme, params = parse_challenge(header)
        with self._lock:
            self._known[route.name] = (time.monotonic() + CHALLENGE_TTL, scheme, params)
        return scheme, params

    def get(self, route: Route) -> tuple | None:
        with self._lock:
            known = self._known.get(route.name)
        if known and known[0] > time.monotonic():
            return known[1], known[2]
        return None


# HTTP handler ##############################################################

_thread_state = threading.local()


def thread_buffer() -> memoryview:
    """One streaming buffer per thread, allocated once and reused."""
    buffer = getattr(_thread_state, "buffer", None)
    if buffer is None:
        buffer = _thread_state.buffer = memoryview(bytearray(CHUNK_SIZE))
    return buffer


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One client connection: reads requests, answers each, logs one line each."""

    protocol_version = "HTTP/1.1"
    server_version = f"dockerproxy/{__version__}"
    timeout = CLIENT_IDLE_TIMEOUT

    def setup(self) -> None:
        super().setup()
        # Headers and small bodies go out in separate writes; without this,
        # Nagle holds the second write until the first is acknowledged.
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # Dispatch ----------------------------------------------------------------

    def do_GET(self) -> None:
        self.handle_request()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def reset_request_state(self) -> None:
        self.started = time.monotonic()
        self.route_name = "-"
        self.response_started = False
        self.status_sent = 0
        self.bytes_sent = 0

    def handle_request(self) -> None:
        self.reset_request_state()
        try:
            self.dispatch()
        except RegistryError as err:
            self.send_registry_error(err)
        except (ConnectionError, socket.timeout):
            self.close_connection = True  # the client went away
        except Exception:
            log.exception("internal error on %s %s", self.command, printable(self.path))
            self.send_registry_error(RegistryError(500, "UNKNOWN", "internal error"))
        finally:
            self.log_access()

    def dispatch(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        ns = query.get("ns", [None])[0]
        if self.command not in ("GET", "HEAD") and not (
                self.command == "POST" and url.path == "/v2/auth"):
            self.close_connection = True  # the request body is left unread
            raise RegistryError(405, "UNSUPPORTED",
                                f"{self.command} is not supported: this is a pull-only mirror",
                                headers=(("Allow", "GET, HEAD"),))
        if url.path == "/":
            return self.send_small(301, b"", headers=(("Location", "/v2/"),))
        if url.path in ("/healthz", "/health"):
            return self.send_json(200, {"status": "ok"})
        if url.path == "/routes":
            return self.send_json(200, self.server.routes.describe())
        if url.path in ("/v2", "/v2/"):
            return self.serve_base(ns)
        if url.path == "/v2/auth":
            return self.serve_token(query)
        if not url.path.startswith("/v2/"):
            raise RegistryError(404, "UNSUPPORTED", "not a registry endpoint", url.path)
        target = self.server.routes.resolve(self.client_host(), url.path, ns)
        self.route_name = target.route.name
        location = library_redirect(target, url.query)
        if location:
            return self.send_small(301, b"", headers=(("Location", location),))
        self.serve_registry(target, url.query)

    # Client view -------------------------------------------------------------

    def client_host(self) -> str:
        """The host (and port) the client addressed, checked before we echo it."""
        host = self.headers.get("host", "")
        if self.server.config.trust_proxy_headers:
            host = self.headers.get("x-forwarded-host", host).split(",")[0].strip()
        if not host:
            address, port = self.server.server_address[:2]
            host = f"{address}:{port}"
        if not HOST_HEADER.match(host):
            raise RegistryError(400, "UNSUPPORTED", "malformed Host header")
        return host

    def client_scheme(self) -> str:
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        if self.server.config.trust_proxy_headers:
            forwarded = self.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
            if forwarded in ("http", "https"):
                scheme = forwarded
        return scheme

    def own_challenge(self, route: Route, upstream_header: str, prefix: str = "") -> str:
        """Our challenge for an upstream's: same service and scope, our realm."""
        scheme, params = self.server.challenges.remember(route, upstream_header)
        if scheme != "bearer":
            return upstream_header  # Basic: the client sends credentials we forward
        realm = f"{self.client_scheme()}://{self.client_host()}/v2/auth"
        implied = self.server.routes.implied(self.client_host())
        if route.registry_hosts and (implied is None or implied.name != route.name):
            # Routed by ns or path prefix: the token must come from this route too.
            realm += "?ns=" + urllib.parse.quote(route.registry_hosts[0])
        ours = {"realm": realm, "service": params.get("service", "")}
        if params.get("scope"):
            ours["scope"] = " ".join(client_scope(s, prefix) for s in params["scope"].split(" "))
        return render_challenge("bearer", ours)

    # Endpoints ---------------------------------------------------------------

    def serve_base(self, ns: str | None) -> None:
        """/v2/: the upstream decides whether a token is needed, we answer with our realm."""
        route = self.server.routes.for_base(self.client_host(), ns)
        self.route_name = route.name
        response = self.server.upstreams.fetch(
            self.command, route.upstream + "/v2/", forwarded_request_headers(self.headers))
        self.relay(response, route)

    def serve_registry(self, target: Target, query: str) -> None:
        url = target.route.upstream + target.upstream_path + (f"?{query}" if query else "")
        response = self.server.upstreams.fetch(
            self.command, url, forwarded_request_headers(self.headers))
        self.relay(response, target.route, target.prefix)

    def serve_token(self, query: dict) -> None:
        """/v2/auth: a token from the realm of the route the image comes from."""
        form = self.read_form() if self.command == "POST" else {}
        # OAuth2 joins scopes with spaces; docker repeats the parameter.  Take both.
        scopes = " ".join(form.get("scope", []) if form else query.get("scope", [])).split()
        ns = query.get("ns", [None])[0]
        route = self.server.routes.for_token(self.client_host(), ns, scopes)
        self.route_name = route.name
        challenge = self.upstream_challenge(route)
        if challenge is None or challenge[0] != "bearer":
            return self.send_json(200, {"token": ANONYMOUS_TOKEN, "access_token": ANONYMOUS_TOKEN})
        realm, service = self.checked_realm(route, challenge[1])
        scopes = list(dict.fromkeys(rewrite_scope(scope, route) for scope in scopes))
        headers = {"user-agent": self.headers.get("user-agent", self.server_version)}
        if self.headers.get("authorization"):
            headers["authorization"] = self.headers["authorization"]
        if self.command == "POST":
            form.update({"service": [service], "scope": [" ".join(scopes)]})
            body = urllib.parse.urlencode(form, doseq=True).encode()
            headers["content-type"] = "application/x-www-form-urlencoded"
            response = self.server.upstreams.fetch("POST", realm, headers, body)
        else:
            params = [("service", service)] + [("scope", s) for s in scopes]
            params += [(k, v) for k, values in query.items() if k not in ("service", "scope", "ns") for v in values]
            separator = "&" if "?" in realm else "?"
            response = self.server.upstreams.fetch("GET", realm + separator + urllib.parse.urlencode(params), headers)
        log.debug("token %s for %s -> %d", redacted_url(realm), " ".join(scopes), response.status)
        self.relay(response, None)

    def upstream_challenge(self, route: Route) -> tuple | None:
        """The route's realm and service, asked of its /v2/ once an hour."""
        known = self.server.challenges.get(route)
        if known:
            return known
        response = self.server.upstreams.fetch("GET", route.upstream + "/v2/", {})
        response.read_small()
        response.release()
        header = response.headers.get("www-authenticate")
        if response.status != 401 or not header:
            return None
        return self.server.challenges.remember(route, header)

    def checked_realm(self, route: Route, params: dict) -> tuple:
        realm = params.get("realm", "")
        scheme = urllib.parse.urlsplit(realm).scheme
        if scheme not in ("http", "https") or (route.upstream.startswith("https:") and scheme == "http"):
            raise UpstreamUnavailable(f"upstream of route {route.name} names an unusable realm")
        return realm, params.get("service", "")

    def read_form(self) -> dict:
        length = self.headers.get("content-length", "")
        if not length.isdigit() or int(length) > MAX_SMALL_BODY:
            self.close_connection = True
            raise RegistryError(400, "UNSUPPORTED", "token request body missing or too large")
        body = self.rfile.read(int(length)).decode("utf-8", "replace")
        return urllib.parse.parse_qs(body, keep_blank_values=True)

    # Answers -----------------------------------------------------------------

    def relay(self, response: UpstreamResponse, route: Route | None, prefix: str = "") -> None:
        """An upstream answer to the client: our challenge for a 401, else as it came."""
        try:
            challenge = response.headers.get("www-authenticate")
            if response.status == 401 and route is not None and challenge:
                response.read_small()
                error = RegistryError(401, "UNAUTHORIZED", "authentication required",
                                      headers=(("WWW-Authenticate", self.own_challenge(route, challenge, prefix)),))
                return self.send_registry_error(error)
            self.start_response(response.status, response_headers(response.headers, prefix))
            length = response.headers.get("content-length")
            if self.command == "HEAD" or response.status in (204, 304):
                self.send_header("Content-Length", length or "0")
                self.end_headers()
            elif length is not None and length.isdigit():
                self.send_header("Content-Length", length)
                self.end_headers()
                self.stream_body(response, int(length))
            else:
                self.stream_unknown_length(response)
        finally:
            response.release()

    def stream_body(self, response: UpstreamResponse, length: int) -> None:
        """Exactly `length` bytes, or the connection closes short of them."""
        buffer = thread_buffer()
        remaining = length
        while remaining:
            try:
                count = response.readinto(buffer[:min(remaining, CHUNK_SIZE)])
            except (OSError, http.client.HTTPException):
                count = 0
            if not count:
                # Headers are out: the only honest signal left is a short body.
                log.warning("upstream %s ended %d bytes short", redacted_url(response.url), remaining)
                response.close()
                self.close_connection = True
                return
            self.wfile.write(buffer[:count])
            self.bytes_sent += count
            remaining -= count

    def stream_unknown_length(self, response: UpstreamResponse) -> None:
        """No Content-Length upstream: chunked to HTTP/1.1 clients, so an end is an end."""
        chunked = self.request_version == "HTTP/1.1"
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        buffer = thread_buffer()
        while True:
            try:
                count = response.readinto(buffer)
            except (OSError, http.client.HTTPException):
                response.close()
                self.close_connection = True
                return
            if chunked:
                self.wfile.write(b"%x\r\n" % count)
            if not count:
                break
            self.wfile.write(buffer[:count])
            if chunked:
                self.wfile.write(b"\r\n")
            self.bytes_sent += count
        if chunked:
            self.wfile.write(b"\r\n")

    def start_response(self, status: int, headers) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.response_started = True
        self.status_sent = status

    def send_small(self, status: int, body: bytes, content_type: str = "",
                   headers: tuple = ()) -> None:
        """A whole answer in one write (no Nagle wait between headers and body)."""
        self.start_response(status, headers)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.command != "HEAD" and body and self.request_version != "HTTP/0.9":
            self._headers_buffer.extend((b"\r\n", body))
            self.bytes_sent += len(body)
            self.flush_headers()
        else:
            self.end_headers()

    def send_json(self, status: int, document: object) -> None:
        self.send_small(status, json.dumps(document, indent=1).encode(), "application/json")

    def send_registry_error(self, err: RegistryError) -> None:
        if self.response_started:
            self.close_connection = True  # too late for a status: cut the body short
            return
        self.send_small(err.status, err.body(), "application/json", err.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, huge headers) in registry form."""
        self.close_connection = True
        self.reset_request_state()
        code = 405 if code == 501 else code  # unknown methods: same answer as PUT
        error = RegistryError(code, "UNSUPPORTED", message or "bad request")
        try:
            self.send_registry_error(error)
        finally:
            self.log_access()

    # Logging -----------------------------------------------------------------

    def log_request(self, code: object = "-", size: object = "-") -> None:
        """Replaced by log_access(), which knows the route and byte count."""

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), printable(format % args))

    def log_access(self) -> None:
        path = urllib.parse.urlsplit(getattr(self, "path", "") or "").path
        log.info('%s "%s %s %s" route=%s status=%s bytes=%d %.3fs',
                 self.client_address[0], getattr(self, "command", None) or "-",
                 printable(self.headers.get("host", "-") if getattr(self, "headers", None) else "-"),
                 printable(path), self.route_name, self.status_sent or "-",
                 self.bytes_sent, time.monotonic() - self.started)


def response_headers(headers, prefix: str = "") -> list:
    """The upstream headers a client gets (see FORWARDED_RESPONSE_HEADERS)."""
    kept = []
    for name in FORWARDED_RESPONSE_HEADERS:
        for value in headers.get_all(name) or []:
            if name == "link" and prefix:
                value = value.replace("</v2/", f"</v2/{prefix}/", 1)
            kept.append((name.title() if name != "etag" else "ETag", value))
    return kept


# Server and main ###########################################################

class ProxyServer(http.server.ThreadingHTTPServer):
    """The listening socket, the route table and the shared upstream client."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, config: Config, handler=ProxyHandler) -> None:
        self.config = config
        self.routes = RouteTable(config)
        self.upstreams = Upstreams(config.connect_timeout, config.read_timeout)
        self.challenges = Challenges()
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), handler)


def configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s")


def main(argv: list | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as err:
        print(f"dockerproxy.py: error: {err}", file=sys.stderr)
        return 2
    configure_logging(config.debug)
    try:
        server = ProxyServer(config)
    except OSError as err:
        print(f"dockerproxy.py: cannot listen on {config.host}:{config.port}: {err.strerror}",
              file=sys.stderr)
        return 1
    # docker stop and systemd send SIGTERM: leave the serve loop cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host, port = server.server_address[:2]
    log.info("dockerproxy %s listening on %s:%d, default route %s", __version__, host, port,
             config.default_route or "(none)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
