"""A fake Docker-Hub-like upstream for end-to-end tests of dockerproxy.py.

`FakeRegistry` runs three HTTP/1.1 servers on 127.0.0.1, each on its own port
so that the proxy sees three different hosts, as it does with Docker Hub:

* registry: the /v2/ API (manifests, blobs, tags), protected by bearer tokens;
* auth: the token realm (GET and POST /token);
* cdn: blob storage that registry blob GETs redirect to, which, like S3,
  rejects any request carrying an Authorization header.

Content is added with `add_blob`, `add_pattern_blob` (large blobs generated on
the fly, never held in memory), `add_manifest`, `add_image` and `add_index`.
Faults (`fault(...)`) make the next matching requests fail in a chosen way,
and every request is logged in `requests` so tests can count upstream calls.

Fault kinds and their options:

* status: an error answer (`status`, `code`, extra `headers`);
* stall: wait for `release` (or `timeout`), before the headers or, with
  `after_headers`, after `after_bytes` bytes of the body;
* truncate: close the connection after `nbytes` bytes of the body;
* reset: send `nbytes` bytes of the body, then a TCP reset (RST), not a FIN;
* corrupt: flip the first 16 bytes of the body;
* close: close the connection without answering;
* no_length: the body chunked, with no Content-Length;
* framing: the answer's framing rewritten, then the connection closed:
  `content_length` (a value, a list of values for several headers, None for
  none; the true length if absent), `chunked`, `nbytes` (the body cut after
  that many bytes), `stall_after` (the rest of the body held, as by a stall,
  after that many bytes), `headers` (name -> value, or None to remove it);
* redirect: `status` (307) with `location`, where "{target}" is the
  request's own path and query (a redirect loop).

Standard library only; runs on Python 3.8+.
"""

import base64
import hashlib
import http
import json
import os
import secrets
import socket
import struct
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

BLOCK_SIZE = 1 << 20  # pattern blobs repeat a block of this size
CHUNK_SIZE = 64 * 1024  # bodies are written in chunks of this size
STALL_CAP_SECONDS = 30  # a stalled request never waits longer than this
SERVERS = ("registry", "auth", "cdn")
FAULT_KINDS = ("status", "stall", "truncate", "reset", "corrupt", "close", "no_length", "framing", "redirect")
SIGNATURE_PREFIX = "secret-signature-"

_ERROR_CODES = {
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    405: "UNSUPPORTED",
    429: "TOOMANYREQUESTS",
    503: "UNAVAILABLE",
}


def sha256_digest(data):
    """Return the "sha256:<hex>" digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _is_digest(reference):
    # Tags cannot contain ":", digests always do.
    return ":" in reference


# --- blobs -----------------------------------------------------------------


class _BytesBlob:
    """A blob held in memory (small test content)."""

    def __init__(self, data):
        self.data = bytes(data)
        self.size = len(self.data)

    def iter_range(self, start, stop, chunk_size=CHUNK_SIZE):
        for position in range(start, stop, chunk_size):
            yield self.data[position:min(position + chunk_size, stop)]


_pattern_lock = threading.Lock()
_pattern_blocks = {}  # seed -> 1 MiB block
_pattern_digests = {}  # (size, seed) -> digest, so repeated tests hash once


def _pattern_block(seed):
    with _pattern_lock:
        block = _pattern_blocks.get(seed)
        if block is None:
            block = hashlib.shake_256(b"fakeregistry-%d" % seed).digest(BLOCK_SIZE)
            _pattern_blocks[seed] = block
        return block


class _PatternBlob:
    """A large blob generated on the fly: one seeded block, repeated, cut to size."""

    def __init__(self, size, seed):
        self.size = size
        self.block = _pattern_block(seed)

    def iter_range(self, start, stop, chunk_size=CHUNK_SIZE):
        position = start
        while position < stop:
            offset = position % BLOCK_SIZE
            length = min(chunk_size, BLOCK_SIZE - offset, stop - position)
            yield self.block[offset:offset + length]
            position += length


def _pattern_digest(size, seed):
    key = (size, seed)
    with _pattern_lock:
        cached = _pattern_digests.get(key)
    if cached is not None:
        return cached
    hasher = hashlib.sha256()
    for chunk in _PatternBlob(size, seed).iter_range(0, size, BLOCK_SIZE):
        hasher.update(chunk)
    digest = "sha256:" + hasher.hexdigest()
    with _pattern_lock:
        _pattern_digests[key] = digest
    return digest


_UNSATISFIABLE = object()


def _parse_range(value, size):
    """Return (start, stop) for a single byte range, _UNSATISFIABLE, or None
    when the header is absent or not understood (then the whole body is sent,
    as HTTP allows)."""
    if not value:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":  # suffix range: the last N bytes
            suffix = int(last)
            if suffix <= 0:
                return _UNSATISFIABLE
            start, stop = max(0, size - suffix), size
        else:
            start = int(first)
            stop = int(last) + 1 if last else size
            if last and stop <= start:
                return None  # "a-b" with b < a is invalid: ignore the header
    except ValueError:
        return None
    if start >= size:
        return _UNSATISFIABLE
    return start, min(stop, size)


# --- replies ---------------------------------------------------------------


class _Reply:
    """A response to send: status, headers and a body given as chunks."""

    def __init__(self, status, headers=(), body=b"", chunks=None, length=None):
        self.status = status
        self.headers = list(headers)
        if chunks is None:
            chunks, length = ([body] if body else []), len(body)
        self.chunks = chunks
        self.length = length


def _json_reply(status, obj, headers=()):
    body = json.dumps(obj).encode()
    return _Reply(status, [("Content-Type", "application/json")] + list(headers), body)


def _registry_error(status, code, message, detail=None, headers=()):
    errors = {"errors": [{"code": code, "message": message, "detail": detail}]}
    return _json_reply(status, errors, headers)


def _xml_error(status, code, message):
    body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>" % (
        code,
        message,
    )
    return _Reply(status, [("Content-Type", "application/xml")], body.encode())


def _fault_status_reply(options):
    status = options["status"]
    code = options.get("code", _ERROR_CODES.get(status, "UNKNOWN"))
    headers = list(options.get("headers", ()))
    if status == 429:
        headers.append(("Retry-After", str(options.get("retry_after", 1))))
    return _registry_error(status, code, http.HTTPStatus(status).phrase, None, headers)


# --- requests, faults, tokens ----------------------------------------------


class _Request:
    """What a route needs to know about one request."""

    def __init__(self, server, method, path, raw_query, headers, body):
        self.server = server
        self.method = method
        self.path = path
        self.raw_query = raw_query
        self.query = parse_qs(raw_query, keep_blank_values=True)
        self.headers = headers  # http.client.HTTPMessage, case-insensitive
        self.body = body
        self.record = None


class Fault:
    """One armed fault; `remaining` counts down, `hits` counts matches."""

    def __init__(self, server, path_contains, kind, count, method, options):
        self.server = server
        self.path_contains = path_contains
        self.kind = kind
        self.remaining = count
        self.method = method
        self.options = options
        self.hits = 0

    def matches(self, server, target, method):
        return (
            self.remaining > 0
            and self.server == server
            and self.path_contains in target
            and (self.method is None or self.method == method)
        )


class _Grant:
    """What a token allows: a set of (repository, action) and an expiry."""

    def __init__(self, access, expires_at, username):
        self.access = access
        self.expires_at = expires_at
        self.username = username

    def valid(self):
        return time.monotonic() < self.expires_at


def _parse_basic(value):
    """(user, password) from a Basic Authorization header, None without one."""
    scheme, _, encoded = (value or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded.strip()).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return ("", None)  # malformed: counts as wrong credentials
    return user, password


def _parse_scope(scope):
    """(name, [actions]) for "repository:<name>:<actions>", else None.
    The name is cut from both ends because it may hold ":" (host:port)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or not name:
        return None
    return name, actions.split(",")


def _accepted_media_types(headers):
    """Media types from every Accept header, q-values ignored."""
    accepted = []
    for header in headers.get_all("Accept") or []:
        for item in header.split(","):
            media_type = item.split(";")[0].strip()
            if media_type:
                accepted.append(media_type)
    return accepted


def _parse_registry_path(path):
    """(repository, "manifests"|"blobs"|"tags", reference) or None.
    Parsed from the end because repository names have several segments."""
    if not path.startswith("/v2/"):
        return None
    segments = path[len("/v2/"):].split("/")
    if len(segments) < 3 or not all(segments[:-2]):
        return None
    name = "/".join(segments[:-2])
    if segments[-2:] == ["tags", "list"]:
        return name, "tags", None
    if segments[-2] in ("manifests", "blobs") and segments[-1]:
        return name, segments[-2], segments[-1]
    return None


def _now_rfc3339():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- HTTP plumbing ---------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # concurrency tests open many connections at once

    def __init__(self, fake, role):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake
        self.role = role

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # TCP_NODELAY, set by StreamRequestHandler
    server_version = "FakeRegistry/1.0"
    sys_version = ""

    def setup(self):
        super().setup()
        self.server.fake._track_connection(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.fake._track_connection(self.connection, False)

    def log_message(self, format, *args):
        pass  # the request log is `FakeRegistry.requests`

    def __getattr__(self, name):
        # Route every method (PUT, PATCH, PROPFIND, ...) to one dispatcher so
        # that unexpected ones reach the 405 accounting instead of a 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self):
        fake = self.server.fake
        request = self._read_request()
        fault = fake._take_fault(self.server.role, self.path, self.command)
        if fault is not None:
            request.record["fault"] = fault.kind
        try:
            self._answer(fake, request, fault)
        except ConnectionError:
            self.close_connection = True  # the client went away, or close()

    def _read_request(self):
        path, _, raw_query = self.path.partition("?")
        request = _Request(self.server.role, self.command, unquote(path), raw_query, self.headers, self._read_body())
        request.record = self.server.fake._record_request(request)
        return request

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length:
            return self.rfile.read(int(length))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            # Not expected from a proxy; unread, so the connection cannot be reused.
            self.close_connection = True
        return b""

    def _answer(self, fake, request, fault):
        kind = fault.kind if fault is not None else None
        if kind == "close":
            self.close_connection = True
            return
        if kind == "stall" and not fault.options.get("after_headers"):
            fake._stall(fault)
        if kind == "status":
            reply = _fault_status_reply(fault.options)
        elif kind == "redirect":
            location = fault.options["location"].replace("{target}", self.path)
            reply = _Reply(fault.options.get("status", 307), [("Location", location)])
        else:
            reply = fake._route(request)
        request.record["status"] = reply.status
        self._send(reply, fault)

    def _send(self, reply, fault):
        if fault is not None and fault.kind == "framing":
            return self._send_framed(reply, fault)
        chunked = fault is not None and fault.kind == "no_length"
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(reply.length))
        self.end_headers()
        body = () if self.command == "HEAD" else reply.chunks
        self._write_body(body, fault, chunked)

    def _write_body(self, chunks, fault, chunked):
        kind = fault.kind if fault is not None else None
        options = fault.options if fault is not None else {}
        limit = options.get("nbytes", 0) if kind in ("truncate", "reset") else None
        stall_at = options.get("after_bytes", 0) if kind == "stall" and options.get("after_headers") else None
        corrupt_pending = kind == "corrupt"
        sent = 0
        for chunk in chunks:
            if not chunk:
                continue
            if corrupt_pending:
                chunk = bytes(b ^ 0xFF for b in chunk[:16]) + chunk[16:]
                corrupt_pending = False
            if limit is not None:
                chunk = chunk[:limit - sent]
            if stall_at is not None and sent + len(chunk) >= stall_at:
                cut = stall_at - sent
                sent += self._write_piece(chunk[:cut], chunked)
                self.server.fake._stall(fault)
                stall_at, chunk = None, chunk[cut:]
            sent += self._write_piece(chunk, chunked)
            if limit is not None and sent >= limit:
                break
        if stall_at is not None:  # body shorter than after_bytes, or HEAD
            self.server.fake._stall(fault)
        if kind == "reset":
            self._reset_connection()
        elif limit is not None:
            self.close_connection = True  # the client sees EOF before Content-Length
        elif chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _reset_connection(self):
        """Abort the connection: a linger of 0 makes close() send RST, not FIN.
        detach() closes the descriptor now, whatever rfile still holds on it."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(self.connection.detach())
        self.close_connection = True

    def _send_framed(self, reply, fault):
        """The reply with the framing a `framing` fault asks for, then the connection closed."""
        options = fault.options
        chunked = options.get("chunked", False)
        lengths = options.get("content_length", None if chunked else reply.length)
        if not isinstance(lengths, (list, tuple)):
            lengths = [] if lengths is None else [lengths]
        replaced = {name.lower() for name in options.get("headers", {})}
        self.send_response(reply.status)
        for name, value in reply.headers:
            if name.lower() not in replaced:
                self.send_header(name, value)
        for name, value in options.get("headers", {}).items():
            if value is not None:
                self.send_header(name, value)
        for length in lengths:
            self.send_header("Content-Length", str(length))
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        limit, stall_at, sent = options.get("nbytes"), options.get("stall_after"), 0
        for chunk in reply.chunks:
            if limit is not None:
                chunk = chunk[:limit - sent]
            if stall_at is not None and sent + len(chunk) >= stall_at:
                cut = stall_at - sent
                sent += self._write_piece(chunk[:cut], chunked)
                self.server.fake._stall(fault)
                stall_at, chunk = None, chunk[cut:]
            sent += self._write_piece(chunk, chunked)
            if limit is not None and sent >= limit:
                return  # cut: no last chunk either
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _write_piece(self, data, chunked):
        if not data:
            return 0
        if chunked:
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            self.wfile.write(data)
        self.wfile.flush()
        return len(data)


# --- the fake --------------------------------------------------------------


class FakeRegistry:
    """Docker-Hub-like registry + token server + CDN on 127.0.0.1.

    Every constructor keyword is also a plain attribute that tests may change
    while the servers run.  So is `ratelimit`: None (the default), or a
    (limit, remaining) pair of header values such as ("100;w=21600",
    "5;w=21600") that every manifest answer (GET and HEAD) then carries as
    `ratelimit-limit` and `ratelimit-remaining`, as Docker Hub's do.
    """

    service = "fake.registry.test"

    def __init__(
        self,
        auth_required=True,
        redirect_mode="absolute",
        redirect_hops=3,
        redirect_location=None,
        redirect_status=307,
        relative_style="dotdot",
        challenge_order=None,
        challenge_extra=None,
        token_ttl=300,
        cdn_require_signature=True,
        users=None,
        private_repos=None,
    ):
        self.auth_required = auth_required
        self.redirect_mode = redirect_mode
        self.redirect_hops = redirect_hops
        self.redirect_location = redirect_location
        self.redirect_status = redirect_status
        self.relative_style = relative_style
        self.challenge_order = list(challenge_order or ["realm", "service", "scope"])
        self.challenge_extra = dict(challenge_extra or {})
        self.token_ttl = token_ttl
        self.cdn_require_signature = cdn_require_signature
        self.users = dict(users or {})
        self.private_repos = set(private_repos or ())
        self.ratelimit = None  # (limit, remaining) header values for manifest answers

        self.release = threading.Event()  # set it to let stalled requests go on
        self.requests = []
        self.token_requests = []
        self.disallowed_requests = []  # non-GET/HEAD requests to the registry
        self.stalled_count = 0

        self._lock = threading.RLock()
        self._stall_condition = threading.Condition()
        self._blobs = {}  # digest -> _BytesBlob | _PatternBlob
        self._repo_blobs = {}  # repo -> set of digests
        self._manifests = {}  # repo -> digest -> (body, media type)
        self._tags = {}  # repo -> tag -> [[media type, digest], ...] in insertion order
        self._tokens = {}  # token -> _Grant
        self._refresh_tokens = {}  # refresh token -> username
        self._faults = []
        self._connections = set()
        self._closed = False
        self._servers = {}
        self._threads = []
        self._start_servers()
        self.url = self._servers["registry"].url
        self.auth_url = self._servers["auth"].url
        self.cdn_url = self._servers["cdn"].url
        self.realm = self.auth_url + "/token"

    # --- lifecycle ---------------------------------------------------------

    def _start_servers(self):
        try:
            for role in SERVERS:
                server = _Server(self, role)
                self._servers[role] = server
                thread = threading.Thread(
                    target=server.serve_forever,
                    kwargs={"poll_interval": 0.05},  # quick shutdown()
                    name="fakeregistry-" + role,
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
        except Exception:
            self.close()
            raise

    def close(self):
        """Stop all three servers and drop open connections."""
        if self._closed:
            return
        self._closed = True
        self.release.set()  # stalled handlers must not outlive the fake
        # shutdown() waits up to one poll interval; stop the servers in parallel.
        stoppers = [threading.Thread(target=server.shutdown) for server in self._servers.values()]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for server in self._servers.values():
            server.server_close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _track_connection(self, connection, is_open):
        with self._lock:
            if is_open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    # --- content -----------------------------------------------------------

    def add_blob(self, repo, data):
        """Store `data` and link it into `repo`; return its digest."""
        digest = sha256_digest(data)
        self._link_blob(repo, digest, _BytesBlob(data))
        return digest

    def add_pattern_blob(self, repo, size, seed=0):
        """Link a deterministic blob of `size` bytes, generated on the fly, into
        `repo`; return its digest (computed by streaming, not in memory)."""
        digest = _pattern_digest(size, seed)
        self._link_blob(repo, digest, _PatternBlob(size, seed))
        return digest

    def _link_blob(self, repo, digest, blob):
        with self._lock:
            self._blobs[digest] = blob
            self._repo_blobs.setdefault(repo, set()).add(digest)

    def iter_blob(self, digest, chunk_size=CHUNK_SIZE):
        """Yield the bytes of a stored blob in chunks."""
        blob = self._blobs[digest]
        return blob.iter_range(0, blob.size, chunk_size)

    def blob_size(self, digest):
        return self._blobs[digest].size

    def add_manifest(self, repo, reference, body, media_type):
        """Store a manifest by digest and, when `reference` is a tag, under that
        tag. A tag keeps one manifest per media type; re-adding a media type
        replaces it (the tag moved). Returns the manifest digest."""
        body = bytes(body)
        digest = sha256_digest(body)
        with self._lock:
            self._manifests.setdefault(repo, {})[digest] = (body, media_type)
            if reference and not _is_digest(reference):
                entries = self._tags.setdefault(repo, {}).setdefault(reference, [])
                for entry in entries:
                    if entry[0] == media_type:
                        entry[1] = digest
                        break
                else:
                    entries.append([media_type, digest])
        return digest

    def add_image(self, repo, tag, layers, media_type=DOCKER_MANIFEST, platform=None):
        """Store layers, a config blob and a schema2 (or OCI) manifest tagged
        `tag` (None: by digest only). Returns a dict with manifest (bytes),
        digest, config, layers, size, media_type and platform."""
        if media_type == DOCKER_MANIFEST:
            config_type, layer_type = DOCKER_CONFIG, DOCKER_LAYER
        elif media_type == OCI_MANIFEST:
            config_type, layer_type = OCI_CONFIG, OCI_LAYER
        else:
            raise ValueError("not an image manifest media type: %s" % media_type)
        platform = dict(platform or {"architecture": "amd64", "os": "linux"})
        layer_digests = [self.add_blob(repo, layer) for layer in layers]
        config = dict(platform, config={}, rootfs={"type": "layers", "diff_ids": layer_digests})
        config_bytes = json.dumps(config, sort_keys=True).encode()
        config_digest = self.add_blob(repo, config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "size": len(config_bytes), "digest": config_digest},
            "layers": [
                {"mediaType": layer_type, "size": len(layer), "digest": digest}
                for layer, digest in zip(layers, layer_digests)
            ],
        }
        body = json.dumps(manifest, indent=3).encode()
        digest = self.add_manifest(repo, tag, body, media_type)
        return {
            "manifest": body,
            "digest": digest,
            "config": config_digest,
            "layers": layer_digests,
            "size": len(body),
            "media_type": media_type,
            "platform": platform,
        }

    def add_index(self, repo, tag, manifests, media_type=DOCKER_MANIFEST_LIST):
        """Store a manifest list / OCI index. `manifests` holds tuples
        (digest, size, media_type, platform) or dicts returned by add_image.
        Returns its digest."""
        entries = []
        for item in manifests:
            if isinstance(item, dict):
                item = (item["digest"], item["size"], item["media_type"], item["platform"])
            digest, size, child_type, platform = item
            entries.append({"mediaType": child_type, "size": size, "digest": digest, "platform": platform})
        body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, indent=3)
        return self.add_manifest(repo, tag, body.encode(), media_type)

    def delete_tag(self, repo, tag):
        """Remove a tag (all its media types); manifests stay reachable by digest."""
        with self._lock:
            self._tags.get(repo, {}).pop(tag, None)

    # --- users and tokens --------------------------------------------------

    def add_user(self, username, password):
        self.users[username] = password

    def add_private_repo(self, name):
        self.private_repos.add(name)

    def expire_tokens(self):
        """Make every issued token invalid, as if its lifetime had passed."""
        with self._lock:
            for grant in self._tokens.values():
                grant.expires_at = 0

    def granted_scopes(self, token):
        """The scopes a token grants, as "repository:<name>:pull" strings."""
        grant = self._tokens.get(token)
        if grant is None:
            return set()
        return {"repository:%s:%s" % access for access in grant.access}

    # --- faults and counters -----------------------------------------------

    def fault(self, server, path_contains, kind, count=1, **kw):
        """Arm a fault for the next `count` requests to `server` whose target
        (path and query) contains `path_contains`; `method=` narrows it.
        Returns the Fault, whose `remaining` and `hits` tests may check."""
        if server not in SERVERS:
            raise ValueError("unknown server: %s" % server)
        if kind not in FAULT_KINDS:
            raise ValueError("unknown fault kind: %s" % kind)
        method = kw.pop("method", None)
        fault = Fault(server, path_contains, kind, count, method.upper() if method else None, kw)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self):
        with self._lock:
            self._faults = []

    def known_digests(self):
        """Every blob and manifest digest the fake holds, in any repository."""
        with self._lock:
            manifests = {digest for by_digest in self._manifests.values() for digest in by_digest}
            return set(self._blobs) | manifests

    def _take_fault(self, server, target, method):
        with self._lock:
            for fault in self._faults:
                if fault.matches(server, target, method):
                    fault.remaining -= 1
                    fault.hits += 1
                    return fault
        return None

    def _stall(self, fault):
        with self._stall_condition:
            self.stalled_count += 1
            self._stall_condition.notify_all()
        self.release.wait(fault.options.get("timeout", STALL_CAP_SECONDS))

    def wait_stalled(self, n=1, timeout=10):
        """Block until `n` requests in total have reached a stall; True if so."""
        with self._stall_condition:
            return self._stall_condition.wait_for(lambda: self.stalled_count >= n, timeout)

    def _record_request(self, request):
        headers = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = headers[key] + ", " + value if key in headers else value
        record = {
            "server": request.server,
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": headers,
        }
        with self._lock:
            self.requests.append(record)
        return record

    def count(self, server=None, method=None, path=None, path_contains=None):
        """Number of logged requests matching every filter given."""
        with self._lock:
            records = list(self.requests)
        return sum(
            1
            for record in records
            if (server is None or record["server"] == server)
            and (method is None or record["method"] == method)
            and (path is None or record["path"] == path)
            and (path_contains is None or path_contains in record["path"])
        )

    def reset_counters(self):
        """Forget logged requests, token requests, disallowed requests, stalls."""
        with self._lock:
            self.requests = []
            self.token_requests = []
            self.disallowed_requests = []
        with self._stall_condition:
            self.stalled_count = 0

    # --- routing -----------------------------------------------------------

    def _route(self, request):
        if request.server == "registry":
            reply = self._route_registry(request)
            reply.headers.append(("Docker-Distribution-Api-Version", "registry/2.0"))
            return reply
        if request.server == "auth":
            return self._route_auth(request)
        return self._route_cdn(request)

    # registry

    def _route_registry(self, request):
        if request.method not in ("GET", "HEAD"):
            with self._lock:
                self.disallowed_requests.append(request.record)
            return _registry_error(
                405, "UNSUPPORTED", "The operation is unsupported.", headers=[("Allow", "GET, HEAD")]
            )
        if request.path.startswith("/cdn-local/"):
            # Target of "relative" redirects: same host, so no auth check.
            return self._serve_storage(request, request.path[len("/cdn-local"):], reject_authorization=False)
        if request.path in ("/v2", "/v2/"):
            if not self._authorised(request, None):
                return self._challenge(None)
            return _json_reply(200, {})
        route = _parse_registry_path(request.path)
        if route is None:
            return _registry_error(404, "NOT_FOUND", "not found")
        repo, kind, reference = route
        if not self._authorised(request, repo):
            return self._challenge(repo)
        if kind == "tags":
            return self._serve_tags(request, repo)
        if kind == "manifests":
            reply = self._serve_manifest(request, repo, reference)
            ratelimit = self.ratelimit
            if ratelimit is not None:
                reply.headers += [("ratelimit-limit", ratelimit[0]), ("ratelimit-remaining", ratelimit[1])]
            return reply
        return self._serve_registry_blob(request, repo, reference)

    def _authorised(self, request, repo):
        if not self.auth_required:
            return True
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        with self._lock:
            grant = self._tokens.get(token.strip())
        if grant is None or not grant.valid():
            return False
        return repo is None or (repo, "pull") in grant.access

    def _challenge(self, repo):
        params = {"realm": self.realm, "service": self.service}
        if repo is not None:
            params["scope"] = "repository:%s:pull" % repo
        params.update(self.challenge_extra)
        order = [key for key in self.challenge_order if key in params]
        order += [key for key in params if key not in order]
        value = "Bearer " + ",".join('%s="%s"' % (key, params[key]) for key in order)
        return _registry_error(401, "UNAUTHORIZED", "authentication required", headers=[("WWW-Authenticate", value)])

    def _serve_tags(self, request, repo):
        with self._lock:
            known = repo in self._tags or repo in self._manifests or repo in self._repo_blobs
            tags = sorted(tag for tag, entries in self._tags.get(repo, {}).items() if entries)
        if not known:
            return _registry_error(404, "NAME_UNKNOWN", "repository name not known to registry")
        last = request.query.get("last", [""])[0]
        if last:
            tags = [tag for tag in tags if tag > last]
        headers = []
        if "n" in request.query:
            try:
                limit = int(request.query["n"][0])
            except ValueError:
                return _registry_error(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested")
            page = tags[:max(limit, 0)]
            if page and len(tags) > len(page):
                link = '</v2/%s/tags/list?last=%s&n=%d>; rel="next"' % (repo, page[-1], limit)
                headers.append(("Link", link))
            tags = page
        return _json_reply(200, {"name": repo, "tags": tags}, headers)

    def _serve_manifest(self, request, repo, reference):
        with self._lock:
            if _is_digest(reference):
                digest = reference
            else:
                digest = self._choose_tagged(repo, reference, _accepted_media_types(request.headers))
            entry = self._manifests.get(repo, {}).get(digest)
        if entry is None:
            return _registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown", {"Tag": reference})
        body, media_type = entry
        headers = [
            ("Content-Type", media_type),
            ("Docker-Content-Digest", digest),
            ("ETag", '"%s"' % digest),
        ]
        return _Reply(200, headers, body)

    def _choose_tagged(self, repo, tag, accepted):
        """First stored media type of the tag the client accepts."""
        entries = self._tags.get(repo, {}).get(tag) or []
        for media_type, digest in entries:
            if not accepted or "*/*" in accepted or media_type in accepted:
                return digest
        return None

    def _serve_registry_blob(self, request, repo, digest):
        with self._lock:
            linked = digest in self._repo_blobs.get(repo, ())
            blob = self._blobs.get(digest) if linked else None
        if blob is None:
            return _registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry", digest)
        identity = [("Docker-Content-Digest", digest), ("ETag", '"%s"' % digest)]
        # Docker Hub answers HEAD itself; only GET is sent to the CDN.
        if request.method == "HEAD" or (self.redirect_mode == "none" and self.redirect_location is None):
            return self._blob_reply(request, blob, identity)
        location = self._blob_location(request, repo, digest)
        return _Reply(self.redirect_status, [("Location", location)] + identity)

    def _blob_location(self, request, repo, digest):
        signature = SIGNATURE_PREFIX + secrets.token_hex(8)
        query = "?X-Amz-Signature=" + signature
        if self.redirect_location is not None:
            if callable(self.redirect_location):
                return self.redirect_location(digest, repo)
            return self.redirect_location.format(
                digest=digest, repo=repo, url=self.url, cdn_url=self.cdn_url, signature=signature
            )
        if self.redirect_mode == "absolute":
            return self.cdn_url + "/blobs/" + digest + query
        if self.redirect_mode == "relative":
            if self.relative_style == "root":
                return "/cdn-local/blobs/" + digest + query
            # From /v2/<name>/blobs/<digest>, climb every directory to "/".
            return "../" * (request.path.count("/") - 1) + "cdn-local/blobs/" + digest + query
        if self.redirect_mode == "chain":
            if self.redirect_hops > 1:
                return self.cdn_url + "/hop/1/blobs/" + digest + query
            return self.cdn_url + "/blobs/" + digest + query
        raise ValueError("unknown redirect_mode: %s" % self.redirect_mode)

    def _blob_reply(self, request, blob, extra_headers=()):
        """200 with the whole blob, or 206/416 for a Range request."""
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes")] + list(extra_headers)
        span = _parse_range(request.headers.get("Range"), blob.size)
        if span is None:
            return _Reply(200, headers, chunks=blob.iter_range(0, blob.size), length=blob.size)
        if span is _UNSATISFIABLE:
            return _Reply(416, headers + [("Content-Range", "bytes */%d" % blob.size)])
        start, stop = span
        headers.append(("Content-Range", "bytes %d-%d/%d" % (start, stop - 1, blob.size)))
        return _Reply(206, headers, chunks=blob.iter_range(start, stop), length=stop - start)

    # cdn

    def _route_cdn(self, request):
        if request.method not in ("GET", "HEAD"):
            return _xml_error(405, "MethodNotAllowed", "The specified method is not allowed")
        if request.path.startswith("/hop/"):
            return self._serve_hop(request)
        return self._serve_storage(request, request.path, reject_authorization=True)

    def _serve_hop(self, request):
        parts = request.path.split("/", 3)  # "", "hop", k, "blobs/<digest>"
        if len(parts) < 4 or not parts[2].isdigit():
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        hop, rest = int(parts[2]), parts[3]
        if hop + 1 < self.redirect_hops:
            target = "/hop/%d/%s" % (hop + 1, rest)
        else:
            target = "/" + rest
        location = self.cdn_url + target + ("?" + request.raw_query if request.raw_query else "")
        return _Reply(self.redirect_status, [("Location", location)])

    def _serve_storage(self, request, path, reject_authorization):
        """Serve /blobs/<digest> the way S3 behind a presigned URL does."""
        if reject_authorization and request.headers.get("Authorization") is not None:
            # S3 refuses a presigned URL that also carries an Authorization header.
            return _xml_error(400, "InvalidArgument", "Missing x-amz-content-sha256")
        signature = request.query.get("X-Amz-Signature", [""])[0]
        if self.cdn_require_signature and not signature.startswith(SIGNATURE_PREFIX):
            return _xml_error(403, "AccessDenied", "Request has expired or is not signed")
        if not path.startswith("/blobs/"):
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        with self._lock:
            blob = self._blobs.get(path[len("/blobs/"):])
        if blob is None:
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        return self._blob_reply(request, blob)

    # auth

    def _route_auth(self, request):
        if request.path != "/token":
            return _json_reply(404, {"details": "not found"})
        if request.method == "GET":
            params = request.query
        elif request.method == "POST":
            params = parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True)
        else:
            return _json_reply(405, {"details": "method not allowed"})

        def field(name):
            return params.get(name, [None])[0]

        basic = _parse_basic(request.headers.get("Authorization"))
        grant_type = field("grant_type") if request.method == "POST" else None
        scopes = [scope for value in params.get("scope", []) for scope in value.split()]
        with self._lock:
            self.token_requests.append(
                {
                    "method": request.method,
                    "scopes": scopes,
                    "service": field("service"),
                    "username": basic[0] if basic else field("username"),
                    "grant_type": grant_type,
                    "client_id": field("client_id"),
                }
            )
        if field("service") != self.service:
            return _json_reply(400, {"details": "invalid service"})
        username, error = self._token_user(request.method, grant_type, basic, field)
        if error is not None:
            return error
        return self._issue_token(scopes, username, with_refresh=grant_type == "password")

    def _token_user(self, method, grant_type, basic, field):
        """(username or None, error reply or None) for a token request."""
        if method == "GET":
            if basic is None:
                return None, None
            user, password = basic
        elif grant_type == "password":
            user, password = field("username"), field("password")
        elif grant_type == "refresh_token":
            with self._lock:
                owner = self._refresh_tokens.get(field("refresh_token") or "")
            if owner is None:
                return None, _json_reply(401, {"details": "invalid refresh token"})
            return owner, None
        else:
            return None, _json_reply(400, {"details": "unsupported grant_type"})
        if user is None or password is None or self.users.get(user) != password:
            return None, _json_reply(401, {"details": "incorrect username or password"})
        return user, None

    def _issue_token(self, scopes, username, with_refresh):
        access = set()
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            name, actions = parsed
            allowed = username is not None or name not in self.private_repos
            # Like Docker Hub: what may not be granted is silently left out.
            if allowed and ("pull" in actions or "*" in actions):
                access.add((name, "pull"))
        token = secrets.token_urlsafe(24)
        answer = {"token": token, "access_token": token, "expires_in": self.token_ttl, "issued_at": _now_rfc3339()}
        with self._lock:
            self._tokens[token] = _Grant(access, time.monotonic() + self.token_ttl, username)
            if with_refresh:
                refresh_token = secrets.token_urlsafe(24)
                self._refresh_tokens[refresh_token] = username
                answer["refresh_token"] = refresh_token
        return _json_reply(200, answer)
