#!/usr/bin/env python3
"""dockerproxy: a pull-through proxy for container registries, in one file.

SPDX-License-Identifier: MIT
Copyright (c) 2026 the dockerproxy authors; the licence text is in LICENSE.

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
  * streams bodies in fixed-size chunks, whatever their size;
  * keeps a disk cache of blobs and manifests under CACHE_DIR, each verified
    against its digest before it is stored, fetched from upstream once however
    many clients ask at once, served with sendfile, bounded by CACHE_MAX_SIZE
    and CACHE_MAX_AGE, and served (marked stale) when the upstream is down.

Cache layout (CACHE_DIR):
  blobs/<alg>/<hh>/<hex>          a blob or manifest, named by its digest
  blobs/<alg>/<hh>/<hex>.type     a manifest's media type
  repos/<host:port>/<repository>/_tags/<tag>/<accept kind>.json
                                  tag -> digest, and when upstream last said so
  repos/<host:port>/<repository>/_links/<alg>/<hex>
                                  the object belongs to this repository
  repos/<host:port>/<repository>/_public
                                  mtime: when an anonymous pull last succeeded
  .tmp-*                          being written; renamed once verified
A cached object is served without asking upstream only to a client that may
have it: upstream served the object for that repository, and the repository
was pulled anonymously (at any age while upstream is down), or upstream
accepted this client's credentials for it, within the last ten minutes.
Anyone else is checked with a HEAD upstream first, so private images do not
leak.  The whole rule is one class, Access, in the section of that name.

What it never does:
  * accept a push: PUT, POST, PATCH and DELETE on the registry API get 405;
  * connect to a host outside its route table, except where a configured
    upstream redirects it (CDNs) or names its token realm;
  * write outside CACHE_DIR, or log an Authorization header, token or password;
  * put into the cache an object whose bytes do not match its digest.

Settings (command-line flag > environment > .env file > default):
  HOST=0.0.0.0              address to listen on
  PORT=8080                 TCP port to listen on
  CACHE_DIR=./cache         directory of the disk cache (empty: no cache)
  CACHE_MAX_SIZE=20G        evict least recently used objects above this size
  CACHE_MAX_AGE=30d         remove objects unused this long
  MANIFEST_TTL=60           seconds a tag is served before upstream is asked
  CUSTOM_DOMAIN=            domain of the host routes (empty: none)
  DEFAULT_ROUTE=docker      route of requests nothing else routes (empty: 404)
  UPSTREAM_<ROUTE>=         another URL for a route (UPSTREAM_DOCKER=http://...)
  EXTRA_ROUTES=             more routes: name=https://registry.example,...
  MODE=                     "debug": every request goes to TARGET_UPSTREAM
  TARGET_UPSTREAM=          the upstream of MODE=debug
  TRUST_PROXY_HEADERS=false honour X-Forwarded-Proto/-Host/-For
  TLS_CERT=, TLS_KEY=       PEM certificate and key: serve HTTPS (TLS 1.2+)
  REGISTRY_AUTH_FILE=       docker config.json whose auths are the proxy's accounts
  UPSTREAM_<ROUTE>_USERNAME=, UPSTREAM_<ROUTE>_PASSWORD=
                            the proxy's own account upstream (environment only),
                            used when a client brings no credentials
  CONNECT_TIMEOUT=10        seconds to connect to an upstream
  READ_TIMEOUT=60           seconds an upstream may stay silent mid-answer
  CLIENT_TIMEOUT=60         seconds a client may stay idle, or stop reading
  HEADER_TIMEOUT=30         seconds a client has to send a request head
  MAX_CONNECTIONS=512       client connections at once (more get 503)
  MAX_FILLS=16              downloads into the cache at once (more pass through)
  DEBUG=false               log upstream requests, redirects, token fetches
  LOG_FORMAT=text           text: readable lines; json: one JSON object per line
  METRICS=on                Prometheus metrics at /metrics (off: 404)
  METRICS_PUBLIC=false      /metrics to anyone, not only as ADMIN_* allow
  ADMIN_ALLOW=              addresses/CIDRs that may see /status, /metrics, /admin/
  ADMIN_TOKEN=              bearer token or login for them (environment only)
  READY_MIN_FREE=512M       /readyz is 503 below this much free cache disk
  SHUTDOWN_DELAY=0          seconds to keep accepting after SIGTERM (readyz 503)
  SHUTDOWN_GRACE=20         seconds transfers then have to finish before exit
  RATE_LIMIT_REQUESTS=0     registry requests per minute per client (0: no limit)
  RATE_LIMIT_BYTES=0        bytes per hour per client, K/M/G/T (0: no limit)
  RATE_LIMIT_TRANSFERS=0    blob downloads at once per client (0: no limit)
  RATE_LIMIT_EXEMPT=        CIDRs no rate limit applies to
  TRUSTED_PROXIES=          CIDRs of reverse proxies whose X-Forwarded-For is believed
  ALLOW_CLIENTS=            CIDRs that may use the proxy (empty: everyone)
  ALLOW_IMAGES=             globs over registry/name, or @file (empty: every image)
  DENY_IMAGES=              globs over registry/name, or @file, refused
  BLOCK_MESSAGE=            the message of those refusals
  MAX_UPSTREAM_REQUESTS=32  requests awaiting each upstream host's answer (more wait, then 503)
  PREFETCH_FILE=            images kept cached: prefetched, re-checked, never evicted
  PREFETCH_INTERVAL=1h      how often PREFETCH_FILE's tags are checked (0: at start only)
  PREFETCH_PARALLEL=3       blobs a prefetch downloads at once (all: <= MAX_FILLS/2)
  CACHE_S3=                 s3://bucket/prefix: the cache in a bucket shared by
                            instances (CACHE_DIR: spool and hot copy)
  S3_ENDPOINT=, S3_REGION=us-east-1, S3_ADDRESSING=path
                            the S3 API (default AWS), region, path or virtual hosts
  AWS_ACCESS_KEY_ID=, AWS_SECRET_ACCESS_KEY=, AWS_SESSION_TOKEN=
                            the bucket's credentials (environment only)
  CACHE_S3_MAX_SIZE=0, CACHE_S3_MAX_AGE=0
                            the bucket's limits (0: none), swept by one instance
  CACHE_S3_LIFECYCLE=false  leave them to the bucket's lifecycle rules instead
  S3_REDIRECT=false         blob GETs the bucket holds: 307 to a presigned URL
  S3_REDIRECT_TTL=20m       how long that URL works
  S3_REDIRECT_BASE=         a CDN in front of the bucket, for those redirects
  PEERS=                    every instance (http://a:8080,...): one upstream fetch
                            per blob for all of them
  PEER_SELF=                this instance's entry (default: found by PORT and address)
  PEER_SECRET=              signs requests between peers (environment only)

Operators' pages: /healthz (alive), /readyz (should get traffic), /metrics
(Prometheus), /status and /status.json (hit ratio, pulls, upstreams,
prefetches), and POST /admin/purge, /admin/evict and /admin/prefetch; the
last four need ADMIN_ALLOW or ADMIN_TOKEN.  SIGTERM drains and exits; SIGHUP
reads the pattern files again.

Run ``python3 dockerproxy.py --help`` for the same list with the flags,
``python3 dockerproxy.py cache verify|stats|prune`` to check, count or trim
the cache, and ``python3 dockerproxy.py prefetch IMAGE...`` to fill it before
a rollout or a trip off-line (every platform of an index, unless --platform).
"""

from __future__ import annotations

# Imports and limits ########################################################

import argparse
import base64
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import http.client
import http.server
import io
import ipaddress
import json
import logging
import math
import os
import queue
import re
import select
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import weakref

__version__ = "0.1.0"

log = logging.getLogger("dockerproxy")

# The Server header, and the User-Agent of token requests a client sent without one.
SERVER_VERSION = f"dockerproxy/{__version__}"

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

# An idle upstream connection older than this is closed, not reused: servers
# drop idle keep-alive connections after 5-60 s, and a CDN host a registry
# redirected to once should not hold a socket for ever.  At most
# MAX_IDLE_CONNECTIONS wait across all hosts (redirect targets are many).
IDLE_CONNECTION_TTL = 30.0
MAX_IDLE_CONNECTIONS = 64

# An upstream Content-Length above this is an upstream error: no layer is
# near a terabyte, and lengths of 2**63 and more overflow what the OS takes.
MAX_UPSTREAM_LENGTH = 1024 ** 4

# A fill reads upstream into a buffer of its own this large: four times fewer
# turns of its loop than CHUNK_SIZE (measured 6% faster for a cold 256 MiB
# blob here); at most MAX_FILLS of them, 16 MiB with the default.
FILL_BUFFER = 1024 * 1024

# A fill at least this long is hashed in a thread beside it (HashBeside); a
# smaller one (a manifest, a config) is hashed as it is written, no thread.
HASH_BESIDE_MIN = 4 * 1024 * 1024

# Interim (1xx) answers skipped before an upstream's final one: Early Hints
# come once or twice; more is an upstream that never answers.
MAX_INTERIM_ANSWERS = 5

# A chunk-size line (with its extensions) and the trailer lines of a chunked
# upstream body: longer ones are a broken or hostile upstream, not data.
MAX_CHUNK_LINE = 4096
MAX_TRAILER_LINES = 100

# The proxy's own upstream tokens are renewed this long before they expire,
# so a request in flight never carries one that lapses on the way (Docker
# Hub's last 300 s; the spec's default is 60 s).
TOKEN_RENEW_MARGIN = 30.0

# A TLS client must finish its handshake within this, or its thread is freed.
TLS_HANDSHAKE_TIMEOUT = 10.0

# A request head (request line and headers) is at most this many bytes in
# all, and at most MAX_HEADER_LINES lines: docker's heads are under 2 KiB,
# and without a total a client could hold 100 lines of 64 KiB each (6.5 MB)
# per connection.  nginx allows 8 KiB per line, 32 KiB in all by default;
# node.js 16 KiB in all.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_LINES = 100   # http.client's own limit, which parses the head

# The read buffer of a client connection: its request heads and POST bodies.
CLIENT_READ_BUFFER = 8192

# The listen backlog: socketserver's default of 5 drops connections when a
# node pulls many layers of many images at once.
LISTEN_BACKLOG = 128

# Returned by /v2/auth when an upstream needs no token, so that clients that
# always fetch one (podman pings the default route) can go on.  It is never
# forwarded upstream.
ANONYMOUS_TOKEN = "dockerproxy-anonymous"

# distribution refuses manifests over 4 MiB; a larger one is passed through
# uncached rather than held to a limit no registry would serve.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

# A repository verified pullable (anonymously, or with a client's token) is
# trusted this long before upstream is asked again.  Cached public content
# costs no upstream request; a repository made private, or a token revoked,
# is noticed within ten minutes.
ACCESS_TTL = 600.0

# Client identities remembered in memory (access grants, anonymous tokens):
# at most this many keys, about 20 MiB.  When full the memory is cleared:
# crude but bounded, and the cost is one upstream HEAD per client forgotten.
MAX_REMEMBERED = 100_000

# A token that a client fetched without credentials is known as anonymous
# this long: longer than registries let such tokens live (Docker Hub: 300 s).
ANONYMOUS_TOKEN_TTL = 3600.0

# The upstream tokens the proxy keeps for itself, at most (one per repository
# pulled with its account, or per redirect target and scope): at most
# MAX_TOKEN_LENGTH each, 16 MiB in all.  Beyond, they are dropped and fetched again.
MAX_PROXY_TOKENS = 2000

# A token the proxy could not get is not asked for again for this long: a
# client repeating a request must not make the proxy repeat its token
# request (with its account's credentials) to the token service.
REFUSED_TOKEN_TTL = 60.0

# A token the proxy keeps is visible ASCII without spaces (a JWT, RFC 6750's
# b64token): anything else could fold or split the header it goes into.
# MAX_TOKEN_LENGTH bounds what the token cache holds (a JWT is 1-2 KiB), and
# a token is kept at most MAX_TOKEN_LIFETIME whatever expires_in says, so
# one revoked upstream is dropped within the hour.
TOKEN = re.compile(r"[!-~]{1,8192}\Z")
MAX_TOKEN_LIFETIME = 3600.0

# A token answer without expires_in lasts this long: the default that the
# docker token specification gives ("defaults to 60 seconds").
DEFAULT_TOKEN_LIFETIME = 60.0

# A client following another client's fill waits this many READ_TIMEOUTs
# (plus a second) for more bytes: longer than the fill's own READ_TIMEOUT,
# so a stalled upstream fails the fill first and every follower hears of it.
FOLLOWER_PATIENCE_READ_TIMEOUTS = 2

# Objects being read cannot be evicted, and fills in flight hold their room,
# so the cache may pass CACHE_MAX_SIZE until they end; a fill that would take
# stored and reserved bytes past twice the limit is passed through instead.
MAX_SIZE_OVERSHOOT = 2

# A fill whose clients have all left, and that fits without evicting, goes
# on only while it averages this rate after a grace period: an upstream
# announcing a large length and then trickling must not hold the budget.
ORPHAN_MIN_RATE = 64 * 1024
ORPHAN_GRACE = 30.0

# Fills that ended with their object stored, remembered by key and digest so
# that a request which looked just before one ended is served from the store
# rather than filling again (Fills.begin); 2 entries a fill, about 200 bytes
# each.  A request slower than this many fills between its look and its
# begin() fills once more: never wrong, one more upstream GET.
MAX_ENDED_FILLS = 4096

# Digests a purge left for the next sweep to check, at most (100 bytes each):
# beyond, objects of purged repositories wait for ordinary eviction.
MAX_PURGED = 100_000

# Eviction frees down to 90% of CACHE_MAX_SIZE, so one sweep makes room for
# many fills instead of one sweep per fill at the limit.
EVICTION_LOW_WATER = 0.9

# The evictor's pace when nothing wakes it: CACHE_MAX_AGE is days, so five
# minutes is exact enough, and a full cache wakes it at once.
SWEEP_INTERVAL = 300.0

# A hit bumps its object's mtime, the "last used" eviction reads, at most
# once a minute: LRU order does not need more, and a hit stays one stat.
TOUCH_INTERVAL = 60.0

# Answers up to this size go out in the same write as their headers
# (manifests, errors); larger ones use sendfile.
SMALL_ANSWER = 64 * 1024

# A stored media type is read up to this many characters: RFC 6838 allows 127
# for each of type and subtype, so a longer file is not one we wrote.
MAX_MEDIA_TYPE = 256

# Files being written carry this prefix until they are complete.
TEMP_PREFIX = ".tmp-"

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
                 detail: object = None, headers: tuple = (), close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = tuple(headers)
        self.close = close          # the connection cannot go on (a request body left unread)

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


class UpstreamHeldBack(UpstreamUnavailable):
    """The upstream was not asked: its request slots are taken, its circuit is
    open, or it answered this client 429 not long ago.  An UpstreamUnavailable,
    so the cache answers what it can, as when the upstream is down."""

    def __init__(self, status: int, code: str, message: str, retry_after: float, reason: str) -> None:
        seconds = str(max(1, int(math.ceil(retry_after - 1e-9))))
        RegistryError.__init__(self, status, code, message, headers=(("Retry-After", seconds),))
        self.reason = reason        # "busy", "circuit" or "429", as the metrics count it

    @property
    def upstream_down(self) -> bool:
        """Whether the cache may answer as when the upstream is down (Access's
        stale rule): not when it is only busy, which a client can make it."""
        return self.reason != "busy"


def upstream_down(err: RegistryError) -> bool:
    """An upstream failure the cache may answer for, marked stale: any but a busy one."""
    return getattr(err, "upstream_down", True)


class NoRoute(RegistryError):
    """No route for the request: 404 with the route list, as the Worker."""

    def __init__(self, routes: dict) -> None:
        super().__init__(404, "NAME_UNKNOWN", "no route for this host")
        self.routes = routes

    def body(self) -> bytes:
        return json.dumps(self.routes).encode()


def unauthorized(challenge: str) -> RegistryError:
    """A 401 whose WWW-Authenticate tells the client where to get a token."""
    return RegistryError(401, "UNAUTHORIZED", "authentication required",
                         headers=(("WWW-Authenticate", challenge),))


class ConfigError(Exception):
    """A bad setting: start-up stops with this one-line message, status 2."""


# Configuration #############################################################

# The records below are named tuples, not dataclasses: importing dataclasses
# (and the inspect, ast and dis modules it brings) costs 1.3 MiB of memory.

class Route(collections.namedtuple("Route", "name upstream registry_hosts dockerhub credentials",
                                   defaults=((), False, None))):
    """One upstream registry and the names clients use for it.

    name: "ghcr" (host route ghcr.{CUSTOM_DOMAIN}); upstream: "https://ghcr.io",
    no path; registry_hosts: the names for ?ns= and path prefixes; dockerhub:
    the library/ redirect and scope rewrite; credentials: the proxy's own
    account upstream, for clients that bring none (never printed).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Route({self.name!r}, {self.upstream!r}, {self.registry_hosts!r}, {self.dockerhub!r})"


class Credentials:
    """A username and password for an upstream (from the environment or an auth
    file).  Not a tuple: it cannot be formatted, unpacked or serialised with
    its password by accident; its repr hides the password."""

    __slots__ = ("username", "password")

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, ***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credentials) and (self.username, self.password) == (other.username, other.password)

    def __hash__(self) -> int:
        return hash((self.username, self.password))

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


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


class Config(collections.namedtuple("Config", (
        "host port cache_dir custom_domain default_route mode target_upstream trust_proxy_headers "
        "connect_timeout read_timeout client_timeout header_timeout max_connections max_fills "
        "manifest_ttl cache_max_size cache_max_age tls_cert tls_key registry_auth_file debug "
        "metrics admin_token admin_allow metrics_public ready_min_free log_format "
        "shutdown_delay shutdown_grace rate_limit_requests rate_limit_bytes rate_limit_transfers "
        "rate_limit_exempt trusted_proxies allow_clients allow_images deny_images block_message "
        "max_upstream_requests prefetch_file prefetch_interval prefetch_parallel cache_s3 s3_endpoint "
        "s3_region s3_addressing aws_access_key_id aws_secret_access_key aws_session_token "
        "cache_s3_max_size cache_s3_max_age cache_s3_lifecycle s3_redirect s3_redirect_ttl "
        "s3_redirect_base peers peer_self peer_secret routes accounts"),
        defaults=({},))):
    """Every setting, parsed and checked.  Built by load_config(); the defaults
    are in SETTINGS.  routes: the Route table; accounts: the auth file's
    accounts by host, for realms and redirect targets (never printed, nor
    is the admin token)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self)
                                     if name not in SECRET_FIELDS) + ")"


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


def parse_count(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 100000:
        raise ValueError("not a count (1-100000)")
    return int(text)


def number_of_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("not a number of seconds") from None


def parse_seconds(text: str) -> float:
    seconds = number_of_seconds(text)
    if not 0 < seconds < 86400:
        raise ValueError("must be between 0 and 86400 seconds")
    return seconds


def parse_wait(text: str) -> float:
    """Seconds to wait, 0 included (a shutdown's delay and grace)."""
    seconds = number_of_seconds(text)
    if not 0 <= seconds <= 3600:
        raise ValueError("must be between 0 and 3600 seconds")
    return seconds


# What S3 accepts in a presigned URL's X-Amz-Expires: a week.
MAX_PRESIGN_SECONDS = 7 * 86400

# PEERS at most: rendezvous hashing scores every peer for each miss, and a
# cluster beyond this is better split by registry.
MAX_PEERS = 64


def parse_s3_location(text: str) -> tuple:
    """'s3://bucket/some/prefix' -> ("bucket", "some/prefix/"); '' -> ("", "")."""
    text = text.strip()
    if not text:
        return "", ""
    url = urllib.parse.urlsplit(text)
    bucket = url.netloc
    if url.scheme != "s3" or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket) or url.query:
        raise ValueError("expected s3://bucket[/prefix] (a bucket name of 3-63 lower-case letters, "
                         "digits, dots and hyphens)")
    prefix = url.path.strip("/")
    if prefix and not re.fullmatch(r"[A-Za-z0-9!_.*'()/\-]{1,512}", prefix) or "//" in prefix:
        raise ValueError("a prefix of letters, digits and !_.*'()- between slashes")
    return bucket, f"{prefix}/" if prefix else ""


def parse_addressing(text: str) -> str:
    value = text.strip().lower()
    if value not in ("path", "virtual"):
        raise ValueError("path or virtual")
    return value


def parse_region(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"[a-z0-9\-]{1,32}", value):
        raise ValueError("a region name such as us-east-1 (R2 and MinIO take auto or us-east-1)")
    return value


def parse_redirect_ttl(text: str) -> float:
    seconds = parse_duration(text)
    if not 1 <= seconds <= MAX_PRESIGN_SECONDS:
        raise ValueError("between 1s and 7d (S3's limit for a presigned URL)")
    return seconds


def parse_endpoint(text: str) -> str:
    """An S3 endpoint or a redirect base: scheme://host[:port], or empty."""
    return parse_upstream_url(text) if text.strip() else ""


def parse_peers(text: str) -> tuple:
    """'http://a:8080, http://b:8080' -> ("http://a:8080", "http://b:8080"): sorted, no duplicate."""
    peers = {parse_upstream_url(item) for item in text.split(",") if item.strip()}
    if len(peers) > MAX_PEERS:
        raise ValueError(f"more than {MAX_PEERS} peers")
    return tuple(sorted(peers))


def parse_peer(text: str) -> str:
    return parse_upstream_url(text) if text.strip() else ""


SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """'20G' -> 21474836480 (binary units, K/M/G/T, an optional B or iB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ValueError("not a size (a number with K, M, G or T)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def parse_duration(text: str) -> float:
    """'30d' -> 2592000.0 (seconds; s, m, h or d)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise ValueError("not a duration (a number with s, m, h or d)")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


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


def parse_networks(text: str) -> tuple:
    """'10.0.0.0/8, 192.168.1.5' -> (IPv4Network('10.0.0.0/8'), IPv4Network('192.168.1.5/32'))."""
    networks = []
    for item in text.replace(",", " ").split():
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR network") from None
        mapped = network.network_address.ipv4_mapped if network.version == 6 and network.prefixlen >= 96 else None
        if mapped is not None:  # ::ffff:10.0.0.0/104 is 10.0.0.0/8, as AdminGate maps its peers
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    return tuple(networks)


def parse_limit(text: str) -> int:
    """A rate limit: a count, 0 (or empty) for none."""
    if not text.strip():
        return 0
    if not text.strip().isdigit() or not 0 <= int(text) <= 10 ** 9:
        raise ValueError("not a count (0: no limit)")
    return int(text)


# An image pattern: a glob over registry/name ("docker.io/library/*"), where
# * and ? match any characters, / included, and [abc] one of a set.
IMAGE_PATTERN = re.compile(r"[a-z0-9._:\-/*?\[\]!]{1,300}\Z")


def check_pattern(pattern: str) -> str:
    """A pattern ALLOW_IMAGES or DENY_IMAGES can hold, or ValueError."""
    if not IMAGE_PATTERN.match(pattern) or "/" not in pattern:
        raise ValueError(f"{pattern!r} is not a pattern over registry/name (e.g. docker.io/library/*)")
    try:
        re.compile(glob_regex(pattern))
    except re.error:  # a reversed range, [z-a]
        raise ValueError(f"{pattern!r} has a bad [...] range") from None
    registry, _, name = pattern.partition("/")
    if registry == "docker.io" and "/" not in name and not any(char in name for char in "*?["):
        raise ValueError(f"{pattern!r} matches nothing: Docker Hub's official images are "
                         f"docker.io/library/{name}")
    return pattern


def glob_set(pattern: str, start: int) -> tuple:
    """The [...] at `start` as a regular expression class, and where it ends; (None, start)
    if it is not closed (then "[" is itself)."""
    inner = start + 1
    inner += pattern[inner:inner + 1] == "!"
    inner += pattern[inner:inner + 1] == "]"   # a "]" first is in the set
    end = pattern.find("]", inner)
    if end < 0:
        return None, start
    members = pattern[start + 1:end]
    negate = members.startswith("!")
    members = "".join("\\" + char if char in "[]\\^" else char for char in members[negate:])
    if "--" in members:  # "a--" is no range an image name needs: literal hyphens, no warning
        members = members.replace("-", "\\-")
    return ("[^" if negate else "[") + members + "]", end


def glob_regex(pattern: str, group: str = "g") -> str:
    """A glob (*, ?, [set]) as a regular expression that takes linear time on any name.

    Each * but the last becomes a lazy match inside a lookahead, taken whole by
    a back-reference: an atomic group, so a match never backtracks through
    every way of splitting the name (Python 3.8's fnmatch.translate does: a
    long token scope against "a/*/*/*-x" held the interpreter for seconds).
    The earliest match of each middle part is the right one for a glob.
    """
    parts, current, index = [], "", 0
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            parts.append(current)
            current = ""
        elif char == "?":
            current += "."
        elif char == "[":
            regex, index = glob_set(pattern, index)
            current += regex if regex else "\\["
        else:
            current += re.escape(char)
        index += 1
    parts.append(current)
    if len(parts) == 1:
        return parts[0] + "\\Z"
    middle = "".join(f"(?=(?P<{group}_{number}>.*?{part}))(?P={group}_{number})"
                     for number, part in enumerate(parts[1:-1]))
    return f"{parts[0]}{middle}.*{parts[-1]}\\Z"


def parse_patterns(text: str) -> tuple:
    """ALLOW_IMAGES/DENY_IMAGES: glob patterns and @files, comma- or space-separated.

    The files are read by ImagePolicy (now, and again on SIGHUP); a pattern
    is checked here, so a typo stops start-up instead of blocking every pull.
    """
    items = tuple(item if item.startswith("@") else item.lower()  # a file's path keeps its case
                  for item in re.split(r"[,\s]+", text.strip()) if item)
    for item in items:
        if not item.startswith("@"):
            check_pattern(item)
    return items


def parse_message(text: str) -> str:
    message = text.strip()
    if len(message) > 500 or not all(" " <= char != "\x7f" for char in message):
        raise ValueError("at most 500 printable characters on one line")
    return message


# An admin token is checked on every request that brings one, with no limit
# on tries: it must be too long to guess (openssl rand -hex 24 gives 48).
MIN_ADMIN_TOKEN_LENGTH = 16


def parse_admin_token(text: str) -> str:
    token = text.strip()
    if token and (len(token) < MIN_ADMIN_TOKEN_LENGTH or not re.fullmatch(r"[!-~]+", token)):
        raise ValueError(f"needs at least {MIN_ADMIN_TOKEN_LENGTH} visible ASCII characters, no spaces "
                         "(e.g. openssl rand -hex 24)")
    return token


def parse_log_format(text: str) -> str:
    value = text.strip().lower() or "text"
    if value not in ("text", "json"):
        raise ValueError("not text or json")
    return value


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


class Setting(collections.namedtuple("Setting", "env default parse help secret", defaults=(False,))):
    """One setting: its environment name, default, parser and help; a secret
    one is read from the environment or .env only, never a flag (a command
    line is visible to every user), and its value is never printed."""

    __slots__ = ()

    @property
    def field(self) -> str:
        return self.env.lower()

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


SETTINGS = (
    Setting("HOST", "0.0.0.0", str.strip, "address to listen on"),
    Setting("PORT", "8080", parse_port, "TCP port to listen on"),
    Setting("CACHE_DIR", "./cache", str.strip, "directory of the disk cache (empty: no cache)"),
    Setting("CACHE_MAX_SIZE", "20G", parse_size,
            "evict least recently used objects above this size, K/M/G/T (0: no limit)"),
    Setting("CACHE_MAX_AGE", "30d", parse_duration,
            "remove objects unused this long, s/m/h/d (0: never)"),
    Setting("MANIFEST_TTL", "60", parse_duration,
            "seconds a cached tag is served before a HEAD asks upstream whether it moved"),
    Setting("CUSTOM_DOMAIN", "", parse_domain,
            "domain of the host routes docker.DOMAIN, ghcr.DOMAIN, ... (empty: none)"),
    Setting("DEFAULT_ROUTE", "docker", parse_route_name,
            "route of requests no host, ns or path prefix routes (empty: 404 with the route list)"),
    Setting("EXTRA_ROUTES", "", parse_extra_routes,
            "more routes, name=https://registry.example.com, comma-separated"),
    Setting("MODE", "", parse_mode, "debug: send every request to TARGET_UPSTREAM"),
    Setting("TARGET_UPSTREAM", "", parse_optional_url, "the upstream of MODE=debug"),
    Setting("TRUST_PROXY_HEADERS", "false", parse_bool,
            "honour X-Forwarded-Proto/-Host/-For (only behind a TLS-terminating reverse proxy)"),
    Setting("TLS_CERT", "", str.strip, "PEM certificate (chain): serve HTTPS (with TLS_KEY)"),
    Setting("TLS_KEY", "", str.strip, "PEM private key of TLS_CERT"),
    Setting("REGISTRY_AUTH_FILE", "", str.strip,
            "docker config.json or podman auth.json whose auths the proxy uses upstream "
            "when a client brings no credentials"),
    Setting("CONNECT_TIMEOUT", "10", parse_seconds, "seconds to connect to an upstream"),
    Setting("READ_TIMEOUT", "60", parse_seconds,
            "seconds an upstream may stay silent mid-answer (a whole transfer has no limit)"),
    Setting("CLIENT_TIMEOUT", "60", parse_seconds,
            "seconds a client connection may stay idle between requests, or stop reading an answer"),
    Setting("HEADER_TIMEOUT", "30", parse_seconds,
            "seconds a client has to send a whole request head, from its first byte"),
    Setting("MAX_CONNECTIONS", "512", parse_count,
            "client connections served at once; more get 503 (HTTPS: are closed)"),
    Setting("MAX_FILLS", "16", parse_count,
            "downloads into the cache at once; more requests are passed through uncached"),
    Setting("DEBUG", "false", parse_bool,
            "log every upstream request, redirect and token fetch"),
    Setting("LOG_FORMAT", "text", parse_log_format,
            "text: one readable line per request; json: one JSON object per line"),
    Setting("METRICS", "on", parse_bool, "serve Prometheus metrics at /metrics (off: 404)"),
    Setting("METRICS_PUBLIC", "false", parse_bool,
            "serve /metrics to anyone, not only as ADMIN_ALLOW and ADMIN_TOKEN allow"),
    Setting("ADMIN_ALLOW", "", parse_networks,
            "addresses or CIDR networks whose connections may see /status, /metrics and "
            "use /admin/ (the socket peer, naming us by an address, localhost, this machine's "
            "name or CUSTOM_DOMAIN; empty: none)"),
    Setting("ADMIN_TOKEN", "", parse_admin_token,
            "bearer token (or login) for /status, /metrics and /admin/", secret=True),
    Setting("READY_MIN_FREE", "512M", parse_size,
            "/readyz answers 503 when the cache's file system has less free space, K/M/G/T"),
    Setting("SHUTDOWN_DELAY", "0", parse_wait,
            "seconds to keep accepting after SIGTERM, /readyz already 503 (Kubernetes: a few)"),
    Setting("SHUTDOWN_GRACE", "20", parse_wait,
            "seconds the transfers in flight then have to finish before the process exits"),
    Setting("RATE_LIMIT_REQUESTS", "0", parse_limit,
            "registry requests per minute per client address, in bursts of as many (0: no limit)"),
    Setting("RATE_LIMIT_BYTES", "0", parse_size,
            "bytes per hour per client address, K/M/G/T; a transfer is never cut, "
            "the next request is refused (0: no limit)"),
    Setting("RATE_LIMIT_TRANSFERS", "0", parse_limit,
            "blob downloads at once per client address (0: no limit; docker pulls 3 at once, podman 6)"),
    Setting("RATE_LIMIT_EXEMPT", "", parse_networks,
            "addresses or CIDR networks no rate limit applies to (the operator's CI)"),
    Setting("TRUSTED_PROXIES", "", parse_networks,
            "CIDRs of the operator's reverse proxies: from them, the client is the rightmost "
            "X-Forwarded-For address not in this list (for limits, ALLOW_CLIENTS and logs)"),
    Setting("ALLOW_CLIENTS", "", parse_networks,
            "only these addresses or CIDRs may use the proxy; others get 403 (empty: everyone; "
            "/healthz and /readyz are always open)"),
    Setting("ALLOW_IMAGES", "", parse_patterns,
            "only images matching these globs over registry/name may be pulled, e.g. "
            "docker.io/library/*,ghcr.io/myorg/*; @/path/file reads them from a file, "
            "again on SIGHUP (empty: all)"),
    Setting("DENY_IMAGES", "", parse_patterns,
            "images matching these globs (or @file) are refused, even if ALLOW_IMAGES allows them"),
    Setting("BLOCK_MESSAGE", "", parse_message,
            "the message of a refusal by ALLOW_CLIENTS, ALLOW_IMAGES or DENY_IMAGES"),
    Setting("MAX_UPSTREAM_REQUESTS", "32", parse_count,
            "requests waiting for an upstream host's answer head at once; more wait (up to "
            "CONNECT_TIMEOUT, as many as this), then get 503"),
    Setting("PREFETCH_FILE", "", str.strip,
            "images to keep cached: one a line, optionally with platforms (alpine:3.20 linux/amd64); "
            "prefetched at start and every PREFETCH_INTERVAL, never evicted while listed (empty: none)"),
    Setting("PREFETCH_INTERVAL", "1h", parse_duration,
            "how often PREFETCH_FILE's tags are checked (a HEAD upstream) and what moved fetched, "
            "s/m/h/d (0: at start only)"),
    Setting("PREFETCH_PARALLEL", "3", parse_count,
            "blobs a prefetch downloads at once; all prefetches together at most half of MAX_FILLS"),
    Setting("CACHE_S3", "", parse_s3_location,
            "s3://bucket/prefix: keep the cache in an S3 bucket that several instances share "
            "(CACHE_DIR becomes its spool and hot copy)"),
    Setting("S3_ENDPOINT", "", parse_endpoint,
            "the S3 API's URL (default AWS: https://s3.<S3_REGION>.amazonaws.com)"),
    Setting("S3_REGION", "us-east-1", parse_region, "the bucket's region, as signatures name it"),
    Setting("S3_ADDRESSING", "path", parse_addressing,
            "path (ENDPOINT/bucket/key) or virtual (bucket.ENDPOINT/key)"),
    Setting("AWS_ACCESS_KEY_ID", "", str.strip, "the bucket's access key", secret=True),
    Setting("AWS_SECRET_ACCESS_KEY", "", str.strip, "the bucket's secret key", secret=True),
    Setting("AWS_SESSION_TOKEN", "", str.strip, "a temporary credential's session token", secret=True),
    Setting("CACHE_S3_MAX_SIZE", "0", parse_size,
            "evict the bucket's least recently used objects above this size, K/M/G/T (0: no limit)"),
    Setting("CACHE_S3_MAX_AGE", "0", parse_duration,
            "remove the bucket's objects unused this long, s/m/h/d (0: never)"),
    Setting("CACHE_S3_LIFECYCLE", "false", parse_bool,
            "leave the bucket's size and age to its own lifecycle rules: no sweep"),
    Setting("S3_REDIRECT", "false", parse_bool,
            "answer a blob GET the bucket holds with a 307 to a presigned URL of it"),
    Setting("S3_REDIRECT_TTL", "20m", parse_redirect_ttl, "how long a presigned URL works (at most 7d)"),
    Setting("S3_REDIRECT_BASE", "", parse_endpoint,
            "a CDN in front of the bucket: redirects go to it, with the same signed path"),
    Setting("PEERS", "", parse_peers,
            "every instance on the bucket, this one too (http://a:8080,http://b:8080): "
            "each blob is fetched upstream by one of them"),
    Setting("PEER_SELF", "", parse_peer,
            "this instance's entry of PEERS (default: the one on PORT at a name or address of this machine)"),
    Setting("PEER_SECRET", "", str.strip, "shared secret that signs requests between PEERS", secret=True),
)

# Config fields never printed (Config's repr, --help): credentials and secrets.
SECRET_FIELDS = ("accounts", "admin_token", "aws_access_key_id", "aws_secret_access_key",
                 "aws_session_token", "peer_secret")

UPSTREAM_PREFIX = "UPSTREAM_"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dockerproxy.py", usage="%(prog)s [cache {verify,stats,prune} | prefetch IMAGE...] [options]",
        description="Pull-through proxy for container registries.",
        epilog="UPSTREAM_<ROUTE>_USERNAME and UPSTREAM_<ROUTE>_PASSWORD (environment or .env "
               "only, never a flag: argv is visible to every user) give the proxy an upstream "
               "account for clients that bring no credentials.  ADMIN_TOKEN (environment or "
               ".env only, for the same reason) is the bearer token of /status, /metrics and "
               "/admin/; AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN are the "
               "CACHE_S3 bucket's credentials, and PEER_SECRET signs requests between PEERS "
               "(environment or .env only too).  "
               "Commands: 'cache verify' re-hashes every cached object and removes bad ones; "
               "'cache stats' prints counts and sizes; 'cache prune' applies CACHE_MAX_SIZE and "
               "CACHE_MAX_AGE now (passing PREFETCH_FILE's images by); 'prefetch IMAGE...' fetches "
               "images into the cache (see 'prefetch --help').  SIGTERM or SIGINT drains and exits; SIGHUP reads the "
               "ALLOW_IMAGES and DENY_IMAGES pattern files again.  "
               "Each setting is read from its flag, else the environment, else the "
               ".env file, else its default.  UPSTREAM_<ROUTE>=URL (or --upstream "
               "ROUTE=URL) points a route at another registry, e.g. "
               "UPSTREAM_DOCKER=http://127.0.0.1:5000 for a local mirror of Docker Hub.")
    add_settings(parser)
    parser.add_argument("--version", action="version", version=f"dockerproxy {__version__}")
    return parser


def add_settings(parser: argparse.ArgumentParser) -> None:
    """A flag for each setting that may be one, --upstream and --env-file."""
    for setting in SETTINGS:
        if setting.secret:
            continue
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
    return config_from_args(build_parser().parse_args(argv), environ)


def config_from_args(args: argparse.Namespace, environ: dict) -> Config:
    """Settings from parsed flags (see add_settings), environ and the .env file; raises ConfigError."""
    env_file = args.env_file or ".env"
    try:
        dotenv = read_env_file(env_file) if args.env_file or os.path.exists(env_file) else {}
    except OSError as err:
        raise ConfigError(f"--env-file {env_file}: {err.strerror}") from None
    values = {}
    for setting in SETTINGS:
        raw = None if setting.secret else getattr(args, setting.field)
        if raw is None:
            raw = environ.get(setting.env, dotenv.get(setting.env, setting.default))
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as err:
            raise ConfigError(f"{setting.env}={'***' if setting.secret else shown(raw)}: {err}") from None
    extra_routes = values.pop("extra_routes")
    overrides = {**upstream_overrides(dotenv), **upstream_overrides(environ)}
    for item in args.upstream:
        name, _, url = item.partition("=")
        overrides[name.strip().lower()] = url
    routes = build_routes(extra_routes, overrides)
    accounts = read_auth_file(values["registry_auth_file"]) if values["registry_auth_file"] else {}
    credentials = route_accounts(accounts, routes)
    credentials.update(upstream_credentials({**dotenv, **environ}, routes))
    routes = tuple(route._replace(credentials=credentials.get(route.name)) for route in routes)
    config = Config(routes=routes, accounts=accounts, **values)
    check_config(config)
    if config.tls_cert or config.tls_key:
        server_tls_context(config)  # a bad certificate stops start-up here, status 2
    return config


def server_tls_context(config: Config) -> ssl.SSLContext:
    """TLS 1.2+ with the standard library's modern defaults."""
    if not (config.tls_cert and config.tls_key):
        raise ConfigError("TLS_CERT and TLS_KEY go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"TLS_CERT={config.tls_cert!r}/TLS_KEY={config.tls_key!r}: "
                          f"{getattr(err, 'strerror', None) or err}") from None
    return context


CREDENTIAL_SUFFIXES = ("_USERNAME", "_PASSWORD")


def upstream_overrides(variables: dict) -> dict:
    """UPSTREAM_K8S_GCR=url -> {"k8s-gcr": url}."""
    return {
        key[len(UPSTREAM_PREFIX):].lower().replace("_", "-"): value
        for key, value in variables.items()
        if key.startswith(UPSTREAM_PREFIX) and value.strip() and not key.endswith(CREDENTIAL_SUFFIXES)
    }


def upstream_credentials(variables: dict, routes: tuple) -> dict:
    """UPSTREAM_<ROUTE>_USERNAME/_PASSWORD -> {route name: Credentials}."""
    names = {env_name(route.name): route.name for route in routes}
    found = {}
    for key in variables:
        if not (key.startswith(UPSTREAM_PREFIX) and key.endswith(CREDENTIAL_SUFFIXES)):
            continue
        route = key[len(UPSTREAM_PREFIX):-len("_USERNAME")]
        if route not in names:
            raise ConfigError(f"{key}: unknown route {route.lower().replace('_', '-')!r}")
        username = variables.get(f"{UPSTREAM_PREFIX}{route}_USERNAME", "")
        password = variables.get(f"{UPSTREAM_PREFIX}{route}_PASSWORD", "")
        if not username or not password:
            raise ConfigError(f"{UPSTREAM_PREFIX}{route}_USERNAME and _PASSWORD go together")
        found[names[route]] = Credentials(username, password)
    return found


def read_auth_file(path: str) -> dict:
    """The `auths` of a docker config.json / podman auth.json -> {host[:port]: Credentials}.

    Keys are registry hosts as `docker login` wrote them
    ("https://index.docker.io/v1/", "ghcr.io", "127.0.0.1:5000").
    """
    try:
        with open(path, encoding="utf-8") as file:
            auths = json.load(file).get("auths", {})
        found = {}
        for key, entry in auths.items():
            host = urllib.parse.urlsplit(key if "//" in key else "//" + key).netloc.lower()
            if entry.get("auth"):
                username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            else:
                username, password = entry.get("username", ""), entry.get("password", "")
            if username and password:
                found[host] = Credentials(username, password)
        return found
    except OSError as err:
        raise ConfigError(f"REGISTRY_AUTH_FILE={path!r}: {err.strerror}") from None
    except (ValueError, AttributeError, TypeError, UnicodeDecodeError):
        raise ConfigError(f"REGISTRY_AUTH_FILE={path!r}: not a docker config.json") from None


def route_accounts(accounts: dict, routes: tuple) -> dict:
    """Which auth-file account each route's upstream gets: {route name: Credentials}.

    An entry goes to the host it names: the route's upstream host, or one
    of its registry names (docker.io, ghcr.io) only while the route still
    points at that registry.  An overridden route (UPSTREAM_DOCKER=http://mirror)
    never gets Docker Hub's account, which would go to the mirror in the clear.
    """
    defaults = {route.name: route.upstream for route in BUILTIN_ROUTES}
    found = {}
    for route in routes:
        names = {urllib.parse.urlsplit(route.upstream).netloc}
        if defaults.get(route.name, route.upstream) == route.upstream:
            names.update(route.registry_hosts)
        for host, credentials in accounts.items():
            if host in names:
                found[route.name] = credentials
    return found


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
        routes[name] = routes[name]._replace(upstream=upstream)
    return tuple(routes.values())


def shown(value: str) -> str:
    """A setting's value for an error message, with a URL's user and password
    hidden as the URL parser splits them (the userinfo ends at the last @)."""
    try:
        parts = urllib.parse.urlsplit(value.strip())
    except ValueError:
        return repr("***")
    if "@" not in parts.netloc:
        return repr(value)
    return repr(urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])))


def env_name(route_name: str) -> str:
    return route_name.upper().replace("-", "_")


def check_config(config: Config) -> None:
    names = [route.name for route in config.routes]
    if config.default_route and config.default_route not in names:
        raise ConfigError(f"DEFAULT_ROUTE={config.default_route!r}: unknown route "
                          f"(known: {', '.join(names)})")
    if config.mode == "debug" and not config.target_upstream:
        raise ConfigError("MODE='debug': needs TARGET_UPSTREAM")
    if config.prefetch_file and not config.cache_dir:
        raise ConfigError("PREFETCH_FILE: there is no cache to keep warm (CACHE_DIR is empty)")
    check_shared_config(config)
    seen = {}
    for route in config.routes:
        for host in route.registry_hosts:
            if host in seen:
                raise ConfigError(f"EXTRA_ROUTES: {route.name!r} and {seen[host]!r} "
                                  f"both claim registry host {host!r}")
            seen[host] = route.name
    registries = {registry_name(route) for route in config.routes}
    if config.mode == "debug":  # every request goes to the one target: its name is the registry
        registries = {registry_name(RouteTable(config).debug_target)}
    for setting, items in (("ALLOW_IMAGES", config.allow_images), ("DENY_IMAGES", config.deny_images)):
        for item in items:
            if not item.startswith("@") and pattern_registry(item) not in registries | {""}:
                raise ConfigError(f"{setting}: {item!r} names no registry of the route table "
                                  f"({', '.join(sorted(registries))})")


def check_shared_config(config: Config) -> None:
    """CACHE_S3, S3_REDIRECT and PEERS: what each needs."""
    if config.cache_s3[0]:
        if not config.cache_dir:
            raise ConfigError("CACHE_S3: needs CACHE_DIR, where fills spool before they are uploaded")
        if not (config.aws_access_key_id and config.aws_secret_access_key):
            raise ConfigError("CACHE_S3: needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(environment or .env)")
    elif config.s3_redirect or config.cache_s3_lifecycle or config.cache_s3_max_size or config.cache_s3_max_age:
        raise ConfigError("S3_REDIRECT and CACHE_S3_*: need CACHE_S3")
    if config.s3_redirect_base and not config.s3_redirect:
        raise ConfigError("S3_REDIRECT_BASE: needs S3_REDIRECT=true")
    if config.peers:
        if not config.cache_dir:
            raise ConfigError("PEERS: needs CACHE_DIR (a peer serves what it cached)")
        if len(config.peer_secret) < MIN_PEER_SECRET:
            raise ConfigError(f"PEERS: needs PEER_SECRET of at least {MIN_PEER_SECRET} characters "
                              "(environment or .env)")
        if config.mode == "debug":
            raise ConfigError("PEERS: not with MODE=debug")
    elif config.peer_self:
        raise ConfigError("PEER_SELF: needs PEERS")


# Routing and dispatch (pure: no I/O) #######################################

class Target(collections.namedtuple("Target", "route kind repository reference prefix", defaults=("",))):
    """What a registry API request asks for, once routed: its Route; kind,
    "manifests", "blobs", "tags" or "referrers"; repository, the name the
    upstream knows ("library/nginx"); reference, a tag or digest ("list" for
    tags); prefix, the registry host the client put before the name."""

    __slots__ = ()

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


class ImageReference(collections.namedtuple("ImageReference", "registry repository tag digest")):
    """An image as docker names it, normalised: registry "docker.io" for Docker
    Hub, repository "library/alpine", a tag ("latest" when neither is given)
    and/or a digest (which wins when both are)."""

    __slots__ = ()

    @property
    def reference(self) -> str:
        return self.digest or self.tag

    def __str__(self) -> str:
        return (f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))


# A registry in an image name: host names and IPv4 addresses, with a port.
REGISTRY_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,252}[a-z0-9])?(?::[0-9]{1,5})?\Z")

# Docker's names for Docker Hub (reference.ParseNormalizedNamed).
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")


def parse_image_reference(text: str) -> ImageReference:
    """'alpine' -> docker.io/library/alpine:latest, by docker's rules: a first
    component with "." or ":" or "localhost" is a registry, else it is Docker
    Hub (whatever DEFAULT_ROUTE says, as for docker); ValueError if malformed."""
    name, _, digest = text.strip().partition("@")
    if digest and not DIGEST.match(digest):
        raise ValueError(f"{text.strip()!r}: {digest!r} is not a sha256 or sha512 digest")
    tag = ""
    last = name.rpartition("/")[2]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not TAG.match(tag):
            raise ValueError(f"{text.strip()!r}: {tag!r} is not a valid tag")
    first, slash, rest = name.partition("/")
    if slash and looks_like_registry_host(first):
        registry, path = first.lower(), rest
        if not REGISTRY_HOST.match(registry) or int(registry.partition(":")[2] or 0) > 65535:
            raise ValueError(f"{text.strip()!r}: {first!r} is not a registry host[:port]")
    else:
        registry, path = "docker.io", name
    if registry in DOCKER_HUB_NAMES:
        registry = "docker.io"
        path = path if "/" in path else f"library/{path}"
    components = path.split("/")
    if path != path.lower():
        raise ValueError(f"{text.strip()!r}: repository names must be lowercase")
    if not path or len(path) > MAX_NAME_LENGTH or not all(NAME_COMPONENT.match(part) for part in components):
        raise ValueError(f"{text.strip()!r}: not a valid image name")
    return ImageReference(registry, path, tag or ("" if digest else "latest"), digest)


class Endpoint(collections.namedtuple("Endpoint", "name route target query location",
                                      defaults=(None, None, "", ""))):
    """What a request asks for, as dispatch() found it: its name (one of
    ENDPOINTS); the Route it is for, once known; a registry object's Target;
    the client's query string, passed upstream as it came; where a
    "redirect" points."""

    __slots__ = ()


# Endpoint names, as the access log and the metrics call them.
ENDPOINTS = ("redirect", "health", "ready", "routes", "metrics", "status", "status.json",
             "login", "logout", "purge", "evict", "prefetch", "base", "token",
             "manifest", "tag", "blob", "tags", "referrers")

# The proxy's own pages, by path (GET and HEAD).
OWN_PAGES = {"/healthz": "health", "/health": "health", "/readyz": "ready", "/routes": "routes",
             "/metrics": "metrics", "/status": "status", "/status.json": "status.json"}

# Paths no rule of the operator's closes (ALLOW_CLIENTS): probes must reach them.
ALWAYS_OPEN = ("/healthz", "/health", "/readyz")

# Endpoints the rate limits count: the registry API, tokens included.
LIMITED_ENDPOINTS = ("redirect", "base", "token", "manifest", "tag", "blob", "tags", "referrers")

# The operator's actions, by path (POST only).
ADMIN_ACTIONS = {"/admin/login": "login", "/admin/logout": "logout",
                 "/admin/purge": "purge", "/admin/evict": "evict", "/admin/prefetch": "prefetch"}

# A registry object's kind in its path -> its endpoint (manifests: by digest
# or by tag, which the cache treats differently).
OBJECT_ENDPOINTS = {"blobs": "blob", "tags": "tags", "referrers": "referrers"}


def dispatch(routes: RouteTable, method: str, path: str, query: str, host: str) -> Endpoint:
    """(method, path, query, host) -> the endpoint and its parsed target.

    Raises RegistryError for what the proxy does not serve: a push (405), a
    path that is not a registry endpoint (404), a malformed Host, an
    unknown registry or a bad name (400, 403, 404).
    """
    if path in ADMIN_ACTIONS:
        if method != "POST":
            # close: a body sent with another method is left unread, and must not be read as a request
            raise RegistryError(405, "UNSUPPORTED", f"{path} takes POST", headers=(("Allow", "POST"),), close=True)
        return Endpoint(ADMIN_ACTIONS[path])
    if method not in ("GET", "HEAD") and not (method == "POST" and path == "/v2/auth"):
        raise RegistryError(405, "UNSUPPORTED", f"{method} is not supported: this is a pull-only mirror",
                            headers=(("Allow", "GET, HEAD"),), close=True)
    if path == "/":
        return Endpoint("redirect", location="/v2/")
    if path in OWN_PAGES:
        return Endpoint(OWN_PAGES[path], query=query)
    if path != "/v2" and not path.startswith("/v2/"):
        raise RegistryError(404, "UNSUPPORTED", "not a registry endpoint", path)
    checked_host(host)
    ns = urllib.parse.parse_qs(query, keep_blank_values=True).get("ns", [None])[0]
    if path in ("/v2", "/v2/"):
        return Endpoint("base", routes.for_base(host, ns))
    if path == "/v2/auth":
        return Endpoint("token", query=query)  # its route comes from the scopes, maybe in a body
    target = routes.resolve(host, path, ns)
    location = library_redirect(target, query)
    if location:
        return Endpoint("redirect", target.route, location=location)
    name = OBJECT_ENDPOINTS.get(target.kind) or ("manifest" if DIGEST.match(target.reference) else "tag")
    return Endpoint(name, target.route, target, query)


def checked_host(host: str) -> str:
    """A Host header we may echo into a realm, or 400."""
    if not HOST_HEADER.match(host):
        raise RegistryError(400, "UNSUPPORTED", "malformed Host header")
    return host


# Protocol helpers (pure: no I/O) ###########################################

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
    if not is_repository_scope(kind) or not name:
        return scope
    first, sep, rest = name.partition("/")
    if sep and first.lower() in route.registry_hosts:
        name = rest
    if route.dockerhub and "/" not in name:
        name = "library/" + name
    return f"{kind}:{name}:{actions}"


def is_repository_scope(kind: str) -> bool:
    """'repository', and its classed form 'repository(plugin)', in any case."""
    return kind.lower().partition("(")[0] == "repository"


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


def own_challenge(route: Route, params: dict, prefix: str, base_url: str, implied: Route | None) -> str:
    """Our Bearer challenge for an upstream's: the same service and scope, our realm.

    base_url is where the client reaches us ("https://mirror.example:5000");
    implied is the route its requests naming no registry get on that host.
    """
    realm = f"{base_url}/v2/auth"
    if route.registry_hosts and (implied is None or implied.name != route.name):
        # Routed by ns or path prefix: the token must come from this route too.
        realm += "?ns=" + urllib.parse.quote(route.registry_hosts[0])
    ours = {"realm": realm, "service": params.get("service", "")}
    if params.get("scope"):
        ours["scope"] = " ".join(client_scope(s, prefix) for s in params["scope"].split(" "))
    return render_challenge("bearer", ours)


def requested_host(headers, trust_proxy_headers: bool, listening: tuple, target_host: str = "") -> str:
    """The host (and port) the client addressed; dispatch() checks it before anyone echoes it.

    An absolute-form request target's host wins over Host (RFC 9112 3.2.2);
    X-Forwarded-Host, when trusted, over both.
    """
    host = target_host or headers.get("host", "")
    if trust_proxy_headers:
        host = headers.get("x-forwarded-host", host).split(",")[0].strip()
    if not host:
        host = f"{listening[0]}:{listening[1]}"
    return host


def requested_scheme(tls: bool, headers, trust_proxy_headers: bool) -> str:
    """http or https, as the client reached us (a TLS-terminating proxy may say so)."""
    scheme = "https" if tls else "http"
    if trust_proxy_headers:
        forwarded = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if forwarded in ("http", "https"):
            scheme = forwarded
    return scheme


# A request target is visible ASCII (RFC 9112 section 3.2; RFC 3986).
VISIBLE_ASCII = re.compile(r"[!-~]+\Z")


def split_target(target: str) -> tuple:
    """A request target -> (host or "", path, query), or 400.

    Origin form ("/v2/...?ns=x") names no host; the absolute form
    ("http://mirror/v2/...") does, and then its host is the one the request
    is for (RFC 9112 section 3.2.2).  Anything else is not a registry request.
    """
    if not VISIBLE_ASCII.match(target):
        # Raw control or non-ASCII bytes: http.client would refuse to send them
        # upstream, and the library/ redirect would echo them into a header.
        raise RegistryError(400, "UNSUPPORTED", "request target with control or non-ASCII bytes", close=True)
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return "", path, query.partition("#")[0]
    if target[:8].lower().startswith(("http://", "https://")):
        try:
            parts = urllib.parse.urlsplit(target)
            parts.port
        except ValueError:
            parts = None
        if parts and parts.netloc:
            return parts.netloc, parts.path or "/", parts.query
    raise RegistryError(400, "UNSUPPORTED", "malformed request target", close=True)


def logged_target(target: str) -> str:
    """A request target fit for a log line: escaped, without its query, which
    can carry secrets (refresh_token=, signatures), and without the user and
    password an absolute-form target may carry."""
    shown = target.partition("?")[0]
    scheme, sep, rest = shown.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "@" in authority:
        shown = f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"
    return printable(shown)


def request_problem(method: str, headers) -> str:
    """Why a parsed request head cannot be served safely, or "".

    A body on a GET or HEAD would be read as the next request on the
    connection; so would a body whose length is in doubt (Transfer-Encoding,
    Content-Lengths that disagree).  A CR, LF or NUL in a value (obs-fold,
    RFC 9112 section 5.2), or a line the parser could not take as a header,
    must not be forwarded upstream.
    """
    if getattr(headers, "defects", None) or headers.get_payload():
        return "malformed header line"
    if any(char in value for value in headers.values() for char in "\r\n\0"):
        return "folded header or control character in a header"
    if headers.get_all("transfer-encoding"):
        return "Transfer-Encoding on a request"
    lengths = {length.strip() for value in headers.get_all("content-length") or []
               for length in value.split(",")}
    if len(lengths) > 1 or any(not re.fullmatch(r"[0-9]{1,19}", length) for length in lengths):
        return "malformed or conflicting Content-Length"
    if method in ("GET", "HEAD") and lengths and int(lengths.pop()):
        return "a body on a GET or HEAD"
    return ""


def json_form(body: bytes) -> dict:
    """A JSON object's string members as a form: {"image": "x"} -> {"image": ["x"]},
    {"images": ["x", "y"]} -> {"images": ["x", "y"]}; else 400."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # 64 KiB of "[" nests past the parser's depth
        document = None
    if not isinstance(document, dict):
        raise RegistryError(400, "UNSUPPORTED", "the body is not a JSON object")
    form = {key: [value] for key, value in document.items() if isinstance(value, str)}
    form.update({key: value for key, value in document.items()
                 if isinstance(value, list) and all(isinstance(item, str) for item in value)})
    return form


def object_answer(status: int) -> bool:
    """An answer that gives the client the object (200, 206, 304), which the cache
    outcome counts; a challenge, a 404 or an error is only counted by its status,
    so the hit ratio is of the objects served."""
    return 200 <= status < 300 or status == 304


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


def response_headers(headers, prefix: str = "") -> list:
    """The upstream headers a client gets (see FORWARDED_RESPONSE_HEADERS)."""
    kept = []
    for name in FORWARDED_RESPONSE_HEADERS:
        for value in headers.get_all(name) or []:
            if name == "link" and prefix:
                value = value.replace("</v2/", f"</v2/{prefix}/", 1)
            kept.append((name.title() if name != "etag" else "ETag", value))
    return kept


# Upstream headers worth keeping when we answer in its place.
KEPT_ON_REFUSAL = ("retry-after", "ratelimit-limit", "ratelimit-remaining", "docker-ratelimit-source")


def refusal_error(status: int, headers, kind: str) -> RegistryError:
    """Our own registry error for an upstream refusal that came without a body
    (the answer to a HEAD), so that a GET client gets a complete answer."""
    if status == 404:
        code = {"manifests": "MANIFEST_UNKNOWN", "blobs": "BLOB_UNKNOWN"}.get(kind, "NAME_UNKNOWN")
    else:
        code = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}.get(
            status, "UNAVAILABLE" if status >= 500 else "UNKNOWN")
    if status < 400:
        status, code = 502, "UNAVAILABLE"  # nothing a GET client could use
    kept = [(name.title(), value) for name in KEPT_ON_REFUSAL for value in headers.get_all(name) or []]
    return RegistryError(status, code, f"upstream answered {status}", headers=kept)


def content_length(headers) -> int | None:
    """A Content-Length header as a number, None if absent or not plain digits."""
    value = (headers.get("content-length") or "").strip()
    return int(value) if re.fullmatch(r"[0-9]{1,19}", value) else None


def is_upstream_failure(status: int) -> bool:
    """Answers that mean "try the cache": the upstream is broken or rate-limiting."""
    return status >= 500 or status == 429


def checked_redirect(url: str, location: str) -> str:
    """Where a redirect goes, refused if not http(s), from https down to http,
    or carrying a user and password (which would go wherever it points)."""
    next_url = urllib.parse.urljoin(url, location)
    parts = urllib.parse.urlsplit(next_url)
    try:
        parts.port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or (
            url.startswith("https:") and parts.scheme == "http") or "@" in parts.netloc:
        raise UpstreamUnavailable(f"refused redirect from {redacted_url(url)} to {redacted_url(next_url)}")
    return next_url


def same_origin(url_a: str, url_b: str) -> bool:
    a, b = urllib.parse.urlsplit(url_a), urllib.parse.urlsplit(url_b)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def redacted_url(url: str) -> str:
    """A URL fit for a log line or an error: no query (CDN signatures), no user
    or password, control characters escaped."""
    parts = urllib.parse.urlsplit(url)
    return printable(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}")


def printable(text: str) -> str:
    """Control characters escaped, as http.server does, so a log line stays one line."""
    return text.encode("unicode_escape", "backslashreplace").decode("ascii").replace('"', '\\"')


# Cache layout and manifest kinds (pure: no I/O) ############################

MANIFEST_KINDS = {
    "application/vnd.docker.distribution.manifest.v2+json": "docker-manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "docker-list",
    "application/vnd.oci.image.manifest.v1+json": "oci-manifest",
    "application/vnd.oci.image.index.v1+json": "oci-index",
    "application/vnd.docker.distribution.manifest.v1+prettyjws": "docker-v1",
    "application/vnd.docker.distribution.manifest.v1+json": "docker-v1",
}

BLOB_TYPE = "application/octet-stream"


def empty_for(length: int | None, digest: str | None) -> bool:
    """No bytes for a digest of some (a DIGEST): sent, that would be a clean empty
    200 (there is no last byte to hold back until the digest is checked)."""
    if length != 0 or not digest:
        return False
    algorithm, _, hexdigest = digest.partition(":")
    return hexdigest != hashlib.new(algorithm).hexdigest()


def accepted_types(accept: str) -> list:
    """'a/b;q=0.5, c/d' -> ['a/b', 'c/d']; parameters do not change what may be sent."""
    return [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]


def accept_kind(accept: str) -> str:
    """The tag index key for what a client accepts: the same tag can answer
    with a different manifest per Accept (an OCI index or a docker list)."""
    types = accepted_types(accept)
    kinds = sorted({MANIFEST_KINDS[t] for t in types if t in MANIFEST_KINDS})
    if not types or "*/*" in types:
        kinds.append("any")
    return "+".join(kinds) or "other"


def accepts(accept: str, media_type: str) -> bool:
    """Whether a client may be sent `media_type` (no Accept at all means anything)."""
    types = accepted_types(accept)
    return not types or "*/*" in types or media_type.lower() in types


def object_path(root: str, digest: str) -> str:
    """'sha256:abcd...' -> ROOT/blobs/sha256/ab/abcd...; blobs and manifests alike."""
    algorithm, _, hexdigest = digest.partition(":")
    return os.path.join(root, "blobs", algorithm, hexdigest[:2], hexdigest)


def repository_dir(root: str, upstream: str, repository: str) -> str:
    """Per-registry, per-repository bookkeeping: the upstream's host:port is in
    the key, so ghcr.io/x/y and docker.io/x/y never share an entry."""
    return os.path.join(root, "repos", urllib.parse.urlsplit(upstream).netloc, repository)


def tag_path(root: str, upstream: str, repository: str, tag: str, kind: str) -> str:
    # Name components never start with "_", so _tags cannot collide with one.
    return os.path.join(repository_dir(root, upstream, repository), "_tags", tag, kind + ".json")


def link_path(root: str, upstream: str, repository: str, digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return os.path.join(repository_dir(root, upstream, repository), "_links", algorithm, hexdigest)


def public_marker_path(root: str, upstream: str, repository: str) -> str:
    return os.path.join(repository_dir(root, upstream, repository), "_public")


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def document_media_type(manifest: bytes) -> str | None:
    """What a manifest is, read from its own bytes, so that no upstream's
    Content-Type decides what other repositories' clients are told.

    The mediaType it names, if it is a manifest kind we know; without one
    (optional in OCI), an index if it lists manifests, an image manifest if
    it has a config; None if the bytes say nothing (the header then decides).
    """
    try:
        document = json.loads(manifest)
    except (ValueError, RecursionError):  # deep nesting: not a manifest either
        return None
    if not isinstance(document, dict):
        return None
    media_type = document.get("mediaType")
    if isinstance(media_type, str) and media_type in MANIFEST_KINDS:
        return media_type
    if media_type is None and document.get("schemaVersion") == 2:
        if isinstance(document.get("manifests"), list):
            return OCI_INDEX
        if isinstance(document.get("config"), dict):
            return OCI_MANIFEST
    return None


def is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


def is_schema1(manifest: bytes, headers) -> bool:
    """A docker schema 1 manifest, whose digest is computed without its signatures."""
    if MANIFEST_KINDS.get(bare_media_type(headers.get("content-type", ""))) == "docker-v1":
        return True
    try:
        document = json.loads(manifest)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and document.get("schemaVersion") == 1


def bare_media_type(content_type: str) -> str:
    """'application/x; charset=utf-8' -> 'application/x': what Accept is matched against."""
    return content_type.partition(";")[0].strip().lower()


# Platforms as docker's --platform names them: os/architecture[/variant].
PLATFORM = re.compile(r"([a-z0-9_.-]{1,32})/([a-z0-9_.-]{1,32})(?:/([a-z0-9_.-]{1,32}))?\Z")
PLATFORM_PART = re.compile(r"[a-z0-9_.-]{1,32}\Z")

# Platforms one image of a prefetch may name: more is not a fleet, and each
# costs a pass over the index and a place in messages.
MAX_PREFETCH_PLATFORMS = 16

# The variant an architecture has when none is named (containerd's
# platforms.Normalize): linux/arm64 is linux/arm64/v8.
DEFAULT_VARIANTS = {"arm64": "v8"}

# What an attestation manifest of an index points at (BuildKit's annotations):
# it goes with the platform manifest it describes.
ATTESTATION_TYPE = "vnd.docker.reference.type"
ATTESTATION_OF = "vnd.docker.reference.digest"


def parse_platform(text: str) -> tuple:
    """'linux/arm/v7' -> ('linux', 'arm', 'v7'); ValueError if it is not one."""
    match = PLATFORM.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text.strip()!r} is not a platform: os/architecture[/variant], "
                         "e.g. linux/amd64 or linux/arm/v7")
    os_name, architecture, variant = match.groups()
    return os_name, architecture, variant or ""


def platform_name(platform: tuple) -> str:
    return "/".join(part for part in platform if part)


def descriptor_platform(descriptor: dict) -> tuple:
    """An index entry's platform as parse_platform() gives it; a part missing, or
    not one a platform name can have, is ""."""
    platform = descriptor.get("platform")
    platform = platform if isinstance(platform, dict) else {}
    fields = (platform.get("os"), platform.get("architecture"), platform.get("variant"))
    # An upstream's strings: only what a platform name can be (they reach messages and terminals).
    return tuple(value.lower() if isinstance(value, str) and PLATFORM_PART.match(value.lower()) else ""
                 for value in fields)


def platform_matches(wanted: tuple, platform: tuple) -> bool:
    """linux/arm64 matches linux/arm64/v8; linux/arm matches every arm variant."""
    if wanted[:2] != platform[:2]:
        return False
    if not wanted[2]:
        return True
    default = DEFAULT_VARIANTS.get(wanted[1], "")
    return (wanted[2] or default) == (platform[2] or default)


class Descriptor(collections.namedtuple("Descriptor", "digest size media_type platform manifest describes",
                                        defaults=("",))):
    """An object a manifest names: its digest, size and media type; the platform
    of an index entry (else ()); manifest: whether it is a manifest itself;
    describes: the manifest an attestation manifest is about, else ""."""

    __slots__ = ()


def attestation_target(item: dict) -> str:
    """The digest of the manifest an index entry attests to, "" if it is not an attestation."""
    annotations = item.get("annotations")
    if not isinstance(annotations, dict) or annotations.get(ATTESTATION_TYPE) != "attestation-manifest":
        return ""
    target = annotations.get(ATTESTATION_OF)
    return target if isinstance(target, str) and DIGEST.match(target) else ""


def valid_descriptor(item: object) -> bool:
    """A descriptor with a digest we know and, if it has one, a size in range (a bool is no size)."""
    if not isinstance(item, dict) or not isinstance(item.get("digest"), str) or not DIGEST.match(item["digest"]):
        return False
    size = item.get("size", 0)
    return type(size) is int and 0 <= size <= MAX_UPSTREAM_LENGTH


def manifest_references(document: object) -> list:
    """The Descriptors a manifest names: an index's manifests; an image's
    config and layers (an artifact's blobs); a schema 1 manifest's fsLayers.
    Layers a registry does not hold (Windows' foreign layers, which carry
    urls) are left out, as every client leaves them.  [] for anything else."""
    if not isinstance(document, dict):
        return []
    if isinstance(document.get("manifests"), list):
        return [Descriptor(item["digest"], item.get("size", 0), str(item.get("mediaType", "")),
                           descriptor_platform(item), True, attestation_target(item))
                for item in document["manifests"] if valid_descriptor(item)]
    if document.get("schemaVersion") == 1:
        layers = document.get("fsLayers") if isinstance(document.get("fsLayers"), list) else []
        digests = [item.get("blobSum") for item in layers if isinstance(item, dict)]
        unique = dict.fromkeys(digest for digest in digests if isinstance(digest, str) and DIGEST.match(digest))
        return [Descriptor(digest, 0, BLOB_TYPE, (), False) for digest in unique]
    items = [document.get("config")]
    for key in ("layers", "blobs"):
        items += document.get(key) if isinstance(document.get(key), list) else []
    found = {}
    for item in items:
        if valid_descriptor(item) and not item.get("urls"):
            found.setdefault(item["digest"], Descriptor(item["digest"], item.get("size", 0),
                                                        str(item.get("mediaType", "")), (), False))
    return list(found.values())


def manifest_problem(document: object) -> str:
    """Why no client could pull what this manifest describes ("" if nothing):
    not an object of a kind we know, an index without entries, an image
    without a config, a descriptor without a valid digest and size.  manifest_references() skips what is invalid; a
    prefetch must not call such an image warm."""
    if not isinstance(document, dict):
        return "not a JSON object"
    if "manifests" in document:
        entries = document["manifests"]
        if not isinstance(entries, list) or not entries:
            return "an index without manifests"
        if not all(valid_descriptor(item) and "size" in item for item in entries):
            return "an index entry without a valid digest and size"
        return ""
    if document.get("schemaVersion") == 1:
        layers = document.get("fsLayers")
        if not isinstance(layers, list) or not layers or not all(
                isinstance(item, dict) and isinstance(item.get("blobSum"), str) and DIGEST.match(item["blobSum"])
                for item in layers):
            return "a schema 1 manifest without valid fsLayers"
        return ""
    if document.get("schemaVersion") != 2:
        return "neither schema version 1 nor 2"
    if not (valid_descriptor(document.get("config")) and "size" in document["config"]):
        return "an image manifest without a valid config"
    items = document.get("layers", []), document.get("blobs", [])
    if not all(isinstance(group, list) for group in items) or not all(
            valid_descriptor(item) and "size" in item for group in items for item in group):
        return "a layer without a valid digest and size"
    return ""


def chosen_manifests(entries: list, wanted: tuple) -> list:
    """Of an index's entries, those of the wanted platforms (all when none are
    named), with the attestation manifests that describe those."""
    if not wanted:
        return list(entries)
    chosen = [entry for entry in entries if any(platform_matches(want, entry.platform) for want in wanted)]
    digests, taken = {entry.digest for entry in chosen}, {id(entry) for entry in chosen}
    return chosen + [entry for entry in entries if entry.describes in digests and id(entry) not in taken]


def parse_platforms(texts: list) -> tuple:
    """--platform values, each once, at most MAX_PREFETCH_PLATFORMS; ValueError."""
    platforms = tuple(dict.fromkeys(parse_platform(text) for text in texts))
    if len(platforms) > MAX_PREFETCH_PLATFORMS:
        raise ValueError(f"at most {MAX_PREFETCH_PLATFORMS} platforms")
    return platforms


def parse_image_list(text: str) -> list:
    """A prefetch list: one image a line, optionally followed by platforms
    ("alpine:3.20 linux/amd64,linux/arm64"); "#" starts a comment.
    [(ImageReference, (platform, ...))]; ValueError naming the line."""
    images = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.partition("#")[0].split()
        if not fields:
            continue
        try:
            if len(fields) > 2:
                raise ValueError("one image and at most one comma-separated platform list a line")
            platforms = parse_platforms(fields[1].split(",")) if len(fields) == 2 else ()
            images.append((parse_image_reference(fields[0]), platforms))
        except ValueError as err:
            raise ValueError(f"line {number}: {err}") from None
    return images


# A Range header longer than this is not one a client resuming a download
# sends; positions have at most 19 digits (2**63).
MAX_RANGE_HEADER = 100
RANGE_NUMBER = re.compile(r"[0-9]{1,19}\Z")


def parse_byte_range(header: str, size: int) -> tuple | None:
    """'bytes=a-b' -> (start, end inclusive); None for what we serve whole.

    One range only (what clients send to resume); a malformed, invalid
    (last before first) or multi-range header is ignored, as RFC 9110
    section 14.2 allows.  Unsatisfiable raises 416.  The header is split by
    hand, not matched by a pattern with optional parts around optional
    parts, whose backtracking a client could make cubic.
    """
    if not header or len(header) > MAX_RANGE_HEADER:
        return None
    unit, equals, spec = header.partition("=")
    first, dash, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if unit.strip().lower() != "bytes" or not equals or not dash or not (first or last) or not (
            RANGE_NUMBER.match(first or "0") and RANGE_NUMBER.match(last or "0")):
        return None
    if first and last and int(last) < int(first):
        return None
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise RegistryError(416, "BLOB_UNKNOWN", "requested range not satisfiable",
                            headers=(("Content-Range", f"bytes */{size}"),))
    return start, end




# Access: who may have cached bytes #########################################

class Clock:
    """The time every TTL and age is measured against.

    Wall time for what is written down (tag checks, anonymous-pull markers,
    an object's last use), monotonic time for what lives in memory (grants,
    tokens), so a step of the system clock cannot stretch a grant.  Tests
    hand the proxy a clock they move forward instead of editing files.
    """

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class Recent:
    """Keys remembered for `ttl` seconds (grants, anonymous tokens), at most MAX_REMEMBERED."""

    def __init__(self, ttl: float, clock: Clock, limit: int = MAX_REMEMBERED) -> None:
        self.ttl = ttl
        self.clock = clock
        self.limit = limit
        self._seen = {}
        self._lock = threading.Lock()

    def add(self, key) -> None:
        with self._lock:
            if len(self._seen) >= self.limit:
                self._seen.clear()  # crude, but bounded: the cost is a few re-checks
            self._seen[key] = self.clock.monotonic()

    def discard(self, key) -> None:
        with self._lock:
            self._seen.pop(key, None)

    def fresh(self, key) -> bool:
        seen = self._seen.get(key)
        return seen is not None and self.clock.monotonic() - seen < self.ttl


def identity_of(authorization: str) -> str:
    """Who a client is, for access bookkeeping: a hash, never the credential."""
    return hashlib.sha256(authorization.encode()).hexdigest()


class Access:
    """The one rule that decides whether cached bytes may go to a client
    without asking upstream.

    A cached object (blob or manifest) of repository R on upstream U goes to a
    client from the cache alone only when both hold:

      1. the object is linked to R on U: U served it for R, or confirmed it
         for R with a HEAD (a manifest naming it is no proof: anyone may push
         a manifest that names anyone's digest);
      2. R on U is open to this client for that object: U accepted this
         client's own credentials for R within ACCESS_TTL; or an anonymous
         pull from R succeeded within ACCESS_TTL (at any age while U is down
         or failing) and the object was linked to R before it, so it was in
         R while R was public (what is added to a repository after it turned
         private never reaches an anonymous client from the cache).

    Anyone else is sent upstream: a HEAD for a cached object, whose answer
    decides (and, if it is 200, links the object and opens R to the client),
    or a fill of its own.  A client joins another client's fill in progress
    when it brings the same credentials, or when rule 2 holds for the fill
    (its start counting as the object's link).

    "Anonymous" is a request without credentials, or with a token that the
    proxy saw fetched without credentials.  Clients are told apart by a hash
    of their Authorization header, never by the credential itself.  Links
    and anonymous-pull markers are AccessRecords (on disk, so every process
    on the cache shares them); grants to credentials live in memory only.
    """

    def __init__(self, records: AccessRecords | None, clock: Clock) -> None:
        self.records = records      # None without a cache: nothing is served from one
        self.clock = clock
        self.grants = Recent(ACCESS_TTL, clock)                    # (identity, upstream, repository)
        self.anonymous_tokens = Recent(ANONYMOUS_TOKEN_TTL, clock)  # identities of such tokens

    def identity(self, authorization: str) -> str | None:
        """None for an anonymous client, else a hash that tells clients apart."""
        if not authorization or authorization == f"Bearer {ANONYMOUS_TOKEN}":
            return None
        identity = identity_of(authorization)
        return None if self.anonymous_tokens.fresh(identity) else identity

    def note_anonymous_token(self, token: str) -> None:
        """A token fetched without credentials: what it may pull, anyone may."""
        self.anonymous_tokens.add(identity_of(f"Bearer {token}"))

    def repository_open(self, identity: str | None, upstream: str, repository: str, linked: float,
                        stale: bool = False) -> bool:
        """Rule 2, for an object linked at `linked` (stale: upstream is down)."""
        if identity is not None and self.grants.fresh((identity, upstream, repository)):
            return True
        since = self.records.public_since(upstream, repository, needed=linked) if self.records else None
        return since is not None and linked <= since and (stale or self.clock.time() - since < ACCESS_TTL)

    def may_serve(self, identity: str | None, upstream: str, repository: str, digest: str,
                  stale: bool = False) -> bool:
        """Rules 1 and 2: this client may have `digest` of `repository` from the cache alone."""
        linked = self.records.linked_since(upstream, repository, digest) if self.records else None
        return linked is not None and self.repository_open(identity, upstream, repository, linked, stale)

    def may_join(self, identity: str | None, started_by: str | None, upstream: str,
                 repository: str, started_at: float) -> bool:
        """This client may follow a fill that `started_by` began at `started_at`."""
        return identity == started_by or self.repository_open(identity, upstream, repository, started_at)

    def refused(self, identity: str | None, upstream: str, repository: str) -> None:
        """Upstream refused this client (401 or 403 to a request that carried a token
        or credentials): what it knew of the repository no longer opens it."""
        if identity is not None:
            self.grants.discard((identity, upstream, repository))
        elif self.records is not None:
            self.records.drop_public(upstream, repository)

    def link(self, upstream: str, repository: str, digests: list, when: float | None = None) -> None:
        """Upstream served `digests` from `repository` to someone: rule 1 only, nobody's access."""
        if self.records is not None:
            self.records.link(upstream, repository, digests, when)

    def record(self, identity: str | None, upstream: str, repository: str, digests: list,
               when: float | None = None) -> None:
        """Upstream let this client have `digests` of `repository` (answering at `when`,
        if the records are written later): link them, open the repository."""
        if self.records is None:
            return
        self.records.link(upstream, repository, digests, when)
        if identity is None:
            self.records.mark_public(upstream, repository, when)
        else:
            self.grants.add((identity, upstream, repository))


# Protection: client limits, the image policy, a gentle upstream ############

# Clients the rate limiter remembers at most: about 300 bytes each, 15 MiB.
# Beyond, a budget idle long enough to be full again is dropped (losing
# nothing), so a spray of addresses cannot grow it.
MAX_LIMITED_CLIENTS = 50_000

# When every remembered client is still being limited (a spray of addresses,
# or an IPv6 /48's 65,536 /64s), a new one shares this one budget with every
# other newcomer, rather than pushing out a limited one (which would hand it a
# fresh allowance).  FORGET_TRIES bounds the search for a budget to drop.
OVERFLOW_CLIENTS = "(overflow)"
FORGET_TRIES = 8

# The windows of RATE_LIMIT_REQUESTS (per minute) and RATE_LIMIT_BYTES (per
# hour): a bucket holds one window's allowance and refills over the window.
REQUEST_WINDOW = 60.0
BYTE_WINDOW = 3600.0

# IPv6 clients are limited per /64: one host gets a whole /64 (RFC 6177), so
# a limit per address would be a limit on nothing.
IPV6_CLIENT_PREFIX = 64

# An upstream 429 without a usable Retry-After is remembered this long, and
# none longer than MAX_UPSTREAM_BACKOFF whatever it says (Docker Hub's pull
# window is six hours, but a quota can come back sooner; an hour bounds a
# hostile or broken header).
DEFAULT_UPSTREAM_BACKOFF = 60.0
MAX_UPSTREAM_BACKOFF = 3600.0

# Upstream 429s remembered at once, one per (upstream, client identity):
# about 200 bytes each.  Beyond, expired ones go, then the soonest to expire.
MAX_UPSTREAM_BACKOFFS = 10_000

# A route's upstream is given up on (its circuit opened) after this many
# transport failures in a row (timeouts, refused or reset connections): for
# BREAKER_BACKOFF seconds, doubling with each failed retry up to
# MAX_BREAKER_BACKOFF.  Meanwhile requests are answered from the cache, or
# refused at once, instead of each waiting out CONNECT_TIMEOUT.
BREAKER_FAILURES = 5
BREAKER_BACKOFF = 5.0
MAX_BREAKER_BACKOFF = 120.0

# What a client is told to wait for when the upstream's request slots are
# all taken and its queue is full: a second lets most requests in flight end.
BUSY_RETRY_AFTER = 1


# X-Forwarded-For entries read from the right, at most: more reverse proxies
# than this in a row is a client writing the header, not a chain of hops.
MAX_FORWARDED_HOPS = 16


def plain_address(text: str):
    """An address as the limits compare it: IPv4-mapped IPv6 as IPv4, no zone; None if not one."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0].strip())
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def in_networks(address, networks: tuple) -> bool:
    return address is not None and any(address in network for network in networks)


def client_address(peer: str, headers, trust_proxy_headers: bool, trusted_proxies: tuple = ()) -> str:
    """Who a request is from.

    With TRUSTED_PROXIES, and a socket peer in it: the rightmost address of
    X-Forwarded-For that is not in it (each proxy appends the address it saw;
    those left of the first untrusted one the client may have written).  An
    entry that is not an address stops the walk at the last trusted hop.
    Else, with TRUST_PROXY_HEADERS (logs and the status page only; limits
    never trust a header from a peer not listed): the last X-Forwarded-For
    address.  Else the socket peer.
    """
    own = plain_address(peer)
    peer = str(own) if own is not None else peer
    if headers is None:
        return peer
    forwarded = [item.strip() for value in headers.get_all("x-forwarded-for") or [] for item in value.split(",")]
    if trusted_proxies:
        if not in_networks(own, trusted_proxies):
            return peer
        hop = peer
        for item in reversed(forwarded[-MAX_FORWARDED_HOPS:]):
            address = plain_address(item)
            if address is None:
                return hop
            hop = str(address)
            if not in_networks(address, trusted_proxies):
                return hop
        return hop
    if trust_proxy_headers and forwarded:
        address = plain_address(forwarded[-1])
        return str(address) if address is not None else peer
    return peer


def limit_key(address: str) -> str:
    """The key of a client's limits: its IPv4 address, or its IPv6 /64."""
    parsed = plain_address(address)
    if parsed is None or parsed.version == 4:
        return str(parsed or address)
    return str(ipaddress.ip_network(f"{parsed}/{IPV6_CLIENT_PREFIX}", strict=False))


def too_many_requests(message: str, retry_after: float, detail: object = None) -> RegistryError:
    """429 TOOMANYREQUESTS with a Retry-After in whole seconds (at least 1)."""
    seconds = max(1, int(math.ceil(retry_after - 1e-9)))  # (float sums of refills)
    return RegistryError(429, "TOOMANYREQUESTS", message, detail, headers=(("Retry-After", str(seconds)),))


class ClientBudget:
    """One client's allowance: request tokens, byte balance, transfers in flight."""

    __slots__ = ("tokens", "balance", "updated", "transfers")

    def __init__(self, tokens: float, balance: float, now: float) -> None:
        self.tokens = tokens          # requests it may make now
        self.balance = balance        # bytes it may still receive; below 0 after a large transfer
        self.updated = now
        self.transfers = 0


class ClientLimits:
    """RATE_LIMIT_REQUESTS, RATE_LIMIT_BYTES and RATE_LIMIT_TRANSFERS, per client.

    (MAX_LIMITED_CLIENTS bounds it: a budget is forgotten only once it is full
    again; see OVERFLOW_CLIENTS.)

    Two token buckets per client: requests (full at one minute's allowance,
    refilled at the limit per minute) and bytes (one hour's, refilled per
    hour).  A request is refused with 429 and the seconds until it would be
    admitted; never delayed, so a client is never left waiting on a socket.
    Bytes are counted when an answer ends, so a transfer is never cut: a
    client over its bytes is refused its next request, until the balance is
    positive again.  At most MAX_LIMITED_CLIENTS clients are remembered.
    """

    def __init__(self, requests: int, bytes_per_hour: int, transfers: int, exempt: tuple, clock: Clock,
                 max_clients: int = MAX_LIMITED_CLIENTS) -> None:
        self.requests = requests
        self.bytes_per_hour = bytes_per_hour
        self.transfers = transfers
        self.exempt = exempt
        self.clock = clock
        self.max_clients = max_clients
        self._budgets = collections.OrderedDict()  # key -> ClientBudget, least recently used first
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.requests or self.bytes_per_hour or self.transfers)

    def __len__(self) -> int:
        return len(self._budgets)

    def key(self, address: str) -> str | None:
        """The limits' key for a client, None if it is exempt or nothing is limited."""
        if not self.enabled or in_networks(plain_address(address), self.exempt):
            return None
        return limit_key(address)

    def admit(self, key: str, transfer: bool) -> str:
        """Count one request (a blob download if `transfer`), or raise 429.
        Returns the key it was counted under, for done(): OVERFLOW_CLIENTS when
        the limiter is full of clients still being limited."""
        with self._lock:
            key, budget = self._budget(key)
            if self.requests and budget.tokens < 1 - 1e-9:  # (float sums of refills)
                wait = (1 - budget.tokens) * REQUEST_WINDOW / self.requests
                raise too_many_requests(f"more than {self.requests} requests a minute; retry later", wait,
                                        {"limit": "RATE_LIMIT_REQUESTS"})
            if self.bytes_per_hour and budget.balance <= 0:
                wait = (1 - budget.balance) * BYTE_WINDOW / self.bytes_per_hour
                raise too_many_requests("over this client's bytes for the hour; retry later",
                                        wait, {"limit": "RATE_LIMIT_BYTES"})
            if transfer and self.transfers and budget.transfers >= self.transfers:
                raise too_many_requests(f"more than {self.transfers} downloads at once", 1,
                                        {"limit": "RATE_LIMIT_TRANSFERS"})
            if self.requests:
                budget.tokens -= 1
            if transfer:
                budget.transfers += 1
            return key

    def done(self, key: str, sent: int, transfer: bool) -> None:
        """A request admitted under `key` ended, having sent `sent` body bytes."""
        with self._lock:
            budget = self._budget(key)[1]
            if self.bytes_per_hour:  # else a balance below 0 never refills, and is never forgotten
                budget.balance -= sent
            if transfer:
                budget.transfers = max(budget.transfers - 1, 0)

    def _budget(self, key: str) -> tuple:
        """(key, the client's budget), refilled to now (made full if new), most recently used."""
        now = self.clock.monotonic()
        budget = self._budgets.get(key)
        if budget is None and len(self._budgets) >= self.max_clients - 1 and not self._forget_one(now):
            key = OVERFLOW_CLIENTS
            budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = ClientBudget(self.requests, self.bytes_per_hour, now)
            return key, budget
        self._budgets.move_to_end(key)
        self._refill(budget, now)
        return key, budget

    def _refill(self, budget: ClientBudget, now: float) -> None:
        elapsed = max(now - budget.updated, 0.0)
        budget.tokens = min(self.requests, budget.tokens + elapsed * self.requests / REQUEST_WINDOW)
        budget.balance = min(self.bytes_per_hour, budget.balance + elapsed * self.bytes_per_hour / BYTE_WINDOW)
        budget.updated = now

    def _forget_one(self, now: float) -> bool:
        """Make room by dropping the least recently used budget, only if forgetting
        it loses nothing: it has refilled to full, with no transfer in flight.
        False if the oldest few are all still limiting their clients."""
        for _ in range(FORGET_TRIES):
            key, budget = next(iter(self._budgets.items()))
            self._refill(budget, now)
            full = budget.tokens >= self.requests and budget.balance >= self.bytes_per_hour  # (0 >= 0 when off)
            if full and not budget.transfers and key != OVERFLOW_CLIENTS:
                del self._budgets[key]
                return True
            self._budgets.move_to_end(key)
        return False


def registry_name(route: Route) -> str:
    """The registry a route's images are named by, as clients write it: docker.io
    for Docker Hub whatever its upstream, else its first registry host, else the
    upstream's host[:port] (MODE=debug)."""
    if route.dockerhub:
        return "docker.io"
    if route.registry_hosts:
        return route.registry_hosts[0]
    return urllib.parse.urlsplit(route.upstream).netloc


def image_name(route: Route | None, repository: str) -> str:
    """registry/name: "docker.io/library/alpine", "ghcr.io/owner/app"."""
    return f"{registry_name(route)}/{repository}" if route is not None else repository


def pattern_registry(pattern: str) -> str:
    """The registry a pattern names literally ("" when its first part is a glob)."""
    first = pattern.partition("/")[0]
    return "" if any(char in first for char in "*?[") else first


def patterns_regex(patterns: list):
    """One compiled regular expression matching any of the globs, or None for none."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{glob_regex(pattern, f'p{number}')})"
                               for number, pattern in enumerate(patterns)))


def read_pattern_file(path: str) -> list:
    """A pattern file: patterns separated by lines, commas or spaces; # starts a comment."""
    patterns = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            for item in re.split(r"[,\s]+", line.partition("#")[0].strip().lower()):
                if item:
                    patterns.append(check_pattern(item))
    return patterns


class ImagePolicy:
    """ALLOW_IMAGES and DENY_IMAGES: which images (registry/name) may be pulled.

    An image is refused if a DENY pattern matches it, or if there are ALLOW
    patterns and none matches it.  Patterns from @files are read at start-up
    and again by reload() (SIGHUP); a file that cannot be read then leaves the
    patterns as they were, so a bad edit never opens or closes the mirror.
    """

    def __init__(self, allow: tuple, deny: tuple, registries: set) -> None:
        self.sources = (allow, deny)
        self.registries = registries     # the names a pattern's registry may be
        self.allow = self.deny = None
        self.reload(at_start=True)

    def reload(self, at_start: bool = False) -> bool:
        """Read the pattern files again; False (and the old patterns kept) on any error."""
        try:
            allow, deny = (self.expand(items) for items in self.sources)
        except (OSError, ValueError, UnicodeDecodeError) as err:
            if at_start:
                raise ConfigError(f"ALLOW_IMAGES/DENY_IMAGES: {getattr(err, 'strerror', None) or err}"
                                  f"{': ' + err.filename if getattr(err, 'filename', None) else ''}") from None
            log.error("image patterns not reloaded, the old ones stay: %s", err)
            return False
        unknown = {pattern_registry(p) for p in allow + deny} - self.registries - {""}
        if unknown:
            log.warning("image patterns name registries outside the route table, which match nothing: %s",
                        ", ".join(sorted(unknown)))
        self.allow, self.deny = patterns_regex(allow), patterns_regex(deny)
        if not at_start:
            log.info("image patterns reloaded: %d allowed, %d denied", len(allow), len(deny))
        return True

    @staticmethod
    def expand(items: tuple) -> list:
        patterns = []
        for item in items:
            patterns += read_pattern_file(item[1:]) if item.startswith("@") else [item]
        return patterns

    @property
    def active(self) -> bool:
        return any(self.sources)

    def allows(self, image: str) -> bool:
        allow, deny = self.allow, self.deny   # one reload's pair, whatever reload() does meanwhile
        image = image.lower()
        if deny is not None and deny.match(image):
            return False
        if self.sources[0] and (allow is None or not allow.match(image)):
            return False  # an allow-list, even one whose file is now empty, allows only what it lists
        return True


class UpstreamBackoff:
    """Upstream 429s, remembered per (upstream, client identity) until their
    Retry-After: until then the cache answers what it can, and the rest gets
    429 at once, without asking an upstream that would only refuse again (and
    count the request against the quota)."""

    def __init__(self, clock: Clock, limit: int = MAX_UPSTREAM_BACKOFFS) -> None:
        self.clock = clock
        self.limit = limit
        self._until = {}    # (upstream, identity or None) -> monotonic time
        self._lock = threading.Lock()

    def note(self, upstream: str, identity: str | None, retry_after: str | None) -> float:
        """An upstream answered 429; returns the seconds it will be left alone."""
        seconds = parse_retry_after(retry_after, self.clock.time())
        seconds = min(max(DEFAULT_UPSTREAM_BACKOFF if seconds is None else seconds, 1.0), MAX_UPSTREAM_BACKOFF)
        now = self.clock.monotonic()
        with self._lock:
            if len(self._until) >= self.limit:
                self._forget(now)
            self._until[(upstream, identity)] = now + seconds
        return seconds

    def remaining(self, upstream: str, identity: str | None) -> float:
        """Seconds until this upstream may be asked for this client again (0: now)."""
        until = self._until.get((upstream, identity))
        return max(until - self.clock.monotonic(), 0.0) if until else 0.0

    def for_upstream(self, upstream: str) -> float:
        """The longest back-off on an upstream, for the status page."""
        now = self.clock.monotonic()
        with self._lock:
            return max([until - now for (host, _), until in self._until.items() if host == upstream] + [0.0])

    def _forget(self, now: float) -> None:
        """Expired entries go, then the soonest to expire of clients with credentials:
        never an anonymous one, which a spray of made-up credentials could push out."""
        for key in [key for key, until in self._until.items() if until <= now]:
            del self._until[key]
        while len(self._until) >= self.limit:
            named = [key for key in self._until if key[1] is not None]
            if not named:
                return  # anonymous entries only: one per route, so few
            del self._until[min(named, key=self._until.get)]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP date (RFC 9110 10.2.3);
    None if it is neither."""
    value = (value or "").strip()
    if re.fullmatch(r"[0-9]{1,100}", value):
        return float(value)
    import datetime, email.utils  # here: only an upstream that sends a date needs them
    try:
        parsed = email.utils.parsedate_to_datetime(value)
        if parsed.tzinfo is None:  # asctime dates name no zone: every HTTP date is GMT
            parsed = parsed.replace(tzinfo=datetime.timezone.utc)
        when = parsed.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(when - now, 0.0)


class Circuit:
    """One upstream's transport failures in a row, and until when it is left alone."""

    __slots__ = ("failures", "open_until", "backoff")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.backoff = BREAKER_BACKOFF


class CircuitBreakers:
    """Routes whose upstream keeps failing are left alone for a while.

    After BREAKER_FAILURES transport failures in a row, requests to that
    upstream fail at once (and the cache answers what it can) for the
    back-off; then one failure more opens it again for twice as long, one
    answer of any status closes it.  Only the route table's upstreams are
    watched: redirect targets and realms are many, and come and go.
    """

    def __init__(self, origins, clock: Clock) -> None:
        self.clock = clock
        self._circuits = {origin: Circuit() for origin in origins}
        self._lock = threading.Lock()

    def open_for(self, origin: str) -> float:
        """Seconds the circuit of `origin` stays open (0: closed)."""
        circuit = self._circuits.get(origin)
        return max(circuit.open_until - self.clock.monotonic(), 0.0) if circuit else 0.0

    def failed(self, origin: str) -> None:
        circuit = self._circuits.get(origin)
        if circuit is None:
            return
        with self._lock:
            now = self.clock.monotonic()
            if circuit.open_until > now:
                return  # a request begun before it opened
            circuit.failures += 1
            if circuit.failures < BREAKER_FAILURES:
                return
            if circuit.failures > BREAKER_FAILURES:  # the retry after a back-off failed too
                circuit.backoff = min(circuit.backoff * 2, MAX_BREAKER_BACKOFF)
            circuit.failures = BREAKER_FAILURES
            circuit.open_until = now + circuit.backoff
        log.warning("upstream %s failed %d times in a row: left alone for %gs",
                    origin, BREAKER_FAILURES, circuit.backoff)

    def succeeded(self, origin: str) -> None:
        circuit = self._circuits.get(origin)
        if circuit is not None and circuit.failures:
            with self._lock:
                circuit.failures, circuit.open_until, circuit.backoff = 0, 0.0, BREAKER_BACKOFF

    def state(self, origin: str) -> dict:
        circuit = self._circuits.get(origin)
        return {"open_seconds": round(self.open_for(origin), 1),
                "failures_in_a_row": circuit.failures if circuit else 0}


class Slot:
    """One request's place among its host's MAX_UPSTREAM_REQUESTS; given back once."""

    __slots__ = ("slots", "host")

    def __init__(self, slots, host: str) -> None:
        self.slots = slots
        self.host = host

    def release(self) -> None:
        slots, self.slots = self.slots, None
        if slots is not None:
            slots.give_back(self.host)


class UpstreamSlots:
    """At most `limit` requests in flight per upstream host, each from its
    request to its answer's head (see Upstreams.send).  More wait, at most `limit` of them and
    at most `patience` seconds each (a waiter holds a client connection),
    then are refused with 503 and Retry-After: bursts are smoothed, and an
    upstream that limits connections (Docker Hub) is not flooded."""

    def __init__(self, limit: int, patience: float) -> None:
        self.limit = limit
        self.patience = patience
        self._busy = {}      # host -> requests in flight
        self._waiting = {}   # host -> requests waiting
        self._free = threading.Condition(threading.Lock())

    def take(self, host: str) -> Slot:
        with self._free:
            if self._busy.get(host, 0) >= self.limit:
                if self._waiting.get(host, 0) >= self.limit:
                    raise UpstreamHeldBack(503, "UNAVAILABLE", f"upstream {host} is busy; retry", BUSY_RETRY_AFTER, "busy")
                self._waiting[host] = self._waiting.get(host, 0) + 1
                try:
                    free = self._free.wait_for(lambda: self._busy.get(host, 0) < self.limit, self.patience)
                finally:
                    self._waiting[host] -= 1
                    if not self._waiting[host]:
                        del self._waiting[host]
                if not free:
                    raise UpstreamHeldBack(503, "UNAVAILABLE", f"upstream {host} is busy; retry", BUSY_RETRY_AFTER, "busy")
            self._busy[host] = self._busy.get(host, 0) + 1
        return Slot(self, host)

    def give_back(self, host: str) -> None:
        with self._free:
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]
            self._free.notify_all()  # waiters of every host share the condition

    def in_flight(self, host: str) -> int:
        return self._busy.get(host, 0)


# Metrics and activity: what /metrics and /status report ####################
#
# Running totals, kept in memory as requests end, so a scrape walks no
# directory.  Every label value comes from a bounded set: route names,
# endpoint names, status codes and the kinds below, never a repository name,
# a client address or anything else a client chooses, so no client can grow
# the number of series.  The status page's tables of images and clients are
# bounded by count instead (Activity).

# Request latency buckets, in seconds: a cached manifest takes milliseconds,
# a cold layer of a gigabyte minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# dispatch()'s endpoint names as the endpoint label has them ("other": the
# proxy's own pages, redirects, refusals before dispatch).
METRIC_ENDPOINTS = {"manifest": "manifest", "tag": "manifest", "blob": "blob", "tags": "tags",
                    "referrers": "referrers", "token": "auth", "base": "base"}
ENDPOINT_LABELS = ("manifest", "blob", "tags", "referrers", "auth", "base", "other")
CACHE_RESULTS = ("hit", "miss", "stale", "bypass")
OBJECT_TYPES = ("blob", "manifest")
OBJECT_KINDS = {"blobs": "blob", "manifests": "manifest"}  # a Target's kind -> its type label
UPSTREAM_ERROR_KINDS = ("timeout", "refused", "reset", "tls", "5xx", "429", "other")
BYTE_SOURCES = ("cache", "upstream")
HELD_BACK_REASONS = ("busy", "circuit", "429")
REFUSAL_REASONS = ("requests", "bytes", "transfers", "client", "image")

# name -> (type, help, label names).  The registry_proxy_ families are
# distribution's proxy-mode counters, by its names, so its dashboards work.
METRIC_FAMILIES = {
    "dockerproxy_http_requests_total": (
        "counter", "Client requests answered, by route, method, endpoint and status code.",
        ("route", "method", "endpoint", "code")),
    "dockerproxy_http_request_duration_seconds": (
        "histogram", "Time from a request's head to the end of its answer.", ("endpoint",)),
    "dockerproxy_cache_requests_total": (
        "counter", "Blob and manifest requests by cache outcome: hit (from the cache, after an "
        "access HEAD too), miss (fetched into the cache, or followed a fill), stale (from the "
        "cache, upstream failing), bypass (relayed from upstream, not stored).", ("type", "result")),
    "dockerproxy_cache_bytes_served_total": (
        "counter", "Blob and manifest bytes sent to clients, by where they came from.", ("source",)),
    "dockerproxy_cache_size_bytes": ("gauge", "Bytes stored in the cache.", ()),
    "dockerproxy_cache_limit_bytes": ("gauge", "CACHE_MAX_SIZE (0: no limit).", ()),
    "dockerproxy_cache_objects": ("gauge", "Blobs and manifests stored in the cache.", ()),
    "dockerproxy_cache_disk_free_bytes": (
        "gauge", "Free space for the proxy on the cache directory's file system.", ()),
    "dockerproxy_cache_disk_size_bytes": ("gauge", "Size of the cache directory's file system.", ()),
    "dockerproxy_cache_evictions_total": ("counter", "Objects the evictor removed.", ()),
    "dockerproxy_cache_fill_waiters_total": (
        "counter", "Clients that followed another client's download instead of starting one.", ()),
    "dockerproxy_cache_verify_failures_total": (
        "counter", "Upstream bodies whose bytes did not match their digest (never stored).", ()),
    "dockerproxy_upstream_requests_total": (
        "counter", "Requests to upstreams answered, by route, method and status code.",
        ("route", "method", "code")),
    "dockerproxy_upstream_errors_total": (
        "counter", "Upstream failures by route and kind (timeout, refused, reset, tls, 5xx, 429, other).",
        ("route", "kind")),
    "dockerproxy_upstream_bytes_total": ("counter", "Body bytes read from upstreams.", ("route",)),
    "dockerproxy_upstream_held_back_total": (
        "counter", "Requests not sent upstream, by route and reason: busy (MAX_UPSTREAM_REQUESTS "
        "and its queue full), circuit (the upstream keeps failing), 429 (it refused this client "
        "not long ago).", ("route", "reason")),
    "dockerproxy_upstream_circuit_open": (
        "gauge", "1 while a route's upstream is left alone after failing again and again.", ("route",)),
    "dockerproxy_client_refusals_total": (
        "counter", "Client requests refused by the proxy's own rules: requests, bytes, transfers "
        "(RATE_LIMIT_*), client (ALLOW_CLIENTS), image (ALLOW_IMAGES, DENY_IMAGES).", ("reason",)),
    "dockerproxy_ratelimit_clients": ("gauge", "Clients the rate limiter remembers now.", ()),
    "dockerproxy_prefetch_images_total": (
        "counter", "Images the proxy prefetched (admin API, PREFETCH_FILE), by result: ok or failed.", ("result",)),
    "dockerproxy_upstream_ratelimit_remaining": (
        "gauge", "The last RateLimit-Remaining an upstream sent (Docker Hub: pulls left).", ("route",)),
    "dockerproxy_upstream_ratelimit_limit": (
        "gauge", "The last RateLimit-Limit an upstream sent (Docker Hub: pulls per window).", ("route",)),
    "dockerproxy_s3_requests_total": (
        "counter", "Requests to the CACHE_S3 bucket, by operation and result: ok, error (an S3 "
        "error answer), unreachable.", ("operation", "result")),
    "dockerproxy_s3_uploads_total": (
        "counter", "Verified objects uploaded to the bucket, by result: ok or failed.", ("result",)),
    "dockerproxy_s3_redirects_total": ("counter", "Blob GETs answered with a presigned redirect.", ()),
    "dockerproxy_s3_evictions_total": (
        "counter", "Objects removed from the bucket by CACHE_S3_MAX_SIZE or CACHE_S3_MAX_AGE.", ()),
    "dockerproxy_s3_objects": ("gauge", "Objects in the bucket, as its last count found.", ()),
    "dockerproxy_s3_size_bytes": ("gauge", "Bytes in the bucket, as its last count found.", ()),
    "dockerproxy_peer_requests_total": (
        "counter", "Misses this instance asked a peer to fill, by result: ok (the peer sent the "
        "blob), declined (it could not: filled here), unreachable (it did not answer, refused our "
        "proof, or its answer broke off: passed over for a while).", ("result",)),
    "dockerproxy_peer_served_total": (
        "counter", "Requests of peers this instance answered, by cache result (hit, miss, bypass) "
        "or refused (a wrong or stale PEER_SECRET proof).", ("result",)),
    "dockerproxy_peer_up": ("gauge", "1 while a peer of PEERS answers, 0 while it is passed over.", ("peer",)),
    "dockerproxy_connections_open": ("gauge", "Client connections open.", ()),
    "dockerproxy_threads": ("gauge", "Threads of the process.", ()),
    "dockerproxy_fills_in_flight": ("gauge", "Downloads into the cache in progress.", ()),
    "dockerproxy_start_time_seconds": ("gauge", "When the process started, Unix time.", ()),
    "dockerproxy_build_info": ("gauge", "Always 1; the version and Python in its labels.", ("version", "python")),
    "process_resident_memory_bytes": ("gauge", "Resident memory of the process.", ()),
    "process_cpu_seconds_total": ("counter", "CPU time of the process, user and system.", ()),
    "process_open_fds": ("gauge", "File descriptors open.", ()),
    "registry_proxy_requests_total": (
        "counter", "Blob and manifest requests served (distribution's name).", ("type",)),
    "registry_proxy_hits_total": (
        "counter", "Of those, served from the cache, stale ones too (distribution's name).", ("type",)),
    "registry_proxy_misses_total": (
        "counter", "Of those, not served from the cache (distribution's name).", ("type",)),
    "registry_proxy_pulled_bytes_total": (
        "counter", "Body bytes read from upstreams for blobs and manifests (distribution's name).", ("type",)),
    "registry_proxy_pushed_bytes_total": (
        "counter", "Blob and manifest bytes sent to clients (distribution's name).", ("type",)),
}


# What asking a peer to fill a miss can come to (dockerproxy_peer_requests_total).
PEER_ASK_RESULTS = ("ok", "declined", "unreachable")

# The families Metrics counts; the others are read at scrape time (render()'s gauges).
COUNTED_FAMILIES = tuple(name for name, (kind, _, _) in METRIC_FAMILIES.items()
                         if kind == "counter" and not name.startswith("process_"))


class Served(collections.namedtuple("Served", (
        "time client method endpoint route status bytes duration cache source joined "
        "repository reference upstream_status"))):
    """One request as it ended, for the metrics, the status page and the access log:
    wall time; the client's address; method; dispatch()'s endpoint name; route
    name ("-": none); status sent (0: none); body bytes sent; seconds taken;
    the cache outcome ("" or one of CACHE_RESULTS); where the bytes came from
    ("cache" or "upstream"); whether it followed another client's fill; the
    repository and reference of a registry object (else ""); the last
    upstream status (0: none)."""

    __slots__ = ()


# The status codes a label names as they are: the registered ones (about 60),
# so an upstream that answers every code from 100 to 599 adds no more series.
REGISTERED_STATUSES = frozenset(int(status) for status in http.HTTPStatus)


def status_label(status: int) -> str:
    """A status code as a label: a registered one as it is, any other "other", none "none"."""
    if not status:
        return "none"
    return str(status) if status in REGISTERED_STATUSES else "other"


def method_label(method: str) -> str:
    return method if method in ("GET", "HEAD", "POST") else "other"


def object_type(endpoint: str) -> str:
    return "blob" if endpoint == "blob" else "manifest"


def parse_ratelimit(value: str | None) -> int | None:
    """RateLimit-Remaining: '76;w=21600' -> 76; None if absent or not a count."""
    count = (value or "").partition(";")[0].strip()
    return int(count) if re.fullmatch(r"[0-9]{1,12}", count) else None


def upstream_error_kind(err: BaseException) -> str:
    """One of UPSTREAM_ERROR_KINDS for an exception of the upstream client."""
    if isinstance(err, socket.timeout):
        return "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    if isinstance(err, ssl.SSLError):
        return "tls"
    if isinstance(err, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                        http.client.RemoteDisconnected, http.client.IncompleteRead)):
        return "reset"
    return "other"


def label_text(names: tuple, values: tuple) -> str:
    """'{a="x",b="y"}', values escaped as the exposition format says ("" for no labels)."""
    if not names:
        return ""
    escaped = (str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for value in values)
    return "{" + ",".join(f'{name}="{value}"' for name, value in zip(names, escaped)) + "}"


def number_text(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Histogram:
    """One histogram series: counts per DURATION_BUCKETS bound, their sum and count."""

    def __init__(self) -> None:
        self.buckets = [0] * len(DURATION_BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(DURATION_BUCKETS):
            if value <= bound:
                self.buckets[index] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str, names: tuple, values: tuple) -> list:
        lines, cumulative = [], 0
        for bound, count in zip(DURATION_BUCKETS, self.buckets):
            cumulative += count
            lines.append(f"{name}_bucket{label_text(names + ('le',), values + (number_text(bound),))} {cumulative}")
        lines.append(f"{name}_bucket{label_text(names + ('le',), values + ('+Inf',))} {self.count}")
        lines.append(f"{name}_sum{label_text(names, values)} {repr(self.sum)}")
        lines.append(f"{name}_count{label_text(names, values)} {self.count}")
        return lines


class RouteHealth(collections.namedtuple("RouteHealth", "status latency when ratelimit_remaining ratelimit_limit")):
    """What a route's upstream last answered: status, seconds to its head, when
    (wall time), and the rate limit it announced (None: never)."""

    __slots__ = ()


class Metrics:
    """The running totals of METRIC_FAMILIES, and each route's last upstream answer.

    Counters only go up; the gauges of live things (cache size, connections)
    are read from them at scrape time and passed to render().  The series of
    fixed label sets start at 0, so rate() works from the first scrape.
    """

    def __init__(self, route_names=(), started: float | None = None) -> None:
        self.started = time.time() if started is None else started
        self._lock = threading.Lock()
        self._values = {name: {} for name in COUNTED_FAMILIES}
        self._durations = {endpoint: Histogram() for endpoint in ENDPOINT_LABELS}
        self.route_health = {}        # route name -> RouteHealth
        for type_ in OBJECT_TYPES:
            for result in CACHE_RESULTS:
                self._values["dockerproxy_cache_requests_total"][(type_, result)] = 0
            for family in ("requests", "hits", "misses", "pulled_bytes", "pushed_bytes"):
                self._values[f"registry_proxy_{family}_total"][(type_,)] = 0
        for source in BYTE_SOURCES:
            self._values["dockerproxy_cache_bytes_served_total"][(source,)] = 0
        for name in ("evictions", "fill_waiters", "verify_failures"):
            self._values[f"dockerproxy_cache_{name}_total"][()] = 0
        for reason in REFUSAL_REASONS:
            self._values["dockerproxy_client_refusals_total"][(reason,)] = 0
        for result in ("ok", "failed"):
            self._values["dockerproxy_prefetch_images_total"][(result,)] = 0
        for route in route_names:
            self._values["dockerproxy_upstream_requests_total"][(route, "GET", "200")] = 0
            self._values["dockerproxy_upstream_bytes_total"][(route,)] = 0
            for kind in UPSTREAM_ERROR_KINDS:
                self._values["dockerproxy_upstream_errors_total"][(route, kind)] = 0
            for reason in HELD_BACK_REASONS:
                self._values["dockerproxy_upstream_held_back_total"][(route, reason)] = 0

    def add(self, name: str, labels: tuple = (), amount: float = 1) -> None:
        with self._lock:
            self._count(name, labels, amount)

    def start_shared(self, bucket: bool, peers: bool) -> None:
        """The series of CACHE_S3's and PEERS' counters, at 0 from the start (only when configured)."""
        with self._lock:
            if bucket:
                for result in ("ok", "failed"):
                    self._values["dockerproxy_s3_uploads_total"][(result,)] = 0
                for name in ("redirects", "evictions"):
                    self._values[f"dockerproxy_s3_{name}_total"][()] = 0
            if peers:
                for result in PEER_ASK_RESULTS:
                    self._values["dockerproxy_peer_requests_total"][(result,)] = 0

    def value(self, name: str, labels: tuple = ()) -> float:
        """A series' value now (0 if it never counted): for the status page and tests."""
        with self._lock:
            return self._values[name].get(labels, 0)

    def total(self, name: str, **match) -> float:
        """The sum of a family's series whose labels have the values given."""
        names = METRIC_FAMILIES[name][2]
        with self._lock:
            return sum(value for labels, value in self._values[name].items()
                       if all(dict(zip(names, labels)).get(key) == wanted for key, wanted in match.items()))

    # What the proxy reports -----------------------------------------------------

    def served(self, served: Served) -> None:
        """A client request ended."""
        endpoint = METRIC_ENDPOINTS.get(served.endpoint, "other")
        with self._lock:
            self._count("dockerproxy_http_requests_total",
                        (served.route, method_label(served.method), endpoint, status_label(served.status)))
            self._durations[endpoint].observe(max(served.duration, 0.0))
            if served.cache:
                self._count_cache(served)

    def _count(self, name: str, labels: tuple, amount: float = 1) -> None:
        series = self._values[name]
        series[labels] = series.get(labels, 0) + amount

    def _count_cache(self, served: Served) -> None:
        type_ = object_type(served.endpoint)
        self._count("dockerproxy_cache_requests_total", (type_, served.cache))
        self._count("dockerproxy_cache_bytes_served_total", (served.source,), served.bytes)
        self._count("registry_proxy_requests_total", (type_,))
        self._count("registry_proxy_pushed_bytes_total", (type_,), served.bytes)
        self._count("registry_proxy_hits_total" if served.cache in ("hit", "stale")
                    else "registry_proxy_misses_total", (type_,))
        if served.joined:
            self._count("dockerproxy_cache_fill_waiters_total", ())

    def upstream_answer(self, route: str, method: str, status: int, latency: float, headers) -> None:
        """An upstream answered (every hop of a redirect counts)."""
        remaining = parse_ratelimit(headers.get("ratelimit-remaining"))
        limit = parse_ratelimit(headers.get("ratelimit-limit"))
        with self._lock:
            self._count("dockerproxy_upstream_requests_total", (route, method_label(method), status_label(status)))
            if status >= 500 or status == 429:
                self._count("dockerproxy_upstream_errors_total", (route, "429" if status == 429 else "5xx"))
            known = self.route_health.get(route)
            if remaining is None and known is not None:
                remaining, limit = known.ratelimit_remaining, known.ratelimit_limit
            self.route_health[route] = RouteHealth(status, latency, time.time(), remaining, limit)

    def upstream_failed(self, route: str, kind: str) -> None:
        self.add("dockerproxy_upstream_errors_total", (route, kind))

    def upstream_bytes(self, route: str, type_: str, count: int) -> None:
        with self._lock:
            self._count("dockerproxy_upstream_bytes_total", (route,), count)
            if type_:
                self._count("registry_proxy_pulled_bytes_total", (type_,), count)

    # The exposition --------------------------------------------------------------

    def render(self, gauges: dict) -> str:
        """The text exposition format 0.0.4: the totals, and `gauges` (name -> value,
        or name -> {labels: value}) for the live values."""
        lines = []
        with self._lock:
            for route, health in self.route_health.items():
                if health.ratelimit_remaining is not None:
                    gauges.setdefault("dockerproxy_upstream_ratelimit_remaining", {})[(route,)] = health.ratelimit_remaining
                if health.ratelimit_limit is not None:
                    gauges.setdefault("dockerproxy_upstream_ratelimit_limit", {})[(route,)] = health.ratelimit_limit
            for name, (kind, help_text, names) in METRIC_FAMILIES.items():
                if kind == "histogram":
                    series = [lines for endpoint, histogram in self._durations.items()
                              for lines in histogram.lines(name, names, (endpoint,))]
                else:
                    values = self._values[name] if name in self._values else gauges.get(name)
                    if values is None:
                        continue
                    if not isinstance(values, dict):
                        values = {(): values}
                    series = [f"{name}{label_text(names, labels)} {number_text(value)}"
                              for labels, value in sorted(values.items())]
                if series:
                    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"] + series
        return "\n".join(lines) + "\n"


# The status page's tables are bounded by count: the last RECENT_PULLS
# pulls, and per hour of the last day at most TOP_KEYS images and TOP_KEYS
# clients (more are counted as OTHER): 24 x 2 x 256 entries of about 300
# bytes, under 4 MiB whatever clients send.
RECENT_PULLS = 50
TOP_KEYS = 256
TOP_ROWS = 10
OTHER = "(other)"

# A client's requests of one repository make one pull until it has been
# quiet this long (docker fetches a manifest, then each layer; containerd
# resolves with a HEAD first).
PULL_QUIET = 60.0

# Pulls being assembled at once (one per client and repository); beyond, the
# one quiet the longest is closed early.
MAX_OPEN_PULLS = 256


class Pull:
    """One client's pull of one image: its requests from the first until it
    has been quiet PULL_QUIET seconds, their bytes and their cache outcomes."""

    def __init__(self, started: float, client: str, image: str, tag: str) -> None:
        self.started = started
        self.last = started          # when its latest request ended
        self.client = client
        self.image = image
        self.tag = tag               # the tag it resolved, if it began with one
        self.bytes = 0
        self.results = collections.Counter()  # cache outcome -> requests

    def outcome(self) -> str:
        """"hit", "miss", ... when all its requests had one outcome, else "mixed"."""
        kinds = [result for result in CACHE_RESULTS if self.results[result]]
        return kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "-")

    def document(self) -> dict:
        return {"time": self.started, "client": self.client, "image": self.image,
                "outcome": self.outcome(), "requests": dict(self.results), "bytes": self.bytes,
                "duration_seconds": round(self.last - self.started, 3)}


class Tally:
    """Counts of one period (a minute or an hour): requests by cache outcome,
    bytes by source, and pulls and bytes by image and by client (TOP_KEYS each)."""

    def __init__(self, period: int) -> None:
        self.period = period
        self.results = collections.Counter()
        self.bytes = collections.Counter()
        self.images = {}              # image -> [pulls, bytes]
        self.clients = {}             # client -> [pulls, bytes]

    @staticmethod
    def bump(table: dict, key: str, pulls: int, count: int) -> None:
        if key not in table and len(table) >= TOP_KEYS:
            key = OTHER
        entry = table.setdefault(key, [0, 0])
        entry[0] += pulls
        entry[1] += count


class Activity:
    """Who pulled what, for the status page: pulls assembled from the requests
    of each client and repository, the last RECENT_PULLS of them, and per-minute
    and per-hour tallies for "the last hour" and "the last day"."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.recent = collections.deque(maxlen=RECENT_PULLS)
        self._open = collections.OrderedDict()    # (client, route, repository) -> Pull, quietest first
        self._minutes = collections.deque(maxlen=60)
        self._hours = collections.deque(maxlen=24)

    def served(self, served: Served, route: Route | None) -> None:
        """A request ended: count it, and add it to its pull if it is a registry object's."""
        with self._lock:
            minute = self._tally(self._minutes, int(served.time // 60))
            hour = self._tally(self._hours, int(served.time // 3600))
            if served.cache:
                minute.results[served.cache] += 1
                minute.bytes[served.source] += served.bytes
            if not served.repository or not served.cache:
                return  # a refusal, a 404, an error: no pull, and no row a stranger can add
            pull, new = self._pull_of(served, route, hour)
            pull.bytes += served.bytes
            pull.last = max(pull.last, served.time)
            if served.cache:
                pull.results[served.cache] += 1
            Tally.bump(hour.images, pull.image, int(new), served.bytes)
            Tally.bump(hour.clients, pull.client, int(new), served.bytes)

    @staticmethod
    def _tally(tallies: collections.deque, period: int) -> Tally:
        if not tallies or tallies[-1].period < period:
            tallies.append(Tally(period))
        return tallies[-1]  # a request ending a moment before another's counts with it

    def _pull_of(self, served: Served, route: Route | None, hour: Tally) -> tuple:
        """(the pull this request belongs to, whether it is new)."""
        key = (served.client, served.route, served.repository)
        tag = served.reference if served.endpoint == "tag" else ""
        pull = self._open.pop(key, None)
        if pull is not None and served.time - pull.last < PULL_QUIET and not (tag and pull.tag and tag != pull.tag):
            self._open[key] = pull  # the most recent last
            if tag and not pull.tag:  # a blob on another connection ended before the tag's request
                self._name(pull, f"{image_name(route, served.repository)}:{tag}", tag, hour)
            return pull, False
        while len(self._open) >= MAX_OPEN_PULLS:
            self._open.popitem(last=False)
        image = image_name(route, served.repository)
        if tag:
            image += f":{tag}"
        elif served.endpoint == "manifest":
            image += f"@{served.reference[:19]}"
        pull = self._open[key] = Pull(served.time, served.client, image, tag)
        self.recent.append(pull)
        return pull, True

    @staticmethod
    def _name(pull: Pull, image: str, tag: str, hour: Tally) -> None:
        """Give a pull its tag, and move what this hour counted under its old name."""
        counted = hour.images.get(pull.image)
        if counted is not None and pull.started >= hour.period * 3600:
            counted[0] -= 1
            counted[1] -= pull.bytes
            if counted[0] <= 0 and counted[1] <= 0:
                del hour.images[pull.image]
            Tally.bump(hour.images, image, 1, pull.bytes)
        pull.image, pull.tag = image, tag

    def document(self, now: float) -> dict:
        """The last hour's outcomes and bytes, the day's top images and clients, the recent pulls."""
        with self._lock:
            minutes = [tally for tally in self._minutes if tally.period > now // 60 - 60]
            hours = [tally for tally in self._hours if tally.period > now // 3600 - 24]
            results = sum((tally.results for tally in minutes), collections.Counter())
            sources = sum((tally.bytes for tally in minutes), collections.Counter())
            return {
                "last_hour": {"requests": {result: results[result] for result in CACHE_RESULTS},
                              "bytes": {source: sources[source] for source in BYTE_SOURCES}},
                "top_images": self._top(hours, "images", "image"),
                "top_clients": self._top(hours, "clients", "client"),
                "recent_pulls": [pull.document() for pull in reversed(self.recent)],
            }

    @staticmethod
    def _top(hours: list, table: str, key_name: str) -> list:
        totals = {}
        for tally in hours:
            for key, (pulls, count) in getattr(tally, table).items():
                entry = totals.setdefault(key, [0, 0])
                entry[0] += pulls
                entry[1] += count
        ranked = sorted(totals.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))[:TOP_ROWS]
        return [{key_name: key, "pulls": pulls, "bytes": count} for key, (pulls, count) in ranked]


# Storage: blob store, tag index, access records ############################
#
# The three seams a second backend (a bucket several instances share) will
# implement.  These keep them as files under CACHE_DIR, in the layout of the
# module docstring and the pure path functions above.

_thread_state = threading.local()


def thread_buffer() -> memoryview:
    """One streaming buffer per thread, allocated once and reused."""
    buffer = getattr(_thread_state, "buffer", None)
    if buffer is None:
        buffer = _thread_state.buffer = memoryview(bytearray(CHUNK_SIZE))
    return buffer


def create_temp(directory: str, name: str) -> tuple:
    """A new locked temporary file beside its final name: (fd, path).

    The flock marks it as alive: start-up and `cache verify` remove only
    temporary files nobody holds, so a second process sharing CACHE_DIR
    never loses a fill in progress, and a SIGKILLed one leaves nothing behind.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{TEMP_PREFIX}{name}-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, path


def write_all(fd: int, data) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def write_atomic(path: str, data: bytes) -> None:
    """Small files (tag entries, media types): temp file, then rename.  A purge
    may remove the directory in between: then once more, in a new one."""
    for last in (False, True):
        fd, temp = create_temp(os.path.dirname(path), os.path.basename(path))
        try:
            write_all(fd, data)
            os.replace(temp, path)
            return
        except FileNotFoundError:
            remove_quietly(temp)
            if last:
                raise
        except BaseException:
            remove_quietly(temp)
            raise
        finally:
            os.close(fd)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_abandoned_temps(root: str) -> int:
    """Temporary files whose writer is gone (its flock released): removed."""
    removed = 0
    for directory, _, files in os.walk(root):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live fill holds it
            finally:
                os.close(fd)
            remove_quietly(path)
            removed += 1
    return removed


def file_digest(path: str, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    buffer = thread_buffer()
    with open(path, "rb", buffering=0) as file:
        for count in iter(lambda: file.readinto(buffer), 0):
            hasher.update(buffer[:count])
    return f"{algorithm}:{hasher.hexdigest()}"


class DiskTrouble:
    """A full or failing disk degrades the cache to pass-through: one warning per episode."""

    def __init__(self) -> None:
        self.warned = False

    def warn(self, err: OSError) -> None:
        if not self.warned:
            self.warned = True
            log.warning("cache cannot write (%s): passing content through uncached", err.strerror or err)

    def cleared(self) -> None:
        self.warned = False


class Spool:
    """A new object being written: a locked temporary file where it will live."""

    def __init__(self, directory: str, name: str) -> None:
        self.fd, self.path = create_temp(directory, name)

    def reserve(self, length: int | None) -> None:
        """Claim the space now: a full disk (or a file size limit) shows here,
        before any client depends on this file.  Raises OSError."""
        if not length or not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(self.fd, 0, length)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    def write(self, data) -> None:
        write_all(self.fd, data)

    def read_start(self, limit: int) -> bytes:
        """The first `limit` bytes written (a manifest, to read what it names)."""
        return os.pread(self.fd, limit, 0)

    def finish(self, length: int) -> None:
        """Exactly `length` bytes, on disk before the object takes its name."""
        os.ftruncate(self.fd, length)
        os.fsync(self.fd)

    def discard(self) -> None:
        remove_quietly(self.path)

    def close(self) -> None:
        os.close(self.fd)


class StoredObject(collections.namedtuple("StoredObject", "digest size last_used")):
    """One object of a BlobStore, as eviction and the operator commands see it."""

    __slots__ = ()


class BlobStore:
    """Content-addressed objects, blobs and manifests alike, named by digest.

    A verified Spool is put under its digest; an object is opened for reading
    (and counted as being read until closed, so eviction passes it by),
    deleted, or listed.  A manifest carries its media type.
    """

    def __init__(self, root: str, clock: Clock) -> None:
        self.root = root
        self.clock = clock
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
        self._lock = threading.Lock()
        self._readers = {}            # path -> clients reading it: never evicted
        self._touched = Recent(TOUCH_INTERVAL, clock)  # paths whose last use was bumped lately

    def exists(self, digest: str) -> bool:
        return os.path.exists(object_path(self.root, digest))

    def media_type(self, digest: str) -> str | None:
        """The stored media type of a cached manifest, else None."""
        path = object_path(self.root, digest)
        try:
            with open(path + ".type", encoding="utf-8") as file:
                media_type = file.read(MAX_MEDIA_TYPE).strip()
        except (OSError, ValueError):  # ValueError: not UTF-8, so not ours
            return None
        return media_type if os.path.exists(path) else None

    def open(self, digest: str):
        """(file, size) of a stored object, counted as being read; None if absent."""
        path = object_path(self.root, digest)
        try:
            file = open(path, "rb", buffering=0)  # read with sendfile or pread, never through a buffer
        except FileNotFoundError:
            return None
        with self._lock:
            self._readers[path] = self._readers.get(path, 0) + 1
        self._touch(path)
        return file, os.fstat(file.fileno()).st_size

    def close(self, file) -> None:
        """The end of a read that open() (or any other file on the store) began."""
        with self._lock:
            count = self._readers.pop(file.name, 1) - 1
            if count:
                self._readers[file.name] = count
        file.close()

    def in_use(self, digest: str) -> bool:
        with self._lock:
            return bool(self._readers.get(object_path(self.root, digest)))

    def _touch(self, path: str) -> None:
        """Bump the mtime that eviction reads as last use, at most once a minute."""
        if not self._touched.fresh(path):
            self._touched.add(path)
            now = self.clock.time()
            try:
                os.utime(path, (now, now))
            except OSError:
                pass

    def new_spool(self, digest: str | None) -> Spool:
        """A Spool beside where `digest` will live (a manifest by tag: any shard)."""
        name = digest.partition(":")[2] if digest else "manifest"
        return Spool(os.path.dirname(object_path(self.root, digest or "sha256:00")), name)

    def put(self, spool: Spool, digest: str, media_type: str | None) -> bool:
        """The spool's verified bytes take their name; True if the object is new."""
        final = object_path(self.root, digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)  # a manifest by tag spools in another shard
        if media_type and self.media_type(digest) is None:  # the first verified fill's type stays
            write_atomic(final + ".type", media_type.encode())
        now = self.clock.time()
        os.utime(spool.path, (now, now))
        is_new = not os.path.exists(final)  # another process may have filled it too
        os.replace(spool.path, final)
        return is_new

    def size(self, digest: str) -> int | None:
        try:
            return os.path.getsize(object_path(self.root, digest))
        except OSError:
            return None

    def manifest(self, digest: str) -> object:
        """A stored manifest's JSON document; None if it is not one."""
        try:
            with open(object_path(self.root, digest), "rb") as file:
                return json.loads(file.read(MAX_MANIFEST_SIZE + 1))
        except (OSError, ValueError, RecursionError):
            return None

    def delete(self, digest: str) -> None:
        path = object_path(self.root, digest)
        remove_quietly(path)
        remove_quietly(path + ".type")

    def digest_of(self, digest: str) -> str:
        """The digest of the bytes stored as `digest` (a check that they match)."""
        return file_digest(object_path(self.root, digest), digest.partition(":")[0])

    def objects(self) -> list:
        """Every stored object (temporary files aside), with its size and last use."""
        found = []
        for path, digest in self._files(misplaced=False):
            try:
                stat = os.stat(path)
            except OSError:  # gone since the walk, or unreadable: not servable either
                continue
            found.append(StoredObject(digest, stat.st_size, stat.st_mtime))
        return found

    def remove_strays(self) -> int:
        """Remove files where this store puts nothing (by hand, or a broken disk); how many."""
        strays = [path for path, _ in self._files(misplaced=True)]
        for path in strays:
            remove_quietly(path)
        return len(strays)

    def _files(self, misplaced: bool):
        """(path, digest) of the files under blobs/, placed where object_path() puts them or not."""
        for directory, _, files in os.walk(os.path.join(self.root, "blobs")):
            algorithm = os.path.basename(os.path.dirname(directory))
            for name in files:
                if name.startswith(TEMP_PREFIX) or name.endswith(".type"):
                    continue
                path, digest = os.path.join(directory, name), f"{algorithm}:{name}"
                if (path != object_path(self.root, digest)) == misplaced:
                    yield path, digest


# How far ahead of this process's clock a repository's anonymous-pull mark may
# be and still be kept (not moved back): a mark another thread wrote a moment
# after the time a record() read.  Seconds: far more than a thread waits for
# the disk, far less than ACCESS_TTL.
MARK_SKEW = 5.0


def checked_tag_entry(entry: object, now: float) -> dict | None:
    """A tag entry as read, if it is one: a digest, and a time of check that is a
    number and not ahead of `now` by more than MARK_SKEW (an instance whose clock
    runs ahead would keep it fresh for everyone: it is then taken as never checked)."""
    if not isinstance(entry, dict) or not DIGEST.match(str(entry.get("digest"))):
        return None
    checked = entry.get("checked")
    if isinstance(checked, bool) or not isinstance(checked, (int, float)) or not math.isfinite(checked):
        return None
    if checked > now + MARK_SKEW:
        entry["checked"] = 0.0
    return entry


class TagIndex:
    """Which manifest a tag named (per kind of Accept), and when upstream last said so."""

    def __init__(self, root: str, clock: Clock, trouble: DiskTrouble) -> None:
        self.root = root
        self.clock = clock
        self.trouble = trouble

    def get(self, upstream: str, repository: str, tag: str, kind: str) -> dict | None:
        """{"digest", "media_type", "checked"} as written, None if absent or unreadable."""
        try:
            with open(tag_path(self.root, upstream, repository, tag, kind), encoding="utf-8") as file:
                entry = json.load(file)
        except (OSError, ValueError):
            return None
        return checked_tag_entry(entry, self.clock.time())

    def kinds(self, upstream: str, repository: str, tag: str) -> list:
        """The kinds of Accept the tag has entries for."""
        directory = os.path.dirname(tag_path(self.root, upstream, repository, tag, "x"))
        try:
            return sorted(name[:-5] for name in os.listdir(directory) if name.endswith(".json"))
        except OSError:
            return []

    def put(self, upstream: str, repository: str, tag: str, kind: str,
            digest: str, media_type: str, checked: float | None = None) -> None:
        """The entry, checked now (`checked` is for BucketTags, written after the fill)."""
        entry = {"digest": digest, "media_type": media_type, "checked": self.clock.time()}
        try:
            write_atomic(tag_path(self.root, upstream, repository, tag, kind), json.dumps(entry).encode())
        except OSError as err:  # the tag is asked upstream again next time
            self.trouble.warn(err)

    def drop(self, upstream: str, repository: str, tag: str) -> None:
        directory = os.path.dirname(tag_path(self.root, upstream, repository, tag, "x"))
        shutil.rmtree(directory, ignore_errors=True)

    def drop_all(self, upstream: str, repository: str) -> int:
        """Every tag of the repository; how many tags there were."""
        directory = os.path.join(repository_dir(self.root, upstream, repository), "_tags")
        try:
            count = len(os.listdir(directory))
        except OSError:
            return 0
        shutil.rmtree(directory, ignore_errors=True)
        return count

    def entry_files(self) -> list:
        """Every entry's file (entries being written included)."""
        found = []
        for directory, _, files in os.walk(os.path.join(self.root, "repos")):
            if os.path.basename(os.path.dirname(directory)) == "_tags":
                found.extend(os.path.join(directory, name) for name in files)
        return found

    def prune(self, exists) -> int:
        """Drop the entries whose manifest is no longer stored; how many."""
        dropped = 0
        for path in self.entry_files():
            try:
                with open(path, encoding="utf-8") as file:
                    digest = json.load(file)["digest"]
                present = DIGEST.match(digest) and exists(digest)
            except (OSError, ValueError, KeyError, TypeError):
                present = os.path.basename(path).startswith(TEMP_PREFIX)  # being written
            if not present:
                remove_quietly(path)
                dropped += 1
        return dropped




class AccessRecords:
    """What the Access rule reads from disk: which objects each repository of
    each upstream holds (links), and when it was last pulled anonymously."""

    def __init__(self, root: str, clock: Clock, trouble: DiskTrouble) -> None:
        self.root = root
        self.clock = clock
        self.trouble = trouble
        self._marking = threading.Lock()  # see mark_public()

    def linked_since(self, upstream: str, repository: str, digest: str) -> float | None:
        """When the object was first linked to the repository, if it is."""
        try:
            return os.stat(link_path(self.root, upstream, repository, digest)).st_mtime
        except OSError:
            return None

    @staticmethod
    def _touch(path: str, now: float) -> None:
        """The link file, made if missing; once more if a purge removed its directory meanwhile."""
        for last in (False, True):
            if os.path.exists(path):
                return
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(path, "ab"):
                    os.utime(path, (now, now))
                return
            except FileNotFoundError:
                if last:
                    raise

    def link(self, upstream: str, repository: str, digests, when: float | None = None) -> None:
        """Link `digests` now (on disk records are written before the client's last byte:
        `when` is for BucketRecords, written after it)."""
        now = self.clock.time()
        try:
            for digest in digests:
                self._touch(link_path(self.root, upstream, repository, digest), now)
        except OSError as err:  # without a link the next hit asks upstream: slower, not wrong
            self.trouble.warn(err)

    def public_since(self, upstream: str, repository: str, fresh: bool = False,
                     needed: float | None = None) -> float | None:
        """When an anonymous pull of the repository last succeeded upstream, if ever
        (read anew each time: `fresh` and `needed` are for BucketRecords)."""
        try:
            return os.stat(public_marker_path(self.root, upstream, repository)).st_mtime
        except OSError:
            return None

    def drop_public(self, upstream: str, repository: str) -> None:
        remove_quietly(public_marker_path(self.root, upstream, repository))

    def forget(self, upstream: str, repository: str) -> list:
        """Drop the repository's links and marker; the digests it linked."""
        directory = os.path.join(repository_dir(self.root, upstream, repository), "_links")
        digests = self._linked_in(directory)
        shutil.rmtree(directory, ignore_errors=True)
        self.drop_public(upstream, repository)
        return digests

    def linked_anywhere(self) -> set:
        """Every digest some repository links."""
        found = set()
        for directory, subdirectories, _ in os.walk(os.path.join(self.root, "repos")):
            if "_links" in subdirectories:
                found.update(self._linked_in(os.path.join(directory, "_links")))
        return found

    @staticmethod
    def _linked_in(directory: str) -> list:
        try:
            return [f"{algorithm}:{name}" for algorithm in os.listdir(directory)
                    for name in os.listdir(os.path.join(directory, algorithm))]
        except OSError:
            return []

    def mark_public(self, upstream: str, repository: str, when: float | None = None) -> None:
        """The marker's time is now, or a moment later if another thread just marked.

        Each record() links, then marks: the last mark must come after every
        link, or an object linked just before it would not be servable
        anonymously.  Two threads (parallel downloads of one pull) could
        otherwise write their times out of order: the time is read and
        written under a lock, and not moved back by up to MARK_SKEW (a marker
        further ahead is a clock stepped back, or another process's skewed
        clock: kept, it would hold the repository open long after).
        """
        path = public_marker_path(self.root, upstream, repository)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with self._marking:
                now, marked = self.clock.time(), self.public_since(upstream, repository) or 0.0
                if now < marked <= now + MARK_SKEW:
                    now = marked  # another thread's mark, a moment later than the time we read
                with open(path, "ab"):
                    os.utime(path, (now, now))
        except OSError as err:
            self.trouble.warn(err)

    def repositories(self) -> int:
        """How many repositories hold links or tags."""
        count = 0
        for _, subdirectories, _ in os.walk(os.path.join(self.root, "repos")):
            count += "_links" in subdirectories or "_tags" in subdirectories
        return count


# Fills: one upstream download per object, followed by every client #########

def fill_key(target: Target, tag_kind: str | None) -> tuple:
    """What one upstream fetch fills: concurrent requests of the same key share it."""
    return (target.route.upstream, target.repository, target.kind, target.reference, tag_kind)


class FillAbandoned(Exception):
    """Every client of a fill left, and finishing it would evict cached content."""


class DigestMismatch(ValueError):
    """An upstream body whose bytes are not the digest they were asked or named for."""


class Fill:
    """One upstream download into a Spool, followed by every client.

    The fill runs in its own thread, so a slow or vanished client neither
    slows nor stops it; clients send what has been written with sendfile.
    The last byte is held back until the digest is verified: a bad body
    ends every client's transfer short, never as a clean 200.
    """

    PENDING, STREAMING, DONE, FAILED, DECLINED = "pending", "streaming", "done", "failed", "declined"

    def __init__(self, key: tuple, identity: str | None, started_at: float) -> None:
        self.key = key
        self.identity = identity     # whose credentials fetched it (None: anonymous)
        self.started_at = started_at  # wall time, as Access compares it with an anonymous pull
        self.cond = threading.Condition()
        self.state = Fill.PENDING
        self.headers = []            # the answer headers every follower sends
        self.length = None           # the Content-Length every follower announces
        self.written = 0
        self.verified = False        # size and digest matched: the last byte may go out
        self.followers = 0           # clients that joined it (for logs and tests)
        self.readers = 0             # clients reading it now
        self.abandoned = False       # its clients left and it stops (see Fills.close_reader)
        self.orphaned = None         # (when, bytes written) its last client left, if it goes on
        self.spool_path = ""         # where the bytes so far are
        self.stored_digest = ""      # once stored, the name late followers open instead
        self.source = "upstream"     # or "bucket" or "peer": only what came from upstream is uploaded
        self.origin = ""             # the peer it came from, if one

    def set_state(self, state: str) -> None:
        with self.cond:
            self.state = state
            self.cond.notify_all()

    def wait_started(self, timeout: float) -> str:
        with self.cond:
            self.cond.wait_for(lambda: self.state != Fill.PENDING, timeout)
            return self.state

    def open_reader(self, store: BlobStore):
        """A file on the bytes so far (close it with Fills.close_reader); None if the fill failed first."""
        with self.cond:
            if self.state not in (Fill.STREAMING, Fill.DONE) or self.abandoned:
                return None
            # stored_digest is set under this lock when the spool takes its name,
            # so one of the two exists, unless the fill has just failed.
            if self.stored_digest:
                opened = store.open(self.stored_digest)
                file = opened[0] if opened else None
            else:
                try:
                    file = open(self.spool_path, "rb", buffering=0)  # no read-ahead of bytes not yet written
                except FileNotFoundError:
                    file = None
            if file is not None:
                self.followers += 1
                self.readers += 1
                self.orphaned = None
            return file

    def wait_beyond(self, position: int, timeout: float) -> tuple:
        """(bytes a client may send, all sent may be, failed) once there is more than `position`.

        The last byte waits for verification, not for the fsync and rename that
        follow it: a request arriving meanwhile waits for those in
        Fills.wait_stored(), so a client that asks again still finds it cached.
        """
        def ready():
            return self.verified or self.state == Fill.FAILED or self.available() > position
        with self.cond:
            self.cond.wait_for(ready, timeout)
            return self.available(), self.verified, self.state == Fill.FAILED and not self.verified

    def available(self) -> int:
        """What a client may have: never the final byte before verification,
        never more than the length it was announced."""
        if self.verified:
            return min(self.written, self.length)
        return max(min(self.written, self.length - 1), 0)

    def wait_finished(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.state in (Fill.DONE, Fill.FAILED, Fill.DECLINED), timeout)


def too_slow_for_an_orphan(fill: Fill) -> bool:
    """A fill nobody waits for, below ORPHAN_MIN_RATE since its grace ended."""
    if fill.orphaned is None:
        return False
    since, written = fill.orphaned
    elapsed = time.monotonic() - since
    return elapsed > ORPHAN_GRACE and fill.written - written < ORPHAN_MIN_RATE * elapsed


class HashInline:
    """A fill's digest, computed in its own thread as the bytes land (small fills)."""

    def __init__(self, spool: Spool, algorithm: str) -> None:
        self.algorithm = algorithm
        self.hasher = hashlib.new(algorithm)

    def landed(self, chunk, written: int) -> None:
        self.hasher.update(chunk)

    def abort(self) -> None:
        pass

    def finish(self) -> str:
        return f"{self.algorithm}:{self.hasher.hexdigest()}"


class HashBeside(threading.Thread):
    """A fill's digest, computed in a thread beside it from what has landed in
    the spool (read back from the page cache).  hashlib lets go of the
    interpreter lock, so on two cores hashing (the costliest step, about
    1.4 GB/s here) runs while the next bytes are received and written,
    instead of between them; the last byte still waits for the digest."""

    def __init__(self, spool: Spool, algorithm: str) -> None:
        super().__init__(daemon=True, name="hash")
        self.spool = spool
        self.algorithm = algorithm
        self.hasher = hashlib.new(algorithm)
        self.cond = threading.Condition()
        self.written = self.hashed = 0
        self.closing = self.aborted = False
        self.error = None            # why it could not hash what was written, if it could not
        self.start()

    def landed(self, chunk, written: int) -> None:
        with self.cond:
            self.written = written
            self.cond.notify()

    def abort(self) -> None:
        with self.cond:
            self.closing = self.aborted = True
            self.cond.notify()
        self.join()

    def finish(self) -> str:
        """The digest of everything written; raises if any of it could not be hashed."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.join()
        if self.error is not None or self.hashed != self.written:
            raise ValueError(f"could not hash what was written: {self.error or 'spool short'}")
        return f"{self.algorithm}:{self.hasher.hexdigest()}"

    def run(self) -> None:
        try:
            self.hash_as_it_lands()
        except Exception as err:  # finish() turns it into a failed fill
            self.error = err

    def hash_as_it_lands(self) -> None:
        buffer = thread_buffer()
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.written > self.hashed or self.closing)
                end, done = self.written, self.closing
            if self.aborted or (done and self.hashed >= end):
                return
            while self.hashed < end and not self.aborted:
                count = os.preadv(self.spool.fd, [buffer[:min(CHUNK_SIZE, end - self.hashed)]], self.hashed)
                if not count:
                    raise ValueError("the spool is shorter than what was written to it")
                self.hasher.update(buffer[:count])
                self.hashed += count


def hashing_for(spool: Spool, algorithm: str, length: int):
    """HashBeside for a large fill, HashInline for a small one, or when no thread can start."""
    if length >= HASH_BESIDE_MIN:
        try:
            return HashBeside(spool, algorithm)
        except RuntimeError:  # "can't start new thread": a task limit (systemd TasksMax)
            pass
    return HashInline(spool, algorithm)


class Fills:
    """The downloads into the BlobStore in progress, one per key, at most MAX_FILLS.

    start() copies an upstream answer of known length into a Spool in a
    thread of its own, hashing as it goes, and puts it in the store once its
    size and digest are right; nothing else ever reaches the store.  Its
    length is reserved in the Budget first: what does not fit is passed
    through instead.  A fill whose clients have all gone goes on only while
    the cache has room for it without evicting anything (finishing it is
    then free, and the client's retry is a hit) and keeps ORPHAN_MIN_RATE;
    otherwise it stops at once.
    """

    def __init__(self, store: BlobStore, budget: Budget, trouble: DiskTrouble, max_fills: int,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.budget = budget
        self.trouble = trouble
        self.max_fills = max_fills
        self.metrics = metrics or Metrics()
        self._changed = threading.Condition()
        self._running = {}            # key -> Fill
        self._storing = {}            # digest -> verified Fill being fsynced and renamed
        self._ended = collections.OrderedDict()  # key or digest -> self.ends when its fill ended stored
        self.ends = 0                 # fills ended stored so far: a request notes it before it looks
        self.on_stored = None         # (digest, media type) -> None: queues the upload to a bucket, if any
        self.on_failed = None         # (fill, digest, error) -> None: a fill from the bucket or a peer failed
        # With a bucket, the bookkeeping (bucket requests) comes after the fill
        # ended rather than holding every client's last byte, or the fill's slot:
        # a slow bucket must not cut cold pulls.  A client's next request
        # meanwhile may ask upstream with a HEAD (the link is not there yet):
        # slower, never wrong.  (A bucket that does not answer fails these at
        # once behind its circuit breaker, so they cannot pile up threads.)
        self.record_late = False

    def begin(self, key: tuple, identity: str | None, now: float, since: int | None = None,
              digest: str | None = None) -> tuple:
        """(fill, True) for the first request of `key`, (its fill, False) for the
        others, (None, False) when MAX_FILLS are running: pass it through.

        (None, True): look again, do not fill.  A fill of `key` (or of
        `digest`, from any repository) ended stored after the caller noted
        `since` = self.ends and looked: the caller's look may have missed it
        (a look at a bucket takes a while).  Nothing but memory is read under
        the lock.  (With a bucket a fill's records may still be on their way:
        a blob found again is then allowed by a HEAD upstream, as any blob
        without its link; a tag whose entry is not written yet fills again,
        since waiting for it would let a slow bucket stall pulls.)
        """
        with self._changed:
            fill = self._running.get(key)
            if fill is not None:
                return fill, False
            if since is not None and (self._ended.get(key, 0) > since
                                      or (digest is not None and self._ended.get(digest, 0) > since)):
                return None, True
            if len(self._running) >= self.max_fills:
                return None, False
            fill = self._running[key] = Fill(key, identity, now)
            return fill, True

    def end(self, fill: Fill, state: str) -> None:
        with self._changed:
            if self._running.get(fill.key) is fill:
                del self._running[fill.key]
            self._changed.notify_all()
        fill.set_state(state)

    def in_flight(self) -> list:
        with self._changed:
            return list(self._running.values())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no fill is running or being stored; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._running and not self._storing, timeout)

    def wait_room(self, timeout: float) -> bool:
        """Wait until fewer than MAX_FILLS run (a prefetch's next blob is then cached); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._running) < self.max_fills, timeout)

    def wait_stored(self, key: tuple, timeout: float) -> None:
        """If `key` was just verified and is being stored, wait until it is stored."""
        fill = self._running.get(key)
        if fill is not None and fill.verified:
            fill.wait_finished(timeout)

    def _remember_ended(self, fill: Fill, digest: str) -> None:
        """A fill ended with its object stored (the caller holds the lock)."""
        self.ends += 1
        for name in (fill.key, digest):
            self._ended[name] = self.ends
            self._ended.move_to_end(name)
        while len(self._ended) > MAX_ENDED_FILLS:
            self._ended.popitem(last=False)

    def wait_digest_stored(self, digest: str, timeout: float) -> None:
        """If `digest` (from any repository or tag) is being stored, wait until it is."""
        fill = self._storing.get(digest)
        if fill is not None:
            fill.wait_finished(timeout)

    def close_reader(self, fill: Fill, file) -> None:
        """A client is done with a fill: the last one gone stops it, unless it fits without eviction."""
        self.store.close(file)
        with fill.cond:
            fill.readers -= 1
            if fill.readers == 0 and not fill.verified and fill.state == Fill.STREAMING:
                fill.abandoned = not self.budget.fits_without_eviction()
                fill.orphaned = (time.monotonic(), fill.written)

    def start(self, fill: Fill, response, digest: str | None, headers: list,
              media_type: str | None, on_verified):
        """Start writing `response` (of known length) into the store in a thread of its own.

        Returns the first client's reader, opened before the thread starts so
        that client always sees its own fill through; None when the answer
        cannot be cached (no room reserved): the caller passes it through.
        """
        length = response.length
        if length is None or empty_for(length, digest):  # passed through: relay() refuses the latter
            return None
        spool = self._reserved_spool(length, digest)
        if spool is None:
            return None
        fill.length, fill.spool_path, fill.headers = length, spool.path, headers
        fill.set_state(Fill.STREAMING)
        reader = fill.open_reader(self.store)
        threading.Thread(target=self._run, daemon=True, name="fill",
                         args=(fill, response, spool, digest, media_type, on_verified)).start()
        return reader

    def _reserved_spool(self, length: int, digest: str | None) -> Spool | None:
        """A Spool with `length` bytes reserved in the budget and on disk; None if either has no room."""
        if not self.budget.reserve(length):
            return None
        spool = None
        try:
            spool = self.store.new_spool(digest)
            spool.reserve(length)
            return spool
        except BaseException as err:
            if spool is not None:
                spool.close()
                spool.discard()
            self.budget.unreserve(length)
            if not isinstance(err, OSError):
                raise
            self.trouble.warn(err)
            return None

    def _run(self, fill: Fill, response, spool: Spool, digest: str | None,
             media_type: str | None, on_verified) -> None:
        state, actual = Fill.FAILED, ""
        try:
            actual = self._copy_verified(fill, response, spool, digest)
            response.release()
            self._release_verified(fill, actual, spool, None if self.record_late else on_verified)
            spool.finish(fill.written)
            self._store(fill, spool, actual, media_type)
            state = Fill.DONE
            self.trouble.cleared()
        except Exception as err:  # nothing is stored; clients not yet verified are cut short
            log.warning("cache fill of %s stopped: %s", digest or "manifest", printable(str(err)))
            if isinstance(err, DigestMismatch):
                self.metrics.add("dockerproxy_cache_verify_failures_total")
            if self.on_failed is not None and not fill.verified:
                self.on_failed(fill, digest, err)
            spool.discard()
            response.close()
        finally:
            spool.close()
            self.budget.unreserve(fill.length)
            late = state == Fill.DONE and self.record_late
            upload = state == Fill.DONE and fill.source == "upstream" and self.on_stored is not None
            with self._changed:
                if state == Fill.DONE:  # stored: a request that looked before finds it now (begin)
                    self._remember_ended(fill, actual)
                if not late:
                    self._storing.pop(actual, None)
            if upload and not late:
                self.on_stored(actual, media_type)  # queued (Uploads): what came from upstream only
            self.end(fill, state)
        if late:  # its slot among MAX_FILLS is free; wait_idle() still waits for this
            self._record(actual, spool, on_verified)
            if upload:  # after its records: an object in the bucket is never one nobody may be served
                self.on_stored(actual, media_type)
            with self._changed:
                self._storing.pop(actual, None)
                self._changed.notify_all()

    def _copy_verified(self, fill: Fill, response, spool: Spool, digest: str | None) -> str:
        """Upstream bytes to the spool, hashed as they land; their digest if all is well."""
        algorithm = digest.partition(":")[0] if digest else "sha256"
        hashing = hashing_for(spool, algorithm, fill.length)
        buffer = memoryview(bytearray(min(FILL_BUFFER, fill.length) or 1))
        try:
            while True:
                count = response.readinto(buffer)
                if not count:
                    break
                spool.write(buffer[:count])
                with fill.cond:
                    fill.written += count
                    fill.cond.notify_all()
                hashing.landed(buffer[:count], fill.written)
                if fill.abandoned or too_slow_for_an_orphan(fill):
                    raise FillAbandoned("every client left, and it has no room without evicting, or trickles")
        except BaseException:
            hashing.abort()
            raise
        actual = hashing.finish()
        if fill.written != fill.length:
            raise ValueError(f"upstream sent {fill.written} of {fill.length} bytes")
        if digest and actual != digest:
            raise DigestMismatch(f"upstream sent bytes of {actual}, not {digest}")
        return actual

    def _release_verified(self, fill: Fill, digest: str, spool: Spool, on_verified) -> None:
        """Verified: note who may see it, then let clients have their last byte.

        The fsync and rename that follow take a while on a busy disk; a request
        for this digest meanwhile waits for them in wait_digest_stored().  The
        bookkeeping goes first, so what a client may ask next is in place
        (it names an object that exists only after the rename, so it is inert until then).
        """
        if on_verified is not None:
            self._record(digest, spool, on_verified)
        with self._changed:
            self._storing[digest] = fill
        with fill.cond:
            fill.verified = True
            fill.cond.notify_all()

    @staticmethod
    def _record(digest: str, spool: Spool, on_verified) -> None:
        try:
            on_verified(digest, spool)
        except Exception:  # bookkeeping only: the object itself is good
            log.exception("cache bookkeeping for %s failed", digest)

    def _store(self, fill: Fill, spool: Spool, digest: str, media_type: str | None) -> None:
        """The verified bytes take their name; followers open that from now on."""
        with fill.cond:
            is_new = self.store.put(spool, digest, media_type)
            fill.stored_digest = digest
        self.budget.stored(fill.written if is_new else 0, 1 if is_new else 0)


# Cache: the stores, the fills, eviction, the operator commands #############

class Budget:
    """The cache's bytes against CACHE_MAX_SIZE: those stored, and those
    reserved by fills in flight.  Fills in flight never reserve more than
    CACHE_MAX_SIZE together, and stored plus reserved bytes never pass
    MAX_SIZE_OVERSHOOT times it; the evictor brings what is stored back
    under the limit (reservations evict nothing: a fill may never finish)."""

    def __init__(self, max_size: int, on_over) -> None:
        self.max_size = max_size      # 0: no limit
        self.on_over = on_over        # called when stored + reserved passes max_size
        self.size = 0                 # bytes stored, as the last sweep counted and fills added
        self.objects = 0              # objects stored, counted the same way
        self.reserved = 0
        self._lock = threading.Lock()

    def reserve(self, length: int) -> bool:
        with self._lock:
            if not self._room_for(length):
                return False
            self.reserved += length
        return True

    def _room_for(self, length: int) -> bool:
        """The limits of reserve() (the caller holds the lock)."""
        return not self.max_size or (self.reserved + length <= self.max_size and self.size + self.reserved
                                     + length <= MAX_SIZE_OVERSHOOT * self.max_size)

    def unreserve(self, length: int | None) -> None:
        with self._lock:
            self.reserved -= length or 0

    def stored(self, added: int, objects: int = 1) -> None:
        with self._lock:
            self.size += added
            self.objects += objects
            over = self.max_size and self.size > self.max_size
        if over:
            self.on_over()

    def counted(self, size: int, objects: int) -> None:
        """A sweep's count of the bytes and objects stored."""
        with self._lock:
            self.size = size
            self.objects = objects

    def fits(self, length: int) -> bool:
        """Whether reserve(length) would succeed now (nothing is reserved)."""
        with self._lock:
            return self._room_for(length)

    def fits_without_eviction(self) -> bool:
        with self._lock:
            return not self.max_size or self.size + self.reserved <= self.max_size


class Cache:
    """The disk cache: a BlobStore, a TagIndex, AccessRecords and the Fills into
    them, kept under CACHE_MAX_SIZE and CACHE_MAX_AGE by an evictor thread."""

    def __init__(self, root: str, max_size: int, max_age: float, clock: Clock | None = None,
                 max_fills: int = 16, metrics: Metrics | None = None, pinned=None, shared=None) -> None:
        self.root = root
        self.max_size = max_size
        self.max_age = max_age
        self.pinned = pinned or (lambda: [])  # -> [(upstream, repository, tag or digest)] never evicted
        self.clock = clock = clock or Clock()
        self.metrics = metrics or Metrics()
        trouble = DiskTrouble()
        self._sweep_now = threading.Event()
        self._sweep_lock = threading.Lock()  # the evictor's sweep and an operator's run one at a time
        self._purged = set()                 # digests a purge unlinked, for the next sweep
        self.budget = Budget(max_size, self._sweep_now.set)
        self.store = BlobStore(root, clock)
        remove_abandoned_temps(root)
        self.shared = shared                 # a SharedStore (CACHE_S3): tags and records live there
        self.tags = shared.tags if shared else TagIndex(root, clock, trouble)
        self.records = shared.records if shared else AccessRecords(root, clock, trouble)
        self.fills = Fills(self.store, self.budget, trouble, max_fills, self.metrics)
        if shared is not None:
            self.fills.on_stored = shared.uploads_for(self.store, max_fills).add
            self.fills.record_late = True

    def tag(self, upstream: str, repository: str, tag: str, kind: str) -> dict | None:
        """A tag's entry, with the media type stored with the manifest's bytes
        (not the one a HEAD claimed); None unless that manifest is stored."""
        entry = self.tags.get(upstream, repository, tag, kind)
        if entry is None:
            return None
        entry["media_type"] = self.media_type(entry["digest"])
        return entry if entry["media_type"] else None

    def media_type(self, digest: str) -> str | None:
        """The media type of a stored manifest, copied from the bucket first
        if only the bucket has it; None if it is not stored."""
        media_type = self.store.media_type(digest)
        if media_type is None and self.shared is not None and not self.store.exists(digest):
            media_type = self.copy_manifest(digest)
        return media_type

    def copy_manifest(self, digest: str) -> str | None:
        """A manifest the bucket holds, checked and stored here (it is small); its media type."""
        found = self.shared.manifest(digest)
        if found is None:
            return None
        data, media_type = found
        if not self.budget.reserve(len(data)):
            return None
        spool = None
        try:
            spool = self.store.new_spool(digest)
            spool.write(data)
            spool.finish(len(data))
            is_new = self.store.put(spool, digest, media_type)
            self.budget.stored(len(data) if is_new else 0, 1 if is_new else 0)
        except OSError as err:
            log.warning("cache: manifest %s from the bucket not stored: %s", digest, err.strerror or err)
            if spool is not None:
                spool.discard()
            return None
        finally:
            if spool is not None:
                spool.close()
            self.budget.unreserve(len(data))
        return media_type

    def tag_entries(self, upstream: str, repository: str, tag: str) -> list:
        entries = (self.tag(upstream, repository, tag, kind) for kind in self.tags.kinds(upstream, repository, tag))
        return [entry for entry in entries if entry]

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no fill is running or being stored, nor uploaded (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        idle = self.fills.wait_idle(timeout)
        if self.shared is not None and self.shared.uploads is not None:
            idle = self.shared.uploads.wait_idle(max(deadline - time.monotonic(), 0.0)) and idle
        return idle

    # Eviction ----------------------------------------------------------------

    def start_evictor(self) -> None:
        threading.Thread(target=self._evict_forever, daemon=True, name="evictor").start()

    def _evict_forever(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception:
                log.exception("cache sweep failed")
            self._sweep_now.wait(SWEEP_INTERVAL)
            self._sweep_now.clear()

    def sweep(self) -> dict:
        """Remove the objects a purge left unlinked everywhere, those unused for
        CACHE_MAX_AGE, then, over CACHE_MAX_SIZE, the least recently used down to
        the low-water mark; never one being read."""
        with self._sweep_lock:
            objects = sorted(self.store.objects(), key=lambda stored: (stored.last_used, stored.size, stored.digest))
            purged = self._unlinked_purged()
            pinned = self.pinned_objects(self.pinned())
            total = sum(stored.size for stored in objects)
            low_water = self.max_size * EVICTION_LOW_WATER if self.max_size and total > self.max_size else None
            now, removed, freed, kept = self.clock.time(), 0, 0, len(objects)
            for stored in objects:  # least recently used first
                expired = self.max_age and now - stored.last_used > self.max_age
                over = low_water is not None and total > low_water
                if not (expired or over or stored.digest in purged) or self.store.in_use(stored.digest):
                    continue
                if stored.digest in pinned and stored.digest not in purged:
                    continue
                self.store.delete(stored.digest)
                total, removed, freed, kept = total - stored.size, removed + 1, freed + stored.size, kept - 1
            self.budget.counted(total, kept)
            self._purged |= {digest for digest in purged if self.store.exists(digest)}  # in use: next time
            dropped = self.tags.prune(self.store.exists)
            # counted before the next sweep may run: whoever sweeps after this one sees its evictions
            self.metrics.add("dockerproxy_cache_evictions_total", (), removed)
        if removed:
            log.info("cache evicted %d objects (%d bytes) and %d tag entries; %d bytes remain",
                     removed, freed, dropped, total)
        return {"removed": removed, "freed_bytes": freed, "tags_dropped": dropped, "size_bytes": total}

    def count(self) -> None:
        """Count what is stored, for CACHE_MAX_SIZE, without evicting anything (the prefetch command)."""
        objects = self.store.objects()
        self.budget.counted(sum(stored.size for stored in objects), len(objects))

    def pinned_objects(self, images: list) -> set:
        """Every stored object of these images, (upstream, repository, tag or
        digest) each: their manifests, what those name, and so on down."""
        pending = []
        for upstream, repository, reference in images:
            if DIGEST.match(reference):
                pending.append(reference)
            else:
                pending += [entry["digest"] for entry in self.tag_entries(upstream, repository, reference)]
        pinned = set()
        while pending:
            digest = pending.pop()
            if digest in pinned or not self.store.exists(digest):
                continue
            pinned.add(digest)
            if self.store.media_type(digest):  # a manifest: what it names is pinned too
                pending += [child.digest for child in manifest_references(self.store.manifest(digest))]
        return pinned

    # Purge -------------------------------------------------------------------

    def purge(self, upstream: str, repository: str, tag: str | None = None) -> dict:
        """The operator's purge: one tag's entries, or all of a repository's, with
        its links and anonymous-pull marker.  The objects it linked that no other
        repository links go at the next sweep; the next pull asks upstream again."""
        if tag:
            known = bool(self.tags.kinds(upstream, repository, tag))
            self.tags.drop(upstream, repository, tag)
            return {"tags_removed": int(known), "objects_unlinked": 0}
        tags = self.tags.drop_all(upstream, repository)
        digests = self.records.forget(upstream, repository)
        with self._sweep_lock:
            self._purged.update(digests[:max(MAX_PURGED - len(self._purged), 0)])
        return {"tags_removed": tags, "objects_unlinked": len(digests)}

    def _unlinked_purged(self) -> set:
        """Of the digests purges unlinked, those no repository links now (the caller holds the lock)."""
        if not self._purged:
            return set()
        candidates, self._purged = self._purged, set()
        return candidates - self.records.linked_anywhere()

    # Operator commands -------------------------------------------------------

    def verify(self) -> dict:
        """Re-hash every object; remove those whose bytes do not match their name."""
        checked = bad = 0
        for stored in self.store.objects():
            checked += 1
            if DIGEST.match(stored.digest) and self.store.digest_of(stored.digest) == stored.digest:
                continue
            log.warning("cache verify: %s does not match its digest: removed",
                        printable(object_path(self.root, stored.digest)))
            self.store.delete(stored.digest)
            bad += 1
        bad += self.store.remove_strays()
        temps = remove_abandoned_temps(self.root)
        return {"checked": checked, "bad_removed": bad, "temporary_files_removed": temps,
                "tags_dropped": self.tags.prune(self.store.exists)}

    def stats(self) -> dict:
        objects = self.store.objects()
        manifests = sum(1 for stored in objects if self.store.media_type(stored.digest) is not None)
        tags = sum(1 for path in self.tags.entry_files() if path.endswith(".json"))
        return {"objects": len(objects), "manifests": manifests, "blobs": len(objects) - manifests,
                "size_bytes": sum(stored.size for stored in objects), "max_size_bytes": self.max_size,
                "max_age_seconds": self.max_age, "tag_entries": tags,
                "repositories": self.records.repositories()}

# Upstream client ###########################################################

def body_framing(method: str, status: int, headers) -> tuple:
    """(framing, length) of an upstream answer's body, as RFC 9112 section 6.3 says.

    framing is "none" (HEAD, 1xx, 204, 304), "length" (Content-Length),
    "chunked", or "close" (the body ends when the connection does).  What
    a proxy must not guess at raises ValueError, which the caller turns into a
    502: a Content-Length with a Transfer-Encoding (a request-smuggling
    shape), another transfer coding than chunked, lengths that disagree, or a
    length no registry object has.
    """
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", 0
    encodings = [coding.strip().lower() for value in headers.get_all("transfer-encoding") or []
                 for coding in value.split(",") if coding.strip()]
    lengths = {length.strip() for value in headers.get_all("content-length") or []
               for length in value.split(",")}
    if encodings and lengths:
        raise ValueError("both Content-Length and Transfer-Encoding")
    if encodings:
        if encodings != ["chunked"]:
            raise ValueError(f"transfer coding {', '.join(encodings)!r}")
        return "chunked", None
    if not lengths:
        return "close", None
    length = lengths.pop()
    if lengths or not re.fullmatch(r"[0-9]{1,16}", length) or int(length) > MAX_UPSTREAM_LENGTH:
        raise ValueError("unusable Content-Length")
    return "length", int(length)


# Cloud metadata services outside the link-local ranges: AWS over IPv6,
# Alibaba Cloud.  (AWS, GCP, Azure and Oracle over IPv4 use 169.254.169.254.)
METADATA_ADDRESSES = frozenset({"fd00:ec2::254", "100.100.100.200"})


def is_link_local(address: str) -> bool:
    """169.254.0.0/16, fe80::/10 and METADATA_ADDRESSES: where cloud metadata services answer."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_link_local or mapped.is_link_local or str(mapped) in METADATA_ADDRESSES


class BrokenBody(http.client.HTTPException):
    """An upstream body whose chunked framing is malformed."""


class HeadWatcher:
    """An answer's reader while http.client parses its head: notes a head that the
    end of the connection cut short (RFC 9112 section 8: then nothing after it is whole)."""

    def __init__(self, fp) -> None:
        self.fp = fp
        self.cut = False

    def readline(self, limit: int = -1) -> bytes:
        line = self.fp.readline(limit)
        self.cut = self.cut or not line.endswith(b"\n")
        return line


class CheckedResponse(http.client.HTTPResponse):
    """http.client's answer, whose head must end with its blank line, and
    whose interim answers (102 Processing, 103 Early Hints) are skipped:
    http.client skips only 100 and would take a 103 for the answer itself."""

    def begin(self) -> None:
        real = self.fp
        self.fp = watcher = HeadWatcher(real)
        try:
            for _ in range(MAX_INTERIM_ANSWERS):
                super().begin()
                if self.status == 101:
                    raise http.client.HTTPException("101 Switching Protocols, never asked for")
                if not 100 <= self.status < 200:
                    break
                self.headers = None  # an interim answer: the final one follows
            else:
                raise http.client.HTTPException("too many interim answers")
        finally:
            self.fp = real
        if watcher.cut:
            raise http.client.IncompleteRead(b"")


class UpstreamResponse:
    """An upstream answer: status and headers parsed by http.client, the body
    read here, framed as body_framing() says.

    readinto() passes on what has arrived (one recv at most), so a slow but
    live upstream is never mistaken for a silent one; `complete` says whether
    the body ended where its framing says it ends.  The connection goes back
    to the pool only after a complete body with nothing after it.
    """

    def __init__(self, response: http.client.HTTPResponse, connection, pool, url: str, method: str,
                 purpose: tuple = ("-", "")) -> None:
        self.response = response
        self.status = response.status
        self.headers = response.headers
        self.url = url
        self.method = method
        self._connection = connection
        self._pool = pool
        self.framing, self.length = body_framing(method, response.status, response.headers)
        self._left = self.length      # bytes left of the length, or of the current chunk
        self._chunk_ended = False     # a chunk's data was read: its CRLF comes next
        self._buffered = True         # http.client's reader may hold body bytes read with the head
        self.complete = self.framing == "none" or self.length == 0
        # (route name, "blob", "manifest" or ""): what the metrics count its bytes as;
        # an error's or a redirect's body is no object pulled
        self.purpose = purpose if 200 <= self.status < 300 else (purpose[0], "")
        self._metrics = pool.metrics if pool is not None else Metrics()  # no pool: a test's answer
        self._failed = self.status >= 500 or self.status == 429  # counted by upstream_answer()

    def readinto(self, buffer) -> int:
        """What has arrived, at most len(buffer) bytes; 0 at the end, or where the body broke off."""
        fp = self.response.fp
        if self.complete or fp is None:
            return 0
        try:
            count = self._read_body(fp, buffer)
        except (OSError, http.client.HTTPException) as err:
            self._count_failure(upstream_error_kind(err))
            raise
        if count:
            self._metrics.upstream_bytes(*self.purpose, count)
        elif not self.complete:
            self._count_failure("reset")  # ended before its framing said it would
        return count

    def _read_body(self, fp, buffer) -> int:
        if self.framing == "chunked":
            return self._read_chunked(fp, buffer)
        view = buffer if self._left is None else buffer[:min(len(buffer), self._left)]
        count = self._read_arrived(fp, view)
        if self._left is not None:
            self._left -= count
            self.complete = self._left == 0
        elif not count:
            self.complete = True  # close-delimited: the close is the end
        return count

    def _count_failure(self, kind: str) -> None:
        if not self._failed:
            self._failed = True
            self._metrics.upstream_failed(self.purpose[0], kind)

    def _read_chunked(self, fp, buffer) -> int:
        if not self._left:
            self._buffered = True  # reading a line may read past it
            if self._chunk_ended and fp.readline(3) not in (b"\r\n", b"\n"):
                raise BrokenBody("chunk data not followed by CRLF")
            self._left, self._chunk_ended = self._chunk_size(fp), False
            if self._left == 0:
                self._read_trailers(fp)
                self.complete = True
                return 0
        count = self._read_arrived(fp, buffer[:min(len(buffer), self._left)])
        if count:
            self._left -= count
            self._chunk_ended = self._left == 0
        return count

    def _read_arrived(self, fp, view) -> int:
        """Bytes that have arrived, into view: those the reader holds first, with no
        read (its readinto1 would copy them and then wait on the socket for the
        rest), then, once it holds none, one recv straight into view."""
        if self._buffered:
            data = fp.read1(len(view))
            view[:len(data)] = data
            self._buffered = len(data) == len(view)  # fewer than asked: it holds none now
            return len(data)
        return fp.readinto1(view)

    def _chunk_size(self, fp) -> int:
        self._buffered = True  # reading a line may read past it
        line = fp.readline(MAX_CHUNK_LINE + 1)
        size = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size):
            raise BrokenBody("malformed chunk size")
        return int(size, 16)

    @staticmethod
    def _read_trailers(fp) -> None:
        for _ in range(MAX_TRAILER_LINES):
            line = fp.readline(MAX_CHUNK_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return
            if not line.endswith(b"\n"):
                break
        raise BrokenBody("malformed or endless trailers")

    def read_small(self, limit: int = MAX_SMALL_BODY) -> bytes:
        """A body known to be small (JSON errors, tokens, redirects)."""
        data, buffer = bytearray(), thread_buffer()
        while len(data) <= limit:
            try:
                count = self.readinto(buffer[:limit + 1 - len(data)])
            except socket.timeout:  # not the client's timeout: the client is owed an answer
                self.close()
                raise UpstreamTimeout(f"upstream {redacted_url(self.url)} stalled in a small answer") from None
            except (OSError, http.client.HTTPException) as err:
                self.close()
                raise UpstreamUnavailable(f"upstream {redacted_url(self.url)} broke off: "
                                          f"{err.__class__.__name__}") from None
            if not count:
                return bytes(data)
            data += buffer[:count]
        self.close()
        raise UpstreamUnavailable(f"upstream answer larger than {limit} bytes")

    def consume(self, limit: int = MAX_SMALL_BODY) -> bytes:
        """A small body read to its end, and the connection given back."""
        body = self.read_small(limit)
        self.release()
        return body

    def release(self) -> None:
        """Reuse the connection if the body was read to its end and nothing
        follows it (more bytes would be read as the next answer), else close it."""
        if self._connection is None:
            return
        if self.complete and not self.response.will_close and nothing_to_read(self._connection.sock):
            self.response.close()  # http.client's side: this answer is done, the next may come
            self._pool.put_back(self._connection)
        else:
            self._connection.close()
        self._connection = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def nothing_to_read(sock) -> bool:
    """No byte (nor the end) waiting on an idle connection: it may carry the next request."""
    if sock is None:
        return False
    pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted
    if pending is not None and pending():
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


class Upstreams:
    """HTTP/1.1 client for the upstreams: keep-alive pools, timeouts, redirects."""

    def __init__(self, connect_timeout: float, read_timeout: float, configured_hosts=(),
                 clock: Clock | None = None, metrics: Metrics | None = None,
                 max_requests: int = 100000, watched=()) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.configured_hosts = frozenset(configured_hosts)  # may be link-local: the operator chose them
        self.clock = clock or Clock()
        self.metrics = metrics or Metrics()
        self.slots = UpstreamSlots(max_requests, connect_timeout)
        self.breakers = CircuitBreakers(watched, self.clock)   # the route table's upstreams
        self._tls = None
        self._idle = {}               # (scheme, host, port) -> [(connection, idle since)], newest last
        self._lock = threading.Lock()

    def _new_connection(self, scheme: str, host: str, port: int | None):
        if scheme == "https":
            if self._tls is None:  # loaded at first use: 2 MiB less for all-http setups
                self._tls = ssl.create_default_context()
            connection = http.client.HTTPSConnection(
                host, port, timeout=self.connect_timeout, context=self._tls)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
        connection.response_class = CheckedResponse
        connection.connect()
        if host not in self.configured_hosts and is_link_local(connection.sock.getpeername()[0]):
            # An upstream's redirect or realm must not reach a metadata service:
            # refused after connecting (whatever DNS said), before a byte is sent.
            connection.close()
            raise UpstreamUnavailable(f"refused link-local address of {host}")
        # Connecting may wait CONNECT_TIMEOUT; after that only silence counts,
        # never the length of the whole transfer.
        connection.sock.settimeout(self.read_timeout)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.pool_key = (scheme, host, port)
        return connection

    def _idle_connection(self, key: tuple):
        """The newest idle connection to `key` that is still usable."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    self._idle.pop(key, None)
                    return None
                connection, since = idle.pop()
            if self.clock.monotonic() - since < IDLE_CONNECTION_TTL and nothing_to_read(connection.sock):
                return connection
            connection.close()  # the server closed it, or sent what nobody asked for

    def idle_count(self) -> int:
        """Connections waiting in the pool for their next request."""
        with self._lock:
            return sum(len(idle) for idle in self._idle.values())

    def put_back(self, connection) -> None:
        now, closing = self.clock.monotonic(), []
        with self._lock:
            idle = self._idle.setdefault(connection.pool_key, [])
            if len(idle) < IDLE_CONNECTIONS_PER_HOST:
                idle.append((connection, now))
                connection = None
            closing = self._expire_idle(now)
        for stale in closing + ([connection] if connection else []):
            stale.close()

    def _expire_idle(self, now: float) -> list:
        """Idle connections past IDLE_CONNECTION_TTL, and the oldest beyond
        MAX_IDLE_CONNECTIONS, out of the pool (for closing outside the lock)."""
        entries = sorted(((since, key, connection) for key, idle in self._idle.items()
                          for connection, since in idle), key=lambda entry: entry[0])
        expired = [entry for entry in entries if now - entry[0] >= IDLE_CONNECTION_TTL]
        expired += entries[len(expired):max(len(entries) - MAX_IDLE_CONNECTIONS, len(expired))]
        for since, key, connection in expired:
            self._idle[key].remove((connection, since))
            if not self._idle[key]:
                del self._idle[key]
        return [connection for _, _, connection in expired]

    def send(self, method: str, url: str, headers: dict, body: bytes | None = None,
             purpose: tuple = ("-", "")) -> UpstreamResponse:
        """One request, one answer, within the host's MAX_UPSTREAM_REQUESTS and
        unless its circuit is open; a stale pooled connection is retried once.
        `purpose` is what the metrics count it as: (route name, object type or "").

        A slot is held until the answer's head arrives, not through its body: a
        client reading slowly must not hold the host's slots (and lock everyone
        else out), and a request never needs two slots of a host at once (a
        realm on the host of the 401 in hand)."""
        parts = urllib.parse.urlsplit(url)
        try:
            key = (parts.scheme, parts.hostname, parts.port)
        except ValueError:
            raise UpstreamUnavailable(f"malformed upstream URL {redacted_url(url)}") from None
        origin = f"{parts.scheme}://{parts.netloc}"
        open_for = self.breakers.open_for(origin)
        if open_for:
            self.metrics.add("dockerproxy_upstream_held_back_total", (purpose[0], "circuit"))
            raise UpstreamHeldBack(503, "UNAVAILABLE", f"upstream {parts.netloc} keeps failing; "
                                   f"not asked again for {open_for:.0f}s", open_for, "circuit")
        try:
            slot = self.slots.take(parts.netloc)
        except UpstreamHeldBack:
            self.metrics.add("dockerproxy_upstream_held_back_total", (purpose[0], "busy"))
            raise
        try:
            return self._send(key, origin, method, url, headers, body, purpose)
        finally:
            slot.release()  # the answer's head is here: its body is MAX_FILLS' and MAX_CONNECTIONS' to bound

    def _send(self, key: tuple, origin: str, method: str, url: str, headers: dict, body: bytes | None,
              purpose: tuple) -> UpstreamResponse:
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection = self._idle_connection(key)
        try:
            if connection is not None:
                try:
                    response = self._exchange(connection, method, url, target, headers, body, purpose)
                    self.breakers.succeeded(origin)
                    return response
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    connection.close()  # the server closed it while idle: reconnect
            connection = self._new_connection(*key)
            response = self._exchange(connection, method, url, target, headers, body, purpose)
            self.breakers.succeeded(origin)
            return response
        except socket.timeout:
            self.metrics.upstream_failed(purpose[0], "timeout")
            self.breakers.failed(origin)
            raise UpstreamTimeout(f"upstream {parts.netloc} did not answer in time") from None
        except (OSError, http.client.HTTPException, ValueError) as err:  # ValueError: IDNA, bad header
            self.metrics.upstream_failed(purpose[0], upstream_error_kind(err))
            self.breakers.failed(origin)
            raise UpstreamUnavailable(f"upstream {parts.netloc} unreachable: {err.__class__.__name__}") from None
        except UpstreamUnavailable:  # a link-local address refused
            self.metrics.upstream_failed(purpose[0], "other")
            raise

    def _exchange(self, connection, method, url, target, headers, body, purpose) -> UpstreamResponse:
        started = time.monotonic()
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        log.debug("upstream %s %s -> %d", method, redacted_url(url), response.status)
        self.metrics.upstream_answer(purpose[0], method, response.status, time.monotonic() - started,
                                     response.headers)
        try:
            return UpstreamResponse(response, connection, self, url, method, purpose)
        except ValueError as err:  # framing we must not guess at
            connection.close()  # send() counts it ("other")
            raise UpstreamUnavailable(f"upstream {urllib.parse.urlsplit(url).netloc}: {err}") from None

    def fetch(self, method: str, url: str, headers: dict, body: bytes | None = None,
              purpose: tuple = ("-", "")) -> UpstreamResponse:
        """send(), following redirects the way a registry client must.

        Authorization never goes to another host (S3 and R2 refuse it with
        400), Range and Accept go everywhere, https never downgrades to http.
        """
        for _ in range(MAX_REDIRECTS + 1):
            response = self.send(method, url, headers, body, purpose)
            location = response.headers.get("location")
            if response.status not in REDIRECT_STATUSES or not location:
                return response
            response.consume()
            try:
                next_url = checked_redirect(url, location)
            except UpstreamUnavailable:
                self.metrics.upstream_failed(purpose[0], "other")
                raise
            if not same_origin(url, next_url):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if response.status == 303:
                method, body = ("HEAD" if method == "HEAD" else "GET"), None
            log.debug("redirect %d %s -> %s", response.status, redacted_url(url), redacted_url(next_url))
            url = next_url
        self.metrics.upstream_failed(purpose[0], "other")
        raise UpstreamUnavailable(f"more than {MAX_REDIRECTS} redirects from upstream")


class Challenges:
    """Each route's upstream realm and service, remembered for CHALLENGE_TTL."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._known = {}
        self._lock = threading.Lock()

    def remember(self, route: Route, header: str) -> tuple:
        """Parse a challenge, and keep it for the route if it is usable: one
        repository's broken 401 must not spoil /v2/auth for all the others."""
        scheme, params = parse_challenge(header)
        try:
            usable = scheme != "bearer" or checked_realm(route, params)
        except UpstreamUnavailable:
            usable = False
        if usable:
            with self._lock:
                self._known[route.name] = (self.clock.monotonic() + CHALLENGE_TTL, scheme, params)
        return scheme, params

    def get(self, route: Route, any_age: bool = False) -> tuple | None:
        with self._lock:
            known = self._known.get(route.name)
        if known and (any_age or known[0] > self.clock.monotonic()):
            return known[1], known[2]
        return None


class Tokens:
    """Upstream tokens the proxy fetched itself: with its own account, per
    (route, repository), and anonymous ones for registries an upstream
    redirected to, per (host, scope).  Each is kept until TOKEN_RENEW_MARGIN
    before it expires; a refusal ("") is remembered for REFUSED_TOKEN_TTL, so
    a client asking again and again does not make the proxy ask again."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._tokens = {}
        self._lock = threading.Lock()

    def get(self, key: tuple) -> str | None:
        """The token, "" for a recent refusal, None if there is none to use."""
        with self._lock:
            token, renew_at = self._tokens.get(key, (None, 0.0))
        return token if self.clock.monotonic() < renew_at else None

    def forget(self, key: tuple) -> None:
        with self._lock:
            self._tokens.pop(key, None)

    def put(self, key: tuple, token: str, expires_in: float) -> None:
        with self._lock:
            if len(self._tokens) >= MAX_PROXY_TOKENS:
                self._tokens.clear()  # bounded; each is fetched again when next needed
            lifetime = expires_in - TOKEN_RENEW_MARGIN if token else REFUSED_TOKEN_TTL
            self._tokens[key] = (token, self.clock.monotonic() + lifetime)


def checked_realm(route: Route, params: dict) -> tuple:
    """(realm, service) of a challenge, refusing a realm we must not call."""
    realm = params.get("realm", "")
    scheme = urllib.parse.urlsplit(realm).scheme
    if scheme not in ("http", "https") or (route.upstream.startswith("https:") and scheme == "http"):
        raise UpstreamUnavailable(f"upstream of route {route.name} names an unusable realm")
    return realm, params.get("service", "")


def realm_url(realm: str, fields: list) -> str:
    return realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(fields)


def path_scope(path: str) -> str:
    """The pull scope of a registry API path ("/v2/a/b/blobs/..." -> "repository:a/b:pull")."""
    match = re.match(r"/v2/(.+?)/(?:manifests|blobs|tags|referrers)/", path)
    return f"repository:{match.group(1)}:pull" if match else ""


def is_loopback_host(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class UpstreamAuth:
    """Tokens the proxy fetches for itself, and the challenges upstreams send.

    Credentials go only where they are meant to go.  The proxy's account on a
    route (UPSTREAM_<ROUTE>_USERNAME, or an auth-file entry for that host)
    goes to the route's upstream, and to a token realm on another host only
    if the upstream named it over https or the auth file has an entry for
    the realm's host.  A registry that an upstream redirects to and that
    asks for a token (registry.k8s.io to Artifact Registry, lscr.io to
    ghcr.io) gets one anonymous request at its own realm (https, unless the
    target is http on a loopback or configured host); never a client's
    credentials, and the proxy's account only where that host is itself a
    route's upstream with it (where anonymous clients could use it anyway:
    anywhere else, an upstream could redirect to what only the account may see).
    """

    def __init__(self, upstreams: Upstreams, clock: Clock, config: Config) -> None:
        self.upstreams = upstreams
        self.challenges = Challenges(clock)
        self.tokens = Tokens(clock)
        self.account_hosts = {split_host(host) for host in config.accounts}  # named by the auth file
        self.route_accounts = {urllib.parse.urlsplit(route.upstream).netloc: route.credentials
                               for route in config.routes if route.credentials}
        self.trusted_hosts = frozenset(configured_hosts(config))  # the operator's upstreams

    def challenge(self, route: Route) -> tuple | None:
        """The route's (scheme, params), asked of its /v2/ once an hour; None: no auth."""
        known = self.challenges.get(route)
        if known:
            return known if known[0] else None
        response = self.upstreams.fetch("GET", route.upstream + "/v2/", {}, purpose=(route.name, ""))
        response.consume()
        own = response.status == 401 and same_origin(response.url, route.upstream)
        header = response.headers.get("www-authenticate", "") if own else ""
        scheme, params = self.challenges.remember(route, header)  # "" remembers "no auth"
        return (scheme, params) if scheme else None

    def forget_account_token(self, route: Route, repository: str) -> None:
        """Upstream refused the proxy's token (revoked, expired early): fetch a new one next time."""
        self.tokens.forget(("account", route.name, repository))

    def authorization(self, route: Route, repository: str) -> str | None:
        """An Authorization header for the proxy's own account on `route`, if it has one."""
        challenge = self.challenge(route) if route.credentials else None
        if challenge is None:
            return None
        if challenge[0] != "bearer":
            return route.credentials.basic()
        key = ("account", route.name, repository)
        token = self.tokens.get(key)
        if token is None:
            token = self.account_token(route, challenge[1], repository)
            self.tokens.put(key, *token)
            token = token[0]
        return token or None

    def anonymous_authorization(self, route: Route, repository: str) -> str | None:
        """An anonymous token for `repository` (a peer's request brings none:
        the owner pulls as an anonymous client would)."""
        challenge = self.challenge(route)
        if challenge is None or challenge[0] != "bearer":
            return None
        key = ("anonymous", route.name, repository)
        token = self.tokens.get(key)
        if token is None:
            realm, service = checked_realm(route, challenge[1])
            token, expires_in = self.request_token(realm, service, f"repository:{repository}:pull", None, route.name)
            self.tokens.put(key, token, expires_in)
        return token or None

    def account_token(self, route: Route, params: dict, repository: str) -> tuple:
        """("Bearer ...", lifetime) from the route's realm with the proxy's account; ("", 0) if refused."""
        realm, service = checked_realm(route, params)
        upstream = urllib.parse.urlsplit(route.upstream)
        realm_host = urllib.parse.urlsplit(realm).hostname
        if realm_host != upstream.hostname and upstream.scheme != "https" and realm_host not in self.account_hosts:
            log.warning("route %s: its realm is on another host, named over http: "
                        "the proxy's credentials are not sent there", route.name)
            return "", 0.0
        scope = f"repository:{repository}:pull"
        token, expires_in = self.request_token(realm, service, scope, route.credentials, route.name)
        if token:
            log.debug("proxy token for %s on route %s, %d s", repository, route.name, expires_in)
        else:
            log.warning("route %s: the proxy's credentials got no token", route.name)
        return token, expires_in

    def retry_at_redirect_target(self, response: UpstreamResponse, method: str,
                                 headers: dict) -> UpstreamResponse:
        """A registry the upstream redirected to asks for a token: one more try with an anonymous one."""
        scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
        token = self.target_token(response.url, params, response.purpose[0]) if scheme == "bearer" else None
        if not token:
            return response
        url = response.url
        response.consume()
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return self.upstreams.fetch(method, url, {**headers, "authorization": token}, purpose=response.purpose)

    def target_token(self, url: str, params: dict, route_name: str = "-") -> str | None:
        """An anonymous token (or the auth file's, for that host) from a redirect target's realm."""
        target, realm = urllib.parse.urlsplit(url), params.get("realm", "")
        realm_scheme = urllib.parse.urlsplit(realm).scheme
        trusted_http = target.scheme == "http" and (
            is_loopback_host(target.hostname) or target.hostname in self.trusted_hosts)
        if realm_scheme != "https" and not (realm_scheme == "http" and trusted_http):
            log.warning("refused the realm %s of %s", redacted_url(realm) if realm_scheme else "(none)",
                        target.netloc)
            return None
        scope = params.get("scope") or path_scope(target.path)
        key = ("target", target.netloc, scope)
        token = self.tokens.get(key)
        if token is None:
            account = self.route_accounts.get(target.netloc.lower())
            token, expires_in = self.request_token(realm, params.get("service", ""), scope, account, route_name)
            self.tokens.put(key, token, expires_in)
        return token or None

    def request_token(self, realm: str, service: str, scope: str, account: Credentials | None,
                      route_name: str) -> tuple:
        """("Bearer ...", lifetime) from a realm, ("", 0) if it gave none."""
        fields = [(name, value) for name, value in (("service", service), ("scope", scope)) if value]
        headers = {"authorization": account.basic()} if account else {}
        response = self.upstreams.fetch("GET", realm_url(realm, fields), headers, purpose=(route_name, ""))
        body = response.consume()
        try:
            answer = json.loads(body) if response.status == 200 else {}
            token = answer.get("token") or answer.get("access_token")
            expires_in = float(answer.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError, OverflowError):
            token = None
        if not isinstance(token, str) or not TOKEN.match(token):
            return "", 0.0  # none, or not one that may go into a header
        return f"Bearer {token}", min(max(expires_in, 0.0), MAX_TOKEN_LIFETIME)


# Shared cache: an S3 bucket, and peers that fill for each other ############
#
# With CACHE_S3, blobs, manifests, tag entries and the Access records live in
# one bucket that every instance reads, and CACHE_DIR holds fills in progress
# and a hot copy of recent objects.  With PEERS, a miss for a blob is filled
# by one instance for the whole cluster (its owner by rendezvous hashing):
# the others ask it instead of upstream.

# S3 requests at once per instance (uploads aside: one per fill).
MAX_S3_REQUESTS = 64

# A listing page: S3 sends at most 1000 keys, each a few hundred bytes of XML
# (a page parses to about 40 times its size: 1 MiB of nested elements, 40 MiB).
S3_LIST_PAGE = 1000
MAX_S3_LISTING = 1024 * 1024

# Keys one listing reads at most: a purge's or a count's (a repository's
# records), and the sweep's (MAX_SWEPT_OBJECTS objects, about 150 bytes each
# in memory: a 50 TB bucket of 50 MB layers); more is a store that never ends.
MAX_LISTED_KEYS = 1_000_000
MAX_SWEPT_OBJECTS = 1_000_000

# An S3 answer's XML is read a piece at a time and given up beyond this
# nesting or this many elements: a listing page of 1000 keys has 4 levels
# and about 8,000 elements; a tree of nested elements costs 250 bytes each.
XML_FEED = 16 * 1024
MAX_XML_DEPTH = 16
MAX_XML_ELEMENTS = 20_000

# Pages of unfinished multipart uploads read at most (1000 each).
MAX_UPLOAD_PAGES = 100

# An object from this size is uploaded in parts of PART_SIZE (more when it
# would take more than MAX_PARTS, S3's limit): a failed part is the only
# part sent again.  Below it, one PUT whose payload hash is the digest itself
# (no pass to hash parts; bench/s3, 256 MiB into SeaweedFS: 1.72 s in one PUT,
# 3.05 s in eight parts), far below S3's 5 GiB limit for one PUT.
MULTIPART_THRESHOLD = 512 * 1024 * 1024
PART_SIZE = 32 * 1024 * 1024
MAX_PARTS = 10_000

# A multipart upload older than this is no live peer's (a part takes
# seconds): the next start-up of any instance aborts it.
STALE_UPLOAD_AGE = 3600.0

# An upload the store refuses as busy (503 SlowDown, 500) or does not
# answer is tried this many times in all, after 1 s, then 2 s.
UPLOAD_ATTEMPTS = 3
UPLOAD_RETRY_DELAY = 1.0

# Uploads waiting for a worker at most: each a digest, a few hundred bytes.
MAX_QUEUED_UPLOADS = 10_000

# Uploads the journal keeps at most (a bucket down for a day of fills).
MAX_JOURNALED_UPLOADS = 10_000
UPLOAD_JOURNAL = "s3-uploads"

# How long a digest found in the bucket is believed to be there without
# asking again: a sweep removes only what nobody used for a long time.
BUCKET_SEEN_TTL = 60.0

# How long an anonymous-pull mark read from the bucket is believed: a
# repository another instance saw turn private closes here within this.
PUBLIC_MARK_TTL = 5.0

# mark_public() serialises the marks of one repository (each a bucket round
# trip): repositories share these locks by hash, so parallel fills of
# different images rarely wait for each other.
MARK_LOCKS = 64

# A tag entry this instance wrote is not written again, naming the same
# manifest, within this many seconds (a burst of HEADs of an uncached tag),
# nor half MANIFEST_TTL when that is shorter: a revalidated entry must be
# fresh again for the next request.
TAG_REWRITE_INTERVAL = 30.0

# A tag entry is a small JSON document: a larger one is not ours.
MAX_TAG_ENTRY = 4096

# An object's last use goes to the bucket at most once per this per
# instance, and at most MAX_PENDING_USES wait for the next write.
USE_MARK_INTERVAL = 3600.0
USE_FLUSH_INTERVAL = 60.0
MAX_PENDING_USES = 100_000

# Peer requests: the header carrying the proof, how far a peer's clock may
# be off, how long to wait for a peer to connect (a live one answers in
# milliseconds: a silent one is down), and how long a peer that did not
# answer is passed over.
PEER_HEADER = "X-Dockerproxy-Peer"
PEER_SKEW = 60.0
PEER_CONNECT_TIMEOUT = 2.0
PEER_RETRY = 30.0
MIN_PEER_SECRET = 16

# Nonces of peer proofs remembered (each 2 x PEER_SKEW), at most: one a miss
# of an asker, which a client can make many of.  Beyond, the oldest are
# forgotten and no proof dated at or before them is taken (Peers._take_nonce).
MAX_PEER_NONCES = 100_000


# The pure parts: signatures, keys, listings.
#
# AWS Signature Version 4, as the S3 documentation describes it ("Authenticating
# Requests (AWS Signature Version 4)"): a canonical form of the request, hashed
# into a string to sign, signed with a key derived from the secret for one day,
# region and service.  tests/test_s3_pure.py checks it against AWS's own worked
# examples.

SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

class S3Credentials(collections.namedtuple("S3Credentials", "access_key secret_key session_token",
                                           defaults=("",))):
    """An access key, its secret and an optional session token; the repr shows none of the secrets."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"S3Credentials(access_key={self.access_key[:4]}..., secret_key=***)"


def uri_encode(text: str, keep_slash: bool = True) -> str:
    """RFC 3986 percent-encoding of everything but the unreserved characters (and / in a path)."""
    return urllib.parse.quote(text, safe="-_.~/" if keep_slash else "-_.~")


def canonical_query(query) -> str:
    """(name, value) pairs encoded and sorted, as signed and as sent."""
    pairs = sorted((uri_encode(name, False), uri_encode(value, False)) for name, value in query)
    return "&".join(f"{name}={value}" for name, value in pairs)


def sigv4_canonical_request(method: str, path: str, query, headers: dict, payload_hash: str) -> str:
    """The canonical request: `path` as sent (S3 encodes keys once and never normalises them)."""
    names = sorted(headers)
    lines = "".join(f"{name}:{' '.join(str(headers[name]).split())}\n" for name in names)
    return "\n".join((method, path, canonical_query(query), lines, ";".join(names), payload_hash))


def sigv4_string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    digest = hashlib.sha256(canonical_request.encode()).hexdigest()
    return "\n".join((SIGV4_ALGORITHM, amz_date, scope, digest))


def sigv4_signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sigv4_signature(credentials: S3Credentials, region: str, service: str, amz_date: str,
                    canonical_request: str) -> tuple:
    """(scope, hex signature) of a canonical request."""
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    key = sigv4_signing_key(credentials.secret_key, amz_date[:8], region, service)
    text = sigv4_string_to_sign(amz_date, scope, canonical_request)
    return scope, hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sigv4_authorization(method: str, path: str, query, headers: dict, payload_hash: str,
                        credentials: S3Credentials, region: str, amz_date: str, service: str = "s3") -> str:
    """The Authorization header of a request whose `headers` (lower-case names,
    host and x-amz-date among them) are all signed."""
    canonical = sigv4_canonical_request(method, path, query, headers, payload_hash)
    scope, signature = sigv4_signature(credentials, region, service, amz_date, canonical)
    return (f"{SIGV4_ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(sorted(headers))}, Signature={signature}")


def sigv4_presigned_query(method: str, host: str, path: str, credentials: S3Credentials, region: str,
                          amz_date: str, expires: int, service: str = "s3") -> list:
    """The query of a presigned URL (only host signed, payload unsigned), X-Amz-Signature last."""
    query = [("X-Amz-Algorithm", SIGV4_ALGORITHM),
             ("X-Amz-Credential", f"{credentials.access_key}/{amz_date[:8]}/{region}/{service}/aws4_request"),
             ("X-Amz-Date", amz_date), ("X-Amz-Expires", str(int(expires))), ("X-Amz-SignedHeaders", "host")]
    if credentials.session_token:
        query.append(("X-Amz-Security-Token", credentials.session_token))
    canonical = sigv4_canonical_request(method, path, query, {"host": host}, UNSIGNED_PAYLOAD)
    _, signature = sigv4_signature(credentials, region, service, amz_date, canonical)
    return query + [("X-Amz-Signature", signature)]


def amz_date(when: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))


# Where the bucket keeps things.  Blobs and manifests lie where distribution's
# S3 driver puts them, so its tools can read them; the proxy's own records
# (links, tag entries, anonymous-pull marks, last use) lie under dockerproxy/.

def blob_key(prefix: str, digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"{prefix}docker/registry/v2/blobs/{algorithm}/{hexdigest[:2]}/{hexdigest}/data"


def digest_of_blob_key(prefix: str, key: str) -> str | None:
    """The digest a key of blob_key() names; None for any other key."""
    parts = key[len(prefix):].split("/") if key.startswith(prefix) else []
    if len(parts) != 8 or parts[:4] != ["docker", "registry", "v2", "blobs"] or parts[7] != "data":
        return None
    digest = f"{parts[4]}:{parts[6]}"
    return digest if DIGEST.match(digest) and parts[5] == parts[6][:2] else None


def record_key(prefix: str, upstream: str, repository: str, *rest: str) -> str:
    """A repository's record: the upstream's host:port in the key, as on disk."""
    netloc = urllib.parse.urlsplit(upstream).netloc
    return "/".join((f"{prefix}dockerproxy/repos/{netloc}/{repository}",) + rest)


def link_key(prefix: str, upstream: str, repository: str, digest: str) -> str:
    return record_key(prefix, upstream, repository, "_links", *digest.split(":", 1))


def used_key(prefix: str, digest: str) -> str:
    """An empty object whose time is an object's last use (written at most once an hour)."""
    return f"{prefix}dockerproxy/used/{digest.replace(':', '/', 1)}"


def digest_of_used_key(prefix: str, key: str) -> str | None:
    algorithm, _, hexdigest = key[len(f"{prefix}dockerproxy/used/"):].partition("/")
    digest = f"{algorithm}:{hexdigest}"
    return digest if key.startswith(f"{prefix}dockerproxy/used/") and DIGEST.match(digest) else None


def xml_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def xml_children(element, name: str) -> list:
    """The children named `name`, whatever their namespace."""
    return [child for child in element if child.tag.rpartition("}")[2] == name]


def xml_text(element, name: str) -> str:
    found = xml_children(element, name)
    return (found[0].text or "") if found else ""


def parse_xml(body: bytes):
    """An S3 answer's XML document; ValueError if it is not one (no DTD: no entity expansion).
    Whitespace around it is dropped: S3 (and MinIO) send some ahead of a slow
    CompleteMultipartUpload's answer to keep the connection alive."""
    import xml.etree.ElementTree  # here: only a bucket's answers need it (1 MiB less without one)
    body = body.strip()
    if b"<!DOCTYPE" in body[:1024].upper() or b"<!ENTITY" in body.upper():
        raise ValueError("an XML answer with a DTD")
    parser = xml.etree.ElementTree.XMLPullParser(("start", "end"))
    root, depth, elements = None, 0, 0
    try:
        for offset in range(0, len(body), XML_FEED):  # a piece at a time: a bomb stops early
            parser.feed(body[offset:offset + XML_FEED])
            for event, element in parser.read_events():
                depth += 1 if event == "start" else -1
                elements += event == "start"
                root = element if root is None else root
                if depth > MAX_XML_DEPTH or elements > MAX_XML_ELEMENTS:
                    raise ValueError("an XML answer nested too deep, or too large")
        parser.close()
    except xml.etree.ElementTree.ParseError as err:
        raise ValueError(f"not XML: {err}") from None
    if root is None:
        raise ValueError("not XML: no element")
    return root


def s3_time(text: str) -> float | None:
    """'2026-12-01T02:55:14.000Z' -> Unix time; None if unreadable (never "1970": a sweep
    would take that for an object unused for decades)."""
    import calendar  # here, as xml.etree in parse_xml()
    try:
        return float(calendar.timegm(time.strptime(text.strip()[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def parse_object_list(body: bytes) -> tuple:
    """A ListObjectsV2 page: ([(key, size, last modified)], the next continuation token or "");
    a size or time it cannot read is None."""
    root = parse_xml(body)
    entries = []
    for item in xml_children(root, "Contents"):
        size = xml_text(item, "Size").strip()
        readable = re.fullmatch(r"[0-9]{1,16}", size) and int(size) <= MAX_UPSTREAM_LENGTH
        entries.append((xml_text(item, "Key"), int(size) if readable else None,
                        s3_time(xml_text(item, "LastModified"))))
    truncated = xml_text(root, "IsTruncated").strip().lower() == "true"
    return entries, xml_text(root, "NextContinuationToken") if truncated else ""


def parse_upload_list(body: bytes) -> tuple:
    """A ListMultipartUploads page: ([(key, upload id, initiated)], (next key, next id) or None)."""
    root = parse_xml(body)
    uploads = [(xml_text(item, "Key"), xml_text(item, "UploadId"), s3_time(xml_text(item, "Initiated")))
               for item in xml_children(root, "Upload")]  # (an unreadable time: None, never aborted as old)
    truncated = xml_text(root, "IsTruncated").strip().lower() == "true"
    # (SeaweedFS leaves NextKeyMarker out: the page's last key is where the next begins)
    last_key = uploads[-1][0] if uploads else ""
    following = (xml_text(root, "NextKeyMarker") or last_key, xml_text(root, "NextUploadIdMarker"))
    return uploads, following if truncated and any(following) else None


def s3_error(body: bytes) -> tuple:
    """(code, message) of an S3 error document; ("", "") if it is not one."""
    try:
        root = parse_xml(body)
    except ValueError:
        return "", ""
    return printable(xml_text(root, "Code"))[:64], printable(xml_text(root, "Message"))[:200]


# Peers: which instance fills a digest, and how a peer proves it is one.

def rendezvous_order(peers, key: str) -> list:
    """The peers by their score for `key`, highest first (rendezvous hashing):
    every instance computes the same order, and losing one peer moves only
    the keys it owned."""
    def score(peer: str) -> bytes:
        return hashlib.sha256(f"{peer}\n{key}".encode()).digest()
    return sorted(peers, key=score, reverse=True)


def peer_signature(secret: str, method: str, peer: str, path: str, timestamp: str, nonce: str) -> str:
    """The HMAC a peer request carries, never the secret itself: of what it
    asks, of whom (a proof for one peer is worth nothing to another), when,
    and a nonce (the peer takes each once)."""
    message = "\n".join(("dockerproxy-peer-v2", method, peer, path, timestamp, nonce)).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def parse_peer_proof(proof: str) -> tuple:
    """'<timestamp> <nonce> <signature>' -> its three parts; ValueError if it is not one."""
    parts = proof.strip().split(" ")
    if len(parts) != 3 or not re.fullmatch(r"[0-9]{1,12}", parts[0]) or not re.fullmatch(
            r"[0-9a-f]{32}", parts[1]) or not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
        raise ValueError("malformed proof")
    return tuple(parts)


def peer_request_problem(secret: str, method: str, peer: str, path: str, proof: str, now: float) -> str:
    """Why a peer request's proof (for `peer`, this instance) fails, or "" (the nonce is the caller's to check)."""
    try:
        timestamp, nonce, signature = parse_peer_proof(proof)
    except ValueError as err:
        return str(err)
    if abs(now - int(timestamp)) > PEER_SKEW:
        return "stale timestamp"
    if not hmac.compare_digest(peer_signature(secret, method, peer, path, timestamp, nonce), signature):
        return "wrong signature"
    return ""


class S3Failure(OSError):
    """An S3 request that failed: no answer (status 0), or an error answer.
    An OSError, so a bucket that fails degrades the cache as a failing disk does."""

    def __init__(self, operation: str, status: int, code: str = "", message: str = "") -> None:
        super().__init__(errno.EIO, f"S3 {operation}: {status or 'no answer'} {code} {message}".strip())
        self.operation = operation
        self.status = status
        self.code = code


class FileRegion(io.RawIOBase):
    """`length` bytes of an open file from `offset`, read with pread: a request body."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self.fd = fd
        self.position = offset
        self.end = offset + length

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        count = self.end - self.position if size < 0 else min(size, self.end - self.position)
        data = os.pread(self.fd, count, self.position) if count > 0 else b""
        if count > 0 and not data:
            raise OSError(errno.EIO, "the file is shorter than the upload")
        self.position += len(data)
        return data


def region_sha256(fd: int, offset: int, length: int) -> str:
    """The SHA-256 of part of a file (an upload part's x-amz-content-sha256)."""
    hasher, region = hashlib.sha256(), FileRegion(fd, offset, length)
    for data in iter(lambda: region.read(FILL_BUFFER), b""):
        hasher.update(data)
    return hasher.hexdigest()


class Bucket:
    """One S3 bucket through its REST API, every request signed (SigV4) with
    the real payload hash: small bodies from memory, large ones read from a
    file.  Addressed by path (endpoint/bucket/key) or virtually (bucket.endpoint/key)."""

    def __init__(self, config: Config, clock: Clock, metrics: Metrics) -> None:
        self.name, self.prefix = config.cache_s3
        self.region = config.s3_region
        self.endpoint = config.s3_endpoint or f"https://s3.{config.s3_region}.amazonaws.com"
        self.credentials = S3Credentials(config.aws_access_key_id, config.aws_secret_access_key,
                                         config.aws_session_token)
        self.clock = clock
        self.metrics = metrics
        url = urllib.parse.urlsplit(self.endpoint)
        virtual = config.s3_addressing == "virtual"
        self.scheme = url.scheme
        self.host = f"{self.name}.{url.netloc}" if virtual else url.netloc
        self.base_path = "" if virtual else f"/{self.name}"
        self.read_timeout = config.read_timeout
        self.connect_timeout = config.connect_timeout
        # Watched by a circuit breaker, as upstreams are: a bucket that keeps
        # failing is left alone a while, so requests fail at once instead of
        # each waiting out the timeouts.
        self.http = Upstreams(config.connect_timeout, config.read_timeout,
                              {urllib.parse.urlsplit(f"{url.scheme}://{self.host}").hostname},
                              clock, Metrics(), MAX_S3_REQUESTS, {f"{url.scheme}://{self.host}"})

    def __repr__(self) -> str:
        return f"Bucket(s3://{self.name}/{self.prefix} at {self.endpoint})"

    def path(self, key: str) -> str:
        return f"{self.base_path}/{uri_encode(key)}"

    def signed(self, method: str, path: str, query, payload_hash: str, extra: dict) -> dict:
        headers = {"host": self.host, "x-amz-date": amz_date(self.clock.time()),
                   "x-amz-content-sha256": payload_hash, **extra}
        if self.credentials.session_token:
            headers["x-amz-security-token"] = self.credentials.session_token
        headers["authorization"] = sigv4_authorization(method, path, query, headers, payload_hash,
                                                       self.credentials, self.region, headers["x-amz-date"])
        return headers

    def url(self, path: str, query) -> str:
        return f"{self.scheme}://{self.host}{path}" + (f"?{canonical_query(query)}" if query else "")

    def send(self, operation: str, method: str, key: str = "", query=(), body: bytes = b"",
             extra: dict | None = None, ok=(200,)) -> UpstreamResponse:
        """One signed request; S3Failure unless its status is in `ok` (404 among them, if asked)."""
        path = self.path(key) if key else (self.base_path or "/")
        headers = self.signed(method, path, query, hashlib.sha256(body).hexdigest(), extra or {})
        try:
            response = self.http.send(method, self.url(path, query), headers, body or None)
        except RegistryError as err:
            self.count(operation, "unreachable")
            code = "CircuitOpen" if isinstance(err, UpstreamHeldBack) else ""
            raise S3Failure(operation, 0, code, err.message) from None
        return self.checked(operation, response, ok)

    def body(self, operation: str, method: str, key: str = "", query=(), body: bytes = b"",
             extra: dict | None = None, ok=(200,), limit: int = MAX_SMALL_BODY) -> bytes:
        """send(), and the answer's body read whole (at most `limit` bytes)."""
        response = self.send(operation, method, key, query, body, extra, ok)
        try:
            return response.consume(limit)
        except RegistryError as err:
            self.count(operation, "unreachable")
            raise S3Failure(operation, 0, "", err.message) from None

    def checked(self, operation: str, response: UpstreamResponse, ok) -> UpstreamResponse:
        if response.status in ok:
            self.count(operation, "ok")
            return response
        try:
            code, message = s3_error(response.read_small())
        except RegistryError:
            code, message = "", ""
        response.close()
        self.count(operation, "error")
        raise S3Failure(operation, response.status, code, message)

    def count(self, operation: str, result: str) -> None:
        self.metrics.add("dockerproxy_s3_requests_total", (operation, result))

    # Objects -----------------------------------------------------------------

    def head(self, key: str) -> tuple | None:
        """(size, content type) of an object; None if there is none."""
        response = self.send("head", "HEAD", key, ok=(200, 404))
        response.release()
        if response.status == 404:
            return None
        length = response.headers.get("content-length", "")
        if not length.isdigit():
            raise S3Failure("head", response.status, "", "no Content-Length")
        return int(length), bare_media_type(response.headers.get("content-type", ""))

    def get(self, key: str) -> UpstreamResponse | None:
        """A GET's answer, its body still to read (release() or close() it); None if absent."""
        response = self.send("get", "GET", key, ok=(200, 404))
        if response.status == 404:
            response.consume()
            return None
        return response

    def get_small(self, key: str, limit: int = MAX_SMALL_BODY) -> bytes | None:
        response = self.get(key)
        if response is None:
            return None
        try:
            return response.consume(limit)
        except RegistryError as err:  # broken off, or larger than limit: not what was put there
            raise S3Failure("get", 0, "", err.message) from None

    def put_small(self, key: str, data: bytes, content_type: str = "application/octet-stream",
                  if_absent: bool = False) -> bool:
        """Write a small object; with `if_absent`, only if there is none (False if there was)."""
        extra = {"content-type": content_type, **({"if-none-match": "*"} if if_absent else {})}
        response = self.send("put", "PUT", key, body=data, extra=extra, ok=(200, 412) if if_absent else (200,))
        written = response.status == 200
        try:
            response.consume()
        except RegistryError as err:
            raise S3Failure("put", 0, "", err.message) from None
        return written

    def delete(self, key: str) -> None:
        self.body("delete", "DELETE", key, ok=(200, 204, 404))

    def list(self, prefix: str, limit: int = MAX_LISTED_KEYS):
        """(key, size, last modified) of the objects under `prefix`, a page at a time;
        S3Failure past `limit` keys (a store that never ends a listing must not
        hold a thread, nor fill its memory)."""
        token, listed = "", 0
        while True:
            query = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(S3_LIST_PAGE))]
            query += [("continuation-token", token)] if token else []
            body = self.body("list", "GET", query=query, limit=MAX_S3_LISTING)
            entries, following = parse_object_list(body)
            yield from (entry for entry in entries if entry[0].startswith(prefix))
            listed += len(entries)
            if not following:
                return
            if listed >= limit:
                raise S3Failure("list", 200, "", f"more than {limit} keys under {prefix}")
            if following == token:  # a store that never gets further must not hold a thread forever
                raise S3Failure("list", 200, "", "the listing does not advance")
            token = following

    # Large objects from files --------------------------------------------------

    def send_file(self, operation: str, method: str, key: str, query, fd: int, offset: int, length: int,
                  payload_hash: str, extra: dict) -> tuple:
        """A request whose body is part of a file, on a connection of its own
        (a pooled one could not resend it); (status, headers, small body)."""
        path = self.path(key)
        headers = self.signed(method, path, query, payload_hash,
                              {**extra, "content-length": str(length)})
        url = urllib.parse.urlsplit(self.url(path, query))
        origin, breakers = f"{url.scheme}://{url.netloc}", self.http.breakers
        if breakers.open_for(origin):  # the bucket keeps failing: left alone, as for every other request
            self.count(operation, "unreachable")
            raise S3Failure(operation, 0, "CircuitOpen", "the bucket keeps failing: left alone for a while")
        if url.scheme == "https":
            connection = http.client.HTTPSConnection(url.hostname, url.port, timeout=self.connect_timeout,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(url.hostname, url.port, timeout=self.connect_timeout)
        connection.blocksize = CHUNK_SIZE
        try:
            connection.connect()
            connection.sock.settimeout(self.read_timeout)
            connection.request(method, url.path + (f"?{url.query}" if url.query else ""),
                               body=FileRegion(fd, offset, length), headers=headers)
            response = connection.getresponse()
            body = response.read(MAX_SMALL_BODY)
        except (OSError, http.client.HTTPException) as err:
            self.count(operation, "unreachable")
            breakers.failed(origin)
            raise S3Failure(operation, 0, "", err.__class__.__name__) from None
        finally:
            connection.close()
        breakers.succeeded(origin)
        if response.status != 200:
            self.count(operation, "error")
            raise S3Failure(operation, response.status, *s3_error(body))
        self.count(operation, "ok")
        return response.status, response.headers, body

    def put_file(self, key: str, fd: int, size: int, sha256_hex: str, content_type: str) -> None:
        self.send_file("put", "PUT", key, (), fd, 0, size, sha256_hex, {"content-type": content_type})

    def start_upload(self, key: str, content_type: str) -> str:
        body = self.body("upload_start", "POST", key, [("uploads", "")], extra={"content-type": content_type})
        upload_id = xml_text(parse_xml(body), "UploadId")
        if not upload_id:
            raise S3Failure("upload_start", 200, "", "no UploadId")
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, fd: int, offset: int, length: int) -> str:
        """One part; its ETag."""
        query = [("partNumber", str(number)), ("uploadId", upload_id)]
        _, headers, _ = self.send_file("upload_part", "PUT", key, query, fd, offset, length,
                                       region_sha256(fd, offset, length), {})
        etag = headers.get("etag", "")
        if not etag:
            raise S3Failure("upload_part", 200, "", "no ETag")
        return etag

    def complete_upload(self, key: str, upload_id: str, etags: list) -> None:
        parts = "".join(f"<Part><PartNumber>{number}</PartNumber><ETag>{xml_escaped(etag)}</ETag></Part>"
                        for number, etag in enumerate(etags, 1))
        document = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        body = self.body("upload_complete", "POST", key, [("uploadId", upload_id)], document)
        if parse_xml(body).tag.rpartition("}")[2] == "Error":
            raise S3Failure("upload_complete", 200, *s3_error(body))  # S3 may fail after its 200

    def abort_upload(self, key: str, upload_id: str) -> None:
        self.body("upload_abort", "DELETE", key, [("uploadId", upload_id)], ok=(200, 204, 404))

    def uploads(self, prefix: str):
        """(key, upload id, initiated) of every multipart upload in progress under `prefix`."""
        following, pages = None, 0
        while True:
            pages += 1
            if pages > MAX_UPLOAD_PAGES:
                raise S3Failure("upload_list", 200, "", f"more than {MAX_UPLOAD_PAGES} pages of uploads")
            query = [("uploads", ""), ("prefix", prefix)]
            if following:
                query += [("key-marker", following[0]), ("upload-id-marker", following[1])]
            body = self.body("upload_list", "GET", query=query, limit=MAX_S3_LISTING)
            uploads, marker = parse_upload_list(body)
            yield from (upload for upload in uploads if upload[0].startswith(prefix))
            if marker is None:
                return
            if marker == following:
                raise S3Failure("upload_list", 200, "", "the listing does not advance")
            following = marker

    def presigned_url(self, key: str, expires: float, base: str = "") -> str:
        """A GET URL anyone may use until it expires; on `base` (a CDN) if given, with the same signed path."""
        path = self.path(key)
        query = sigv4_presigned_query("GET", self.host, path, self.credentials, self.region,
                                      amz_date(self.clock.time()), int(expires))
        origin = base or f"{self.scheme}://{self.host}"
        return f"{origin}{path}?{canonical_query(query)}"

    def check(self) -> None:
        """At start: the credentials and the bucket work (a listing of one key); S3Failure if not."""
        query = [("list-type", "2"), ("prefix", self.prefix), ("max-keys", "1")]
        self.body("list", "GET", query=query, limit=MAX_S3_LISTING)


class BucketTrouble(DiskTrouble):
    """A bucket that fails: one warning per episode, saying what still works."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def warn(self, err: OSError) -> None:
        if not self.warned:
            self.warned = True
            log.warning("bucket %s does not answer as it should (%s): serving from CACHE_DIR and "
                        "upstream, every instance on its own, until it does", self.name, err.strerror or err)


class UploadJournal:
    """The multipart uploads this instance began and has not ended, in a file
    of CACHE_DIR: a start-up aborts what the last run left (a crash, a kill,
    a bucket that went away mid-upload), and never another instance's."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def entries(self) -> list:
        """(upload id, key) of each upload begun and not ended."""
        try:
            with open(self.path, encoding="utf-8") as file:
                lines = file.read(MAX_SMALL_BODY * 16).splitlines()
        except (OSError, ValueError):
            return []
        return [tuple(line.split(" ", 1)) for line in lines if " " in line]

    def _write(self, entries: list) -> None:
        write_atomic(self.path, "".join(f"{upload_id} {key}\n" for upload_id, key in entries).encode())

    def began(self, upload_id: str, key: str) -> None:
        with self._lock:
            self._write(self.entries()[-MAX_JOURNALED_UPLOADS:] + [(upload_id, key)])

    def ended(self, upload_id: str) -> None:
        with self._lock:
            self._write([entry for entry in self.entries() if entry[0] != upload_id])


def remember(table: dict, key: str, value) -> None:
    """table[key] = value, in a table of at most MAX_REMEMBERED entries (when full it
    is emptied: bounded, and the cost is a few bucket reads again)."""
    if len(table) >= MAX_REMEMBERED:
        table.clear()
    table[key] = value


class BucketRecords(AccessRecords):
    """AccessRecords in the bucket, so that what one instance linked every
    instance may serve.  A link or an anonymous-pull mark is an object whose
    body is the time it was made (the writer's clock, as on disk: instances
    keep their clocks in step, MARK_SKEW covers the rest).  A link read once
    is remembered (only a purge removes one); a mark is read again after
    PUBLIC_MARK_TTL, so a repository one instance saw turn private closes on
    the others within seconds."""

    def __init__(self, bucket: Bucket, clock: Clock, trouble: DiskTrouble) -> None:
        super().__init__("", clock, trouble)
        self.bucket = bucket
        self.prefix = bucket.prefix
        self._linked = {}             # link key -> time linked
        self._marks = {}              # mark key -> (time marked or None, when read)
        self._mark_locks = [threading.Lock() for _ in range(MARK_LOCKS)]  # by repository, striped

    def _read_time(self, key: str) -> float | None:
        data = self.bucket.get_small(key, 64)
        try:
            value = float(data) if data is not None else None
        except ValueError:
            return None
        return value if value is not None and math.isfinite(value) else None

    def linked_since(self, upstream: str, repository: str, digest: str) -> float | None:
        key = link_key(self.prefix, upstream, repository, digest)
        known = self._linked.get(key)
        if known is not None:
            return known
        try:
            linked = self._read_time(key)
        except S3Failure as err:
            self.trouble.warn(err)
            return None
        if linked is not None:
            remember(self._linked, key, linked)
        return linked

    def link(self, upstream: str, repository: str, digests, when: float | None = None) -> None:
        """Dated `when` upstream answered (the fill's records are written after its end)."""
        now = self.clock.time() if when is None else when
        try:
            for digest in digests:
                key = link_key(self.prefix, upstream, repository, digest)
                if key not in self._linked:
                    # only if absent: a link keeps the time it was first made (stores without
                    # conditional writes overwrite it, which only narrows access)
                    if self.bucket.put_small(key, repr(now).encode(), "text/plain", if_absent=True):
                        remember(self._linked, key, now)
        except S3Failure as err:
            self.trouble.warn(err)

    def public_since(self, upstream: str, repository: str, fresh: bool = False,
                     needed: float | None = None) -> float | None:
        """The mark, as remembered for PUBLIC_MARK_TTL; read anew when `fresh`, or when the
        remembered one is short of `needed` (a link another instance made after it: its
        mark may have followed, and the client would otherwise be sent upstream)."""
        key = record_key(self.prefix, upstream, repository, "_public")
        known = self._marks.get(key)
        short = needed is not None and (known is None or known[0] is None or known[0] < needed)
        if known is not None and not (fresh or short) and self.clock.monotonic() - known[1] < PUBLIC_MARK_TTL:
            return known[0]
        try:
            marked = self._read_time(key)
        except S3Failure as err:
            self.trouble.warn(err)
            return known[0] if known else None
        if marked is not None and marked > self.clock.time() + MARK_SKEW:
            marked = None  # an instance's clock ahead: it would hold the repository open that much longer
        remember(self._marks, key, (marked, self.clock.monotonic()))
        return marked

    def drop_public(self, upstream: str, repository: str) -> None:
        key = record_key(self.prefix, upstream, repository, "_public")
        self._marks.pop(key, None)
        try:
            self.bucket.delete(key)
        except S3Failure as err:
            self.trouble.warn(err)

    def mark_public(self, upstream: str, repository: str, when: float | None = None) -> None:
        """As on disk (see AccessRecords.mark_public): never moved back by up to MARK_SKEW,
        and dated `when` upstream answered (a drop_public() since is not undone by a late mark).
        One repository's marks wait for each other only."""
        key = record_key(self.prefix, upstream, repository, "_public")
        with self._mark_locks[hash(key) % len(self._mark_locks)]:
            now = self.clock.time() if when is None else when
            if (self.public_since(upstream, repository, fresh=True) or 0.0) >= now:
                return  # a later mark stands (one further ahead than MARK_SKEW reads as none)
            try:
                self.bucket.put_small(key, repr(now).encode(), "text/plain")
            except S3Failure as err:
                self.trouble.warn(err)
                return
            remember(self._marks, key, (now, self.clock.monotonic()))

    def forget(self, upstream: str, repository: str) -> list:
        links = record_key(self.prefix, upstream, repository, "_links") + "/"
        digests = []
        try:
            for key, _, _ in list(self.bucket.list(links)):
                algorithm, _, hexdigest = key[len(links):].partition("/")
                digests.append(f"{algorithm}:{hexdigest}")
                self.bucket.delete(key)
                self._linked.pop(key, None)
        except S3Failure as err:
            self.trouble.warn(err)
        self.drop_public(upstream, repository)
        return digests

    def linked_anywhere(self) -> set:
        found = set()
        for key, _, _ in self.bucket.list(f"{self.prefix}dockerproxy/repos/"):
            head, _, digest = key.rpartition("/_links/")
            if head and DIGEST.match(digest.replace("/", ":", 1)):
                found.add(digest.replace("/", ":", 1))
        return found

    def repositories(self) -> int:
        names = set()
        for key, _, _ in self.bucket.list(f"{self.prefix}dockerproxy/repos/"):
            for marker in ("/_links/", "/_tags/"):
                if marker in key:
                    names.add(key.partition(marker)[0])
        return len(names)


class BucketTags(TagIndex):
    """The TagIndex in the bucket: an entry is a small JSON object, as on disk."""

    def __init__(self, bucket: Bucket, clock: Clock, trouble: DiskTrouble, manifest_ttl: float) -> None:
        super().__init__("", clock, trouble)
        self.bucket = bucket
        self.prefix = bucket.prefix
        self.rewrite_interval = min(TAG_REWRITE_INTERVAL, manifest_ttl / 2)
        self._written = {}            # key -> (digest, media type, when) this instance last wrote
        self._locks = [threading.Lock() for _ in range(MARK_LOCKS)]  # by tag, striped

    def _key(self, upstream: str, repository: str, tag: str, kind: str = "") -> str:
        return record_key(self.prefix, upstream, repository, "_tags", tag, f"{kind}.json" if kind else "")

    def get(self, upstream: str, repository: str, tag: str, kind: str) -> dict | None:
        try:
            data = self.bucket.get_small(self._key(upstream, repository, tag, kind), MAX_TAG_ENTRY)
            entry = json.loads(data) if data is not None else None
        except S3Failure as err:
            self.trouble.warn(err)
            return None
        except (ValueError, RecursionError):
            return None
        return checked_tag_entry(entry, self.clock.time())

    def kinds(self, upstream: str, repository: str, tag: str) -> list:
        directory = self._key(upstream, repository, tag)
        try:
            return sorted(key[len(directory):-5] for key, _, _ in self.bucket.list(directory)
                          if key.endswith(".json") and "/" not in key[len(directory):])
        except S3Failure as err:
            self.trouble.warn(err)
            return []

    def put(self, upstream: str, repository: str, tag: str, kind: str, digest: str, media_type: str,
            checked: float | None = None) -> None:
        """The entry, unless this instance wrote the same one within rewrite_interval
        (each HEAD of an uncached tag notes it: one write, not one per HEAD).  A fill's
        entry is dated `checked`, when upstream answered, and written after the fill
        ended: it does not replace an entry checked later that names another manifest
        (a fill of the tag since, after upstream moved it)."""
        key = self._key(upstream, repository, tag, kind)
        with self._locks[hash(key) % len(self._locks)]:  # this instance's writes of a tag: one at a time
            now = self.clock.time()
            written = self._written.get(key)
            if written and written[:2] == (digest, media_type) and 0 <= now - written[2] < self.rewrite_interval:
                return
            if checked is not None:
                current = self.get(upstream, repository, tag, kind)
                if current and current["digest"] != digest and current["checked"] > checked:
                    return
                now = min(checked, now)
            entry = {"digest": digest, "media_type": media_type, "checked": now}
            try:
                self.bucket.put_small(key, json.dumps(entry).encode(), "application/json")
            except S3Failure as err:
                self.trouble.warn(err)
                return
        remember(self._written, key, (digest, media_type, now))

    def _delete_under(self, prefix: str) -> set:
        """Delete every entry under `prefix`; the tags they were of."""
        self._written.clear()
        tags = set()
        try:
            for key, _, _ in list(self.bucket.list(prefix)):
                tags.add(key[len(prefix):].partition("/")[0])
                self.bucket.delete(key)
        except S3Failure as err:
            self.trouble.warn(err)
        return tags

    def drop(self, upstream: str, repository: str, tag: str) -> None:
        self._delete_under(self._key(upstream, repository, tag))

    def drop_all(self, upstream: str, repository: str) -> int:
        return len(self._delete_under(record_key(self.prefix, upstream, repository, "_tags") + "/"))

    def entry_files(self) -> list:
        return [key for key, _, _ in self.bucket.list(f"{self.prefix}dockerproxy/repos/") if "/_tags/" in key]

    def prune(self, exists) -> int:
        """Nothing here: an entry whose manifest the bucket lost is a miss
        (Cache.tag), and the next pull of the tag writes it anew."""
        return 0


class LastUse:
    """When the bucket's objects were last used, written cheaply: each
    instance notes the digests it serves and, once a minute, writes one
    empty marker object for each digest it has not marked within
    USE_MARK_INTERVAL: an object pulled all day costs 24 writes, not one per pull."""

    def __init__(self, bucket: Bucket, clock: Clock) -> None:
        self.bucket = bucket
        self.clock = clock
        self.marked = Recent(USE_MARK_INTERVAL, clock)
        self._pending = set()
        self._lock = threading.Lock()

    def used(self, digest: str) -> None:
        if self.marked.fresh(digest):
            return
        with self._lock:
            if len(self._pending) < MAX_PENDING_USES:
                self._pending.add(digest)

    def flush(self) -> int:
        """Write the pending markers; how many.  A bucket that fails keeps the
        rest pending for the next flush (S3Failure)."""
        with self._lock:
            pending, self._pending = list(self._pending), set()
        for written, digest in enumerate(pending):
            try:
                self.bucket.put_small(used_key(self.bucket.prefix, digest), b"", "text/plain")
            except S3Failure:
                with self._lock:
                    room = max(MAX_PENDING_USES - len(self._pending), 0)
                    self._pending.update(pending[written:written + room])
                raise
            self.marked.add(digest)
        return len(pending)


class Uploads:
    """The uploads to the bucket that fills left behind: a queue of digests
    (at most MAX_QUEUED_UPLOADS), worked by at most `workers` (MAX_FILLS)
    threads, each holding one open file and one connection.  A slow bucket
    makes the queue longer, never the threads more; what the queue cannot
    take stays in CACHE_DIR only (logged)."""

    def __init__(self, upload, workers: int) -> None:
        self.upload = upload          # (digest, media type) -> None
        self.workers = workers
        self._queue = collections.deque()
        self._queued = set()
        self._started = self._idle = self._busy = 0
        self._cond = threading.Condition()

    def add(self, digest: str, media_type: str | None) -> None:
        with self._cond:
            if digest in self._queued:
                return
            if len(self._queue) >= MAX_QUEUED_UPLOADS:
                log.warning("bucket: %d uploads wait already; %s stays in CACHE_DIR only", len(self._queue), digest)
                return
            self._queue.append((digest, media_type))
            self._queued.add(digest)
            if not self._idle and self._started < self.workers:
                self._started += 1
                threading.Thread(target=self._work, daemon=True, name="upload").start()
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                self._cond.wait_for(lambda: self._queue)
                self._idle -= 1
                digest, media_type = self._queue.popleft()
                self._busy += 1
            try:
                self.upload(digest, media_type)
            except Exception:
                log.exception("bucket: upload of %s failed", digest)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._queued.discard(digest)
                    self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)


class SharedStore:
    """The bucket as the cache's shared tier behind CACHE_DIR.

    A fill from upstream is verified in its local spool and stored locally
    as before, then uploaded (whole, or in parts above MULTIPART_THRESHOLD);
    only verified bytes are ever uploaded, and an upload that fails is
    aborted, so the bucket never holds a wrong object.  An object the
    bucket holds but CACHE_DIR does not is copied back (a blob through a
    Fill, as from upstream; a manifest at once), or answered with a
    presigned redirect (S3_REDIRECT).  What objects the bucket holds is
    remembered for BUCKET_SEEN_TTL.
    """

    def __init__(self, bucket: Bucket, config: Config, clock: Clock, metrics: Metrics) -> None:
        self.bucket = bucket
        self.clock = clock
        self.metrics = metrics
        self.trouble = BucketTrouble(repr(bucket))
        self.tags = BucketTags(bucket, clock, self.trouble, config.manifest_ttl)
        self.records = BucketRecords(bucket, clock, self.trouble)
        self.uses = LastUse(bucket, clock)
        self.journal = UploadJournal(os.path.join(config.cache_dir, UPLOAD_JOURNAL))
        self.redirect = config.s3_redirect
        self.redirect_ttl = config.s3_redirect_ttl
        self.redirect_base = config.s3_redirect_base
        self.max_size = config.cache_s3_max_size
        self.max_age = config.cache_s3_max_age
        self.lifecycle = config.cache_s3_lifecycle
        self.seen = Recent(BUCKET_SEEN_TTL, clock)
        self.avoided = Recent(BUCKET_SEEN_TTL, clock)  # objects whose reading broke off or stalled
        self.counted = None           # (objects, bytes, when) as the last listing found
        self.uploads = None           # the Uploads queue, once the Cache made it (uploads_for)

    def key(self, digest: str) -> str:
        return blob_key(self.bucket.prefix, digest)

    def has(self, digest: str) -> bool:
        """The bucket holds `digest` (a failing bucket holds nothing, nor does an object
        whose reading just failed, for BUCKET_SEEN_TTL)."""
        if self.avoided.fresh(digest):
            return False
        if self.seen.fresh(digest):
            return True
        try:
            found = self.bucket.head(self.key(digest)) is not None
        except S3Failure as err:
            self.trouble.warn(err)
            return False
        if found:
            self.seen.add(digest)
        return found

    def open(self, digest: str) -> UpstreamResponse | None:
        """A GET of the object, its body to read; None if absent or the bucket fails."""
        try:
            response = self.bucket.get(self.key(digest))
        except S3Failure as err:
            self.trouble.warn(err)
            return None
        if response is None:
            self.seen.discard(digest)  # gone since it was seen: the next fill uploads it again
            return None
        if response.length is None:
            response.close()  # every S3 answer to a GET has a length: this is not one
            return None
        return response

    def manifest(self, digest: str) -> tuple | None:
        """(bytes, media type) of a manifest the bucket holds, checked against its digest; else None.

        The type is what its bytes say when they say it (as stored, if they do not):
        a manifest first asked for as a blob went up as a blob, and is one all the same."""
        try:
            info = self.bucket.head(self.key(digest))
            if info is None or info[0] > MAX_MANIFEST_SIZE:
                return None
            data = self.bucket.get_small(self.key(digest), MAX_MANIFEST_SIZE)
        except S3Failure as err:
            self.trouble.warn(err)
            return None
        if data is None or bytes_digest(data, digest) != digest:
            return None
        media_type = document_media_type(data) or (info[1] if info[1] not in ("", BLOB_TYPE) else None)
        return (data, media_type) if media_type else None

    def avoid(self, digest: str) -> None:
        """Reading the object failed (cut, stalled): not read again for a while."""
        log.warning("bucket: reading %s failed: not read again for %gs", digest, BUCKET_SEEN_TTL)
        self.seen.discard(digest)
        self.avoided.add(digest)

    def discard(self, digest: str) -> None:
        """A bucket object whose bytes are not its digest (damaged in the store): removed."""
        log.warning("bucket: %s does not match its digest: removed", digest)
        self.seen.discard(digest)
        try:
            self.bucket.delete(self.key(digest))
        except S3Failure as err:
            self.trouble.warn(err)

    def presigned_url(self, digest: str) -> str:
        self.metrics.add("dockerproxy_s3_redirects_total")
        return self.bucket.presigned_url(self.key(digest), self.redirect_ttl, self.redirect_base)

    # Uploads -------------------------------------------------------------------

    def uploads_for(self, store: BlobStore, workers: int) -> Uploads:
        self.uploads = Uploads(functools.partial(self.upload, store), workers)
        return self.uploads

    def upload(self, store: BlobStore, digest: str, media_type: str | None) -> None:
        """Put a verified local object in the bucket, unless it is there already."""
        if self.has(digest):
            return
        opened = store.open(digest)
        if opened is None:  # evicted already
            return
        file, size = opened
        try:
            self._upload_retried(file.fileno(), size, digest, media_type or BLOB_TYPE)
            self._check_landed(digest, size)
            self.seen.add(digest)
            self.trouble.cleared()
            self.metrics.add("dockerproxy_s3_uploads_total", ("ok",))
        except (OSError, ValueError) as err:  # S3Failure too; the object stays local only
            self.metrics.add("dockerproxy_s3_uploads_total", ("failed",))
            log.info("bucket: upload of %s failed: %s", digest, printable(str(err)))
            self.trouble.warn(err if isinstance(err, OSError) else OSError(errno.EIO, str(err)))
        finally:
            store.close(file)

    def _check_landed(self, digest: str, size: int) -> None:
        """The object is in the bucket whole, by its size: a store that took a cut body
        for a whole one would otherwise be where S3_REDIRECT sends clients (nothing
        the proxy serves itself reads it unchecked).  Deleted, ValueError, if not."""
        info = self.bucket.head(self.key(digest))
        if info is None or info[0] != size:
            if info is not None:
                self.bucket.delete(self.key(digest))
            raise ValueError(f"the store kept {'nothing' if info is None else info[0]} of {size} bytes")

    def _upload_retried(self, fd: int, size: int, digest: str, content_type: str) -> None:
        """_upload(), tried again after a pause when the store is busy or briefly away
        (503 SlowDown, 500, no answer): UPLOAD_ATTEMPTS in all."""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                return self._upload(fd, size, digest, content_type)
            except S3Failure as err:
                if attempt == UPLOAD_ATTEMPTS or err.status not in (0, 500, 502, 503, 504) or err.code == "CircuitOpen":
                    raise
                log.info("bucket: upload of %s: %s; again in %gs", digest, err.strerror, attempt * UPLOAD_RETRY_DELAY)
                time.sleep(attempt * UPLOAD_RETRY_DELAY)  # an upload worker's own time: no client waits

    def _upload(self, fd: int, size: int, digest: str, content_type: str) -> None:
        key = self.key(digest)
        if size < MULTIPART_THRESHOLD:
            sha256_hex = digest.partition(":")[2] if digest.startswith("sha256:") else region_sha256(fd, 0, size)
            return self.bucket.put_file(key, fd, size, sha256_hex, content_type)
        upload_id = self.bucket.start_upload(key, content_type)
        self.journal.began(upload_id, key)
        try:
            part = max(PART_SIZE, -(-size // MAX_PARTS))
            etags = [self.bucket.upload_part(key, upload_id, number, fd, offset, min(part, size - offset))
                     for number, offset in enumerate(range(0, size, part), 1)]
            self.bucket.complete_upload(key, upload_id, etags)
        except BaseException:
            self._abort(key, upload_id)
            raise
        self.journal.ended(upload_id)

    def _abort(self, key: str, upload_id: str) -> None:
        """Abort an upload; if the bucket cannot be reached, the journal keeps it for the next start."""
        try:
            self.bucket.abort_upload(key, upload_id)
            self.journal.ended(upload_id)
        except S3Failure as err:
            log.warning("bucket: could not abort upload %s of %s (the next start will): %s",
                        printable(upload_id[:16]), printable(key), err.strerror)

    def abort_journaled(self) -> int:
        """At shutdown, after SHUTDOWN_GRACE: abort the multipart uploads still running."""
        entries = self.journal.entries()
        for upload_id, key in entries:
            self._abort(key, upload_id)
        if entries:
            log.warning("shutdown: %d uploads to the bucket aborted (the objects stay in CACHE_DIR)",
                        len(entries))
        return len(entries)

    def abort_stale_uploads(self, stale_only: bool = False) -> int:
        """Abort this instance's unfinished uploads (the journal: at start, what a
        past run left), unless `stale_only`, and anyone's older than
        STALE_UPLOAD_AGE (a live peer finishes its own well within that)."""
        aborted = 0
        for upload_id, key in ([] if stale_only else self.journal.entries()):
            self._abort(key, upload_id)
            aborted += 1
        now = self.clock.time()
        for key, upload_id, initiated in list(self.bucket.uploads(self.bucket.prefix)):
            if initiated and now - initiated > STALE_UPLOAD_AGE:
                self._abort(key, upload_id)
                aborted += 1
        return aborted

    # The bucket's limits ------------------------------------------------------------

    def objects(self) -> list:
        """The objects of the bucket's blob store, StoredObject(digest, size, last use), at most
        MAX_SWEPT_OBJECTS; one whose size or time the listing does not say is left out (kept)."""
        used, now = {}, self.clock.time()
        for key, _, modified in self.bucket.list(f"{self.bucket.prefix}dockerproxy/used/", MAX_SWEPT_OBJECTS):
            digest = digest_of_used_key(self.bucket.prefix, key)
            if digest and modified is not None:
                used[digest] = max(used.get(digest, 0.0), modified)
        found = []
        for key, size, modified in self.bucket.list(f"{self.bucket.prefix}docker/registry/v2/blobs/",
                                                    MAX_SWEPT_OBJECTS):
            digest = digest_of_blob_key(self.bucket.prefix, key)
            if digest and size is not None and modified is not None:
                found.append(StoredObject(digest, size, min(max(modified, used.get(digest, 0.0)), now)))
        return found

    def sweep(self, sweeping: bool) -> dict:
        """Count the bucket; when `sweeping` (this instance is the sweeper) and
        CACHE_S3_LIFECYCLE is off, remove what is unused for CACHE_S3_MAX_AGE,
        then the least recently used down to the low-water mark of CACHE_S3_MAX_SIZE."""
        self.uses.flush()
        objects = sorted(self.objects(), key=lambda stored: (stored.last_used, stored.size, stored.digest))
        total, removed, freed = sum(stored.size for stored in objects), 0, 0
        if sweeping and not self.lifecycle and (self.max_size or self.max_age):
            now = self.clock.time()
            low_water = self.max_size * EVICTION_LOW_WATER if self.max_size and total > self.max_size else None
            for stored in objects:
                expired = self.max_age and now - stored.last_used > self.max_age
                if not (expired or (low_water is not None and total > low_water)):
                    continue
                self.bucket.delete(self.key(stored.digest))
                self.bucket.delete(used_key(self.bucket.prefix, stored.digest))
                self.seen.discard(stored.digest)
                total, removed, freed = total - stored.size, removed + 1, freed + stored.size
            if removed:
                log.info("bucket: evicted %d objects (%d bytes); %d bytes remain", removed, freed, total)
        self.counted = (len(objects) - removed, total, self.clock.time())
        self.metrics.add("dockerproxy_s3_evictions_total", (), removed)
        return {"removed": removed, "freed_bytes": freed, "size_bytes": total}

    def status(self) -> dict:
        objects, size, when = self.counted or (None, None, None)
        return {"bucket": f"s3://{self.bucket.name}/{self.bucket.prefix}", "endpoint": self.bucket.endpoint,
                "objects": objects, "size_bytes": size, "counted": when, "max_size_bytes": self.max_size,
                "max_age_seconds": self.max_age, "lifecycle": self.lifecycle, "redirect": self.redirect,
                "uploads_waiting": self.uploads.pending() if self.uploads else 0}


class Peers:
    """The instances on one bucket (PEERS), this one among them.

    A digest's fill belongs to the first live peer by rendezvous_order():
    the others ask it, over an ordinary GET signed with PEER_SECRET, instead
    of upstream.  A peer that does not answer (refused, or silent past
    PEER_CONNECT_TIMEOUT) is passed over for PEER_RETRY, and the next by
    score takes its digests.  Requests go to PEERS' addresses and nowhere else.
    """

    def __init__(self, config: Config, clock: Clock, metrics: Metrics, own: str) -> None:
        self.peers = config.peers
        self.own = own
        self.secret = config.peer_secret
        self.clock = clock
        self.metrics = metrics
        hosts = {urllib.parse.urlsplit(peer).hostname for peer in self.peers}
        self.http = Upstreams(min(PEER_CONNECT_TIMEOUT, config.connect_timeout),
                              config.read_timeout + config.connect_timeout, hosts, clock, Metrics(),
                              config.max_upstream_requests)
        self._down = {}               # peer -> (until, why): passed over until then
        self._lock = threading.Lock()
        self._nonces = collections.OrderedDict()  # nonce -> (when it may be forgotten (monotonic), its time)
        self._forgotten_up_to = 0     # the latest proof time among nonces forgotten early: older proofs refused
        self.refusals_logged = Recent(60.0, clock)

    def live(self) -> list:
        now = self.clock.monotonic()
        with self._lock:
            return [peer for peer in self.peers if peer == self.own or self._down.get(peer, (0,))[0] <= now]

    def order(self, key: str) -> list:
        return rendezvous_order(self.live(), key)

    def failed(self, peer: str, why: str) -> None:
        with self._lock:
            known = peer in self._down
            self._down[peer] = (self.clock.monotonic() + PEER_RETRY, why)
        if not known:
            log.warning("peer %s did not answer (%s): its digests go to the next peer for %gs",
                        peer, why, PEER_RETRY)

    def answered(self, peer: str) -> None:
        with self._lock:
            if self._down.pop(peer, None) is not None:
                log.info("peer %s answers again", peer)

    def proof(self, method: str, peer: str, path: str) -> str:
        timestamp, nonce = str(int(self.clock.time())), os.urandom(16).hex()
        return f"{timestamp} {nonce} {peer_signature(self.secret, method, peer, path, timestamp, nonce)}"

    def fetch(self, peer: str, route: Route, path: str) -> UpstreamResponse:
        """GET `path` of `peer`, signed; RegistryError if it does not answer."""
        headers = {PEER_HEADER: self.proof("GET", peer, path), "user-agent": SERVER_VERSION}
        return self.http.send("GET", peer + path, headers, purpose=(route.name, ""))

    def problem(self, method: str, path: str, proof: str) -> str:
        """Why a peer request's proof does not hold, or "": signed for this
        instance, recent, and its nonce not seen before (a proof seen on the
        wire cannot be replayed)."""
        problem = peer_request_problem(self.secret, method, self.own, path, proof, self.clock.time())
        if not problem:
            timestamp, nonce = proof.split(" ")[:2]
            problem = self._take_nonce(nonce, int(timestamp))
        if problem:
            self.metrics.add("dockerproxy_peer_served_total", ("refused",))
            if not self.refusals_logged.fresh(problem):  # one line a minute for each kind: no log flood
                self.refusals_logged.add(problem)
                log.warning("peer request refused: %s (logged once a minute)", problem)
        return problem

    def _take_nonce(self, nonce: str, timestamp: int) -> str:
        """"" the first time a (signed) nonce is seen within 2 x PEER_SKEW; why not, else.
        Full (a client's misses make peer requests), the memory forgets its oldest
        nonces before their time, and refuses every proof dated at or before the
        latest of them from then on: none of those can be replayed, and the proofs
        peers make now, dated now, still pass unless the flood is as many a second."""
        now = self.clock.monotonic()
        with self._lock:
            while self._nonces and next(iter(self._nonces.values()))[0] <= now:
                self._nonces.popitem(last=False)  # the oldest first: they expire in order
            if nonce in self._nonces or timestamp <= self._forgotten_up_to:
                return "replayed"
            while len(self._nonces) >= MAX_PEER_NONCES:
                _, (_, forgotten) = self._nonces.popitem(last=False)
                self._forgotten_up_to = max(self._forgotten_up_to, forgotten)
            self._nonces[nonce] = (now + 2 * PEER_SKEW, timestamp)
        return ""

    def status(self) -> list:
        now = self.clock.monotonic()
        with self._lock:
            down = dict(self._down)
        return [{"peer": peer, "self": peer == self.own,
                 "state": "down" if down.get(peer, (0,))[0] > now else "up",
                 "last_problem": down[peer][1] if peer in down else ""} for peer in self.peers]


def own_peer(config: Config) -> str:
    """Which entry of PEERS this instance is: PEER_SELF, else the one on PORT
    whose host is this machine's name or one of its addresses; ConfigError if
    none or several are."""
    if config.peer_self:
        if config.peer_self not in config.peers:
            raise ConfigError(f"PEER_SELF={config.peer_self}: not an entry of PEERS")
        return config.peer_self
    names = {socket.gethostname().lower(), socket.getfqdn().lower(), "localhost"}

    def is_this_machine(peer: str) -> bool:
        url = urllib.parse.urlsplit(peer)
        port = url.port or (443 if url.scheme == "https" else 80)
        return port == config.port and (url.hostname in names or is_own_address(url.hostname))
    candidates = [peer for peer in config.peers if is_this_machine(peer)]
    if len(candidates) != 1:
        raise ConfigError(f"PEERS: {'none' if not candidates else 'several'} of its entries on port "
                          f"{config.port} is this machine; set PEER_SELF")
    return candidates[0]


def is_own_address(host: str) -> bool:
    """`host` resolves to an address of this machine (one a socket can bind)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address[0], 0))
            return True
        except OSError:
            continue
    return False


class BucketKeeper(threading.Thread):
    """Writes the last uses every USE_FLUSH_INTERVAL, and every SWEEP_INTERVAL
    counts the bucket and, on the instance that owns the key "sweep" among the
    live peers (this one, without PEERS), applies CACHE_S3_MAX_SIZE and
    CACHE_S3_MAX_AGE: one sweeper at a time."""

    def __init__(self, shared: SharedStore, peers: Peers | None, stopping: threading.Event) -> None:
        super().__init__(daemon=True, name="bucket-keeper")
        self.shared = shared
        self.peers = peers
        self.stopping = stopping

    def sweeper(self) -> bool:
        return self.peers is None or self.peers.order("sweep")[0] == self.peers.own

    def run(self) -> None:
        next_sweep, journal_done = 0.0, False
        while not self.stopping.is_set():
            try:
                if not journal_done:  # here, not in start-up: a slow bucket must not hold the port closed
                    aborted = self.shared.abort_stale_uploads()
                    journal_done = True
                    if aborted:
                        log.info("bucket: aborted %d unfinished uploads", aborted)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_INTERVAL
                    sweeping = self.sweeper()
                    self.shared.sweep(sweeping)
                    if sweeping:  # uploads of instances gone for good (scaled down) end here
                        self.shared.abort_stale_uploads(stale_only=True)
                else:
                    self.shared.uses.flush()
                self.shared.trouble.cleared()
            except S3Failure as err:  # the bucket is down: said once, tried again next time
                self.shared.trouble.warn(err)
            except Exception:
                log.exception("bucket sweep failed")
            self.stopping.wait(USE_FLUSH_INTERVAL)


# Status page (pure: a document in, HTML out) ###############################
#
# Server-rendered, no script, no external asset: it reads the same in a
# phone's browser, a desktop one, dark or light, and lynx.  Every value is
# escaped: image names and client addresses come from clients.

def escape_html(text: str) -> str:
    """Text safe in an element or a quoted attribute (html.escape's rule, without
    importing html.entities, a table of 2,000 names this page never uses)."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def human_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (seconds, "s")]
    shown = [f"{value} {unit}" for value, unit in parts if value][:2]
    return " ".join(shown) or "0 s"


def clock_time(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


STATUS_STYLE = """
:root{color-scheme:light dark;--fg:#1b1f24;--muted:#5b6470;--bg:#f6f7f9;--card:#fff;--line:#d9dde3;
--accent:#0969da;--good:#1a7f37;--warn:#9a6700;--bad:#cf222e}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9aa5b1;--bg:#0d1117;--card:#161b22;
--line:#30363d;--accent:#4493f8;--good:#3fb950;--warn:#d29922;--bad:#f85149}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif}
header,main{max-width:72rem;margin:0 auto;padding:0 1rem}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:.25rem 1rem;padding-top:1rem}
h1{font-size:1.4rem;margin:0}h2{font-size:1.05rem;margin:0 0 .6rem}
.muted{color:var(--muted)}nav{display:flex;flex-wrap:wrap;gap:0 .5rem}a{color:var(--accent)}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:1rem;margin:1rem 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(11rem,1fr));gap:.75rem}
.card{border:1px solid var(--line);border-radius:6px;padding:.6rem .75rem}
.card b{display:block;font-size:1.35rem}
.bar{height:.8rem;border-radius:4px;background:var(--line);overflow:hidden;margin:.4rem 0 1rem}
.bar span{display:block;height:100%;background:var(--accent)}
.bar.warn span{background:var(--warn)}.bar.bad span{background:var(--bad)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600}
td.num,th.num{text-align:right;white-space:nowrap}
td.name{word-break:break-all;min-width:10rem}
.hit,.ok{color:var(--good)}.miss,.mixed{color:var(--warn)}.stale,.bypass,.bad{color:var(--bad)}
form{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin:.4rem 0}
input[type=text],input[type=password]{flex:1 1 12rem;min-width:0;padding:.4rem;border:1px solid var(--line);
border-radius:4px;background:var(--bg);color:var(--fg)}
input,button{font:inherit}
button{padding:.4rem .8rem;border:1px solid var(--line);border-radius:4px;background:var(--card);
color:var(--fg);cursor:pointer}
"""


def html_table(headings: list, rows: list, empty: str) -> str:
    """A table in a scrolling box (a narrow screen scrolls the table, never the page).
    Headings starting with '#' are numeric columns; cells are escaped HTML already."""
    if not rows:
        return f'<p class="muted">{empty}</p>'
    head = "".join(f'<th class="num">{h[1:]}</th>' if h.startswith("#") else f"<th>{h}</th>"
                   for h in headings)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{cell}</td>' if heading.startswith("#") else
        f'<td class="name">{cell}</td>' if heading in ("Image", "Upstream") else f"<td>{cell}</td>"
        for heading, cell in zip(headings, row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def traffic_section(document: dict) -> str:
    cards = []
    for title, period in (("since start", document["traffic"]["since_start"]),
                          ("last hour", document["traffic"]["last_hour"])):
        requests = period["requests"]
        total = sum(requests.values())
        served_from_cache = requests["hit"] + requests["stale"]
        cards.append(f'<div class="card">Hit ratio, {title}<b>{percent(served_from_cache, total)}</b>'
                     f'<span class="muted">{served_from_cache} of {total} blob and manifest requests</span></div>')
        cards.append(f'<div class="card">Saved, {title}<b>{human_bytes(period["bytes"]["cache"])}</b>'
                     f'<span class="muted">sent from the cache; {human_bytes(period["bytes"]["upstream"])} '
                     f'from upstream</span></div>')
    return f'<section id="traffic"><h2>Traffic</h2><div class="cards">{"".join(cards)}</div></section>'


def cache_section(document: dict) -> str:
    cache = document["cache"]
    if not cache["enabled"]:
        return '<section id="cache"><h2>Cache</h2><p class="muted">No cache (CACHE_DIR is empty).</p></section>'
    size, limit = cache["size_bytes"], cache["limit_bytes"]
    share = min(size / limit, 1.0) if limit else 0.0
    level = "bad" if share >= 0.95 else "warn" if share >= 0.8 else ""
    limit_text = f"of {human_bytes(limit)} ({percent(size, limit)})" if limit else "(no limit)"
    fills = [[escape_html(fill["image"]), escape_html(fill["digest"][:19]),
              f'{human_bytes(fill["bytes"])} of {human_bytes(fill["length"])}',
              f'{human_bytes(fill["rate_bytes_per_second"])}/s', str(fill["clients"])]
             for fill in cache["fills"]]
    return (f'<section id="cache"><h2>Cache</h2><p>{human_bytes(size)} {limit_text}, '
            f'{cache["objects"]} objects; free on disk {human_bytes(cache["free_bytes"])}</p>'
            f'<div class="bar {level}" role="img" aria-label="{percent(size, limit)} full">'
            f'<span style="width:{share * 100:.1f}%"></span></div>'
            f'<h2>Downloads in progress</h2>'
            + html_table(["Image", "Digest", "Progress", "#Rate", "#Clients"], fills, "None now.")
            + "</section>")


def routes_section(document: dict) -> str:
    rows = []
    for route in document["routes"]:
        status = route["last_status"]
        status_cell = (f'<span class="{"ok" if status and status < 500 and status != 429 else "bad"}">'
                       f'{status}</span> {escape_html(human_duration(document["now"] - route["last_seen"]))} ago'
                       if status else '<span class="muted">not asked yet</span>')
        latency = f'{route["last_latency_seconds"] * 1000:.0f} ms' if status else "-"
        quota = (f'{route["ratelimit_remaining"]} of {route["ratelimit_limit"]}'
                 if route["ratelimit_remaining"] is not None else "-")
        rows.append([escape_html(route["name"]), escape_html(route["upstream"]), status_cell, latency, quota,
                     route_state(route)])
    return ('<section id="routes"><h2>Upstreams</h2>'
            + html_table(["Route", "Upstream", "Last answer", "#Latency", "#Pulls left", "State"], rows,
                         "No routes.")
            + "</section>")


def route_state(route: dict) -> str:
    """Whether the proxy is leaving an upstream alone, and why."""
    circuit = route.get("circuit") or {"open_seconds": 0, "failures_in_a_row": 0}
    ratelimited = route.get("ratelimited_seconds")
    if circuit["open_seconds"]:
        return (f'<span class="bad">circuit open</span> {circuit["failures_in_a_row"]} failures in a row; '
                f'retried in {human_duration(circuit["open_seconds"])}')
    if ratelimited:
        return f'<span class="bad">429</span> cache only for {human_duration(ratelimited)}'
    return f'<span class="ok">ok</span>, {route.get("in_flight", 0)} in flight'



def top_section(section_id: str, title: str, entries: list, key: str) -> str:
    rows = [[escape_html(entry[key]), str(entry["pulls"]), human_bytes(entry["bytes"])] for entry in entries]
    heading = "Image" if key == "image" else "Client"
    return (f'<section id="{section_id}"><h2>{title}</h2>'
            + html_table([heading, "#Pulls", "#Bytes"], rows, "No pulls in the last 24 hours.") + "</section>")


def outcome_cell(outcome: str) -> str:
    """A pull's cache outcome, coloured by its class when it is one of ours."""
    css = f' class="{outcome}"' if outcome in CACHE_RESULTS or outcome == "mixed" else ""
    return f"<span{css}>{escape_html(outcome)}</span>"


def pulls_section(document: dict) -> str:
    rows = [[escape_html(clock_time(pull["time"])[11:19]), escape_html(pull["client"]),
             escape_html(pull["image"]), outcome_cell(pull["outcome"]),
             human_bytes(pull["bytes"]), f'{pull["duration_seconds"]:.1f} s']
            for pull in document["recent_pulls"]]
    return (f'<section id="pulls"><h2>Last {RECENT_PULLS} pulls</h2>'
            + html_table(["Time (UTC)", "Client", "Image", "Cache", "#Bytes", "#Took"], rows, "No pulls yet.")
            + "</section>")


def prefetches_section(document: dict) -> str:
    """Prefetches running (the admin API's, the keep-warm one), then the last ones that ended."""
    rows = []
    for job in document.get("prefetches", []):
        state = "running" if job["ok"] is None else ("done" if job["ok"] else "failed")
        rows.append([escape_html(clock_time(job["started"])[11:19]), escape_html(job["source"]),
                     escape_html(state), f'{job["images_done"]} / {job["images"]}', str(job["failed"]),
                     f'{human_bytes(job["bytes_done"])} / {human_bytes(job["bytes_total"])}',
                     escape_html(", ".join(job["current"]))])
    return ('<section id="prefetches"><h2>Prefetches</h2>'
            + html_table(["Started (UTC)", "By", "State", "#Images", "#Failed", "Bytes", "Now fetching"], rows,
                         "No prefetch since start.") + "</section>")


def shared_section(document: dict) -> str:
    """The bucket (CACHE_S3) and the peers (PEERS); nothing without either."""
    shared = document.get("shared") or {}
    bucket, peers = shared.get("bucket"), shared.get("peers") or []
    if not bucket and not peers:
        return ""
    parts = ['<section id="shared"><h2>Shared cache</h2>']
    if bucket:
        counted = (f'{bucket["objects"]} objects, {human_bytes(bucket["size_bytes"])} '
                   f'(counted {escape_html(clock_time(bucket["counted"])[11:19])} UTC)'
                   if bucket.get("counted") else "not counted yet")
        limits = ("the bucket's lifecycle rules" if bucket["lifecycle"] else
                  f'{human_bytes(bucket["max_size_bytes"]) if bucket["max_size_bytes"] else "no size limit"}, '
                  f'{human_duration(bucket["max_age_seconds"]) if bucket["max_age_seconds"] else "no age limit"}')
        parts.append(html_table(["Bucket", "Holds", "Limits", "Hits"], [[
            escape_html(bucket["bucket"]) + f' <span class="muted">at {escape_html(bucket["endpoint"])}</span>',
            counted, escape_html(limits), "redirected" if bucket["redirect"] else "sent by the proxy"]], ""))
    if peers:
        rows = [[escape_html(peer["peer"]) + (" (this one)" if peer["self"] else ""),
                 f'<span class="{"ok" if peer["state"] == "up" else "bad"}">{peer["state"]}</span>',
                 escape_html(peer["last_problem"])] for peer in peers]
        asked = shared.get("asked_peers") or {}
        parts.append(html_table(["Peer", "State", "Last problem"], rows, "")
                     + f'<p class="muted">Misses asked of peers: {int(asked.get("ok", 0))} served, '
                     f'{int(asked.get("declined", 0))} declined, {int(asked.get("unreachable", 0))} unreachable; '
                     f'requests of peers answered: {int(shared.get("served_peers", 0))}.</p>')
    return "".join(parts) + "</section>"


def actions_section(csrf: str, cache_enabled: bool, logout: bool) -> str:
    token = f'<input type="hidden" name="csrf" value="{escape_html(csrf)}">'
    parts = ['<section id="actions"><h2>Actions</h2>']
    if cache_enabled:
        parts.append(f'<form method="post" action="/admin/purge">{token}'
                     '<label for="image">Purge an image</label>'
                     '<input type="text" id="image" name="image" placeholder="docker.io/library/alpine:3.20" '
                     'required><button type="submit">Purge</button></form>'
                     f'<form method="post" action="/admin/evict">{token}'
                     '<button type="submit">Run eviction now</button></form>'
                     f'<form method="post" action="/admin/prefetch">{token}'
                     '<label for="prefetch">Prefetch an image</label>'
                     '<input type="text" id="prefetch" name="images" placeholder="ghcr.io/owner/app:1 linux/amd64" '
                     'required><button type="submit">Prefetch</button></form>')
    if logout:
        parts.append(f'<form method="post" action="/admin/logout">{token}<button type="submit">Log out</button></form>')
    return "".join(parts) + "</section>"


def page(title: str, body: str, refresh: int = 0) -> str:
    refresh_tag = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="color-scheme" content="light dark">{refresh_tag}<title>{escape_html(title)}</title>'
            f'<style>{STATUS_STYLE}</style></head><body>{body}</body></html>')


def status_page(document: dict, csrf: str, refresh: int = 0, logout: bool = False) -> str:
    """/status: the document of /status.json, as HTML."""
    refresh_links = " ".join(f'<a href="/status?refresh={seconds}">every {seconds} s</a>' for seconds in (5, 30))
    header = (f'<header><h1>dockerproxy</h1><span class="muted">{escape_html(document["version"])}, '
              f'up {human_duration(document["uptime_seconds"])}, '
              f'{escape_html(clock_time(document["now"]))}</span>'
              f'<nav>Refresh: <a href="/status">off</a> {refresh_links} · <a href="/status.json">JSON</a> · '
              '<a href="/metrics">metrics</a></nav></header>')
    sections = [traffic_section(document), cache_section(document), routes_section(document),
                top_section("images", "Most pulled images, last 24 h", document["top_images"], "image"),
                top_section("clients", "Clients that pulled most, last 24 h", document["top_clients"], "client"),
                pulls_section(document), prefetches_section(document), shared_section(document),
                actions_section(csrf, document["cache"]["enabled"], logout)]
    return page("dockerproxy status", header + "<main>" + "".join(sections) + "</main>", refresh)


def login_page(message: str = "") -> str:
    """The form that trades ADMIN_TOKEN for a session cookie."""
    note = f'<p class="bad">{escape_html(message)}</p>' if message else ""
    return page("dockerproxy: log in", '<main><section><h1>dockerproxy</h1>'
                '<p>The status page needs the admin token (ADMIN_TOKEN).</p>' + note +
                '<form method="post" action="/admin/login"><label for="token">Admin token</label>'
                '<input type="password" id="token" name="token" autocomplete="current-password" required>'
                '<button type="submit">Log in</button></form></section></main>')


def message_page(title: str, message: str) -> str:
    return page(f"dockerproxy: {title}", f'<main><section><h1>{escape_html(title)}</h1>'
                f'<p>{escape_html(message)}</p><p><a href="/status">Back to the status page</a></p></section></main>')


# The session cookie a login sets, and how long it lasts: a working day.
SESSION_COOKIE = "dockerproxy_session"
SESSION_LIFETIME = 12 * 3600
# Sessions logged out before their expiry, remembered by this process until
# then.  Only a logged-in operator can add one (a logout needs the session and
# its CSRF token); past the cap the oldest is forgotten.
MAX_REVOKED_SESSIONS = 10000


def cookie_value(header: str, name: str) -> str:
    """The value of cookie `name` in a Cookie header, or ""."""
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip()
    return ""


class AdminGate:
    """Who may see /status and /status.json, use /admin/, and scrape /metrics
    (unless METRICS_PUBLIC): a connection whose socket peer is in ADMIN_ALLOW,
    or a request bearing ADMIN_TOKEN, as a bearer token or as the session
    cookie a login with it set.  Without either setting, no one.

    A session cookie is "<expiry>.<nonce>.<HMAC of both>", keyed by the token,
    so no session is stored and every instance sharing the token accepts it;
    a logout is remembered by the process that saw it (MAX_REVOKED_SESSIONS),
    and changing the token ends every session.  A
    form's POST must also carry the page's CSRF token (an HMAC of the session,
    or of "peer" for ADMIN_ALLOW), which another site's page cannot read; a
    bearer token is never sent by a browser on its own, so it needs none.
    """

    def __init__(self, token: str, allow: tuple, clock: Clock) -> None:
        self.token = token
        self.allow = allow
        self.clock = clock
        self.key = hashlib.sha256(b"dockerproxy admin session\0" + token.encode()).digest() if token \
            else os.urandom(32)
        self.revoked = collections.OrderedDict()  # session value -> its expiry
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.token or self.allow)

    def _sign(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, candidate: str) -> bool:
        return bool(self.token) and hmac.compare_digest(candidate.encode(), self.token.encode())

    def peer_allowed(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return False
        address = getattr(address, "ipv4_mapped", None) or address
        return any(address.version == network.version and address in network for network in self.allow)

    def new_session(self) -> str:
        payload = f"{int(self.clock.time() + SESSION_LIFETIME)}.{os.urandom(8).hex()}"
        return f"{payload}.{self._sign('session:' + payload)}"

    def session_valid(self, value: str) -> bool:
        if not self.token or not re.fullmatch(r"[0-9]{1,15}\.[0-9a-f]{16}\.[0-9a-f]{64}", value):
            return False
        payload, _, signature = value.rpartition(".")
        return (int(payload.partition(".")[0]) > self.clock.time() and value not in self.revoked
                and hmac.compare_digest(signature.encode(), self._sign("session:" + payload).encode()))

    def revoke(self, value: str) -> None:
        """A logout: the session is refused from now on, here, until it would have expired."""
        now = self.clock.time()
        with self._lock:
            for old, expiry in list(self.revoked.items()):
                if expiry <= now:
                    del self.revoked[old]
            while len(self.revoked) >= MAX_REVOKED_SESSIONS:
                self.revoked.popitem(last=False)
            self.revoked[value] = int(value.partition(".")[0])

    def admits(self, peer: str, authorization: str, cookie: str) -> str | None:
        """How a request is admitted: "bearer", "session:<value>", "peer", or None."""
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(credential.strip()):
            return "bearer"
        session = cookie_value(cookie, SESSION_COOKIE)
        if session and self.session_valid(session):
            return "session:" + session
        if self.peer_allowed(peer):
            return "peer"
        return None

    def csrf_token(self, admitted: str) -> str:
        return self._sign("csrf:" + admitted)

    def csrf_ok(self, admitted: str, form_value: str) -> bool:
        """A POST from a browser: the page's CSRF token; a bearer request needs none."""
        return admitted == "bearer" or hmac.compare_digest(form_value.encode(), self.csrf_token(admitted).encode())


# Serving: the endpoints ####################################################
#
# Each endpoint is a part that reads a ClientRequest, uses the proxy's shared
# parts, and sends its answer through the handler (or raises RegistryError,
# which the handler renders).  /v2/ and /v2/auth first, then the registry
# objects: passed through, or through the cache (blobs, manifests by digest,
# tags).

class ClientRequest(collections.namedtuple("ClientRequest", "method headers host scheme implied form peer via_peer",
                                           defaults=("", False))):
    """What the serving parts know of a client's request; the handler parses it:
    its method; its headers (an http.client.HTTPMessage); the host it
    addressed, checked by dispatch(); "http" or "https", as it reached us;
    the Route of a request on that host that names no registry; the form of
    a POST to /v2/auth or /admin/, else empty; the socket peer's address;
    whether it is a request of another instance of PEERS (signed, anonymous)."""

    __slots__ = ()

    @property
    def authorization(self) -> str:
        return self.headers.get("authorization", "")

    @property
    def accept(self) -> str:
        return ", ".join(self.headers.get_all("accept") or [])

    def own_challenge(self, route: Route, params: dict, prefix: str = "") -> str:
        """Our Bearer challenge, with a realm this client reaches."""
        return own_challenge(route, params, prefix, f"{self.scheme}://{self.host}", self.implied)


class Part:
    """A serving part: the proxy's shared parts, one request, and the handler,
    which it uses only to send answers."""

    def __init__(self, proxy: Proxy, request: ClientRequest, answer: Answers, endpoint: Endpoint) -> None:
        self.proxy = proxy
        self.request = request
        self.answer = answer
        self.endpoint = endpoint


class BaseEndpoint(Part):
    """/v2/: the upstream decides whether a token is needed, we answer with our realm.

    A client without credentials always gets our challenge, even when this
    route's upstream needs none: skopeo and podman take the challenge of
    this one ping for every registry behind the proxy, so an anonymous
    default route must not leave them unable to answer ghcr.io's.  The
    same challenge answers when the upstream is unreachable, so clients
    still reach the cache through /v2/auth.
    """

    def serve(self) -> None:
        route = self.endpoint.route
        if self.request.authorization == f"Bearer {ANONYMOUS_TOKEN}":
            # Our placeholder: an anonymous upstream, the proxy's own account or an
            # unreachable upstream stands behind it; upstream would only refuse it.
            return self.answer.send_small(200, b"{}", "application/json",
                                          (("Docker-Distribution-Api-Version", "registry/2.0"),))
        try:
            response = self.proxy.upstreams.fetch(
                self.request.method, route.upstream + "/v2/", forwarded_request_headers(self.request.headers),
                purpose=(route.name, ""))
        except (UpstreamUnavailable, UpstreamTimeout) as err:
            log.warning("route %s: %s; answering /v2/ from memory", route.name, err.message)
            raise self.unauthorized(route) from None
        self.answer.note_upstream(response.status)
        if response.status == 200 and not self.request.authorization:
            response.consume()
            raise self.unauthorized(route)
        self.answer.relay(response, route)

    def unauthorized(self, route: Route) -> RegistryError:
        """Our 401, with the upstream's service as last seen (any age), else the route's name."""
        known = self.proxy.auth.challenges.get(route, any_age=True)
        params = known[1] if known and known[0] == "bearer" else {"service": route.name}
        return unauthorized(self.request.own_challenge(route, params))


class TokenEndpoint(Part):
    """/v2/auth: a token from the realm of the route the image comes from."""

    def serve(self) -> None:
        query = urllib.parse.parse_qs(self.endpoint.query, keep_blank_values=True)
        form = self.request.form
        # OAuth2 joins scopes with spaces; docker repeats the parameter.  Take both.
        scopes = " ".join(form.get("scope", []) if form else query.get("scope", [])).split()
        route = self.proxy.routes.for_token(self.request.host, query.get("ns", [None])[0], scopes)
        self.answer.log_route(route)
        scopes = list(dict.fromkeys(rewrite_scope(scope, route) for scope in scopes))
        for scope in scopes:
            kind, repository, _ = split_scope(scope)
            if is_repository_scope(kind):
                check_repository(repository.split("/"))  # 400 for a name no registry has
                self.proxy.check_image(route, repository)
        # A POST carries a password or a refresh token: credentials either way.
        with_credentials = self.request.method == "POST" or bool(self.request.authorization)
        if route.credentials and not with_credentials:
            # The proxy's account is used by the proxy, upstream; a token of it
            # must never reach a client, who could use it anywhere, for anything.
            return self.send_anonymous_token()
        try:
            challenge = self.proxy.auth.challenge(route)
            if challenge is None or challenge[0] != "bearer":
                return self.send_anonymous_token()
            response = self.fetch_token(route, challenge[1], scopes, query)
        except (UpstreamUnavailable, UpstreamTimeout) as err:
            if not upstream_down(err):
                raise  # only busy: an anonymous token would fail a client that has credentials
            # Offline: cached public content needs no upstream token.
            log.warning("route %s: token service unavailable (%s); anonymous token", route.name, err.message)
            return self.send_anonymous_token()
        body = response.consume()
        if response.status == 200 and not with_credentials:
            self.note_anonymous_token(body)
        self.answer.send_small(response.status, body, headers=response_headers(response.headers))

    def fetch_token(self, route: Route, params: dict, scopes: list, query: dict) -> UpstreamResponse:
        realm, service = checked_realm(route, params)
        headers = {"user-agent": self.request.headers.get("user-agent", SERVER_VERSION)}
        if self.request.authorization:
            headers["authorization"] = self.request.authorization
        if self.request.method == "POST":
            form = {**self.request.form, "service": [service], "scope": [" ".join(scopes)]}
            body = urllib.parse.urlencode(form, doseq=True).encode()
            headers["content-type"] = "application/x-www-form-urlencoded"
            response = self.proxy.upstreams.fetch("POST", realm, headers, body, purpose=(route.name, ""))
        else:
            fields = [("service", service)] + [("scope", scope) for scope in scopes]
            fields += [(k, v) for k, values in query.items() if k not in ("service", "scope", "ns") for v in values]
            response = self.proxy.upstreams.fetch("GET", realm_url(realm, fields), headers, purpose=(route.name, ""))
        log.debug("token %s for %s -> %d", redacted_url(realm), printable(" ".join(scopes)), response.status)
        self.answer.note_upstream(response.status)
        return response

    def send_anonymous_token(self) -> None:
        self.answer.send_json(200, {"token": ANONYMOUS_TOKEN, "access_token": ANONYMOUS_TOKEN})

    def note_anonymous_token(self, body: bytes) -> None:
        """Requests with a token fetched without credentials count as anonymous."""
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            return
        if isinstance(token, str) and token:
            self.proxy.access.note_anonymous_token(token)


class PassThrough(Part):
    """A registry object asked of its route's upstream and relayed uncached:
    tag lists, referrers, and everything when there is no cache."""

    def __init__(self, proxy: Proxy, request: ClientRequest, answer: Answers, endpoint: Endpoint) -> None:
        super().__init__(proxy, request, answer, endpoint)
        self.target = endpoint.target
        self.route = endpoint.target.route

    def serve(self) -> None:
        self.pass_through()

    def pass_through(self) -> None:
        self.relay(self.fetch(self.request.method))

    def fetch(self, method: str) -> UpstreamResponse:
        """Ask the route's upstream, unless it refused this client with 429 not long ago."""
        identity = self.proxy.access.identity(self.request.authorization)
        self.held_back_by_429(identity)
        headers = self.upstream_headers()
        purpose = (self.route.name, OBJECT_KINDS.get(self.target.kind, ""))
        response = self.proxy.upstreams.fetch(method, self.upstream_url(), headers, purpose=purpose)
        if response.status == 429 and self.target.kind in OBJECT_KINDS and same_origin(
                response.url, self.route.upstream):
            # (a CDN's 429 is about one object's host, and a tag list's about a cheap
            # uncached call a client can repeat: neither is the route's pull quota)
            seconds = self.proxy.backoff.note(self.route.upstream, identity, response.headers.get("retry-after"))
            log.warning("route %s: upstream answered 429; only the cache answers %s for %gs",
                        self.route.name, "anonymous clients" if identity is None else "that client", seconds)
        own_account = headers.get("authorization") not in (None, self.request.authorization)
        if response.status == 401 and own_account and same_origin(response.url, self.route.upstream):
            self.proxy.auth.forget_account_token(self.route, self.target.repository)
        if self.refused(response, headers):
            identity = self.proxy.access.identity(self.request.authorization)
            self.proxy.access.refused(identity, self.route.upstream, self.target.repository)
        if response.status == 401 and not same_origin(response.url, self.route.upstream):
            headers = forwarded_request_headers(self.request.headers, same_host=False)
            response = self.proxy.auth.retry_at_redirect_target(response, method, headers)
        self.answer.note_upstream(response.status)
        return response

    def held_back_by_429(self, identity: str | None) -> None:
        """Raise 429 with the time left if the upstream refused this client (its
        identity, or anonymous: the proxy's own account) with 429 not long ago."""
        remaining = self.proxy.backoff.remaining(self.route.upstream, identity)
        if remaining:
            self.proxy.metrics.add("dockerproxy_upstream_held_back_total", (self.route.name, "429"))
            raise UpstreamHeldBack(429, "TOOMANYREQUESTS", f"the upstream of route {self.route.name} "
                                   "is rate-limiting this client; retry later", remaining, "429")

    def refused(self, response: UpstreamResponse, headers: dict) -> bool:
        """The route's upstream refused this client access: 401 or 403.  (A 401 to
        a request without a token may only ask for one; a client then comes back
        with it, and a success opens the repository again.)"""
        return response.status in (401, 403) and same_origin(response.url, self.route.upstream)

    def upstream_url(self) -> str:
        query = self.endpoint.query
        return self.route.upstream + self.target.upstream_path + (f"?{query}" if query else "")

    def upstream_headers(self) -> dict:
        """The client's headers, with the proxy's own account if the client brings none
        (a peer's request: never a credential of its own, whatever it carries)."""
        headers = forwarded_request_headers(self.request.headers, same_host=not self.request.via_peer)
        if "authorization" not in headers:
            auth, repository = self.proxy.auth, self.target.repository
            authorization = (auth.authorization(self.route, repository) if self.route.credentials else
                             auth.anonymous_authorization(self.route, repository) if self.request.via_peer else None)
            if authorization:
                headers["authorization"] = authorization
        return headers

    def relay(self, response: UpstreamResponse) -> None:
        whole_blob = self.target.kind == "blobs" and self.request.method == "GET"
        self.answer.relay(response, self.route, self.target.prefix, x_cache="MISS", kind=self.target.kind,
                          verify=self.target.reference if whole_blob else "")


def cacheable(response: UpstreamResponse, manifest: bool) -> bool:
    """Whether an upstream 200 may go into the cache (else it is passed through).

    A blob needs a Content-Length (space is reserved for it before it is
    written); a manifest needs a media type that is not signed schema 1.
    """
    if not manifest:
        return response.length is not None
    media_type = (response.headers.get("content-type") or "").partition(";")[0].strip().lower()
    too_large = response.length is not None and response.length > MAX_MANIFEST_SIZE
    return bool(media_type) and MANIFEST_KINDS.get(media_type) != "docker-v1" and not too_large


def read_at_most(response: UpstreamResponse, limit: int) -> bytes:
    """Up to `limit` bytes of a body, fewer if it ends (or breaks off) before."""
    body, buffer = bytearray(), thread_buffer()
    while len(body) < limit:
        try:
            count = response.readinto(buffer[:limit - len(body)])
        except (OSError, http.client.HTTPException):
            break
        if not count:
            break
        body += buffer[:count]
    return bytes(body)


def bytes_digest(data: bytes, digest: str) -> str:
    """The digest of `data` with the algorithm `digest` names."""
    algorithm = digest.partition(":")[0]
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def peer_refusal(response: UpstreamResponse) -> str:
    """Why a peer refused our proof (its 403 says so), or "" for any other answer; the answer is closed."""
    body = b""
    if response.status == 403:
        try:
            body = response.read_small()
        except RegistryError:
            pass
    response.close()
    try:
        message = json.loads(body)["errors"][0]["message"] if body else ""
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        message = ""
    message = message if isinstance(message, str) else ""
    return f"refused our proof ({printable(message[len('peer request refused: '):][:40])})" \
        if message.startswith("peer request refused") else ""


def peer_path(routes: RouteTable, route: Route, target: Target) -> str | None:
    """The path that asks a peer for `target` on the same upstream: prefixed with
    a registry host of a route to that upstream (every peer has the same routes);
    None if no route to it has one (then this instance fills it itself)."""
    for candidate in [route] + list(routes.routes.values()):
        if candidate.upstream == route.upstream and candidate.registry_hosts:
            return f"/v2/{candidate.registry_hosts[0]}/{target.repository}/{target.kind}/{target.reference}"
    return None


class WholeAnswer:
    """A verified manifest read into memory, handed to a fill as if it came from upstream."""

    framing, complete = "length", True

    def __init__(self, body: bytes, headers) -> None:
        self.body = memoryview(body)
        self.headers = headers
        self.length = len(body)
        self._position = 0

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.length - self._position)
        buffer[:count] = self.body[self._position:self._position + count]
        self._position += count
        return count

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class CachedObject(PassThrough):
    """A blob or manifest through the cache: sent from it when Access allows,
    checked upstream with a HEAD when not, filled from upstream on a miss.
    BlobEndpoint, ManifestEndpoint and TagEndpoint decide which."""

    def __init__(self, proxy: Proxy, request: ClientRequest, answer: Answers, endpoint: Endpoint) -> None:
        super().__init__(proxy, request, answer, endpoint)
        self.cache = proxy.cache
        self.access = proxy.access
        self.identity = None if request.via_peer else proxy.access.identity(request.authorization)
        self.asked_at = None                # when this request's fill asked its source
        self.from_bucket = False            # a fill's source: the bucket, which Access let this client have
        self.looked_again = False           # serve() ran again for an object stored since it looked
        self.looked_at = 0                  # Fills.ends when serve() began to look (see fill_and_follow)

    def may_serve(self, digest: str, stale: bool = False) -> bool:
        return self.access.may_serve(self.identity, self.route.upstream, self.target.repository, digest, stale)

    def wait_until_stored(self, tag_kind: str | None = None) -> None:
        """Wait out the store of an object a client may just have received
        whole; what the look that follows may miss, begin() catches."""
        fills, timeout = self.cache.fills, self.proxy.config.read_timeout
        self.looked_at = fills.ends
        fills.wait_stored(fill_key(self.target, tag_kind), timeout)
        if tag_kind is None:
            fills.wait_digest_stored(self.target.reference, timeout)

    def try_serve_stale(self, reason: str) -> bool:
        """Answer from the cache when upstream fails; only a tag can (TagEndpoint)."""
        return False

    def pass_through(self) -> None:
        self.answer.note_cache("bypass")
        super().pass_through()

    def relay_unless_stale(self, response: UpstreamResponse) -> None:
        """An upstream answer to the client, unless it is a failure the cache answers instead."""
        if is_upstream_failure(response.status) and self.try_serve_stale(f"upstream answered {response.status}"):
            return response.close()
        self.relay(response)

    def allow_or_relay_refusal(self, digest: str) -> bool:
        """For a cached digest: True if Access allows it, else if a HEAD upstream does.

        A refusal is relayed (our challenge for a 401) and False returned: an
        object first fetched with one user's credentials never reaches a client
        upstream would refuse.
        """
        if self.may_serve(digest):
            return True
        try:
            response = self.fetch("HEAD")
        except (UpstreamUnavailable, UpstreamTimeout) as err:
            if upstream_down(err) and self.may_serve(digest, stale=True):
                return True
            raise
        if response.status == 200:
            response.consume()
            self.access.record(self.identity, self.route.upstream, self.target.repository, [digest])
            return True
        if is_upstream_failure(response.status) and self.may_serve(digest, stale=True):
            response.close()
            return True
        self.relay(response)
        return False

    def send_cached(self, digest: str, media_type: str, x_cache: str = "HIT") -> None:
        """A cached object: no upstream request, sendfile for the body, Range for blobs."""
        opened = self.cache.store.open(digest)
        if opened is None:  # evicted since we looked
            return self.pass_through()
        file, size = opened
        self.answer.note_cache("stale" if x_cache == "STALE" else "hit")
        try:
            byte_range = None
            if_range = self.request.headers.get("if-range")
            if self.target.kind == "blobs" and (if_range is None or if_range.strip() == f'"{digest}"'):
                # An If-Range naming another version (or a date: we have none) asks for it all.
                byte_range = parse_byte_range(self.request.headers.get("range", ""), size)
            start, end = byte_range or (0, size - 1)
            headers = [("Content-Type", media_type), ("Docker-Content-Digest", digest),
                       ("ETag", f'"{digest}"'), ("Accept-Ranges", "bytes"), ("X-Cache", x_cache)]
            if byte_range:
                headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            if x_cache == "STALE":
                headers.append(("Warning", '110 dockerproxy "Response is Stale"'))
            self.answer.send_file(206 if byte_range else 200, headers, file, start, end - start + 1)
        finally:
            self.cache.store.close(file)

    def fill_and_follow(self, digest: str | None, manifest: bool, tag_kind: str | None = None) -> None:
        """A miss: one upstream GET per object, however many clients ask at once
        (beyond MAX_FILLS, passed through uncached).  A fill of it that ended
        since serve() looked (a look at the bucket takes a while) sends this
        request back to serve() once, to find it stored."""
        fill, leader = self.cache.fills.begin(fill_key(self.target, tag_kind), self.identity,
                                              self.proxy.clock.time(),
                                              None if self.looked_again else self.looked_at, digest)
        if fill is None and leader:
            self.looked_again = True  # once: an object evicted meanwhile is then filled
            return self.serve()
        if fill is None:
            return self.pass_through()
        if not leader:
            return self.join_fill(fill)
        try:
            self.lead_fill(fill, digest, manifest, tag_kind)
        except BaseException:
            if fill.state == Fill.PENDING:  # a started fill ends in its own thread
                self.cache.fills.end(fill, Fill.DECLINED)
            raise

    def lead_fill(self, fill: Fill, digest: str | None, manifest: bool, tag_kind: str | None) -> None:
        fills = self.cache.fills
        self.answer.note_cache("miss")  # asked upstream to fill the cache, whatever it answers
        self.asked_at = self.proxy.clock.time()  # what the fill's records are dated (see record_fill)
        try:
            response = self.fetch_for_fill(fill, digest, manifest)
        except RegistryError as err:
            fills.end(fill, Fill.DECLINED)
            if upstream_down(err) and self.try_serve_stale(err.message):
                return
            raise
        if response.status != 200 or not cacheable(response, manifest):
            fills.end(fill, Fill.DECLINED)
            if 200 <= response.status < 300:
                self.answer.note_cache("bypass")  # an answer the cache does not keep
            return self.relay_unless_stale(response)
        if digest is None and DIGEST.match(response.headers.get("docker-content-digest", "")):
            digest = response.headers["docker-content-digest"]
        headers = [(name, value) for name, value in response_headers(response.headers, self.target.prefix)
                   if name != "Docker-Content-Digest"]
        headers += [("Docker-Content-Digest", digest)] if digest else []  # what the bytes are checked against
        headers += [("X-Cache", "HIT" if fill.source == "bucket" else "MISS")]
        if manifest:
            response = self.verified_manifest(fill, response, digest, headers)
            if response is None:
                return  # answered, uncached
        media_type = None
        if manifest:  # what the bytes say they are, else what the header says
            media_type = document_media_type(bytes(response.body)) or bare_media_type(
                response.headers.get("content-type", ""))
        record = functools.partial(self.record_fill, fill.source, tag_kind, media_type)
        reader = fills.start(fill, response, digest, headers, media_type, record)
        if reader is None:
            fills.end(fill, Fill.DECLINED)
            self.answer.note_cache("bypass")  # no room (or no bytes for a digest of some: refused in relay)
            return self.send_uncached(response, headers)
        self.follow(fill, reader)

    def fetch_for_fill(self, fill: Fill, digest: str | None, manifest: bool) -> UpstreamResponse:
        """The answer a fill copies: the bucket's object (a blob Access let this
        client have), else the answer of the peer that owns the digest, else upstream's."""
        shared, peers = self.cache.shared, self.proxy.peers
        if self.from_bucket:
            response = shared.open(digest)
            if response is not None and empty_for(response.length, digest):
                response.close()  # a zero-byte object under a digest of bytes: never a clean empty 200
                shared.discard(digest)
            elif response is not None:
                fill.source = "bucket"
                self.answer.note_cache("hit")
                return response
        if not manifest and digest and peers is not None and not self.request.via_peer:
            response = self.ask_peers(fill, digest)
            if response is not None:
                fill.source = "peer"
                return response
        return self.fetch("GET")  # (no bytes for a digest of some: Fills.start and relay() refuse it)

    def ask_peers(self, fill: Fill, digest: str) -> UpstreamResponse | None:
        """The owner's answer for a blob this instance does not fill itself; None: fill it here.

        Peers ahead of this one in the digest's order are asked in turn, and
        one that does not answer is passed over.  An owner that answers with
        anything but the whole blob (the image is private, upstream refused
        or failed) leaves the fill to this instance, with this client's
        own credentials.  Client credentials never go to a peer.
        """
        peers, metrics = self.proxy.peers, self.proxy.metrics
        path = peer_path(self.proxy.routes, self.route, self.target)
        if path is None:
            return None
        for peer in peers.order(digest):
            if peer == peers.own:
                return None
            try:
                response = peers.fetch(peer, self.route, path)
            except UpstreamHeldBack:  # this instance's own limit on requests to it: not the peer's fault
                return None
            except (UpstreamUnavailable, UpstreamTimeout) as err:
                peers.failed(peer, err.message)
                metrics.add("dockerproxy_peer_requests_total", ("unreachable",))
                continue
            if response.status == 200 and response.length is not None and not empty_for(response.length, digest) and (
                    response.headers.get("docker-content-digest") == digest):
                peers.answered(peer)
                metrics.add("dockerproxy_peer_requests_total", ("ok",))
                fill.origin = peer  # passed over if its answer fails (Proxy.fill_failed)
                return response
            if response.status == 429 and self.identity is None:
                # upstream's limit on the owner's anonymous pulls holds for this anonymous
                # client too; a client with credentials of its own has its own quota
                metrics.add("dockerproxy_peer_requests_total", ("declined",))
                return response
            refusal = peer_refusal(response)
            if refusal:  # our proof: a clock out of step, another PEER_SECRET
                peers.failed(peer, refusal)
                metrics.add("dockerproxy_peer_requests_total", ("unreachable",))
                continue
            peers.answered(peer)
            metrics.add("dockerproxy_peer_requests_total", ("declined",))
            return None
        return None

    def verified_manifest(self, fill: Fill, response: UpstreamResponse, digest: str | None,
                          headers: list) -> WholeAnswer | None:
        """A manifest, read whole before a byte of it goes out, if it can be cached.

        It is cached only when its digest (asked for, or named by upstream)
        verifies it, or, naming none, when its framing proves it complete.
        Otherwise the client gets it as it came, uncached: a signed schema 1
        manifest, whose digest leaves out its signatures, one larger than
        MAX_MANIFEST_SIZE (sent on as it arrives), or one whose end nothing
        proves.  Bytes that contradict their digest otherwise, or that broke
        off, are a 502.  None: the client was answered.
        """
        body = read_at_most(response, MAX_MANIFEST_SIZE + 1)
        if len(body) > MAX_MANIFEST_SIZE:
            self.cache.fills.end(fill, Fill.DECLINED)
            self.answer.note_cache("bypass")
            self.answer.relay(response, self.route, self.target.prefix, x_cache="MISS", head=body)
            return None
        if not response.complete:
            self.cache.fills.end(fill, Fill.DECLINED)
            response.close()
            raise UpstreamUnavailable(f"upstream {redacted_url(response.url)} broke off a manifest")
        response.release()
        if digest and bytes_digest(body, digest) != digest and not is_schema1(body, response.headers):
            self.cache.fills.end(fill, Fill.DECLINED)
            self.proxy.metrics.add("dockerproxy_cache_verify_failures_total")
            raise UpstreamUnavailable(f"upstream sent a manifest that is not {digest}")
        if not digest and response.framing == "close" and not is_json(body):
            self.cache.fills.end(fill, Fill.DECLINED)  # the close came before the end of the document
            raise UpstreamUnavailable(f"upstream {redacted_url(response.url)} broke off a manifest")
        if (bytes_digest(body, digest) != digest) if digest else response.framing == "close":
            log.info("manifest %s not cached: nothing verifies it", printable(self.target.upstream_path))
            self.cache.fills.end(fill, Fill.DECLINED)
            self.answer.note_cache("bypass")
            self.answer.send_small(200, body, headers=headers)
            return None
        return WholeAnswer(body, response.headers)

    def send_uncached(self, response, headers: list) -> None:
        if isinstance(response, WholeAnswer):
            return self.answer.send_small(200, bytes(response.body), headers=headers)
        self.relay(response)

    def join_fill(self, fill: Fill) -> None:
        """Follow another client's fill if Access lets this client, else fetch alone."""
        config = self.proxy.config
        allowed = self.access.may_join(self.identity, fill.identity, self.route.upstream,
                                       self.target.repository, fill.started_at)
        if allowed and fill.wait_started(config.connect_timeout + config.read_timeout) in (
                Fill.STREAMING, Fill.DONE):
            self.answer.note_cache("miss", joined=True)
            if self.follow(fill):
                return
        self.answer.note_cache("bypass")
        self.pass_through()  # upstream decides, for this client alone

    def follow(self, fill: Fill, reader=None) -> bool:
        """Send a fill's bytes as they land; False if it failed before we began."""
        reader = reader or fill.open_reader(self.cache.store)
        if reader is None:
            return False
        patience = FOLLOWER_PATIENCE_READ_TIMEOUTS * self.proxy.config.read_timeout + 1
        try:
            self.answer.send_fill(fill, reader, patience)
        finally:
            self.cache.fills.close_reader(fill, reader)
        return True

    def record_fill(self, source: str, tag_kind: str | None, media_type: str | None, digest: str,
                    spool: Spool) -> None:
        """After a verified fill (in its thread): the link, the tag entry, and who may see it.

        Only upstream's answer to this client opens the repository to it (or,
        anonymous, to everyone).  A copy from the bucket was allowed by what
        the records say already, and changes nothing; a peer's answer links
        the object (the owner's upstream served it from this repository) but
        opens nothing: a new anonymous-pull mark would reopen a repository
        that turned private to everything linked before it.
        """
        upstream, repository = self.route.upstream, self.target.repository
        if media_type and tag_kind:
            self.cache.tags.put(upstream, repository, self.target.reference, tag_kind, digest, media_type,
                                self.asked_at)
        # This object only: what a manifest names is not proof that upstream
        # would serve it from this repository (Access, rule 1).
        if source == "upstream":
            self.access.record(self.identity, upstream, repository, [digest], self.asked_at)
        elif source == "peer":  # dated when asked: no later than the owner's own mark
            self.access.link(upstream, repository, [digest], self.asked_at)


class BlobEndpoint(CachedObject):
    """/v2/<name>/blobs/<digest>: cached, checked, or filled; a HEAD never costs a download."""

    def serve(self) -> None:
        digest = self.target.reference
        self.wait_until_stored()
        shared = self.cache.shared
        if self.cache.store.exists(digest):
            if self.allow_or_relay_refusal(digest):
                self.send_stored(digest)
        elif shared is not None and shared.has(digest):
            if self.allow_or_relay_refusal(digest):
                self.send_from_bucket(digest)
        elif self.request.method == "HEAD" or self.request.headers.get("range"):
            self.pass_through()
        else:
            self.fill_and_follow(digest, manifest=False)

    def redirects(self) -> bool:
        """S3_REDIRECT answers this request: a client's GET (a peer wants the bytes)."""
        shared = self.cache.shared
        return shared is not None and shared.redirect and self.request.method == "GET" and not self.request.via_peer

    def send_stored(self, digest: str) -> None:
        """A blob stored here: redirected to the bucket if it holds it too (S3_REDIRECT), else sent."""
        if self.redirects() and self.cache.shared.has(digest):
            return self.redirect_to_bucket(digest)
        if self.cache.shared is not None:
            self.cache.shared.uses.used(digest)
        self.send_cached(digest, BLOB_TYPE)

    def send_from_bucket(self, digest: str) -> None:
        """A blob only the bucket holds: redirected there, its size told (HEAD), or copied here."""
        shared = self.cache.shared
        shared.uses.used(digest)
        if self.redirects():
            return self.redirect_to_bucket(digest)
        if self.request.method == "HEAD":
            return self.head_from_bucket(digest)
        if self.request.headers.get("range"):
            return self.pass_through()
        self.from_bucket = True
        self.fill_and_follow(digest, manifest=False)

    def redirect_to_bucket(self, digest: str) -> None:
        self.answer.note_cache("hit")
        self.answer.send_small(307, b"", headers=(
            ("Location", self.cache.shared.presigned_url(digest)), ("Docker-Content-Digest", digest),
            ("X-Cache", "HIT")))

    def head_from_bucket(self, digest: str) -> None:
        try:
            info = self.cache.shared.bucket.head(self.cache.shared.key(digest))
        except S3Failure:
            info = None
        if info is None:  # gone since has(): upstream decides
            return self.pass_through()
        self.answer.note_cache("hit")
        self.answer.send_small(200, b"", headers=(
            ("Content-Type", BLOB_TYPE), ("Docker-Content-Digest", digest), ("ETag", f'"{digest}"'),
            ("Accept-Ranges", "bytes"), ("X-Cache", "HIT")), content_length=info[0])


class ManifestEndpoint(CachedObject):
    """/v2/<name>/manifests/<digest>: immutable, so cached like a blob, if the client accepts its type."""

    def serve(self) -> None:
        digest = self.target.reference
        self.wait_until_stored()
        media_type = self.cache.media_type(digest)
        if media_type and accepts(self.request.accept, media_type):
            if self.allow_or_relay_refusal(digest):
                self.send_cached(digest, media_type)
        elif self.request.method == "HEAD":
            self.pass_through()
        else:
            self.fill_and_follow(digest, manifest=True)


class TagEndpoint(CachedObject):
    """/v2/<name>/manifests/<tag>: from the tag index within MANIFEST_TTL, then
    revalidated by a HEAD (which Docker Hub does not count as a pull); stale
    from the cache when upstream is down, failing or rate-limiting."""

    def __init__(self, proxy: Proxy, request: ClientRequest, answer: Answers, endpoint: Endpoint) -> None:
        super().__init__(proxy, request, answer, endpoint)
        self.kind = accept_kind(request.accept)

    def serve(self) -> None:
        upstream, repository, tag = self.route.upstream, self.target.repository, self.target.reference
        self.wait_until_stored(self.kind)
        entry = self.cache.tag(upstream, repository, tag, self.kind)
        if entry is not None and not accepts(self.request.accept, entry["media_type"]):
            entry = None  # noted from a HEAD that named another type than the stored one
        if entry is None:
            if self.request.method == "HEAD":
                return self.head_uncached()
            return self.fill_and_follow(None, manifest=True, tag_kind=self.kind)
        fresh = self.proxy.clock.time() - entry.get("checked", 0) < self.proxy.config.manifest_ttl
        if fresh and self.may_serve(entry["digest"]):
            return self.send_cached(entry["digest"], entry["media_type"])
        self.revalidate(entry)

    def head_upstream(self) -> UpstreamResponse | None:
        """A HEAD of the tag upstream; None when upstream failed and the cache answered."""
        try:
            return self.fetch("HEAD")
        except (UpstreamUnavailable, UpstreamTimeout) as err:
            if upstream_down(err) and self.try_serve_stale(err.message):
                return None
            raise

    def head_uncached(self, response: UpstreamResponse | None = None) -> None:
        """An uncached tag's HEAD: asked upstream with a HEAD, stale from the cache if that fails.

        The answer's digest is noted in the tag index: containerd resolves a
        tag by HEAD and then fetches the manifest by digest, so without this
        entry it could never resolve the tag from the cache when upstream is
        down.  The entry serves nothing until that manifest is cached itself.
        """
        response = response or self.head_upstream()
        if response is None:
            return
        digest = response.headers.get("docker-content-digest", "")
        media_type = response.headers.get("content-type", "")
        if response.status == 200 and DIGEST.match(digest) and media_type:
            self.cache.tags.put(self.route.upstream, self.target.repository, self.target.reference,
                                self.kind, digest, media_type)
        self.relay_unless_stale(response)

    def revalidate(self, entry: dict) -> None:
        """HEAD upstream: the same digest, serve ours; another, fetch it; a failure, stale."""
        response = self.head_upstream()
        if response is None:
            return
        upstream, repository = self.route.upstream, self.target.repository
        if response.status == 200:
            response.consume()
            if response.headers.get("docker-content-digest") == entry["digest"]:
                self.cache.tags.put(upstream, repository, self.target.reference,
                                    self.kind, entry["digest"], entry["media_type"])
                self.access.record(self.identity, upstream, repository, [entry["digest"]])
                return self.send_cached(entry["digest"], entry["media_type"])
            if self.request.method == "HEAD":
                return self.head_uncached(response)  # the answer in hand
            return self.fill_and_follow(None, manifest=True, tag_kind=self.kind)
        if response.status == 404:
            self.cache.tags.drop(upstream, repository, self.target.reference)
        self.relay_unless_stale(response)

    def try_serve_stale(self, reason: str) -> bool:
        """Upstream down, 5xx or 429: a cached manifest of the tag, marked stale, if any."""
        upstream, repository, tag = self.route.upstream, self.target.repository, self.target.reference
        for entry in self.cache.tag_entries(upstream, repository, tag):
            if accepts(self.request.accept, entry["media_type"]) and self.may_serve(entry["digest"], stale=True):
                log.warning("route %s: %s; serving %s:%s from cache (stale)",
                            self.route.name, reason, repository, tag)
                self.send_cached(entry["digest"], entry["media_type"], "STALE")
                return True
        return False


# The operator's pages ------------------------------------------------------

def purge_target(routes: RouteTable, name: str) -> tuple:
    """An image name as docker writes it -> (Route, repository, tag or None), or 400.

    'alpine' and 'docker.io/alpine' are library/alpine on Docker Hub's route;
    'ghcr.io/owner/app:1.0' is owner/app on the route of ghcr.io; a name
    without a registry host is on DEFAULT_ROUTE."""
    name = name.strip()
    if "@" in name:
        raise RegistryError(400, "NAME_INVALID", "purge takes name or name:tag, not a digest")
    path, tag = name, None
    if ":" in name.rpartition("/")[2]:
        path, _, tag = name.rpartition(":")
        check_reference("manifests", tag)
    components = path.split("/")
    if routes.debug_target:
        route = routes.debug_target
    elif len(components) >= 2 and looks_like_registry_host(components[0]):
        route, components = routes.for_registry(components[0]), components[1:]
    elif routes.default is not None:
        route = routes.default
    else:
        raise RegistryError(400, "NAME_INVALID", "name the registry: there is no DEFAULT_ROUTE")
    repository = check_repository(components)
    if route.dockerhub and "/" not in repository:
        repository = "library/" + repository
    return route, repository, tag


def own_host_name(host: str, custom_domain: str, machine: str) -> bool:
    """A Host a browser on an ADMIN_ALLOW address may name: an IP address,
    localhost, this machine's name, or CUSTOM_DOMAIN and its subdomains.
    Another name may be a DNS-rebinding attacker's, re-pointed at us: the
    browser would then let that site's page read our answers and post our
    forms, with the allowed address as the peer."""
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host.strip("[]").partition("%")[0])
        return True
    except ValueError:
        pass
    return host in ("localhost", machine) or bool(custom_domain) and (
        host == custom_domain or host.endswith("." + custom_domain))


def page_refresh(query: str) -> int:
    """?refresh=N: reload the status page every N seconds (2 to 3600; else not)."""
    value = urllib.parse.parse_qs(query).get("refresh", [""])[0]
    return int(value) if re.fullmatch(r"[0-9]{1,4}", value) and 2 <= int(value) <= 3600 else 0


class ReadyEndpoint(Part):
    """/readyz: 200 when this instance should get traffic, else 503 with the reasons.
    It answers anyone: a load balancer or kubelet brings no token."""

    def serve(self) -> None:
        problems = self.proxy.readiness()
        self.answer.send_json(503 if problems else 200,
                              {"status": "not ready" if problems else "ready", "problems": problems})


# What a 401 of the admin pages asks for (RFC 9110 requires one): the token as a bearer.
ADMIN_CHALLENGE = ("WWW-Authenticate", 'Bearer realm="dockerproxy admin"')


class AdminPart(Part):
    """A page or action behind the AdminGate."""

    def admitted(self) -> str | None:
        admitted = self.proxy.gate.admits(self.request.peer, self.request.authorization,
                                          self.request.headers.get("cookie", ""))
        if admitted == "peer" and not own_host_name(split_host(self.request.host), self.proxy.config.custom_domain,
                                                     self.proxy.machine_name):
            return None  # a name we do not know: a DNS-rebinding page may be behind it
        return admitted

    def wants_html(self) -> bool:
        return "text/html" in self.request.accept

    def refuse(self) -> None:
        """No admission: off, a login form, a bearer challenge, or a refused address."""
        gate = self.proxy.gate
        if not gate.enabled and self.endpoint.name == "metrics":
            raise RegistryError(404, "UNSUPPORTED", "/metrics is served to ADMIN_ALLOW and ADMIN_TOKEN, and "
                                "neither is set: set one, or METRICS_PUBLIC=true")
        if not gate.enabled:
            raise RegistryError(404, "UNSUPPORTED", "the status page and admin actions are off: "
                                "set ADMIN_TOKEN or ADMIN_ALLOW")
        if gate.token and self.wants_html():
            return self.answer.send_page(401, login_page(), (ADMIN_CHALLENGE,))
        if gate.token:
            raise RegistryError(401, "UNAUTHORIZED", "the admin token is required",
                                headers=(ADMIN_CHALLENGE,))
        if gate.peer_allowed(self.request.peer):
            raise RegistryError(403, "DENIED", "ADMIN_ALLOW admits requests that name this proxy by an address, "
                                "localhost, this machine's name or CUSTOM_DOMAIN (another name may be a "
                                "DNS-rebinding site's); use one of those, or ADMIN_TOKEN")
        raise RegistryError(403, "DENIED", "this address is not in ADMIN_ALLOW")


class MetricsEndpoint(AdminPart):
    """/metrics: Prometheus text format 0.0.4, to ADMIN_ALLOW and ADMIN_TOKEN, or anyone with METRICS_PUBLIC."""

    def serve(self) -> None:
        config = self.proxy.config
        if not config.metrics:
            raise RegistryError(404, "UNSUPPORTED", "metrics are off (METRICS=off)")
        if not config.metrics_public and self.admitted() is None:
            return self.refuse()
        self.answer.send_small(200, self.proxy.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8",
                               (("Cache-Control", "no-store"),))


class StatusEndpoint(AdminPart):
    """/status (HTML) and /status.json: the operator's view (client addresses are the operator's data)."""

    def serve(self) -> None:
        admitted = self.admitted()
        if admitted is None:
            return self.refuse()
        document = self.proxy.status()
        if self.endpoint.name == "status.json":
            return self.answer.send_small(200, json.dumps(document, indent=1).encode(), "application/json",
                                          (("Cache-Control", "no-store"),))
        text = status_page(document, self.proxy.gate.csrf_token(admitted), page_refresh(self.endpoint.query),
                           logout=admitted.startswith("session:"))
        self.answer.send_page(200, text)


class AdminAction(AdminPart):
    """POST /admin/login, /admin/logout, /admin/purge, /admin/evict.

    A browser's form gets a page back, its refusals too; anything else JSON.
    Every action but the login needs admission and, from a browser, the
    page's CSRF token and no foreign Origin."""

    def serve(self) -> None:
        try:
            self.act()
        except RegistryError as err:
            if not self.wants_html() or err.close:
                raise
            self.answer.send_page(err.status, message_page(f"{self.endpoint.name}: refused", err.message),
                                  err.headers)

    def act(self) -> None:
        gate = self.proxy.gate
        if not gate.enabled:
            return self.refuse()
        if self.endpoint.name == "login":
            return self.login()
        admitted = self.admitted()
        if admitted is None:
            return self.refuse()
        if not self.same_origin() or not gate.csrf_ok(admitted, self.field("csrf")):
            raise RegistryError(403, "DENIED", "missing or wrong CSRF token, or a foreign Origin")
        if self.endpoint.name == "logout":
            return self.end_session(admitted)
        if self.endpoint.name == "prefetch":
            return self.prefetch()
        report = self.purge() if self.endpoint.name == "purge" else self.evict()
        client = client_address(self.request.peer, self.request.headers, self.proxy.config.trust_proxy_headers)
        log.info("admin %s from %s: %s", self.endpoint.name, client, printable(json.dumps(report)))
        if self.wants_html():
            return self.answer.send_page(200, message_page(f"{self.endpoint.name} done", json.dumps(report)))
        self.answer.send_json(200, report)

    def field(self, name: str) -> str:
        return (self.request.form.get(name) or [""])[0]

    def same_origin(self) -> bool:
        """A browser names the page a POST came from; it must be ours (none: not a browser)."""
        origin = self.request.headers.get("origin")
        if origin is None:
            return True
        try:
            netloc = urllib.parse.urlsplit(origin).netloc
        except ValueError:  # "http://[": not a page of ours
            return False
        return netloc.lower() == self.request.host.lower()

    def login(self) -> None:
        gate = self.proxy.gate
        if not gate.token:
            raise RegistryError(404, "UNSUPPORTED", "there is no ADMIN_TOKEN to log in with")
        if not self.same_origin() or not gate.token_matches(self.field("token")):
            log.warning("admin login refused from %s", client_address(self.request.peer, self.request.headers,
                                                                       self.proxy.config.trust_proxy_headers))
            return self.answer.send_page(401, login_page("That is not the admin token."), (ADMIN_CHALLENGE,))
        self.send_session(gate.new_session(), SESSION_LIFETIME)

    def end_session(self, admitted: str) -> None:
        if admitted.startswith("session:"):
            self.proxy.gate.revoke(admitted.partition(":")[2])
        self.send_session("", 0)

    def send_session(self, value: str, lifetime: int) -> None:
        secure = "; Secure" if self.request.scheme == "https" else ""
        cookie = f"{SESSION_COOKIE}={value}; Path=/; Max-Age={lifetime}; HttpOnly; SameSite=Strict{secure}"
        self.answer.send_small(303, b"", headers=PAGE_HEADERS + (("Location", "/status"), ("Set-Cookie", cookie)))

    def purge(self) -> dict:
        if self.proxy.cache is None:
            raise RegistryError(404, "UNSUPPORTED", "there is no cache (CACHE_DIR is empty)")
        image = self.field("image")
        route, repository, tag = purge_target(self.proxy.routes, image)
        report = self.proxy.cache.purge(route.upstream, repository, tag)
        return {"image": image_name(route, repository) + (f":{tag}" if tag else ""), **report}

    def evict(self) -> dict:
        if self.proxy.cache is None:
            raise RegistryError(404, "UNSUPPORTED", "there is no cache (CACHE_DIR is empty)")
        return self.proxy.cache.sweep()

    def prefetch(self) -> None:
        """Prefetch the images of the form ("images", each as a prefetch list's
        line, and "platforms"): NDJSON events as they happen; from a browser,
        started in the background, /status shows it."""
        if self.proxy.cache is None:
            raise RegistryError(404, "UNSUPPORTED", "there is no cache (CACHE_DIR is empty)")
        images = self.prefetch_list()
        client = client_address(self.request.peer, self.request.headers, self.proxy.config.trust_proxy_headers)
        log.info("admin prefetch from %s: %s", client, printable(", ".join(str(image[0]) for image in images)))
        self.proxy.prefetch(images, self.answer, background=self.wants_html())

    def prefetch_list(self) -> list:
        form = self.request.form
        lines = (form.get("images") or []) + (form.get("image") or [])
        try:
            default = parse_platforms(form.get("platforms", []) + form.get("platform", []))
            images = [(reference, own or default) for reference, own in parse_image_list("\n".join(lines))]
        except ValueError as err:
            raise RegistryError(400, "NAME_INVALID", str(err)) from None
        if not images or len(images) > MAX_PREFETCH_IMAGES:
            raise RegistryError(400, "NAME_INVALID", f"name 1 to {MAX_PREFETCH_IMAGES} images in \"images\"")
        return images


# What serves each endpoint of dispatch(); the cached parts pass through
# when there is no cache.  redirect, health and routes the handler answers.
SERVING_PARTS = {
    "base": BaseEndpoint, "token": TokenEndpoint, "blob": BlobEndpoint,
    "manifest": ManifestEndpoint, "tag": TagEndpoint, "tags": PassThrough, "referrers": PassThrough,
    "ready": ReadyEndpoint, "metrics": MetricsEndpoint, "status": StatusEndpoint, "status.json": StatusEndpoint,
    "login": AdminAction, "logout": AdminAction, "purge": AdminAction, "evict": AdminAction,
    "prefetch": AdminAction,
}


def serving_part(name: str, cache: Cache | None) -> type:
    part = SERVING_PARTS[name]
    return PassThrough if cache is None and issubclass(part, CachedObject) else part


# HTTP handler ##############################################################

def cork(sock, on: bool) -> None:
    """TCP_CORK (what nginx's tcp_nopush sets): while on, the kernel sends only
    full segments, so headers and the first bytes of a file leave together.
    Measured on a 256 MiB sendfile here: about 10% faster.  Linux only."""
    if hasattr(socket, "TCP_CORK") and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
        except OSError:
            pass  # the client is gone: the next write says so


def sendfile_all(sock, fd: int, offset: int, count: int, on_sent=None) -> int:
    """`count` bytes of `fd` from `offset` to a socket with os.sendfile, waiting
    (at most the socket's timeout) only when it is full (socket.sendfile polls
    before every call).  Returns where it stopped: the end, or where the file
    system refused sendfile (the caller sends the rest another way)."""
    end, out = offset + count, sock.fileno()
    while offset < end:
        try:
            sent = os.sendfile(out, fd, offset, end - offset)
        except BlockingIOError:
            if not writable(sock, sock.gettimeout()):
                raise socket.timeout("the client stopped reading") from None
            continue
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return offset
            raise
        if not sent:
            raise ConnectionAbortedError("the file is shorter than announced")
        offset += sent
        if on_sent is not None:
            on_sent(sent)  # as it goes: a transfer cut short still counts what went (RATE_LIMIT_BYTES)
    return offset


def writable(sock, timeout: float | None) -> bool:
    """Whether a socket can take more bytes within `timeout` seconds (poll: no
    limit on the descriptor's number, as select() has at 1024)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


class DigestCheck:
    """A body hashed as it passes, against the digest a client asked for ("": nothing to check)."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.hasher = hashlib.new(digest.partition(":")[0]) if digest else None

    def update(self, chunk) -> None:
        if self.hasher is not None:
            self.hasher.update(chunk)

    def failed(self) -> bool:
        return self.hasher is not None and f"{self.digest.partition(':')[0]}:{self.hasher.hexdigest()}" != self.digest


# The headers of our HTML pages: nothing but their own inline style runs or
# loads, forms post only to us, no other site may frame them (clickjacking an
# admin action), and no browser or proxy keeps a copy of one.
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"), ("Cache-Control", "no-store"),
)


class Answers:
    """The answers a handler sends: small ones in one write, files with
    sendfile, upstream answers relayed, fills as they grow, errors.

    A mixin of ProxyHandler, in socketserver's style: it writes through the
    request handler's send_response, wfile and connection, and it is all
    that the serving parts use of the handler.
    """

    def note_cache(self, result: str, joined: bool = False) -> None:
        """This request's cache outcome (one of CACHE_RESULTS), for the metrics,
        the status page and the log; the last one noted stands."""
        self.cache_result = result
        self.joined = joined

    def note_upstream(self, status: int) -> None:
        self.upstream_status = status

    def send_page(self, status: int, text: str, headers=()) -> None:
        """An HTML page of our own: never cached, never framed, no script, nothing fetched."""
        self.send_small(status, text.encode(), "text/html; charset=utf-8", PAGE_HEADERS + tuple(headers))

    def start_response(self, status: int, headers) -> None:
        self.send_response(status)
        self.end_if_draining()
        for name, value in headers:
            self.send_header(name, value)
        self.response_started = True
        self.status_sent = status

    def send_small(self, status: int, body: bytes, content_type: str = "",
                   headers=(), content_length: int | None = None) -> None:
        """A whole answer in one write (no Nagle wait between headers and body)."""
        self.start_response(status, headers)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        if self.command != "HEAD" and body and self.request_version != "HTTP/0.9":
            self._headers_buffer.extend((b"\r\n", body))
            self.bytes_sent += len(body)
            self.flush_headers()
        else:
            self.end_headers()

    def start_lines(self, content_type: str) -> None:
        """A 200 whose body is lines sent as they come (NDJSON), chunked to an
        HTTP/1.1 client, else ended by closing the connection."""
        self.start_response(200, (("Content-Type", content_type), ("Cache-Control", "no-store"),
                                   ("X-Accel-Buffering", "no")))
        if self.request_version == "HTTP/1.1":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()

    def send_line(self, line: bytes) -> None:
        chunked = self.request_version == "HTTP/1.1"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line) if chunked else line)
        self.wfile.flush()
        self.bytes_sent += len(line)

    def end_lines(self) -> None:
        if self.request_version == "HTTP/1.1":
            self.wfile.write(b"0\r\n\r\n")

    def send_json(self, status: int, document: object) -> None:
        self.send_small(status, json.dumps(document, indent=1).encode(), "application/json")

    def send_registry_error(self, err: RegistryError) -> None:
        if err.close:
            self.close_connection = True
        if self.response_started:
            self.close_connection = True  # too late for a status: cut the body short
            return
        self.send_small(err.status, err.body(), "application/json", err.headers)

    def send_challenge(self, route: Route, header: str, prefix: str = "") -> None:
        """An upstream's 401 as ours: a Bearer realm becomes our /v2/auth."""
        scheme, params = self.proxy.auth.challenges.remember(route, header)
        if scheme == "bearer":
            header = self.client.own_challenge(route, params, prefix)
        # Basic: passed on; the client's credentials then go to the same host.
        self.send_registry_error(unauthorized(header))

    def send_file(self, status: int, headers: list, file, start: int, count: int) -> None:
        """`count` bytes of `file` from `start`: small ones in one write, others with
        sendfile, corked so the headers leave in the body's first full segment."""
        if self.command == "HEAD" or count <= SMALL_ANSWER:
            body = b"" if self.command == "HEAD" else os.pread(file.fileno(), count, start)
            return self.send_small(status, body, headers=headers, content_length=count)
        cork(self.connection, True)
        try:
            self.start_response(status, headers)
            self.send_header("Content-Length", str(count))
            self.end_headers()
            self.send_file_part(file, start, count)
        finally:
            cork(self.connection, False)

    def send_file_part(self, file, offset: int, count: int) -> None:
        """`count` bytes of `file` from `offset`: sendfile, or over TLS pread into the reused buffer.

        Never through the file object's own buffer: a file being filled is
        allocated to its full length, so a buffer read ahead holds zeros
        where bytes land later (socket.sendfile's TLS fallback read that way).
        """
        end = offset + count
        if not isinstance(self.connection, ssl.SSLSocket):
            offset = sendfile_all(self.connection, file.fileno(), offset, count, self.count_sent)
        buffer = thread_buffer()
        while offset < end:  # TLS, or where this file system refused sendfile
            read = os.preadv(file.fileno(), [buffer[:min(end - offset, CHUNK_SIZE)]], offset)
            if not read:
                raise ConnectionAbortedError("file shorter than announced")
            self.wfile.write(buffer[:read])
            offset += read
            self.bytes_sent += read

    def count_sent(self, count: int) -> None:
        self.bytes_sent += count

    def send_fill(self, fill: Fill, reader, patience: float) -> None:
        """A fill's bytes as they land in `reader`'s file; cut short if it fails or stalls.
        The headers wait, corked, for the first bytes, to leave in one segment with them."""
        cork(self.connection, True)
        try:
            self.start_response(200, fill.headers)
            self.send_header("Content-Length", str(fill.length))
            self.end_headers()
            position = 0
            while True:
                available, done, failed = fill.wait_beyond(position, patience)
                if failed or (available == position and not done):
                    self.close_connection = True  # short of the length: the client sees a failure
                    return
                if available > position:
                    self.send_file_part(reader, position, available - position)
                    if position == 0:
                        cork(self.connection, False)  # the first bytes are out: the rest as it comes
                    position = available
                if done and position == available:
                    return
        finally:
            cork(self.connection, False)

    def relay(self, response: UpstreamResponse, route: Route, prefix: str = "", x_cache: str = "",
              kind: str = "", head: bytes = b"", verify: str = "") -> None:
        """An upstream answer to the client: our challenge for a 401, else as it came;
        a HEAD's answer to a GET client as our own error, never headers without their body.
        A whole body that must be `verify` (a blob by digest) gets its end only if it is."""
        try:
            challenge = response.headers.get("www-authenticate")
            # Only the route's own upstream names the realm: a 401 from a host it
            # redirected to (a CDN) must never choose where credentials go.
            if response.status == 401 and challenge and same_origin(response.url, route.upstream):
                response.read_small()
                return self.send_challenge(route, challenge, prefix)
            if response.method == "HEAD" and self.command != "HEAD":
                return self.send_registry_error(refusal_error(response.status, response.headers, kind))
            headers = response_headers(response.headers, prefix)
            check = DigestCheck(verify if response.status == 200 else "")
            if empty_for(response.length, check.digest):
                raise UpstreamUnavailable(f"upstream {redacted_url(response.url)} sent no bytes for {check.digest}")
            if check.digest:  # the digest asked for, whatever upstream's header says
                headers = [(k, v) for k, v in headers if k != "Docker-Content-Digest"] + [
                    ("Docker-Content-Digest", check.digest)]
            self.start_response(response.status, headers + ([("X-Cache", x_cache)] if x_cache else []))
            length = content_length(response.headers)
            if self.command == "HEAD" or response.status in (204, 304):
                if length is not None:  # a HEAD tells the size of what a GET would send
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                response.read_small()  # marks it complete, so its connection is reused
            elif length is not None:
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.stream_body(response, length, check)
            else:
                self.stream_unknown_length(response, head, check)
        finally:
            response.release()

    def stream_body(self, response: UpstreamResponse, length: int, check: DigestCheck) -> None:
        """Exactly `length` bytes, or the connection closes short of them."""
        buffer = thread_buffer()
        remaining = length
        while remaining:
            try:
                count = response.readinto(buffer[:min(remaining, CHUNK_SIZE)])
            except (OSError, http.client.HTTPException):
                count = 0
            check.update(buffer[:count])
            if not count or (count == remaining and check.failed()):
                if count:
                    self.proxy.metrics.add("dockerproxy_cache_verify_failures_total")
                # Headers are out: the only honest signal left is a short body.
                log.warning("upstream %s %s", redacted_url(response.url),
                            f"ended {remaining} bytes short" if not count else "sent bytes of another digest")
                response.close()
                self.close_connection = True
                return
            self.wfile.write(buffer[:count])
            self.bytes_sent += count
            remaining -= count

    def stream_unknown_length(self, response: UpstreamResponse, head: bytes = b"",
                              check: DigestCheck | None = None) -> None:
        """No Content-Length upstream: chunked to HTTP/1.1 clients, so an end is an end,
        and a body that broke off upstream never gets the last chunk."""
        chunked = self.request_version == "HTTP/1.1"
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        if head:  # what was read of it already
            self.wfile.write(b"%x\r\n%s\r\n" % (len(head), head) if chunked else head)
            self.bytes_sent += len(head)
        buffer = thread_buffer()
        while True:
            try:
                count = response.readinto(buffer)
            except (OSError, http.client.HTTPException):
                count = 0
            if not count:
                break
            if check:
                check.update(buffer[:count])
            self.wfile.write(b"%x\r\n" % count if chunked else b"")
            self.wfile.write(buffer[:count])
            self.wfile.write(b"\r\n" if chunked else b"")
            self.bytes_sent += count
        if not response.complete or (check and check.failed()):
            if response.complete:
                self.proxy.metrics.add("dockerproxy_cache_verify_failures_total")
            log.warning("upstream %s broke off its answer, or sent another digest", redacted_url(response.url))
            response.close()
            self.close_connection = True
        elif chunked:
            self.wfile.write(b"0\r\n\r\n")


class DeadlineReader(io.RawIOBase):
    """A client socket's reads under two clocks: CLIENT_TIMEOUT while the
    connection waits for its next request, HEADER_TIMEOUT for a whole
    request head from its first byte.  Without the second, a client sending
    one byte a second keeps its thread for ever: a socket timeout restarts
    with every byte."""

    def __init__(self, sock, idle_timeout: float, head_timeout: float) -> None:
        super().__init__()
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.in_head = False
        self.deadline = None
        self.idle_since = None      # waiting for a request's first byte since (monotonic)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout = self.idle_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise socket.timeout("request head not complete within HEADER_TIMEOUT")
        self.sock.settimeout(timeout)
        count = self.sock.recv_into(buffer)
        if self.in_head and self.deadline is None and count:
            self.deadline = time.monotonic() + self.head_timeout
            self.idle_since = None
        return count

    def start_head(self) -> None:
        self.in_head, self.deadline, self.idle_since = True, None, time.monotonic()

    def start_body(self) -> None:
        """A request body (the form of a POST to /v2/auth) is read under HEADER_TIMEOUT too."""
        self.deadline = time.monotonic() + self.head_timeout

    def close_idle(self) -> None:
        """Closed for a new connection (Connections.admit): the wait for a request ends now."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def end_head(self) -> None:
        self.in_head, self.deadline, self.idle_since = False, None, None
        self.sock.settimeout(self.idle_timeout)  # for writing the answer, too


class HeadLines:
    """The header lines of one request, at most `budget` bytes in all
    (http.client.parse_headers checks each line, and their number)."""

    def __init__(self, rfile, budget: int) -> None:
        self.rfile = rfile
        self.budget = budget

    def readline(self, limit: int = -1) -> bytes:
        line = self.rfile.readline(self.budget + 1 if limit < 0 else min(limit, self.budget + 1))
        self.budget -= len(line)
        if self.budget < 0:
            raise http.client.LineTooLong("request head larger than MAX_HEAD_BYTES")
        return line


class ProxyHandler(Answers, http.server.BaseHTTPRequestHandler):
    """One client connection: reads each request head within its limits,
    dispatches the request to a serving part, renders a RegistryError raised
    from any depth, and logs one line per request."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER_VERSION
    client_rules = True               # ALLOW_CLIENTS and RATE_LIMIT_* apply (not to a prefetch's own requests)

    def setup(self) -> None:
        self.proxy = self.server.proxy
        config = self.proxy.config
        self.timeout = config.client_timeout
        super().setup()
        self.rfile.close()  # replaced: reads go through the two clocks
        self.reader = DeadlineReader(self.connection, config.client_timeout, config.header_timeout)
        self.rfile = io.BufferedReader(self.reader, CLIENT_READ_BUFFER)
        connections = getattr(self.server, "connections", None)
        if connections is not None:
            connections.watch(self.reader)
        # Headers and small bodies go out in separate writes; without this,
        # Nagle holds the second write until the first is acknowledged.
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self) -> None:
        connections = getattr(self.server, "connections", None)
        if connections is not None:
            connections.forget(self.reader)
        super().finish()

    def handle_one_request(self) -> None:
        """http.server's, with the head bounded in bytes and in time."""
        self.reader.start_head()
        try:
            self.raw_requestline = self.rfile.readline(MAX_HEAD_BYTES + 1)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > MAX_HEAD_BYTES:
                self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
                return self.send_error(414, "request line too long")
            if not self.parse_request():
                return
            self.reader.end_head()
            if not hasattr(self, "do_" + self.command):
                return self.send_error(501)
            self.handle_request()
            self.wfile.flush()
            if self.proxy.draining.is_set():
                self.close_connection = True  # its answer may have begun before the signal
        except (socket.timeout, ConnectionError):
            self.close_connection = True  # a silent, slow or vanished client: no answer is owed

    def parse_request(self) -> bool:
        """http.server's, reading the headers through a MAX_HEAD_BYTES budget."""
        rfile, self.rfile = self.rfile, HeadLines(self.rfile, MAX_HEAD_BYTES - len(self.raw_requestline))
        try:
            return super().parse_request()
        finally:
            self.rfile = rfile

    def do_GET(self) -> None:
        self.handle_request()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def end_headers(self) -> None:
        self.end_if_draining()  # http.server's own answers (414, 501) come this way
        super().end_headers()

    def end_if_draining(self) -> None:
        """While the process shuts down, every answer ends its connection: the
        client finishes what it asked, and opens its next connection elsewhere."""
        if self.proxy.draining.is_set() and not self.close_connection:
            self.send_header("Connection", "close")  # which sets close_connection

    def reset_request_state(self) -> None:
        self.started = time.monotonic()
        self.route = None
        self.endpoint = None
        self.response_started = False
        self.status_sent = 0
        self.bytes_sent = 0
        self.client = None
        self.cache_result = ""        # see note_cache()
        self.joined = False
        self.upstream_status = 0
        self.limited = None           # (limit key, is a blob transfer) of a request the limits admitted
        self.rules_client = None      # the client the limits and ALLOW_CLIENTS judge, once worked out
        self.peer_request = False     # a request of another instance of PEERS

    def handle_request(self) -> None:
        self.reset_request_state()
        try:
            self.serve_request()
        except RegistryError as err:
            self.send_registry_error(err)
        except (ConnectionError, socket.timeout):
            self.close_connection = True  # the client went away
        except Exception:
            log.exception("internal error on %s %s", printable(self.command), logged_target(self.path))
            self.send_registry_error(RegistryError(500, "UNKNOWN", "internal error"))
        finally:
            if self.limited:
                self.proxy.limits.done(self.limited[0], self.bytes_sent, self.limited[1])
            self.log_access()

    def serve_request(self) -> None:
        target_host, path, query = split_target(self.path)
        peer_problem = self.peer_problem()  # None: not a peer request
        via_peer = self.peer_request = peer_problem == ""
        if self.proxy.config.allow_clients and path not in ALWAYS_OPEN and self.client_rules and not via_peer:
            self.proxy.check_client(self.judged_client())
        if peer_problem:
            raise RegistryError(403, "DENIED", f"peer request refused: {peer_problem}")
        problem = request_problem(self.command, self.headers)
        if problem:
            raise RegistryError(400, "UNSUPPORTED", problem, close=True)
        trust = self.proxy.config.trust_proxy_headers
        host = requested_host(self.headers, trust, self.server.server_address, target_host)
        form = self.read_form(path in ADMIN_ACTIONS) if self.command == "POST" and (
            path == "/v2/auth" or path in ADMIN_ACTIONS) else {}
        endpoint = self.endpoint = dispatch(self.proxy.routes, self.command, path, query, host)
        self.log_route(endpoint.route)
        if via_peer and endpoint.name != "blob":
            raise RegistryError(403, "DENIED", "a peer asks for blobs only")
        if endpoint.name in LIMITED_ENDPOINTS and not via_peer:
            self.admit(endpoint)
        if endpoint.target is not None:
            self.proxy.check_image(endpoint.target.route, endpoint.target.repository)
        if endpoint.name == "redirect":
            return self.send_small(301, b"", headers=(("Location", endpoint.location),))
        if endpoint.name == "health":
            return self.send_json(200, {"status": "ok"})
        if endpoint.name == "routes":
            return self.send_json(200, self.proxy.routes.describe())
        scheme = requested_scheme(isinstance(self.connection, ssl.SSLSocket), self.headers, trust)
        self.client = ClientRequest(self.command, self.headers, host, scheme,
                                    self.proxy.routes.implied(host), form, self.client_address[0], via_peer)
        serving_part(endpoint.name, self.proxy.cache)(self.proxy, self.client, self, endpoint).serve()

    def peer_problem(self) -> str | None:
        """For a request of another instance of PEERS: why its proof fails, or "".
        None for any other request: without PEERS the header means nothing."""
        proofs = self.headers.get_all(PEER_HEADER) or []
        if not proofs or self.proxy.peers is None:
            return None
        if len(proofs) > 1:
            return "more than one proof"
        return self.proxy.peers.problem(self.command, self.path, proofs[0])

    def judged_client(self) -> str:
        """The client's address for the limits and ALLOW_CLIENTS, worked out once a request."""
        if self.rules_client is None:
            self.rules_client = self.proxy.client_of(self.client_address[0], self.headers)
        return self.rules_client

    def admit(self, endpoint: Endpoint) -> None:
        """The client's rate limits: count this request, or refuse it with 429."""
        limits = self.proxy.limits
        if not limits.enabled or not self.client_rules:
            return
        key = limits.key(self.judged_client())
        if key is None:
            return
        transfer = endpoint.name == "blob" and self.command == "GET"
        try:
            key = limits.admit(key, transfer)
        except RegistryError as err:
            self.proxy.metrics.add("dockerproxy_client_refusals_total",
                                   (err.detail["limit"].rpartition("_")[2].lower(),))
            raise
        self.limited = (key, transfer)

    def read_form(self, json_too: bool = False) -> dict:
        """The form of a POST to /v2/auth (OAuth2) or /admin/ (also JSON, with
        `json_too`), read whole, so nothing of it is left behind: name -> [values]."""
        length = self.headers.get("content-length", "")
        if json_too and not length:
            return {}  # no Content-Length on a POST: no body (RFC 9112 6.3), as `curl -X POST` sends
        if not re.fullmatch(r"[0-9]{1,19}", length) or int(length) > MAX_SMALL_BODY:
            raise RegistryError(400, "UNSUPPORTED", "request body missing or too large", close=True)
        self.reader.start_body()
        try:
            body = self.rfile.read(int(length))
        finally:
            self.reader.end_head()
        if len(body) < int(length):
            raise RegistryError(400, "UNSUPPORTED", "token request body cut short", close=True)
        if json_too and bare_media_type(self.headers.get("content-type", "")) == "application/json":
            return json_form(body)
        return urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, huge headers) in registry form."""
        self.close_connection = True
        self.reset_request_state()
        if self.request_version == "HTTP/0.9":  # the default before the line parsed: answer with a status
            self.request_version = "HTTP/1.0"
        code = 405 if code == 501 else code  # unknown methods: same answer as PUT
        error = RegistryError(code, "UNSUPPORTED", message or "bad request")
        try:
            self.send_registry_error(error)
        finally:
            self.log_access()

    # Logging -----------------------------------------------------------------

    def log_route(self, route: Route | None) -> None:
        """The route the access line names, once known."""
        self.route = route

    def log_request(self, code: object = "-", size: object = "-") -> None:
        """Replaced by log_access(), which knows the route and byte count."""

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), printable(format % args))

    def log_access(self) -> None:
        """Count the request, and log one line for it: every field the client
        chose is escaped, the query left out."""
        served = self.served()
        self.proxy.observe(served, self.route)
        if self.peer_request:
            self.proxy.metrics.add("dockerproxy_peer_served_total", (self.cache_result or "other",))
        headers = getattr(self, "headers", None)
        fields = {"client": served.client, "method": printable(served.method),
                  "host": printable(headers.get("host", "-") if headers else "-"),
                  "path": logged_target(getattr(self, "path", "") or ""), "route": served.route,
                  "status": served.status, "bytes": served.bytes, "duration": round(served.duration, 3),
                  "cache": served.cache or "-", "upstream_status": served.upstream_status}
        log.info('%s "%s %s %s" route=%s status=%s bytes=%d %.3fs cache=%s upstream=%s',
                 fields["client"], fields["method"], fields["host"], fields["path"], served.route,
                 served.status or "-", served.bytes, served.duration, fields["cache"],
                 served.upstream_status or "-", extra={"access": fields})

    def served(self) -> Served:
        """This request as it ended (see Served)."""
        endpoint = self.endpoint.name if self.endpoint else "-"
        target = self.endpoint.target if self.endpoint else None
        cache = ""
        to_bucket = self.status_sent == 307 and self.cache_result == "hit"  # S3_REDIRECT: a hit
        if endpoint in ("blob", "manifest", "tag") and (object_answer(self.status_sent) or to_bucket):
            # an object was sent: from the cache, or relayed ("bypass" when nothing
            # was noted: no cache, or the upstream's answer passed on as it was)
            cache = (self.cache_result if self.proxy.cache is not None else "") or "bypass"
        headers = getattr(self, "headers", None)
        client = self.proxy.client_of(self.client_address[0], headers, for_logs=True)
        return Served(
            self.proxy.clock.time(), client, getattr(self, "command", None) or "-", endpoint,
            self.route.name if self.route else "-", self.status_sent, self.bytes_sent,
            time.monotonic() - self.started, cache,
            "cache" if cache in ("hit", "stale") or self.joined else "upstream", self.joined,
            target.repository if target else "", target.reference if target else "", self.upstream_status)


# Prefetch: the cache warmed before it is needed ############################
#
# A prefetch pulls images as a client does, through the proxy's own handler:
# an InternalHandler serves it over a socket pair, so its requests take every
# step a client's take (the image policy, the token dance, the Access rule,
# fills shared with clients' pulls, digests verified) and leave in CACHE_DIR
# exactly what a client's pull would, on disk, where every process sharing
# the directory sees it.  Only the rules about clients (ALLOW_CLIENTS,
# RATE_LIMIT_*) do not apply: the operator asked for it.

# Images one prefetch takes: each holds a few KiB of progress, and a list
# longer than this is a mistake (a fleet's base images are dozens).
MAX_PREFETCH_IMAGES = 1000

# Manifests of one index that are fetched (platforms and attestations): an
# index of more is not an image a client pulls, and one upstream document
# must not cause unbounded work.
MAX_INDEX_ENTRIES = 256

# Prefetches the admin API runs at once (the keep-warm round is not counted):
# each holds PREFETCH_PARALLEL + 1 connections and threads of its own.
MAX_PREFETCHES = 4

# An image's progress is reported at most this often: enough for a person
# watching, few lines for a script reading --json.
PROGRESS_INTERVAL = 0.5

# Finished prefetches the status page lists.
RECENT_PREFETCHES = 5

# A media type an index names, as it may go into an Accept header.
MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,126}/[a-z0-9][a-z0-9.+-]{0,126}\Z")

# What a prefetch accepts for a tag: what docker sends, so the tag index entry
# it leaves is the one docker's pulls read.
PREFETCH_ACCEPT = ", ".join((
    "application/vnd.docker.distribution.manifest.list.v2+json", OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v2+json", OCI_MANIFEST))


def prefetch_patience(config: Config) -> float:
    """How long a prefetch waits for its handler's next bytes: the connect, and
    a fill's follower's patience plus one more READ_TIMEOUT."""
    return config.connect_timeout + (FOLLOWER_PATIENCE_READ_TIMEOUTS + 1) * config.read_timeout


class PrefetchFailed(Exception):
    """An image could not be prefetched: the registry error a client would have got."""

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def document(self) -> dict:
        return {"code": self.code, "message": self.message, "status": self.status}


def prefetch_failure(err: Exception, what: str) -> PrefetchFailed:
    """Any error of one image's prefetch as its registry error; an unexpected one logged whole."""
    if isinstance(err, PrefetchFailed):
        return err
    if isinstance(err, RegistryError):
        return PrefetchFailed(err.code, err.message, err.status)
    if isinstance(err, (OSError, http.client.HTTPException)):
        return PrefetchFailed("UNAVAILABLE", f"connection to the proxy's handler: {err}")
    log.error("prefetch of %s failed", printable(what), exc_info=err)
    return PrefetchFailed("UNKNOWN", f"internal error: {type(err).__name__}")


def error_of(response) -> PrefetchFailed:
    """The registry error of a failed answer (an http.client response), its body read (bounded)."""
    body = response.read(MAX_SMALL_BODY)
    try:
        error = json.loads(body)["errors"][0]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        code, message = "UNKNOWN", f"HTTP {response.status} {response.reason}"
    return PrefetchFailed(code, message, response.status)


class InternalHandler(ProxyHandler):
    """The handler of a prefetch's connection: a client's, but the rules
    about clients (ALLOW_CLIENTS, RATE_LIMIT_*) do not apply to it."""

    client_rules = False


class InternalServer:
    """What an InternalHandler needs of a server."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.server_address = ("localhost", 0)


class InternalConnection(http.client.HTTPConnection):
    """An HTTP connection to an InternalHandler of this process, over a socket pair."""

    def __init__(self, server: InternalServer, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.server = server

    def connect(self) -> None:
        ours, theirs = socket.socketpair()
        ours.settimeout(self.timeout)
        threading.Thread(target=self.serve, args=(theirs,), daemon=True, name="prefetch-handler").start()
        self.sock = ours

    def serve(self, sock) -> None:
        try:
            InternalHandler(sock, ("prefetch", 0), self.server)  # serves until the connection ends
        except OSError:
            pass  # the prefetch closed its end
        finally:
            sock.close()


class RegistrySession:
    """A registry client of the proxy's own handler: requests by path, with
    the Bearer token dance a client does (the token from our /v2/auth)."""

    def __init__(self, server: InternalServer, timeout: float, tokens: dict | None = None,
                 cancelled: threading.Event | None = None) -> None:
        self.connection = InternalConnection(server, timeout)
        self.tokens = {} if tokens is None else tokens  # repository -> "Bearer ...", shared by a job's sessions
        self.cancelled = cancelled or threading.Event()  # set: no new request, no new connection

    def close(self) -> None:
        """End the connection; a read blocked on it (another thread's) returns at once."""
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # close() alone would wait for the blocked reader's lock
            except OSError:
                pass
        self.connection.close()

    def request(self, method: str, path: str, repository: str, accept: str = ""):
        """The answer to a GET or HEAD, 200; else PrefetchFailed with the registry's error."""
        response = self.send(method, path, repository, accept)
        if response.status == 401:
            challenge = response.getheader("www-authenticate", "")
            failure = self.failure(response)
            if not self.fetch_token(challenge, repository):
                raise failure
            response = self.send(method, path, repository, accept)
        if response.status != 200:
            raise self.failure(response)
        return response

    def failure(self, response) -> PrefetchFailed:
        """error_of() the answer; a connection with some of its body left unread is closed."""
        failure = error_of(response)
        if not response.isclosed():
            self.close()
        return failure

    def send(self, method: str, path: str, repository: str, accept: str):
        headers = {"Host": "localhost", "User-Agent": f"{SERVER_VERSION} (prefetch)"}
        if accept:
            headers["Accept"] = accept
        if repository in self.tokens:
            headers["Authorization"] = self.tokens[repository]
        for last in (False, True):
            if self.cancelled.is_set():  # (a cancel's shutdown looks like a kept-alive connection's end)
                raise PrefetchFailed("UNAVAILABLE", "prefetch cancelled")
            try:
                self.connection.request(method, path, headers=headers)
                return self.connection.getresponse()
            except (ConnectionError, http.client.BadStatusLine, http.client.CannotSendRequest):
                self.connection.close()  # the handler ended a kept-alive connection: once more, anew
                if self.cancelled.is_set():
                    raise PrefetchFailed("UNAVAILABLE", "prefetch cancelled") from None
                if last:
                    raise

    def fetch_token(self, challenge: str, repository: str) -> bool:
        """A token from our own /v2/auth for the scope the challenge names."""
        scheme, params = parse_challenge(challenge)
        realm = urllib.parse.urlsplit(params.get("realm", ""))
        if scheme != "bearer" or realm.path != "/v2/auth":
            return False  # not ours: a Basic challenge wants credentials a prefetch does not have
        fields = [(name, params[name]) for name in ("service", "scope") if params.get(name)]
        response = self.send("GET", f"/v2/auth?{urllib.parse.urlencode(fields)}", "", "")
        body = response.read(MAX_SMALL_BODY)
        if not response.isclosed():
            self.close()  # a token answer larger than that is no token; its rest is on the connection
        try:
            answer = json.loads(body) if response.status == 200 else {}
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not TOKEN.match(token):
            return False
        self.tokens[repository] = f"Bearer {token}"
        return True


class ImageProgress:
    """One image of a prefetch, as its events and the summary tell it."""

    def __init__(self, reference: ImageReference, platforms: tuple) -> None:
        self.name = str(reference)
        self.reference = reference
        self.wanted = platforms
        self.digest = ""
        self.platforms = []           # names of the platforms fetched
        self.blobs = 0                # blobs to fetch, once resolved
        self.pending = 0              # blobs not yet done, and 1 while it is resolved
        self.fetched = 0
        self.cached = 0
        self.bytes_total = 0
        self.bytes_done = 0           # of bytes_total: fetched, or found cached
        self.bytes_fetched = 0        # through the cache's fills
        self.started = time.monotonic()
        self.finished = False
        self.seconds = 0.0
        self.error = None             # a PrefetchFailed
        self.reported = 0.0           # when progress was last reported

    def summary(self) -> dict:
        document = {"event": "image", "image": self.name, "ok": self.error is None, "digest": self.digest,
                    "platforms": self.platforms, "fetched": self.fetched, "cached": self.cached,
                    "bytes": self.bytes_fetched, "seconds": round(self.seconds, 3)}
        if self.error is not None:
            document["error"] = self.error.document()
        return document


class PrefetchJob:
    """Prefetch a list of images into the cache, reporting each step as an event.

    Manifests are fetched in the calling thread, image after image; their
    blobs go to PREFETCH_PARALLEL workers, each with a connection of its own,
    downloading in the slots all prefetches share (Prefetches.downloads).  A
    blob already stored is asked with a HEAD (its Access record is made as
    for a client), never downloaded; one shared by several images of the job
    is fetched once.  `emit` gets every event, from any thread, one at a time.
    """

    def __init__(self, proxy: Proxy, images: list, emit, parallel: int | None = None,
                 source: str = "command") -> None:
        config = proxy.config
        self.proxy = proxy
        self.server = InternalServer(proxy)
        self.images = [ImageProgress(reference, platforms) for reference, platforms in dict.fromkeys(images)]
        self.parallel = max(1, min(parallel or config.prefetch_parallel, config.max_fills))
        self.source = source
        self.timeout = prefetch_patience(config)
        self.started = time.time()
        self.cancelled = threading.Event()
        self._emit = emit
        self._lock = threading.Lock()
        self._tasks = queue.Queue()
        self._claimed = {}            # digest -> Event set once its first task of this job ended
        self._sessions = []
        # One token per repository for all the job's connections: a worker asking
        # without it would get a 401 upstream, which drops the repository's
        # anonymous-pull mark and declines the fill clients may have joined.
        self._tokens = {}
        self._emitting = threading.Lock()  # events leave one at a time; a slow reader holds only this

    # Running -----------------------------------------------------------------

    def run(self) -> bool:
        """Every image, then the end event; True if each was prefetched."""
        began = time.monotonic()
        self.emit({"event": "start", "images": [image.name for image in self.images], "parallel": self.parallel})
        workers = [threading.Thread(target=self.work, daemon=True, name="prefetch") for _ in range(self.parallel)]
        for worker in workers:
            worker.start()
        session = self.session()
        try:
            for image in self.images:
                self.resolve(session, image)
        finally:
            for _ in workers:
                self._tasks.put(None)
            for worker in workers:
                worker.join()
            self.close_sessions()
        failed = [image for image in self.images if image.error is not None]
        self.emit({"event": "end", "ok": not failed, "images": len(self.images), "failed": len(failed),
                   "fetched": sum(image.fetched for image in self.images),
                   "cached": sum(image.cached for image in self.images),
                   "bytes": sum(image.bytes_fetched for image in self.images),
                   "seconds": round(time.monotonic() - began, 3)})
        return not failed

    def cancel(self) -> None:
        """Stop: no new request; those in flight are cut (their fills go on as clients' would)."""
        self.cancelled.set()  # before the sessions close: a request cut by it is not sent again
        self.close_sessions()

    def session(self) -> RegistrySession:
        session = RegistrySession(self.server, self.timeout, self._tokens, self.cancelled)
        with self._lock:
            self._sessions.append(session)
        return session

    def close_sessions(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.close()

    def emit(self, event: dict) -> None:
        with self._emitting:
            try:
                self._emit(event)
            except Exception:  # a reader gone away must not stop the prefetch's bookkeeping
                log.debug("prefetch event not delivered", exc_info=True)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set() or self.proxy.draining.is_set():
            raise PrefetchFailed("UNAVAILABLE", "prefetch cancelled")

    # Manifests ---------------------------------------------------------------

    def resolve(self, session: RegistrySession, image: ImageProgress) -> None:
        """The image's manifests, then its blobs queued for the workers."""
        image.pending = 1
        try:
            self.check_cancelled()
            blobs = self.manifests(session, image)
        except Exception as err:  # this image failed; the others go on, and the end event comes
            return self.finish_blob(image, error=prefetch_failure(err, image.name))
        with self._lock:
            image.blobs, image.pending = len(blobs), image.pending + len(blobs)
            image.bytes_total = sum(blob.size for blob in blobs)
        self.emit({"event": "resolved", "image": image.name, "digest": image.digest, "platforms": image.platforms,
                   "blobs": image.blobs, "bytes": image.bytes_total})
        for blob in blobs:
            self._tasks.put((image, blob))
        self.finish_blob(image)  # resolving it is done

    def manifests(self, session: RegistrySession, image: ImageProgress) -> list:
        """Fetch the image's manifests; the blobs they name, each once."""
        reference = image.reference
        digest, document = self.manifest(session, reference, reference.reference, PREFETCH_ACCEPT)
        image.digest = digest
        entries = [entry for entry in manifest_references(document) if entry.manifest]
        if not entries:  # an image manifest
            image.platforms = ["(single platform)"]
            return [blob for blob in manifest_references(document) if not blob.manifest]
        chosen = chosen_manifests(entries, image.wanted)
        if len(chosen) > MAX_INDEX_ENTRIES:
            raise PrefetchFailed("MANIFEST_INVALID", f"the index names {len(chosen)} manifests; a prefetch "
                                 f"takes at most {MAX_INDEX_ENTRIES} (name the platforms wanted)")
        if not chosen:
            offered = sorted({platform_name(entry.platform) for entry in entries})
            raise PrefetchFailed("MANIFEST_UNKNOWN", "none of the platforms asked for is in the index (it has "
                                 f"{', '.join(offered[:8])}{', ...' if len(offered) > 8 else ''})", 404)
        image.platforms = list(dict.fromkeys(platform_name(entry.platform) for entry in chosen))
        blobs = {}
        for entry in chosen:
            self.check_cancelled()
            accept = PREFETCH_ACCEPT
            if MEDIA_TYPE.match(entry.media_type) and entry.media_type not in accepted_types(PREFETCH_ACCEPT):
                accept = f"{entry.media_type}, {PREFETCH_ACCEPT}"  # (an upstream's string: checked first)
            _, child = self.manifest(session, reference, entry.digest, accept)
            if isinstance(child, dict) and "manifests" in child:
                raise PrefetchFailed("MANIFEST_INVALID", f"index entry {entry.digest} is an index itself: "
                                     "nested indexes are not prefetched")
            for blob in manifest_references(child):
                blobs.setdefault(blob.digest, blob)
        return list(blobs.values())

    def manifest(self, session: RegistrySession, reference: ImageReference, wanted: str, accept: str) -> tuple:
        """(digest, document) of a manifest by tag or digest, checked against its digest."""
        path = f"{self.image_path(reference)}/manifests/{wanted}"
        response = session.request("GET", path, reference.repository, accept)
        body = response.read(MAX_MANIFEST_SIZE + 1)
        if len(body) > MAX_MANIFEST_SIZE:
            session.close()  # the rest is still on the connection
            raise PrefetchFailed("MANIFEST_INVALID", f"manifest {wanted} is larger than {MAX_MANIFEST_SIZE} bytes")
        digest = wanted if DIGEST.match(wanted) else response.getheader("docker-content-digest", "")
        if not DIGEST.match(digest):
            digest = bytes_digest(body, "sha256:")
        self.proxy.cache.fills.wait_digest_stored(digest, self.timeout)
        if not self.proxy.cache.store.exists(digest):
            # Passed on uncached, as to every client: a signed schema 1 manifest
            # (whose digest leaves its signatures out), one without a media
            # type, or one nothing verifies.
            raise PrefetchFailed("MANIFEST_INVALID", f"manifest {digest} was sent on, not cached (signed schema 1, "
                                 "no media type, or nothing verifies it): it cannot be served offline")
        if bytes_digest(body, digest) != digest:
            raise PrefetchFailed("DIGEST_INVALID", f"manifest {wanted} does not match its digest {digest}")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise PrefetchFailed("MANIFEST_INVALID", f"manifest {wanted} is not JSON") from None
        problem = manifest_problem(document)
        if problem:
            raise PrefetchFailed("MANIFEST_INVALID", f"manifest {digest}: {problem}")
        return digest, document

    def image_path(self, reference: ImageReference) -> str:
        """/v2/<registry>/<name>: routed by its registry as a path prefix is (MODE=debug: everything to its target)."""
        if self.proxy.routes.debug_target:
            return f"/v2/{reference.repository}"
        self.proxy.routes.for_registry(reference.registry)  # 403 here, with the route table's words
        return f"/v2/{reference.registry}/{reference.repository}"

    # Blobs -------------------------------------------------------------------

    def work(self) -> None:
        session = self.session()
        while True:
            task = self._tasks.get()
            if task is None:
                return
            image, blob = task
            if image.error is not None:
                self.finish_blob(image)  # the image failed already: its other blobs are skipped
                continue
            try:
                self.check_cancelled()
                result, seconds = self.blob(session, image, blob)
            except Exception as err:  # this image failed; the worker goes on with the next blob
                if not isinstance(err, PrefetchFailed):
                    session.close()  # the connection may be mid-answer
                self.finish_blob(image, error=prefetch_failure(err, f"{image.name}, blob {blob.digest}"))
            else:
                self.emit({"event": "blob", "image": image.name, "digest": blob.digest, "size": blob.size,
                           "result": result, "seconds": round(seconds, 3)})
                self.finish_blob(image, result)

    def blob(self, session: RegistrySession, image: ImageProgress, blob: Descriptor) -> tuple:
        """("fetched" or "cached", seconds): a stored blob is only asked with a HEAD."""
        began = time.monotonic()
        first = self.claim(blob.digest)
        try:
            path = f"{self.image_path(image.reference)}/blobs/{blob.digest}"
            cache = self.proxy.cache
            store = cache.store
            for last in (False, True):
                if store.exists(blob.digest):
                    session.request("HEAD", path, image.reference.repository).read()
                    self.check_size(blob)
                    self.progress(image, blob.size, fetched=False)
                    return "cached", time.monotonic() - began
                cache.fills.wait_room(self.timeout)
                with self.download_slot():
                    length = self.download(session, image, blob, path)
                cache.fills.wait_digest_stored(blob.digest, self.timeout)
                if store.exists(blob.digest):
                    self.check_size(blob)
                    return "fetched", time.monotonic() - began
                if length is None:
                    raise PrefetchFailed("UNAVAILABLE", f"blob {blob.digest} came without a Content-Length: "
                                         "the cache keeps only blobs of known length")
                if last or not cache.budget.fits(length):  # only a race for a fill is worth a second download
                    raise PrefetchFailed("UNAVAILABLE", f"blob {blob.digest} was sent on uncached: CACHE_MAX_SIZE "
                                         "has no room for it, or MAX_FILLS downloads were running")
        finally:
            if first:
                self._claimed[blob.digest].set()

    @contextlib.contextmanager
    def download_slot(self):
        """One of the downloads all prefetches share (see Prefetches.downloads)."""
        slots = self.proxy.prefetches.downloads
        while not slots.acquire(timeout=1.0):
            self.check_cancelled()
        try:
            yield
        finally:
            slots.release()

    def claim(self, digest: str) -> bool:
        """True for the first task of this digest; the others wait for it to end."""
        with self._lock:
            done = self._claimed.get(digest)
            if done is None:
                self._claimed[digest] = threading.Event()
                return True
        done.wait(self.timeout)
        return False

    def download(self, session: RegistrySession, image: ImageProgress, blob: Descriptor, path: str) -> int | None:
        """GET the blob through the cache, its bytes counted and dropped; its length, if announced.

        read1() returns after one read from the socket, so progress, a cancel
        and the rate check come between any two arrivals, however slow.  A
        download nobody else waits for is given up as a fill nobody waits for
        is: averaging under ORPHAN_MIN_RATE after ORPHAN_GRACE seconds.
        """
        response = session.request("GET", path, image.reference.repository)
        length, received, began = response.length, 0, time.monotonic()
        try:
            while True:
                self.check_cancelled()
                count = len(response.read1(CHUNK_SIZE))
                if not count:
                    break
                received += count
                self.progress(image, count)
                elapsed = time.monotonic() - began
                if elapsed > ORPHAN_GRACE and received / elapsed < ORPHAN_MIN_RATE:
                    raise PrefetchFailed("UNAVAILABLE", f"blob {blob.digest} came at {human_bytes(received / elapsed)}"
                                         f"/s, under {human_bytes(ORPHAN_MIN_RATE)}/s after {ORPHAN_GRACE:.0f} s")
        except http.client.IncompleteRead:
            session.close()
            raise PrefetchFailed("UNAVAILABLE", f"blob {blob.digest} broke off after {received} of {length} bytes: "
                                 "upstream cut it short, or its bytes did not match the digest") from None
        except BaseException:
            session.close()  # the rest of the body is still on the connection
            raise
        response.close()  # read to its end: the connection takes the next request
        return length

    def check_size(self, blob: Descriptor) -> None:
        """A stored blob has the size its manifest says (docker and containerd refuse it otherwise)."""
        size = self.proxy.cache.store.size(blob.digest)
        if blob.size and size is not None and size != blob.size:
            raise PrefetchFailed("MANIFEST_INVALID",
                                 f"blob {blob.digest} is {size} bytes; its manifest says {blob.size}")

    def progress(self, image: ImageProgress, count: int, fetched: bool = True) -> None:
        now = time.monotonic()
        with self._lock:
            image.bytes_done += count
            image.bytes_fetched += count if fetched else 0
            due = now - image.reported >= PROGRESS_INTERVAL
            if due:
                image.reported = now
            event = {"event": "progress", "image": image.name, "bytes_done": image.bytes_done,
                     "bytes_total": image.bytes_total,
                     "rate_bytes_per_second": round(image.bytes_fetched / max(now - image.started, 0.001))}
        if due:
            self.emit(event)

    def finish_blob(self, image: ImageProgress, result: str = "", error: PrefetchFailed | None = None) -> None:
        """One task of the image ended (a blob, or its resolution); the last one reports the image."""
        with self._lock:
            if result:
                setattr(image, result, getattr(image, result) + 1)
            if error is not None and image.error is None:
                image.error = error
            image.pending -= 1
            done = image.finished = image.pending <= 0
            if done:
                image.seconds = time.monotonic() - image.started
        if done:
            if image.error is not None:
                log.warning("prefetch of %s failed: %s", printable(image.name), printable(image.error.message))
            self.emit(image.summary())

    # The status page ---------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            images = [{"image": image.name, "bytes_done": image.bytes_done, "bytes_total": image.bytes_total,
                       "done": image.finished, "ok": image.error is None}
                      for image in self.images]
        return {"source": self.source, "started": self.started, "images": len(images),
                "images_done": sum(1 for image in images if image["done"]),
                "failed": sum(1 for image in images if image["done"] and not image["ok"]),
                "bytes_done": sum(image["bytes_done"] for image in images),
                "bytes_total": sum(image["bytes_total"] for image in images),
                "current": [image["image"] for image in images if not image["done"]][:3]}


class Prefetches:
    """The prefetches a proxy runs (the admin API's, at most MAX_PREFETCHES at
    once, and the keep-warm round), and the last few that ended: /status lists them."""

    def __init__(self, max_fills: int = 16) -> None:
        self._running = []
        self._ended = collections.deque(maxlen=RECENT_PREFETCHES)
        self._lock = threading.Lock()
        # Blob downloads of all prefetches together: half of MAX_FILLS, at
        # least 1, so clients' misses keep fills of their own.
        self.downloads = threading.BoundedSemaphore(max(1, max_fills // 2))

    def begin(self, job: PrefetchJob) -> None:
        """Count `job` as running; 503 if MAX_PREFETCHES are (keep-warm's one
        round is not counted: admin requests cannot keep it from its turn)."""
        with self._lock:
            counted = [running for running in self._running if running.source != "keep-warm"]
            if job.source != "keep-warm" and len(counted) >= MAX_PREFETCHES:
                raise RegistryError(503, "UNAVAILABLE", f"{MAX_PREFETCHES} prefetches are running; retry later",
                                    headers=(("Retry-After", "60"),))
            self._running.append(job)

    def finish(self, job: PrefetchJob) -> bool:
        """Run a job begin() counted, to its end; True if every image was prefetched."""
        ok = False
        try:
            ok = job.run()
            return ok
        finally:
            failed = sum(1 for image in job.images if image.error is not None)
            job.proxy.metrics.add("dockerproxy_prefetch_images_total", ("ok",), len(job.images) - failed)
            job.proxy.metrics.add("dockerproxy_prefetch_images_total", ("failed",), failed)
            with self._lock:
                self._running.remove(job)
                self._ended.appendleft({**job.status(), "ended": time.time(), "ok": ok})

    def run(self, job: PrefetchJob) -> bool:
        self.begin(job)
        return self.finish(job)

    def status(self) -> list:
        with self._lock:
            return [{**job.status(), "ended": None, "ok": None} for job in self._running] + list(self._ended)


class KeepWarm(threading.Thread):
    """PREFETCH_FILE, prefetched at start and every PREFETCH_INTERVAL: each tag
    is asked with the cache's own rule (a HEAD upstream once MANIFEST_TTL has
    passed), so only what moved is downloaded.  The file is read each time."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__(daemon=True, name="keep-warm")
        self.proxy = proxy

    def run(self) -> None:
        config = self.proxy.config
        while not self.proxy.draining.is_set():
            try:
                self.once()
            except Exception:  # the next round must come
                log.exception("keep-warm prefetch failed")
            if not config.prefetch_interval or self.proxy.draining.wait(config.prefetch_interval):
                return  # 0: at start only

    def once(self) -> None:
        try:
            images = read_image_list(self.proxy.config.prefetch_file)
        except ConfigError as err:
            log.error("keep-warm: %s; the next round reads it again", err)
            return
        job = PrefetchJob(self.proxy, images, lambda event: None, source="keep-warm")
        try:
            ok = self.proxy.prefetches.run(job)
        except RegistryError as err:
            log.warning("keep-warm: %s", err.message)
            return
        fetched = sum(image.fetched for image in job.images)
        log.info("keep-warm: %d images %s, %d blobs downloaded (%s)", len(job.images),
                 "fresh" if ok else "checked, some failed", fetched,
                 human_bytes(sum(image.bytes_fetched for image in job.images)))


class PinnedImages:
    """PREFETCH_FILE's images as the cache keys them, (upstream, repository,
    tag or digest): the evictor passes them by while they are listed.  The
    file is read at each sweep; one that cannot be read leaves the last list."""

    def __init__(self, path: str, routes: RouteTable) -> None:
        self.path = path
        self.routes = routes
        self._last = self.keys(read_image_list(path)) if path else []  # ConfigError at start: exit 2

    def images(self) -> list:
        if not self.path:
            return []
        try:
            self._last = self.keys(read_image_list(self.path))
        except ConfigError as err:
            log.warning("PREFETCH_FILE %s; the images it listed last stay pinned", err)
        return self._last

    def keys(self, images: list) -> list:
        found = []
        for reference, _ in images:
            route = self.routes.debug_target or self.routes.by_registry.get(reference.registry)
            if route is not None:
                found.append((route.upstream, reference.repository, reference.reference))
        return found


def read_image_list(path: str) -> list:
    """A prefetch list file (see parse_image_list); ConfigError naming it if unreadable or bad."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(MAX_SMALL_BODY * 16 + 1)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: {getattr(err, 'strerror', None) or err}") from None
    if len(text) > MAX_SMALL_BODY * 16:
        raise ConfigError(f"{path}: longer than {MAX_SMALL_BODY * 16} bytes")
    try:
        images = parse_image_list(text)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    if len(images) > MAX_PREFETCH_IMAGES:
        raise ConfigError(f"{path}: more than {MAX_PREFETCH_IMAGES} images")
    return images


# What a person sees: progress on a terminal, log lines, or NDJSON -----------

def screen_text(text: str) -> str:
    """Text for a terminal or a log line: each character that is not printable
    (newlines too) escaped.  Names and messages may come from an upstream, or
    from the proxy at --proxy: none may move the cursor or forge a line."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
                   for char in text)


def platforms_text(platforms: list, width: int = 28) -> str:
    text = ", ".join(platforms) or "-"
    return screen_text(text if len(text) <= width else f"{platforms[0]} +{len(platforms) - 1}")


def failure_text(error: dict) -> str:
    return screen_text(f'{error["code"]}: {error["message"]}')


def summary_table(images: list) -> str:
    """The end of a prefetch: one row per image event (see ImageProgress.summary)."""
    rows = [("IMAGE", "PLATFORMS", "FETCHED", "CACHED", "BYTES", "TIME", "RESULT")]
    for image in images:
        error = image.get("error")
        rows.append((screen_text(image["image"]), platforms_text(image["platforms"]), str(image["fetched"]),
                     str(image["cached"]), human_bytes(image["bytes"]), f'{image["seconds"]:.1f} s',
                     failure_text(error) if error else "ok"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


# The fields of each event and their types: what the views read, checked on
# events from a proxy at --proxy (other events and fields are left alone).
NUMBER = (int, float)
EVENT_FIELDS = {
    "start": {"images": list, "parallel": int},
    "resolved": {"image": str, "digest": str, "platforms": list, "blobs": int, "bytes": int},
    "progress": {"image": str, "bytes_done": NUMBER, "bytes_total": NUMBER, "rate_bytes_per_second": NUMBER},
    "blob": {"image": str, "digest": str, "size": int, "result": str, "seconds": NUMBER},
    "image": {"image": str, "ok": bool, "platforms": list, "fetched": int, "cached": int, "bytes": int,
              "seconds": NUMBER},
    "end": {"ok": bool},
}


def checked_event(event: object) -> dict:
    """An event as the views read it; ValueError if it is not one."""
    kind = event.get("event") if isinstance(event, dict) else None
    fields = EVENT_FIELDS.get(kind, {}) if isinstance(kind, str) else None
    if fields is None or not all(isinstance(event.get(name), types) and not (
            types is not bool and isinstance(event.get(name), bool)) for name, types in fields.items()):
        raise ValueError("not an event of a dockerproxy prefetch")
    if not all(isinstance(item, str) for item in event.get("platforms", [])):
        raise ValueError("not an event of a dockerproxy prefetch")
    error = event.get("error")
    if error is not None and not (isinstance(error, dict) and isinstance(error.get("code"), str)
                                  and isinstance(error.get("message"), str)):
        raise ValueError("not an event of a dockerproxy prefetch")
    return event


def eta_text(done: int, total: int, rate: float) -> str:
    if total <= done:
        return "done"
    return human_duration((total - done) / rate) if rate > 0 else "?"


class ProgressView:
    """What the prefetch command prints, from the events (the same whether it
    ran here or in a proxy): LogView, TerminalView and JsonView say how."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.images = []              # the image events, in the order they ended
        self.ok = None                # the end event's verdict

    def event(self, event: dict) -> None:
        if event.get("event") == "image":
            self.images.append(event)
        elif event.get("event") == "end":
            self.ok = bool(event.get("ok"))
        self.show(event)

    def show(self, event: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stream.flush()


class JsonView(ProgressView):
    """--json: each event as one line of JSON (NDJSON)."""

    def show(self, event: dict) -> None:
        self.stream.write(json.dumps(event, separators=(",", ":")) + "\n")
        self.stream.flush()


class LogView(ProgressView):
    """Not a terminal: a plain line per blob and per image, then the summary table."""

    def show(self, event: dict) -> None:
        kind = event.get("event")
        name = screen_text(event.get("image", ""))
        if kind == "resolved":
            self.line(f'{name}: {screen_text(event["digest"])}, {event["blobs"]} blobs, '
                      f'{human_bytes(event["bytes"])} ({platforms_text(event["platforms"], 60)})')
        elif kind == "blob":
            self.line(f'{name}: {screen_text(event["digest"])} {human_bytes(event["size"])} '
                      f'{screen_text(event["result"])}')
        elif kind == "image":
            error = event.get("error")
            self.line(f'{name}: failed: {failure_text(error)}' if error else
                      f'{name}: done, {event["fetched"]} blobs fetched, {event["cached"]} cached')
        elif kind == "end":
            self.line("\n" + summary_table(self.images))

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class TerminalView(ProgressView):
    """A terminal: a line per image being fetched (bytes, rate, ETA) and an
    overall line, redrawn in place with ANSI escapes; each image's result
    stays above them; the summary table at the end."""

    REDRAW_INTERVAL = 0.1             # seconds: smooth enough, and few writes
    # Image lines drawn at most: the block must fit a terminal, or moving up over
    # it to redraw fails.  Images downloading come first; the others are counted.
    MAX_IMAGE_LINES = 8

    def __init__(self, stream, columns: int = 80) -> None:
        super().__init__(stream)
        self.columns = max(columns, 40)
        self.active = {}              # image -> its last progress event
        self.total_images = 0
        self.drawn = 0                # lines of the block on screen
        self.drawn_at = 0.0

    def show(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            self.total_images = len(event["images"])
        elif kind == "resolved":
            self.active[event["image"]] = {"bytes_done": 0, "bytes_total": event["bytes"], "rate_bytes_per_second": 0}
        elif kind == "progress":
            self.active[event["image"]] = event
        elif kind == "image":
            self.active.pop(event["image"], None)
            self.erase()
            error, name = event.get("error"), screen_text(event["image"])
            self.stream.write((f'FAILED {name}: {failure_text(error)}' if error else
                               f'ok {name}: {event["fetched"]} fetched, {event["cached"]} cached, '
                               f'{human_bytes(event["bytes"])} in {event["seconds"]:.1f} s')[:self.columns] + "\n")
        elif kind == "end":
            self.erase()
            self.stream.write("\n" + summary_table(self.images) + "\n")
            self.stream.flush()
            return
        if kind == "image" or time.monotonic() - self.drawn_at >= self.REDRAW_INTERVAL:
            self.draw()

    def lines(self) -> list:
        active = sorted(self.active.items(), key=lambda item: not item[1]["bytes_done"])  # stable: started first
        lines = []
        for name, state in active[:self.MAX_IMAGE_LINES]:
            done, total, rate = state["bytes_done"], state["bytes_total"], state["rate_bytes_per_second"]
            lines.append(f"  {screen_text(name)}  {human_bytes(done)} / {human_bytes(total)}  {human_bytes(rate)}/s  "
                         f"ETA {eta_text(done, total, rate)}")
        if len(active) > self.MAX_IMAGE_LINES:
            lines.append(f"  ... and {len(active) - self.MAX_IMAGE_LINES} more images waiting")
        done_bytes = sum(state["bytes_done"] for state in self.active.values())
        total_bytes = sum(state["bytes_total"] for state in self.active.values())
        lines.append(f"{len(self.images)}/{self.total_images} images done; in progress "
                     f"{human_bytes(done_bytes)} / {human_bytes(total_bytes)}")
        return [line[:self.columns - 1] for line in lines]

    def erase(self) -> None:
        """Move up over the block and clear it."""
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def draw(self) -> None:
        self.erase()
        lines = self.lines()
        self.stream.write("".join(f"\r\x1b[2K{line}\n" for line in lines))
        self.stream.flush()
        self.drawn, self.drawn_at = len(lines), time.monotonic()


# Server and main ###########################################################

# The answer to a connection over MAX_CONNECTIONS, made once: it is sent from
# the accepting thread, which must not build or block on anything.
OVERLOADED_BODY = RegistryError(503, "UNAVAILABLE", "too many connections; retry").body()
OVERLOADED_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(OVERLOADED_BODY), OVERLOADED_BODY))


class Connections:
    """The client connections served: at most MAX_CONNECTIONS.

    Each is a thread and, while it streams, a CHUNK_SIZE buffer; the cap
    keeps a flood from exhausting memory and threads.  When every slot is
    taken, the connection idle the longest (waiting for its next request, or
    for its first byte) is closed to admit the new one, as nginx reuses idle
    keep-alive connections: sockets that send nothing cannot lock real
    clients out.  Only when none is idle is the new connection refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0                # admitted and not yet gone (may pass limit by closings in flight)
        self.readers = weakref.WeakSet()  # the DeadlineReaders of live connections
        self._lock = threading.Lock()
        self._left = threading.Condition(self._lock)  # a connection ended (a shutdown waits)

    def watch(self, reader: DeadlineReader) -> None:
        with self._lock:
            self.readers.add(reader)

    def forget(self, reader: DeadlineReader) -> None:
        with self._lock:
            self.readers.discard(reader)

    def admit(self) -> bool:
        with self._lock:
            if self.count < self.limit:
                self.count += 1
                return True
            idle = [reader for reader in self.readers if reader.idle_since is not None]
            if not idle:
                return False
            oldest = min(idle, key=lambda reader: reader.idle_since)
            oldest.idle_since = None  # chosen once
            self.readers.discard(oldest)
            self.count += 1           # its thread gives its slot back when it ends
        oldest.close_idle()
        return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1
            self._left.notify_all()

    def close_idle_now(self) -> None:
        """Every connection waiting for its next request is closed (a shutdown)."""
        with self._lock:
            idle = [reader for reader in self.readers if reader.idle_since is not None]
        for reader in idle:
            reader.close_idle()

    def wait_gone(self, timeout: float) -> bool:
        """Wait until every connection has ended, at most `timeout` seconds."""
        with self._left:
            return self._left.wait_for(lambda: self.count <= 0, timeout)


class Proxy:
    """The parts every request shares: settings, routes, the upstream client
    and its auth, the Access rule, the cache (None without CACHE_DIR), the
    client connections, and what the operator sees: metrics, activity,
    readiness, and the gate of the admin pages."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.routes = RouteTable(config)
        self.metrics = Metrics([route.name for route in self.all_routes()], started=time.time())
        self.activity = Activity(self.clock)
        self.gate = AdminGate(config.admin_token, config.admin_allow, self.clock)
        self.machine_name = socket.gethostname().lower()  # a name ADMIN_ALLOW's browsers may use
        self.connections = Connections(config.max_connections)
        self.draining = threading.Event()  # set when shutting down: /readyz says so
        self.upstreams = Upstreams(config.connect_timeout, config.read_timeout,
                                   configured_hosts(config), self.clock, self.metrics,
                                   config.max_upstream_requests, {route.upstream for route in self.all_routes()})
        self.limits = ClientLimits(config.rate_limit_requests, config.rate_limit_bytes,
                                   config.rate_limit_transfers, config.rate_limit_exempt, self.clock)
        self.policy = ImagePolicy(config.allow_images, config.deny_images,
                                  {registry_name(route) for route in self.all_routes()})
        self.backoff = UpstreamBackoff(self.clock)
        self.auth = UpstreamAuth(self.upstreams, self.clock, config)
        self.prefetches = Prefetches(config.max_fills)
        self.pins = PinnedImages(config.prefetch_file, self.routes)  # raises ConfigError for a bad file
        self.cache = self.shared = self.peers = None
        if config.cache_dir and config.cache_s3[0]:
            self.shared = SharedStore(Bucket(config, self.clock, self.metrics), config, self.clock, self.metrics)
        if config.cache_dir:
            self.cache = Cache(config.cache_dir, config.cache_max_size, config.cache_max_age, self.clock,
                               config.max_fills, self.metrics, self.pins.images, self.shared)
        if config.peers:
            self.peers = Peers(config, self.clock, self.metrics, own_peer(config))
        self.metrics.start_shared(self.shared is not None, self.peers is not None)
        if self.cache is not None:
            self.cache.fills.on_failed = self.fill_failed
        self.access = Access(self.cache.records if self.cache else None, self.clock)

    def start(self) -> None:
        """The background work: the cache's evictor, the bucket's keeper, and
        keeping PREFETCH_FILE's images warm.  A bucket that refuses the
        credentials stops start-up (ConfigError)."""
        if self.shared is not None:
            self.start_bucket()
        if self.cache is not None:
            self.cache.start_evictor()
        if self.config.prefetch_file:
            KeepWarm(self).start()

    def fill_failed(self, fill: Fill, digest: str | None, err: Exception) -> None:
        """A fill from the bucket or a peer failed before it was verified: that source
        is passed over for the digest (the client's retry goes upstream), and a
        bucket object whose bytes are not its digest is deleted."""
        if isinstance(err, FillAbandoned):  # its clients left: no fault of the source
            return
        if fill.source == "bucket" and self.shared is not None and digest:
            if isinstance(err, DigestMismatch):
                self.shared.discard(digest)
            else:
                self.shared.avoid(digest)
        elif fill.source == "peer" and self.peers is not None and fill.origin:
            self.metrics.add("dockerproxy_peer_requests_total", ("unreachable",))  # its answer broke off
            self.peers.failed(fill.origin, f"its answer for {digest} failed: {printable(str(err))[:80]}")

    def start_bucket(self) -> None:
        """Check the bucket's credentials, abort the uploads a past run left, start the keeper.
        A bucket that does not answer yet is not fatal: the cache works from CACHE_DIR meanwhile."""
        shared = self.shared
        try:
            shared.bucket.check()
        except S3Failure as err:
            if err.status in (400, 401, 403, 404):
                raise ConfigError(bucket_refusal(err, shared.bucket)) from None
            shared.trouble.warn(err)
        else:
            log.info("bucket %r: ready", shared.bucket)
        BucketKeeper(shared, self.peers, self.draining).start()  # aborts what past runs left, first

    def prefetch(self, images: list, answer: Answers, background: bool = False) -> None:
        """POST /admin/prefetch: its events to the client as NDJSON while it runs;
        from a browser, run in the background, and the browser sent to /status."""
        delivery = {"gone": False}

        def send(event: dict) -> None:
            if delivery["gone"]:
                return
            try:
                answer.send_line(json.dumps(event, separators=(",", ":")).encode() + b"\n")
            except OSError:  # the client left: stop, as a client's Ctrl-C stops its pull
                delivery["gone"] = True
                job.cancel()

        job = PrefetchJob(self, images, (lambda event: None) if background else send, source="admin")
        self.prefetches.begin(job)  # 503 before anything is sent
        if background:
            threading.Thread(target=self.prefetches.finish, args=(job,), daemon=True, name="prefetch").start()
            return answer.send_small(303, b"", headers=PAGE_HEADERS + (("Location", "/status#prefetches"),))
        answer.start_lines("application/x-ndjson")
        self.prefetches.finish(job)
        if not delivery["gone"]:
            answer.end_lines()

    def client_of(self, peer: str, headers, for_logs: bool = False) -> str:
        """The client's address (see client_address): limits and ALLOW_CLIENTS
        never take it from a header unless the peer is in TRUSTED_PROXIES."""
        trust = self.config.trust_proxy_headers and for_logs
        return client_address(peer, headers, trust, self.config.trusted_proxies)

    def check_client(self, address: str) -> None:
        """ALLOW_CLIENTS: 403 for an address outside it."""
        allowed = self.config.allow_clients
        if allowed and not in_networks(plain_address(address), allowed):
            self.metrics.add("dockerproxy_client_refusals_total", ("client",))
            raise RegistryError(403, "DENIED", self.config.block_message or "this mirror does not serve "
                                "your address", {"client": address}, close=True)

    def check_image(self, route: Route, repository: str) -> None:
        """ALLOW_IMAGES and DENY_IMAGES: 403 for an image they refuse, before any upstream request."""
        if not self.policy.active:
            return
        image = image_name(route, repository)
        if not all(self.policy.allows(name) for name in self.image_names(route, repository)):
            self.metrics.add("dockerproxy_client_refusals_total", ("image",))
            raise RegistryError(403, "DENIED", self.config.block_message or "this image is not "
                                "served by this mirror", {"image": image})

    def image_names(self, route: Route, repository: str) -> list:
        """Every name an image goes by along a chain of mirrors: "docker.io/index.docker.io/evil"
        on the docker route is that, and "docker.io/library/evil" to an upstream mirror that
        takes path prefixes (docker's own names for a registry, and library/, included)."""
        names = [image_name(route, repository)]
        first, nested, rest = repository.partition("/")
        while nested and looks_like_registry_host(first):
            inner = self.routes.by_registry.get(first.lower())
            if inner is not None and inner.dockerhub and "/" not in rest:
                rest = "library/" + rest
            names.append(image_name(inner, rest) if inner is not None else f"{first}/{rest}")
            first, nested, rest = rest.partition("/")
        return names

    def all_routes(self) -> list:
        routes = list(self.routes.routes.values())
        return routes + [self.routes.debug_target] if self.routes.debug_target else routes

    def observe(self, served: Served, route: Route | None) -> None:
        """A request ended: into the metrics and the activity of the status page."""
        self.metrics.served(served)
        self.activity.served(served, route)

    def readiness(self) -> list:
        """Why this instance should get no traffic now; empty when it is ready."""
        problems = ["shutting down"] if self.draining.is_set() else []
        if self.cache is None:
            return problems
        if not directory_writable(self.cache.root):
            problems.append(f"CACHE_DIR {self.cache.root} is not writable")
        free = free_bytes(self.cache.root)
        if free is not None and free < self.config.ready_min_free:
            problems.append(f"{human_bytes(free)} free on the cache's file system, "
                            f"under READY_MIN_FREE ({human_bytes(self.config.ready_min_free)})")
        return problems

    def metrics_text(self) -> str:
        """/metrics: the running totals, and the live values read now."""
        gauges = {
            "dockerproxy_connections_open": self.connections.count,
            "dockerproxy_threads": threading.active_count(),
            "dockerproxy_fills_in_flight": len(self.cache.fills.in_flight()) if self.cache else 0,
            "dockerproxy_start_time_seconds": self.metrics.started,
            "dockerproxy_ratelimit_clients": len(self.limits),
            "dockerproxy_upstream_circuit_open": {
                (route.name,): int(bool(self.upstreams.breakers.open_for(route.upstream)))
                for route in self.all_routes()},
            "dockerproxy_build_info": {(__version__, platform_python()): 1},
            **process_gauges(),
        }
        if self.cache is not None:
            gauges.update({"dockerproxy_cache_size_bytes": self.cache.budget.size,
                           "dockerproxy_cache_limit_bytes": self.cache.max_size,
                           "dockerproxy_cache_objects": self.cache.budget.objects})
            disk = disk_space(self.config.cache_dir)
            if disk is not None:
                gauges.update({"dockerproxy_cache_disk_free_bytes": disk[0],
                               "dockerproxy_cache_disk_size_bytes": disk[1]})
        if self.shared is not None and self.shared.counted:
            gauges.update({"dockerproxy_s3_objects": self.shared.counted[0],
                           "dockerproxy_s3_size_bytes": self.shared.counted[1]})
        if self.peers is not None:
            gauges["dockerproxy_peer_up"] = {(peer["peer"],): int(peer["state"] == "up")
                                             for peer in self.peers.status()}
        return self.metrics.render(gauges)

    def status(self) -> dict:
        """/status.json, which /status renders."""
        now = self.clock.time()
        activity = self.activity.document(now)
        metrics = self.metrics
        since_start = {
            "requests": {result: metrics.total("dockerproxy_cache_requests_total", result=result)
                         for result in CACHE_RESULTS},
            "bytes": {source: metrics.value("dockerproxy_cache_bytes_served_total", (source,))
                      for source in BYTE_SOURCES}}
        return {
            "version": SERVER_VERSION, "python": platform_python(), "now": now,
            "started": metrics.started, "uptime_seconds": time.time() - metrics.started,
            "routes": [self.route_status(route) for route in self.all_routes()],
            "cache": self.cache_status(now),
            "traffic": {"since_start": since_start, "last_hour": activity.pop("last_hour")},
            "prefetches": self.prefetches.status(),
            "shared": self.shared_status(),
            **activity,
        }

    def shared_status(self) -> dict:
        """The bucket and the peers, as /status shows them."""
        metrics = self.metrics
        return {"bucket": self.shared.status() if self.shared else None,
                "peers": self.peers.status() if self.peers else [],
                "self": self.peers.own if self.peers else None,
                "asked_peers": {result: metrics.value("dockerproxy_peer_requests_total", (result,))
                                for result in PEER_ASK_RESULTS},
                "served_peers": metrics.total("dockerproxy_peer_served_total")}

    def route_status(self, route: Route) -> dict:
        health = self.metrics.route_health.get(route.name)
        return {"name": route.name, "upstream": route.upstream,
                "circuit": self.upstreams.breakers.state(route.upstream),
                "ratelimited_seconds": round(self.backoff.for_upstream(route.upstream), 1),
                "in_flight": self.upstreams.slots.in_flight(urllib.parse.urlsplit(route.upstream).netloc),
                "last_status": health.status if health else None,
                "last_latency_seconds": round(health.latency, 4) if health else None,
                "last_seen": health.when if health else None,
                "ratelimit_remaining": health.ratelimit_remaining if health else None,
                "ratelimit_limit": health.ratelimit_limit if health else None}

    def cache_status(self, now: float) -> dict:
        if self.cache is None:
            return {"enabled": False}
        by_upstream = {}
        for route in self.all_routes():
            by_upstream.setdefault(route.upstream, route)
        fills = []
        for fill in self.cache.fills.in_flight():
            upstream, repository, _, reference, _ = fill.key
            written = fill.written
            fills.append({"image": image_name(by_upstream.get(upstream), repository), "digest": reference,
                          "bytes": written, "length": fill.length or 0, "clients": fill.readers,
                          "rate_bytes_per_second": round(written / max(now - fill.started_at, 0.001))})
        return {"enabled": True, "size_bytes": self.cache.budget.size, "limit_bytes": self.cache.max_size,
                "objects": self.cache.budget.objects, "free_bytes": free_bytes(self.cache.root) or 0,
                "fills": fills}


def bucket_refusal(err: S3Failure, bucket: Bucket) -> str:
    """What a start-up refusal by the bucket means, naming the settings to fix."""
    if err.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed") or err.status in (401, 403):
        settings = "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
        settings += ", AWS_SESSION_TOKEN" if bucket.credentials.session_token else ""
        return f"CACHE_S3: {bucket!r} refused the credentials ({settings}, S3_REGION): {err.strerror}"
    if err.code == "NoSuchBucket" or err.status == 404:
        return f"CACHE_S3: {bucket!r} has no such bucket (create it first): {err.strerror}"
    return f"CACHE_S3: {bucket!r} refused a listing (S3_ENDPOINT, S3_ADDRESSING): {err.strerror}"


def directory_writable(path: str) -> bool:
    """A file can be made in `path` now (os.access says yes to root on a read-only mount)."""
    probe = os.path.join(path, f"{TEMP_PREFIX}ready-{os.getpid()}-{threading.get_ident()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
        return True
    except OSError:
        return False


def disk_space(path: str) -> tuple | None:
    """(bytes free to an unprivileged writer, file system size), or None if unreadable."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def free_bytes(path: str) -> int | None:
    space = disk_space(path)
    return space[0] if space else None


def platform_python() -> str:
    return sys.version.split()[0]


def process_gauges() -> dict:
    """The process_ metrics of Prometheus's own clients, from /proc (Linux; elsewhere none)."""
    try:
        with open("/proc/self/stat", "rb") as file:
            fields = file.read().rpartition(b")")[2].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return {"process_resident_memory_bytes": int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
                "process_cpu_seconds_total": (int(fields[11]) + int(fields[12])) / ticks,
                "process_open_fds": len(os.listdir("/proc/self/fd"))}
    except (OSError, ValueError, IndexError):
        return {}


def configured_hosts(config: Config) -> set:
    """The upstream host names the operator chose (redirects and realms are the upstreams' choice)."""
    urls = [route.upstream for route in config.routes] + [config.target_upstream]
    return {urllib.parse.urlsplit(url).hostname for url in urls if url}


class ProxyServer(http.server.ThreadingHTTPServer):
    """The listening socket (TLS when configured); a thread per connection."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, config: Config, handler=None, proxy: Proxy | None = None) -> None:
        self.config = config
        self.proxy = proxy or Proxy(config)
        self.tls = server_tls_context(config) if config.tls_cert else None
        self.connections = self.proxy.connections
        self.refusals = 0             # connections refused over MAX_CONNECTIONS, since the last warning
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), handler or ProxyHandler)
        self.proxy.start()

    def process_request(self, request, client_address) -> None:
        """A thread for the connection, if Connections admits it (see there);
        else a plain-HTTP client gets 503 with Retry-After at once, rather than
        waiting in a queue it cannot see."""
        if not self.connections.admit():
            return self.refuse(request)
        self.refusals = 0
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # "can't start new thread": the process's task limit (systemd TasksMax)
            self.connections.leave()
            self.refuse(request, "no thread can be started (the process's task limit)")
        except BaseException:
            self.connections.leave()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.leave()

    def handle_error(self, request, client_address) -> None:
        """socketserver prints a traceback to stderr; a client that went away is no error, the rest is logged."""
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return
        log.exception("connection from %s failed", client_address[0])

    def refuse(self, request, why: str = "") -> None:
        """503 on a connection over MAX_CONNECTIONS, or without a thread to serve it
        (TLS: just closed; a handshake costs a thread)."""
        self.refusals += 1
        if self.refusals == 1:
            log.warning("%s: refusing new connections", why or
                        f"more than MAX_CONNECTIONS={self.config.max_connections} client connections")
        if self.tls is None:
            try:
                request.setblocking(False)
                request.send(OVERLOADED_ANSWER)
                request.shutdown(socket.SHUT_WR)  # the answer, then the end, before anything unread
                request.recv(MAX_HEAD_BYTES)      # what came already: read, so closing sends no reset
            except OSError:
                pass
        self.shutdown_request(request)

    def finish_request(self, request, client_address) -> None:
        """With TLS, the handshake runs here, in the connection's own thread,
        so a slow client cannot hold up the accept loop."""
        if self.tls is None:
            return super().finish_request(request, client_address)
        request.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            request = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as err:
            log.info("%s: TLS handshake failed: %s", client_address[0], printable(str(err)))
            return
        try:
            super().finish_request(request, client_address)
        finally:
            self.shutdown_request(request)


class JsonLines(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line, for Loki or Elasticsearch.
    An access line's fields are its keys; any other line has a "message"."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z", "level": record.levelname.lower()}
        access = getattr(record, "access", None)
        if access is not None:
            line.update(access)
        else:
            line["message"] = record.getMessage()
            if record.exc_info:
                line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(debug: bool, log_format: str = "text", level: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level or (logging.DEBUG if debug else logging.INFO), handlers=[handler])


CACHE_COMMANDS = ("verify", "stats", "prune")


def cache_command(action: str, config: Config) -> int:
    """python3 dockerproxy.py cache verify|stats|prune: the operator's tools."""
    if not config.cache_dir:
        print("dockerproxy.py: error: CACHE_DIR is empty: there is no cache", file=sys.stderr)
        return 2
    try:
        pins = PinnedImages(config.prefetch_file, RouteTable(config))
        cache = Cache(config.cache_dir, config.cache_max_size, config.cache_max_age, pinned=pins.images)
        report = {"verify": cache.verify, "stats": cache.stats, "prune": cache.sweep}[action]()
    except OSError as err:
        return cannot_use(err, config)
    for key, value in report.items():
        print(f"{key}: {value}")
    return 1 if report.get("bad_removed") else 0


# The prefetch command --------------------------------------------------------

def prefetch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dockerproxy.py prefetch", usage="%(prog)s [IMAGE ...] [--file FILE] [--platform OS/ARCH[/VARIANT]] "
        "[--json] [--proxy URL] [settings]",
        description="Fetch images into the cache: every manifest, config and layer, verified.  Without "
        "--proxy, into CACHE_DIR with the server's settings (a proxy may be running on it); with --proxy, "
        "the proxy at URL does the work (POST /admin/prefetch, with ADMIN_TOKEN from the environment or .env).  "
        "Exit status: 0 every image was prefetched, 1 one or more failed, 2 bad arguments.")
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="as docker names it: alpine, alpine:3.20, library/alpine@sha256:..., "
                             "ghcr.io/owner/app:1, registry.k8s.io/pause:3.9")
    parser.add_argument("--file", action="append", default=[], metavar="FILE",
                        help="more images, one a line, each optionally followed by platforms "
                             "(alpine:3.20 linux/amd64,linux/arm64); # starts a comment")
    parser.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                        help="only these platforms of an index, and their attestations (repeatable; "
                             "default: every entry, as skopeo copy --all needs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per event (NDJSON)")
    parser.add_argument("--proxy", metavar="URL", help="have the proxy at URL do it, e.g. http://127.0.0.1:8080")
    add_settings(parser)
    return parser


def prefetch_images(names: list, files: list, platforms: list) -> list:
    """The command's images: [(ImageReference, platforms)]; ConfigError if any is bad."""
    try:
        default = parse_platforms(platforms)
        images = [(parse_image_reference(name), default) for name in names]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for path in files:
        images += [(reference, own or default) for reference, own in read_image_list(path)]
    if not images:
        raise ConfigError("name at least one image, or --file")
    if len(images) > MAX_PREFETCH_IMAGES:
        raise ConfigError(f"at most {MAX_PREFETCH_IMAGES} images at once")
    return images


def progress_view(json_lines: bool, stream=None) -> ProgressView:
    """NDJSON with --json; on a terminal (TERM not dumb), progress redrawn in place; else log lines."""
    stream = stream or sys.stdout
    if json_lines:
        return JsonView(stream)
    if stream.isatty() and os.environ.get("TERM", "") != "dumb":
        return TerminalView(stream, shutil.get_terminal_size().columns)
    return LogView(stream)


def prefetch_command(argv: list, environ: dict) -> int:
    """python3 dockerproxy.py prefetch IMAGE...: here, or in the proxy at --proxy."""
    options = prefetch_parser().parse_args(argv)
    try:
        config = config_from_args(options, environ)
        images = prefetch_images(options.images, options.file, options.platform)
    except ConfigError as err:
        print(f"dockerproxy.py prefetch: error: {err}", file=sys.stderr)
        return 2
    configure_logging(config.debug, config.log_format, logging.DEBUG if config.debug else logging.WARNING)
    view = progress_view(options.json)
    try:
        if options.proxy:
            return prefetch_remotely(options.proxy, config, images, view)
        if not config.cache_dir:
            print("dockerproxy.py prefetch: error: CACHE_DIR is empty: there is no cache to fill", file=sys.stderr)
            return 2
        try:
            proxy = Proxy(config)
            proxy.cache.count()
        except OSError as err:
            return cannot_use(err, config)
        except ConfigError as err:  # a pattern file or PREFETCH_FILE that cannot be read
            print(f"dockerproxy.py prefetch: error: {err}", file=sys.stderr)
            return 2
        job = PrefetchJob(proxy, images, view.event)
        try:
            ok = job.run()
        except KeyboardInterrupt:  # Ctrl-C: what is stored stays; downloads in flight are dropped
            job.cancel()
            print("\ndockerproxy.py prefetch: interrupted", file=sys.stderr)
            return 130
        proxy.cache.wait_idle(config.read_timeout)
        return 0 if ok else 1
    finally:
        view.close()


def image_line(reference: ImageReference, platforms: tuple) -> str:
    """An image as a prefetch list writes it (the admin API's "images" items)."""
    return f"{reference} {','.join(map(platform_name, platforms))}" if platforms else str(reference)


def prefetch_remotely(url: str, config: Config, images: list, view: ProgressView) -> int:
    """POST /admin/prefetch to the proxy at `url`; its NDJSON events to `view`."""
    try:
        parts = urllib.parse.urlsplit(url)
        usable = parts.scheme in ("http", "https") and parts.hostname and not parts.username and (
            parts.port or 1) and not parts.query and not parts.fragment
    except ValueError:  # a bad port or IPv6 literal
        usable = False
    if not usable:
        print(f"dockerproxy.py prefetch: error: --proxy {screen_text(url)!r}: not an http(s)://host[:port] URL",
              file=sys.stderr)
        return 2
    body = json.dumps({"images": [image_line(*image) for image in images]}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}
    if config.admin_token:
        headers["Authorization"] = f"Bearer {config.admin_token}"
    timeout = config.connect_timeout + prefetch_patience(config)  # the proxy's prefetch may wait that long
    connection = (http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=ssl.create_default_context())
                  if parts.scheme == "https" else http.client.HTTPConnection(parts.netloc, timeout=timeout))
    try:
        connection.request("POST", parts.path.rstrip("/") + "/admin/prefetch", body, headers)
        response = connection.getresponse()
        if response.status != 200:
            failure = error_of(response)
            print(f"dockerproxy.py prefetch: {screen_text(url)} refused: {screen_text(failure.code)}: "
                  f"{screen_text(failure.message)}", file=sys.stderr)
            return 1
        for line in iter(lambda: response.readline(MAX_SMALL_BODY), b""):
            if line.strip():
                view.event(checked_event(json.loads(line)))
    except (OSError, ValueError, RecursionError, http.client.HTTPException) as err:
        print(f"dockerproxy.py prefetch: {screen_text(url)}: {screen_text(str(err))}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if view.ok is None:
        print(f"dockerproxy.py prefetch: {screen_text(url)} ended its answer before the prefetch did", file=sys.stderr)
        return 1
    return 0 if view.ok else 1


class Shutdown:
    """SIGTERM or SIGINT (docker stop, systemd, Kubernetes, Ctrl-C), gracefully:

    1. /readyz answers 503 at once, and every answer ends its connection;
    2. connections are still accepted for SHUTDOWN_DELAY, while a load
       balancer or Kubernetes' endpoints stop sending new ones;
    3. then the listening socket closes (new connections are refused), idle
       keep-alive connections are closed, and the transfers in flight have
       SHUTDOWN_GRACE to finish;
    4. downloads into the cache still running then are abandoned and their
       temporary files removed: the cache holds verified objects or nothing.

    A second signal exits at once (status 1).  serve_forever() runs in the
    main thread, and its shutdown() must be called from another: that thread
    is started before any signal can come, and the handler only sets flags,
    as a process at its thread limit (TasksMax, a busy proxy) could not
    start one then.
    """

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.proxy = server.proxy
        self.signalled = threading.Event()   # the first signal came
        self.delay_over = threading.Event()  # SHUTDOWN_DELAY cut short (a test)

    def install(self) -> None:
        threading.Thread(target=self._stop_accepting, name="shutdown", daemon=True).start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame) -> None:
        if self.proxy.draining.is_set():
            log.warning("second %s: exiting now, transfers cut", signal.Signals(signum).name)
            os._exit(1)
        self.begin(signal.Signals(signum).name)

    def begin(self, why: str) -> None:
        """Stop being ready now; stop accepting after SHUTDOWN_DELAY (in a thread)."""
        self.proxy.draining.set()
        config = self.proxy.config
        log.info("%s: shutting down; accepting for %gs more, then %gs for transfers in flight",
                 why, config.shutdown_delay, config.shutdown_grace)
        self.signalled.set()

    def _stop_accepting(self) -> None:
        self.signalled.wait()
        self.delay_over.wait(self.proxy.config.shutdown_delay)
        self.server.shutdown()  # serve_forever() returns in the main thread, which finish()es

    def finish(self) -> None:
        """After the serve loop: refuse new connections, close idle ones, wait for the rest."""
        self.server.socket.close()  # a connection now is refused, not left in the backlog
        connections = self.proxy.connections
        deadline = time.monotonic() + self.proxy.config.shutdown_grace
        while True:
            # again and again: a connection that ended an answer begun before the
            # signal (so without Connection: close) may just have become idle
            connections.close_idle_now()
            remaining = deadline - time.monotonic()
            if connections.wait_gone(min(0.1, max(remaining, 0))) or remaining <= 0:
                break
        left = max(connections.count, 0)
        cache = self.proxy.cache
        if cache is not None:  # a fill stores its object after its clients' last byte
            cache.wait_idle(max(deadline - time.monotonic(), 0))
        abandoned = self.abandon_fills()
        if self.proxy.shared is not None:  # an upload cut by the exit would stay pending in the bucket
            self.proxy.shared.abort_journaled()
        if left or abandoned:
            log.warning("shutdown: %d connections still open after SHUTDOWN_GRACE were cut; "
                        "%d downloads into the cache abandoned", left, abandoned)
        log.info("shutdown: done")

    def abandon_fills(self) -> int:
        """Remove the partial files of downloads still running: nothing partial stays behind."""
        cache = self.proxy.cache
        if cache is None:
            return 0
        fills = cache.fills.in_flight()
        for fill in fills:
            if fill.spool_path:
                remove_quietly(fill.spool_path)
        return len(fills)


class Reload:
    """SIGHUP: the image pattern files (ALLOW_IMAGES=@file) are read again.

    In a thread started at install, as for Shutdown: the handler only sets a
    flag.  Signals that come while a reload runs make one more reload.
    """

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.wanted = threading.Event()

    def install(self) -> None:
        threading.Thread(target=self._reload_when_wanted, name="reload", daemon=True).start()
        signal.signal(signal.SIGHUP, lambda signum, frame: self.wanted.set())

    def _reload_when_wanted(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            log.info("SIGHUP: reading the image pattern files again")
            try:
                self.proxy.policy.reload()
            except Exception:  # the thread must live for the next SIGHUP
                log.exception("image patterns not reloaded, the old ones stay")


def serve(config: Config) -> int:
    """Listen and serve until SIGTERM (docker stop, systemd) or Ctrl-C; see Shutdown."""
    early = []  # a signal while starting (opening the cache can take a moment) is kept for then
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: early.append(signum))
    try:
        server = ProxyServer(config)
    except OSError as err:
        return cannot_use(err, config)
    shutdown, reload = Shutdown(server), Reload(server.proxy)
    shutdown.install()
    reload.install()
    if signal.SIGHUP in early:
        reload.wanted.set()
    stops = [signum for signum in early if signum != signal.SIGHUP]
    if stops:
        shutdown.begin(signal.Signals(stops[0]).name)
    host, port = server.server_address[:2]
    log.info("dockerproxy %s listening on %s:%d (%s), default route %s", __version__, host, port,
             "https" if server.tls else "http", config.default_route or "(none)")
    server.serve_forever()
    shutdown.finish()
    return 0


def cannot_use(err: OSError, config: Config) -> int:
    where = f"CACHE_DIR {err.filename}" if err.filename else f"{config.host}:{config.port}"
    print(f"dockerproxy.py: cannot use {where}: {err.strerror or err}", file=sys.stderr)
    return 1


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim).

    Run as a script, this module is compiled before it starts, and the
    compiler's scratch memory (about 8 MiB for this file) stays in the heap,
    counted in RSS, until it is trimmed.  Elsewhere (musl, macOS) this does nothing.
    """
    try:
        import ctypes  # here: importing it costs memory where it is of no use
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


def main(argv: list | None = None, environ: dict | None = None) -> int:
    """The command line: serve, or run a cache command.  argv and environ
    default to the process's own; tests pass theirs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    if argv[:1] == ["prefetch"]:
        return prefetch_command(argv[1:], environ)
    action = None
    if argv[:1] == ["cache"]:
        if len(argv) < 2 or argv[1] not in CACHE_COMMANDS:
            print(f"usage: dockerproxy.py cache {{{','.join(CACHE_COMMANDS)}}} [settings]", file=sys.stderr)
            return 2
        action, argv = argv[1], argv[2:]
    try:
        config = load_config(argv, environ)
    except ConfigError as err:
        print(f"dockerproxy.py: error: {err}", file=sys.stderr)
        return 2
    configure_logging(config.debug, config.log_format)
    try:
        return cache_command(action, config) if action else serve(config)
    except ConfigError as err:  # an image pattern file that cannot be read
        print(f"dockerproxy.py: error: {err}", file=sys.stderr)
        return 2


# Run as a script, a module keeps its whole syntax tree (about 8 MiB for this
# file) alive until the script ends: CPython frees it only after the code it
# compiled to has run.  Imported, the tree is freed as soon as it is
# compiled.  So the script starts again in the same process (same PID, same
# interpreter and options, same arguments, its path still on the command
# line) as an import of this file; python3 -m dockerproxy imports it directly.
# -c would put the working directory first on sys.path: the script's own
# directory takes its place, as in a script run, before anything is imported.
LEAN_START = ("import sys; sys.dont_write_bytecode = True; "
              "sys.path[0:1] = [sys.argv[1].rpartition('/')[0] or '/'] if sys.path[:1] == [''] else sys.path[:1]; "
              "import importlib.machinery as m, importlib.util as u; "
              "f = m.SourceFileLoader('dockerproxy', sys.argv[1]); "
              "d = u.module_from_spec(u.spec_from_loader('dockerproxy', f)); "
              "sys.modules['dockerproxy'] = d; f.exec_module(d); d.run_imported()")


def start_lean() -> None:
    """Replace this process by the same interpreter, with the same options,
    importing this file and running it; nothing if this is not a plain script
    run (standard input, a pipe, runpy in a host program) or not on Linux."""
    path = os.path.abspath(__file__)
    try:
        interpreter = os.readlink("/proc/self/exe")  # not sys.executable, which argv[0] can name
        with open("/proc/self/cmdline", "rb") as file:
            original = [os.fsdecode(part) for part in file.read().split(b"\0")[:-1]]
        options = original[1:len(original) - len(sys.argv)]
        if not (os.path.isfile(path) and os.path.samefile(sys.argv[0], path)
                and original[len(original) - len(sys.argv):] == sys.argv):
            return
        os.execv(interpreter, [interpreter, *options, "-c", LEAN_START, path, *sys.argv[1:]])
    except OSError:
        pass  # cannot start again: run here, with the tree kept


def run_imported() -> None:
    """The second start (LEAN_START): argv as the script had it, then main()."""
    sys.argv[:2] = sys.argv[1:2]
    return_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    if __spec__ is None:  # run as a script, not with -m
        start_lean()
    return_freed_memory()
    sys.exit(main())
