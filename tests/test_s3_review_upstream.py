"""Review of the shared cache (CACHE_S3, S3_REDIRECT, PEERS): a broken or hostile
store, peer or upstream, as the cluster sees it.  Each test fails on e529c27 and
names the behaviour expected instead.

The parts are real where a real one can misbehave on demand: dockerproxy.py
(in this process through conftest's start_proxy, or a process for signals),
SeaweedFS (conftest's s3bucket) for a store that holds a damaged object.  What
no real server does on demand comes from small servers on 127.0.0.1 here:

* FakeS3: an in-memory S3 (path style; signatures not checked, payload hashes
  are) whose answers a test bends with a hook: hang, break off, lie in a
  listing, answer 503 SlowDown, pad a 200 with whitespace;
* LyingPeer: a "peer" of PEERS that answers the signed GET with whatever bytes
  the test writes (wrong bytes, a cut, a zero length);
* FakeRegistry (tests/fakeregistry.py): the upstream, with its faults.

Findings (severity; test):
 1. a store that hangs: every cold blob's client is cut (the last byte waits on
    the bucket bookkeeping, READ_TIMEOUT per request, longer than a follower's
    patience), and every request waits READ_TIMEOUT again (no breaker)
    (high; test_a_hung_store_does_not_cut_a_cold_blob,
    test_a_hung_store_is_passed_over_after_it_failed);
 2. a zero-length answer (a zero-byte object in the bucket, a peer, or upstream
    through the owner) goes out as a clean 200 with no bytes and the asked
    digest (high; test_a_zero_byte_bucket_object_is_never_a_clean_200,
    test_a_peer_answering_zero_bytes_is_never_a_clean_200,
    test_upstream_zero_length_through_the_owner_is_never_a_clean_200);
 3. a peer or a bucket object that fails after its head (wrong bytes, a cut, a
    short length, a stall) is asked again on every retry: the blob never
    reaches a client while upstream has it (medium;
    test_a_peer_that_fails_after_its_head_is_not_asked_again,
    test_a_bucket_object_that_breaks_off_is_not_read_again);
 4. start-up waits for unbounded bucket work before serving: an upload listing
    that never ends, or journal aborts that hang (medium;
    test_start_up_is_not_held_by_an_endless_upload_listing,
    test_start_up_is_not_held_by_a_hanging_journal_abort);
 5. a LastModified the parser cannot read is time 0: CACHE_S3_MAX_AGE evicts
    every such object (medium; test_the_sweep_keeps_objects_whose_time_it_cannot_read);
 6. keys a listing names outside the prefix asked for are deleted by a purge
    (medium; test_purge_deletes_nothing_outside_the_prefix_a_store_lists);
    a listing whose token never advances holds the sweep forever
    (low; test_a_listing_that_never_advances_ends_the_sweep);
 7. tag entries written by an instance whose clock is ahead stay fresh on every
    instance for MANIFEST_TTL plus the skew (low-medium;
    test_tag_entries_of_an_instance_with_its_clock_ahead_do_not_stay_fresh);
    a tag entry whose "checked" is not a number is a 500
    (low; test_a_tag_entry_with_a_non_numeric_time_is_a_miss_not_a_500);
 8. uploads: a 503 SlowDown is never retried (low-medium;
    test_a_slowdown_answer_to_an_upload_is_retried); a Complete 200 whose body
    begins with keep-alive whitespace counts as failed (low;
    test_a_complete_answer_with_leading_whitespace_counts_as_uploaded); an
    object the bucket lost between HEAD and GET is not uploaded again (low;
    test_an_object_the_bucket_lost_between_head_and_get_is_uploaded_again);
    SIGTERM leaves a multipart upload pending in the store (low;
    test_sigterm_aborts_a_multipart_upload_it_cannot_finish);
 9. the owner's 429 to an anonymous pull is repeated upstream by the asker
    (low; test_an_owner_answering_429_to_an_anonymous_pull_is_not_repeated_upstream);
    an owner refusing the asker's proof (clock skew) leaves no trace on the
    asker (low; test_a_peer_refusing_our_proof_shows_on_the_status_page);
10. a nested listing page of MAX_S3_LISTING costs ~150 MB to parse (low;
    test_a_nested_listing_page_costs_little_memory).

Standard library, pytest and (for the SeaweedFS tests) boto3; Python 3.8+.
"""

import hashlib
import http.client
import http.server
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse
import urllib.request
from xml.sax.saxutils import escape

import pytest

import dockerproxy
from conftest import http_request
from fakeregistry import FakeRegistry
from realregistry import free_port, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
PREFIX = "px/"


# A fake S3 ##################################################################

def iso_time(when):
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(when))


class S3Request:
    def __init__(self, method, key, query, headers, body):
        self.method = method
        self.key = key
        self.query = query
        self.headers = headers
        self.body = body


class FakeS3:
    """An in-memory S3 bucket `fake` on 127.0.0.1 (path style).

    A hook (self.hooks: callables of an S3Request) may answer a request in its
    place: with (status, [(name, value)], body), or with a callable of the
    http.server handler that writes (or withholds) raw bytes itself.
    """

    bucket = "fake"

    def __init__(self):
        self.objects = {}             # key -> [bytes, content type, mtime]
        self.uploads = {}             # upload id -> {"key", "parts", "initiated", "content_type"}
        self.requests = []
        self.hooks = []
        self.released = threading.Event()  # set at close: hanging answers end
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except OSError:
                    self.close_connection = True

            def do_any(self):
                fake.handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def env(self, prefix=PREFIX):
        return {"CACHE_S3": f"s3://{self.bucket}/{prefix.rstrip('/')}", "S3_ENDPOINT": self.url,
                "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "fake-secret-key-0123456789"}

    def put(self, key, data, content_type="application/octet-stream", mtime=None):
        with self.lock:
            self.objects[key] = [bytes(data), content_type, time.time() if mtime is None else mtime]

    def keys(self):
        with self.lock:
            return set(self.objects)

    def count(self, method, query=None):
        with self.lock:
            return sum(1 for r in self.requests if r.method == method and (query is None or query in r.query))

    def hang(self, handler):
        """An answer that never comes (until close)."""
        self.released.wait(120)

    # serving ------------------------------------------------------------------

    def handle(self, handler):
        parts = urllib.parse.urlsplit(handler.path)
        query = {name: values[0] for name, values in
                 urllib.parse.parse_qs(parts.query, keep_blank_values=True).items()}
        key = urllib.parse.unquote(parts.path).lstrip("/").partition("/")[2]
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        request = S3Request(handler.command, key, query, handler.headers, body)
        with self.lock:
            self.requests.append(request)
            hooks = list(self.hooks)
        reply = None
        for hook in hooks:
            reply = hook(request)
            if reply is not None:
                break
        if reply is None:
            reply = self.serve(request)
        if callable(reply):
            handler.close_connection = True
            reply(handler)
            return
        status, headers, data = reply
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        if not any(name.lower() == "content-length" for name, _ in headers):
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    @staticmethod
    def error(status, code, message=""):
        return status, [("Content-Type", "application/xml")], (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error>").encode()

    @staticmethod
    def xml(document):
        return 200, [("Content-Type", "application/xml")], (
            '<?xml version="1.0" encoding="UTF-8"?>\n' + document).encode()

    def serve(self, r):
        if not r.key:
            if "uploads" in r.query:
                return self.xml(self.upload_listing(r.query.get("prefix", "")))
            return self.xml(self.object_listing(r.query.get("prefix", ""), r.query.get("continuation-token", ""),
                                                int(r.query.get("max-keys", "1000"))))
        if r.method == "POST" and "uploads" in r.query:
            upload_id = f"upload-{next(self.ids)}"
            with self.lock:
                self.uploads[upload_id] = {"key": r.key, "parts": {}, "initiated": time.time(),
                                           "content_type": r.headers.get("content-type", "")}
            return self.xml(f'<InitiateMultipartUploadResult xmlns="{S3_NS}"><Key>{escape(r.key)}</Key>'
                            f"<UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>")
        if "uploadId" in r.query:
            with self.lock:
                upload = self.uploads.get(r.query["uploadId"])
            if upload is None:
                return self.error(404, "NoSuchUpload")
            if r.method == "PUT":
                problem = self.payload_problem(r)
                if problem:
                    return problem
                upload["parts"][int(r.query["partNumber"])] = r.body
                return 200, [("ETag", '"%s"' % hashlib.md5(r.body).hexdigest())], b""
            with self.lock:
                self.uploads.pop(r.query["uploadId"], None)
            if r.method == "POST":
                self.put(r.key, b"".join(upload["parts"][n] for n in sorted(upload["parts"])), upload["content_type"])
                return self.xml(f'<CompleteMultipartUploadResult xmlns="{S3_NS}"><Key>{escape(r.key)}</Key>'
                                '<ETag>"multipart-1"</ETag></CompleteMultipartUploadResult>')
            return 204, [], b""
        if r.method == "PUT":
            problem = self.payload_problem(r)
            if problem:
                return problem
            self.put(r.key, r.body, r.headers.get("content-type", "application/octet-stream"))
            return 200, [("ETag", '"%s"' % hashlib.md5(r.body).hexdigest())], b""
        if r.method == "DELETE":
            with self.lock:
                self.objects.pop(r.key, None)
            return 204, [], b""
        with self.lock:
            found = self.objects.get(r.key)
        if found is None:
            return self.error(404, "NoSuchKey") if r.method == "GET" else (404, [], b"")
        data, content_type, _ = found
        headers = [("Content-Type", content_type), ("ETag", '"%s"' % hashlib.md5(data).hexdigest())]
        if r.method == "HEAD":
            return 200, headers + [("Content-Length", str(len(data)))], b""
        return 200, headers, data

    @staticmethod
    def payload_problem(r):
        claimed = r.headers.get("x-amz-content-sha256", "")
        if claimed not in ("", "UNSIGNED-PAYLOAD") and claimed != hashlib.sha256(r.body).hexdigest():
            return FakeS3.error(400, "XAmzContentSHA256Mismatch")
        return None

    def object_listing(self, prefix, token, max_keys):
        with self.lock:
            keys = sorted(key for key in self.objects if key.startswith(prefix) and key > token)
            page, rest = keys[:max_keys], keys[max_keys:]
            contents = "".join(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{iso_time(self.objects[key][2])}</LastModified>"
                f"<Size>{len(self.objects[key][0])}</Size></Contents>" for key in page)
        following = f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>" if rest else ""
        return (f'<ListBucketResult xmlns="{S3_NS}"><Name>{self.bucket}</Name><Prefix>{escape(prefix)}</Prefix>'
                f"<KeyCount>{len(page)}</KeyCount><IsTruncated>{'true' if rest else 'false'}</IsTruncated>"
                f"{contents}{following}</ListBucketResult>")

    def upload_listing(self, prefix):
        with self.lock:
            items = "".join(f"<Upload><Key>{escape(upload['key'])}</Key><UploadId>{upload_id}</UploadId>"
                            f"<Initiated>{iso_time(upload['initiated'])}</Initiated></Upload>"
                            for upload_id, upload in sorted(self.uploads.items()) if upload["key"].startswith(prefix))
        return (f'<ListMultipartUploadsResult xmlns="{S3_NS}"><IsTruncated>false</IsTruncated>'
                f"{items}</ListMultipartUploadsResult>")


# A peer that answers what the test writes ###################################

class LyingPeer:
    """A listener on 127.0.0.1 that reads a request head and hands it, with the
    socket, to answer(sock, head); then closes the connection."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.released = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.released.set()
        self.sock.close()

    def _accept(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(connection,), daemon=True).start()

    def _one(self, connection):
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                data = connection.recv(65536)
                if not data:
                    return
                head += data
            self.requests.append(head)
            self.answer(connection, head)
        except OSError:
            pass
        finally:
            connection.close()


def blob_owned_by(owner, others, size=4000):
    """(bytes, digest) of a new random blob whose first peer by rendezvous_order is `owner`."""
    while True:
        data = os.urandom(size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if dockerproxy.rendezvous_order([owner] + list(others), digest)[0] == owner:
            return data, digest


def fetch(proxy, path, headers=None, timeout=60):
    """(status, body, seconds); status "cut" when the answer broke off before its length."""
    started = time.monotonic()
    try:
        status, _, body = proxy.request("GET", path, headers, timeout=timeout)
    except (http.client.IncompleteRead, ConnectionError, socket.timeout) as err:
        return f"cut ({err.__class__.__name__})", b"", time.monotonic() - started
    return status, body, time.monotonic() - started


def assert_never_a_clean_wrong_200(status, body, data):
    assert not (status == 200 and body != data), (
        f"a clean 200 with {len(body)} bytes that are not the blob's {len(data)}")


# Fixtures ###################################################################

@pytest.fixture
def upstream():
    with FakeRegistry(auth_required=False) as registry:
        yield registry


@pytest.fixture
def fake_s3():
    store = FakeS3()
    yield store
    store.close()


@pytest.fixture
def peers_env():
    """peers_env(me, *others): the PEERS, PEER_SELF and PEER_SECRET settings of instance `me`."""
    def build(me, *others, secret="peer-secret-0123456789abcdef"):
        return {"PEERS": ",".join([me] + list(others)), "PEER_SELF": me, "PEER_SECRET": secret}
    return build


def seaweed_env(s3bucket):
    server, bucket = s3bucket
    return {"CACHE_S3": f"s3://{bucket}/px", "S3_ENDPOINT": server.endpoint, "S3_REGION": server.region,
            "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}


def metric(proxy, name, *labels):
    return proxy.server.proxy.metrics.value(name, tuple(labels))


# 1. a store that hangs ##########################################################

def test_a_hung_store_does_not_cut_a_cold_blob(start_proxy, upstream, fake_s3):
    """A store that accepts connections and never answers (an S3 outage where
    connections hang) must not break cache misses: the blob comes from upstream
    whole.  On e529c27 the fill's last byte waits for the bucket bookkeeping
    (link PUT, public-mark GET and PUT: READ_TIMEOUT each), longer than a
    client's patience (2 x READ_TIMEOUT + 1): every cold blob is cut."""
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--read-timeout", "2", "--connect-timeout", "1",
                        **fake_s3.env())
    data = os.urandom(3000)
    digest = upstream.add_blob("library/app", data)
    fake_s3.hooks.append(lambda request: fake_s3.hang)
    status, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
    assert status == 200 and body == data, f"the client got {status} with a store that hangs"


def test_a_hung_store_is_passed_over_after_it_failed(start_proxy, upstream, fake_s3):
    """Once the store has failed to answer again and again, the next requests
    do not wait READ_TIMEOUT for it again and again (as the upstreams' circuit
    breakers do): the store is not asked at all while its circuit is open.
    On e529c27 every cold blob waits for the HEAD and each bookkeeping write: 8 s
    each here, with READ_TIMEOUT=2 (8 minutes with the default 60)."""
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--read-timeout", "2", "--connect-timeout", "1",
                        **fake_s3.env())
    blobs = [os.urandom(2000 + index) for index in range(5)]
    digests = [upstream.add_blob("library/app", data) for data in blobs]
    fake_s3.hooks.append(lambda request: fake_s3.hang)
    for digest in digests[:2]:  # the store's failures show here (whatever the clients get)
        fetch(proxy, f"/v2/library/app/blobs/{digest}")
    bucket = proxy.server.proxy.shared.bucket
    origin = f"{bucket.scheme}://{bucket.host}"
    deadline = time.monotonic() + 60
    while not bucket.http.breakers.open_for(origin):  # the fills' bookkeeping fails in their own threads
        assert time.monotonic() < deadline, "the store's circuit never opened"
        fetch(proxy, f"/v2/library/app/blobs/{digests[1]}")
    asked = len(fake_s3.requests)
    for data, digest in zip(blobs[2:], digests[2:]):
        status, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
        assert status == 200 and body == data, status
    proxy.server.proxy.cache.fills.wait_idle(30)
    assert len(fake_s3.requests) == asked, "requests went to a store whose circuit is open"


# 2. zero-length answers ################################################################

def test_a_zero_byte_bucket_object_is_never_a_clean_200(start_proxy, upstream, s3bucket):
    """SeaweedFS holds a zero-byte object where a 3000-byte blob should be (a
    damaged store, a broken writer).  The client must get the blob (from
    upstream) or a failure, never a complete-looking 200 with no bytes and the
    blob's Docker-Content-Digest, which e529c27 sends: a fill of length 0 has no
    last byte to hold back until the digest is checked."""
    server, bucket = s3bucket
    data = os.urandom(3000)
    digest = upstream.add_blob("library/app", data)
    server.put(bucket, dockerproxy.blob_key(PREFIX, digest), b"")
    proxy = start_proxy("--upstream", f"docker={upstream.url}", **seaweed_env(s3bucket))
    status, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
    assert_never_a_clean_wrong_200(status, body, data)


def test_a_peer_answering_zero_bytes_is_never_a_clean_200(start_proxy, upstream, peers_env):
    """The owner of a digest answers 200, Content-Length: 0, with the right
    Docker-Content-Digest.  The asker's client must not get a clean empty 200."""
    def answer(sock, head):
        digest = head.split(b" ")[1].rsplit(b"/", 1)[1]
        sock.sendall(b"HTTP/1.1 200 OK\r\nDocker-Content-Digest: " + digest + b"\r\nContent-Length: 0\r\n\r\n")
    peer = LyingPeer(answer)
    try:
        port = free_port()
        me = f"http://127.0.0.1:{port}"
        data, digest = blob_owned_by(peer.url, [me])
        upstream.add_blob("library/app", data)
        proxy = start_proxy("--port", str(port), "--upstream", f"docker={upstream.url}", **peers_env(me, peer.url))
        status, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
        assert peer.requests, "the peer was not asked"
        assert_never_a_clean_wrong_200(status, body, data)
    finally:
        peer.close()


def test_upstream_zero_length_through_the_owner_is_never_a_clean_200(start_proxy, upstream, peers_env):
    """Upstream answers the owner's fill with 200 and Content-Length: 0 for a
    3000-byte blob.  The owner passes a clean empty 200 to the asker, which
    passes it to its client as good (the root is shared with a single
    instance's fill, but here two instances vouch for it)."""
    port_a, port_b = free_port(), free_port()
    a_url, b_url = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    data, digest = blob_owned_by(b_url, [a_url])
    upstream.add_blob("library/app", data)
    asker = start_proxy("--port", str(port_a), "--upstream", f"docker={upstream.url}", **peers_env(a_url, b_url))
    owner = start_proxy("--port", str(port_b), "--upstream", f"docker={upstream.url}", **peers_env(b_url, a_url))
    upstream.fault("cdn", "/blobs/", "framing", method="GET", content_length="0", nbytes=0)
    status, body, _ = fetch(asker, f"/v2/library/app/blobs/{digest}")
    asked = sum(metric(asker, "dockerproxy_peer_requests_total", result) for result in ("ok", "declined"))
    assert asked >= 1, "the asker did not ask the owner"
    assert_never_a_clean_wrong_200(status, body, data)
    for instance in (asker, owner):
        assert instance.cache.wait_idle(10)
        if instance.cache.store.exists(digest):
            assert instance.cache.store.digest_of(digest) == digest, "a wrong object stored"


@pytest.mark.parametrize("length, digest, refused", [
    (0, "sha256:" + hashlib.sha256(b"").hexdigest(), False),   # a real empty blob
    (0, "sha512:" + hashlib.sha512(b"").hexdigest(), False),   # the same under sha512 (the final review's find)
    (0, "sha256:" + "a" * 64, True),
    (0, "sha512:" + "a" * 128, True),
    (0, None, False),                                          # a manifest by tag: no digest to hold it to
    (0, "", False),
    (None, "sha256:" + "a" * 64, False),                       # no length: not this check's business
    (3000, "sha256:" + "a" * 64, False),
])
def test_empty_for(length, digest, refused):
    assert dockerproxy.empty_for(length, digest) is refused


def test_a_zero_length_blob_passed_through_is_never_a_clean_200(start_proxy, upstream):
    """The same upstream lie on the pass-through path (no cache: every blob is
    relayed with its digest checked): Content-Length 0 for a 3000-byte blob
    left nothing to hold back, so the client got a clean empty 200."""
    data = os.urandom(3000)
    digest = upstream.add_blob("library/app", data)
    proxy = start_proxy("--cache-dir", "", "--upstream", f"docker={upstream.url}")
    upstream.fault("cdn", "/blobs/", "framing", method="GET", content_length="0", nbytes=0)
    status, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
    assert_never_a_clean_wrong_200(status, body, data)


# 3. sources that fail after their head ###############################################

PEER_FAILURES = ("wrong-bytes", "cut", "short-length", "stall")


@pytest.mark.parametrize("failure", PEER_FAILURES)
def test_a_peer_that_fails_after_its_head_is_not_asked_again(start_proxy, upstream, peers_env, failure):
    """The owner answers 200 with the right Docker-Content-Digest and then fails:
    wrong bytes, a cut, a shorter length, a stall.  The first client's transfer
    is cut (its head went out): right.  Its retry must get the blob (the asker
    falls back to upstream, or passes the peer over); e529c27 asks the same peer
    again, forever, and the blob never reaches a client while upstream has it."""
    def answer(sock, head):
        digest = head.split(b" ")[1].rsplit(b"/", 1)[1].decode()
        data = blobs[digest]
        start = b"HTTP/1.1 200 OK\r\nDocker-Content-Digest: " + digest.encode() + b"\r\n"
        if failure == "wrong-bytes":
            sock.sendall(start + b"Content-Length: %d\r\n\r\n" % len(data) + os.urandom(len(data)))
        elif failure == "cut":
            sock.sendall(start + b"Content-Length: %d\r\n\r\n" % len(data) + data[:len(data) // 2])
        elif failure == "short-length":
            sock.sendall(start + b"Content-Length: 100\r\n\r\n" + data[:100])
        else:
            sock.sendall(start + b"Content-Length: %d\r\n\r\n" % len(data) + data[:100])
            peer.released.wait(30)
    peer = LyingPeer(answer)
    try:
        blobs = {}
        port = free_port()
        me = f"http://127.0.0.1:{port}"
        data, digest = blob_owned_by(peer.url, [me])
        blobs[digest] = data
        upstream.add_blob("library/app", data)
        proxy = start_proxy("--port", str(port), "--upstream", f"docker={upstream.url}", "--read-timeout", "1",
                            "--connect-timeout", "1", **peers_env(me, peer.url))
        first, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
        assert_never_a_clean_wrong_200(first, body, data)
        assert proxy.cache.wait_idle(15)
        second, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
        assert second == 200 and body == data, (
            f"retry got {second} after the peer failed ({failure}); the peer was asked {len(peer.requests)} times")
    finally:
        peer.close()


@pytest.mark.parametrize("failure", ("cut", "stall"))
def test_a_bucket_object_that_breaks_off_is_not_read_again(start_proxy, upstream, fake_s3, failure):
    """The store's GET of a blob object breaks off (or stalls) midway, every
    time (an unreadable object).  The first client is cut; its retry must get the
    blob from upstream.  On e529c27 the object is read from the bucket again on
    every request (only a digest mismatch discards it): the blob is unobtainable."""
    data = os.urandom(5000)
    digest = upstream.add_blob("library/app", data)
    key = dockerproxy.blob_key(PREFIX, digest)
    fake_s3.put(key, data)

    def broken_get(handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + data[:100])
        handler.wfile.flush()
        if failure == "stall":
            fake_s3.released.wait(30)
    fake_s3.hooks.append(lambda request: broken_get if request.method == "GET" and request.key == key else None)
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--read-timeout", "1", "--connect-timeout", "1",
                        **fake_s3.env())
    first, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
    assert_never_a_clean_wrong_200(first, body, data)
    assert proxy.cache.wait_idle(15)
    second, body, _ = fetch(proxy, f"/v2/library/app/blobs/{digest}")
    assert second == 200 and body == data, f"retry got {second}: the broken object was read again"


# 4. start-up ###################################################################

def start_in_thread(start_proxy, *argv, **environ):
    """start_proxy(...) in a thread: (thread, done event)."""
    done = threading.Event()

    def run():
        try:
            start_proxy(*argv, **environ)
        finally:
            done.set()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


@pytest.mark.parametrize("markers", ("same", "advancing"))
def test_start_up_is_not_held_by_an_endless_upload_listing(start_proxy, fake_s3, markers):
    """ListMultipartUploads answers IsTruncated=true forever (the same markers,
    or new ones each page).  The proxy must serve anyway (bounded work, or the
    clean-up off the start-up path); on e529c27 Proxy.start() pages forever and
    the port never answers."""
    endless = threading.Event()
    endless.set()
    pages = itertools.count()

    def listing(request):
        if request.method == "GET" and not request.key and "uploads" in request.query and endless.is_set():
            number = next(pages) if markers == "advancing" else 0
            return fake_s3.xml(f'<ListMultipartUploadsResult xmlns="{S3_NS}"><IsTruncated>true</IsTruncated>'
                               f"<NextKeyMarker>{PREFIX}k{number}</NextKeyMarker>"
                               f"<NextUploadIdMarker>u{number}</NextUploadIdMarker></ListMultipartUploadsResult>")
        return None
    fake_s3.hooks.append(listing)
    thread, started = start_in_thread(start_proxy, **fake_s3.env())
    try:
        assert started.wait(20), f"not serving after 20 s: {fake_s3.count('GET', 'uploads')} upload listings read"
    finally:
        endless.clear()
        thread.join(30)


def test_start_up_is_not_held_by_a_hanging_journal_abort(start_proxy, fake_s3, tmp_path):
    """CACHE_DIR/s3-uploads names an upload a past run left; the store hangs on
    its abort.  Start-up must not wait for it (a journal of a thousand entries
    took 45 s to start on e529c27, even with a quick store; a hanging one costs
    READ_TIMEOUT per entry)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "s3-uploads").write_text(f"upload-left {PREFIX}docker/registry/v2/blobs/sha256/00/{'0' * 64}/data\n")
    release = threading.Event()

    def hanging_abort(request):
        if request.method == "DELETE" and "uploadId" in request.query:
            release.wait(60)
            return 204, [], b""
        return None
    fake_s3.hooks.append(hanging_abort)
    thread, started = start_in_thread(start_proxy, "--read-timeout", "30", **fake_s3.env())
    try:
        assert started.wait(10), "start-up waits for the journal's aborts"
    finally:
        release.set()
        thread.join(60)


# 5, 6. what listings say ##############################################################

def test_the_sweep_keeps_objects_whose_time_it_cannot_read(start_proxy, fake_s3):
    """A store whose listing gives LastModified in another format (RFC 1123
    here) makes s3_time() return 0: with CACHE_S3_MAX_AGE=7d the sweeper of
    e529c27 deletes every blob object of the bucket at its first sweep.  An
    unreadable time must not count as 'unused since 1970'."""
    keys = set()
    for _ in range(3):
        data = os.urandom(100)
        key = dockerproxy.blob_key(PREFIX, "sha256:" + hashlib.sha256(data).hexdigest())
        fake_s3.put(key, data)
        keys.add(key)

    def rfc1123_times(request):
        if request.method == "GET" and not request.key and "list-type" in request.query:
            status, headers, body = fake_s3.serve(request)
            body = re.sub(rb"<LastModified>[^<]*</LastModified>",
                          b"<LastModified>Tue, 01 Dec 2026 03:00:00 GMT</LastModified>", body)
            return status, headers, body
        return None
    fake_s3.hooks.append(rfc1123_times)
    proxy = start_proxy(CACHE_S3_MAX_AGE="7d", **fake_s3.env())
    shared = proxy.server.proxy.shared
    wait_until(lambda: shared.counted is not None, timeout=20, what="the keeper's first sweep")
    assert keys <= fake_s3.keys(), f"evicted: {sorted(keys - fake_s3.keys())}"


def test_purge_deletes_nothing_outside_the_prefix_a_store_lists(start_proxy, upstream, fake_s3):
    """A store that ignores `prefix` in ListObjectsV2 (or lies) names keys of
    others in the listing of a repository's links; a purge of that repository
    must not delete them (e529c27 deletes every key listed)."""
    outside = {"other-team/precious.tar", "px-other/dockerproxy/repos/x"}
    for key in outside:
        fake_s3.put(key, b"someone else's")

    def leaky_listing(request):
        if request.method == "GET" and not request.key and "_links" in request.query.get("prefix", ""):
            status, headers, body = fake_s3.serve(request)
            extra = "".join(f"<Contents><Key>{key}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                            "<Size>14</Size></Contents>" for key in sorted(outside))
            return status, headers, body.replace(b"</ListBucketResult>", extra.encode() + b"</ListBucketResult>")
        return None
    fake_s3.hooks.append(leaky_listing)
    token = "admin-token-0123456789abcdef"
    proxy = start_proxy("--upstream", f"docker={upstream.url}", ADMIN_TOKEN=token, **fake_s3.env())
    digest = upstream.add_blob("library/app", os.urandom(2000))
    assert proxy.request("GET", f"/v2/library/app/blobs/{digest}")[0] == 200
    assert proxy.cache.wait_idle(10)
    status, _, body = proxy.request("POST", "/admin/purge", {"Authorization": f"Bearer {token}",
                                    "Content-Type": "application/x-www-form-urlencoded"}, body=b"image=library/app")
    assert status == 200, body
    assert outside <= fake_s3.keys(), f"deleted outside px/: {sorted(outside - fake_s3.keys())}"


def test_a_listing_that_never_advances_ends_the_sweep(start_proxy, fake_s3):
    """ListObjectsV2 answers IsTruncated=true with the same continuation token
    forever, each page naming objects: the sweep must end (e529c27 pages
    forever, its list of objects growing without bound)."""
    proxy = start_proxy(**fake_s3.env())
    shared = proxy.server.proxy.shared
    wait_until(lambda: shared.counted is not None, timeout=20, what="the keeper's first sweep")
    endless = threading.Event()
    endless.set()
    page = "".join(f"<Contents><Key>{PREFIX}docker/registry/v2/blobs/sha256/{index:02x}/{index:064x}/data</Key>"
                   f"<LastModified>{iso_time(time.time())}</LastModified><Size>1</Size></Contents>"
                   for index in range(200))

    def stuck(request):
        if request.method == "GET" and not request.key and "list-type" in request.query and endless.is_set():
            return fake_s3.xml(f'<ListBucketResult xmlns="{S3_NS}"><IsTruncated>true</IsTruncated>{page}'
                               "<NextContinuationToken>again</NextContinuationToken></ListBucketResult>")
        return None
    fake_s3.hooks.append(stuck)
    ended = threading.Event()

    def sweep():
        try:
            shared.sweep(False)
        except Exception:  # failing is fine: ending is the point
            pass
        finally:
            ended.set()
    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    try:
        assert ended.wait(15), f"the sweep still pages after 15 s ({fake_s3.count('GET', 'list-type')} listings)"
    finally:
        endless.clear()
        thread.join(30)


# 7. times in the bucket ####################################################################

def test_tag_entries_of_an_instance_with_its_clock_ahead_do_not_stay_fresh(start_proxy, upstream, s3bucket):
    """Instance A's clock is 2 minutes ahead; it pulls app:v1, writing the tag
    entry with checked = its time.  The tag moves upstream.  90 s later (past
    MANIFEST_TTL=60 s by any true clock) instance B must revalidate and serve
    the new manifest; on e529c27 B finds the entry 'checked' in its future, so
    fresh, and serves the old one (for MANIFEST_TTL plus the skew, unbounded).
    The same trust in a writer's clock holds the anonymous-pull marks open
    longer (MARK_SKEW clamps only what this instance wrote)."""
    env = seaweed_env(s3bucket)
    first = upstream.add_image("library/app", "v1", [os.urandom(2000)])
    accept = {"Accept": first["media_type"]}
    a = start_proxy("--upstream", f"docker={upstream.url}", **env)
    b = start_proxy("--upstream", f"docker={upstream.url}", **env)
    a.clock.advance(120)
    status, headers, _ = a.request("GET", "/v2/library/app/manifests/v1", accept)
    assert status == 200 and headers["Docker-Content-Digest"] == first["digest"]
    assert a.cache.wait_idle(10)
    second = upstream.add_image("library/app", "v1", [os.urandom(2100)])
    b.clock.advance(90)
    status, headers, _ = b.request("GET", "/v2/library/app/manifests/v1", accept)
    assert status == 200
    assert headers["Docker-Content-Digest"] == second["digest"], (
        "B served the manifest the tag named 90 s ago, unchecked, on A's skewed time")


def test_a_tag_entry_with_a_non_numeric_time_is_a_miss_not_a_500(start_proxy, upstream, s3bucket):
    """A tag entry in the bucket whose "checked" is not a number (another
    writer, another version, a damaged object): the pull must still work
    (a miss, filled from upstream); e529c27 answers 500 (a TypeError)."""
    server, bucket = s3bucket
    image = upstream.add_image("library/app", "v1", [os.urandom(2000)])
    accept = {"Accept": image["media_type"]}
    proxy = start_proxy("--upstream", f"docker={upstream.url}", **seaweed_env(s3bucket))
    assert proxy.request("GET", "/v2/library/app/manifests/v1", accept)[0] == 200
    assert proxy.cache.wait_idle(10)
    keys = [key for key in server.objects(bucket, "px/dockerproxy/repos/") if "/_tags/v1/" in key]
    assert keys, "no tag entry in the bucket"
    for key in keys:
        entry = json.loads(server.object_bytes(bucket, key))
        entry["checked"] = "soon"
        server.put(bucket, key, json.dumps(entry).encode(), content_type="application/json")
    status, _, body = proxy.request("GET", "/v2/library/app/manifests/v1", accept)
    assert status == 200, body[:300]


# 8. uploads ###################################################################

def test_a_slowdown_answer_to_an_upload_is_retried(start_proxy, upstream, fake_s3):
    """The store answers the upload's PUT with 503 SlowDown once (S3 does so when
    a prefix scales; its SDKs retry 500/503 with back-off).  The object must
    reach the bucket; on e529c27 the upload fails for good (the blob is never
    filled again, so never uploaded)."""
    data = os.urandom(3000)
    digest = upstream.add_blob("library/app", data)
    key = dockerproxy.blob_key(PREFIX, digest)
    refused = []

    def slow_down(request):
        if request.method == "PUT" and request.key == key and not refused:
            refused.append(request)
            return fake_s3.error(503, "SlowDown", "Please reduce your request rate.")
        return None
    fake_s3.hooks.append(slow_down)
    proxy = start_proxy("--upstream", f"docker={upstream.url}", **fake_s3.env())
    assert fetch(proxy, f"/v2/library/app/blobs/{digest}")[:2] == (200, data)
    assert proxy.cache.wait_idle(30)
    assert refused, "the store was not asked"
    assert key in fake_s3.keys(), "one SlowDown and the object never reaches the bucket"


def test_a_complete_answer_with_leading_whitespace_counts_as_uploaded(start_proxy, upstream, fake_s3, monkeypatch):
    """S3 (and MinIO) keep a long CompleteMultipartUpload alive by sending
    whitespace after the 200's head, before the XML; ElementTree refuses XML
    whose declaration is not at the start.  The upload succeeded: it must count
    as one (e529c27 counts it failed, warns, and sends an abort)."""
    monkeypatch.setattr(dockerproxy, "MULTIPART_THRESHOLD", 4096)
    monkeypatch.setattr(dockerproxy, "PART_SIZE", 2048)
    data = os.urandom(5000)
    digest = upstream.add_blob("library/app", data)

    def padded(request):
        if request.method == "POST" and "uploadId" in request.query:
            status, headers, body = fake_s3.serve(request)
            return status, headers, b"\n\r\n\r    " + body
        return None
    fake_s3.hooks.append(padded)
    proxy = start_proxy("--upstream", f"docker={upstream.url}", **fake_s3.env())
    assert fetch(proxy, f"/v2/library/app/blobs/{digest}")[:2] == (200, data)
    assert proxy.cache.wait_idle(30)
    assert dockerproxy.blob_key(PREFIX, digest) in fake_s3.keys()
    assert (metric(proxy, "dockerproxy_s3_uploads_total", "ok"),
            metric(proxy, "dockerproxy_s3_uploads_total", "failed")) == (1, 0)


def test_an_object_the_bucket_lost_between_head_and_get_is_uploaded_again(start_proxy, upstream, fake_s3):
    """HEAD says the object is there, the GET finds it gone (the sweeper of
    another instance, a lifecycle rule, a lying store): the proxy fills from
    upstream, and must then upload it; e529c27 skips the upload because its
    HEAD is remembered (BUCKET_SEEN_TTL), and the bucket stays without it."""
    data = os.urandom(3000)
    digest = upstream.add_blob("library/app", data)
    key = dockerproxy.blob_key(PREFIX, digest)
    lied = []

    def stale_head(request):
        if request.method == "HEAD" and request.key == key and not lied:
            lied.append(request)
            return 200, [("Content-Length", str(len(data))), ("Content-Type", "application/octet-stream")], b""
        return None
    fake_s3.hooks.append(stale_head)
    proxy = start_proxy("--upstream", f"docker={upstream.url}", **fake_s3.env())
    assert fetch(proxy, f"/v2/library/app/blobs/{digest}")[:2] == (200, data)
    assert proxy.cache.wait_idle(30)
    assert lied
    assert key in fake_s3.keys(), "filled from upstream but never uploaded"


def test_sigterm_aborts_a_multipart_upload_it_cannot_finish(upstream, fake_s3, tmp_path):
    """SIGTERM while a multipart upload is stuck on a part: the process exits
    after SHUTDOWN_GRACE (right), and must abort the upload on its way out.
    e529c27 leaves it pending in the store for its own next start; an instance
    that never starts again (a StatefulSet scaled down) leaves it there, billed,
    until some other instance restarts (stale uploads are only swept at start)."""
    size = dockerproxy.MULTIPART_THRESHOLD + 6 * 1024 * 1024  # in parts: the process's own constants
    digest = upstream.add_pattern_blob("library/app", size, seed=7)
    stuck = threading.Event()

    def hold_part_two(request):
        if request.method == "PUT" and request.query.get("partNumber") == "2":
            stuck.set()
            fake_s3.released.wait(120)
            return fake_s3.error(500, "InternalError")
        return None
    fake_s3.hooks.append(hold_part_two)
    port = free_port()
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith(("AWS_", "CACHE_", "S3_", "PEER", "UPSTREAM_", "SHUTDOWN_"))}
    environ.update(fake_s3.env(), SHUTDOWN_GRACE="2")
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "dockerproxy.py"), "--env-file", os.devnull, "--host", "127.0.0.1",
             "--port", str(port), "--cache-dir", str(tmp_path / "cache"), "--upstream", f"docker={upstream.url}"],
            env=environ, stdout=log, stderr=subprocess.STDOUT)
    try:
        def serving():
            assert process.poll() is None, log_path.read_text()
            try:
                return http_request(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200
            except OSError:
                return False
        wait_until(serving, timeout=30, what="the proxy serving")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("GET", f"/v2/library/app/blobs/{digest}")
        answer = connection.getresponse()
        received = sum(len(chunk) for chunk in iter(lambda: answer.read(1 << 20), b""))  # not kept
        connection.close()
        assert answer.status == 200 and received == size
        assert stuck.wait(60), "the upload never reached part 2"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert fake_s3.uploads == {}, f"left pending in the store: {sorted(fake_s3.uploads)}"


# 9. peers ###################################################################

def test_an_owner_answering_429_to_an_anonymous_pull_is_not_repeated_upstream(start_proxy, upstream, peers_env):
    """Upstream answers the owner 429.  The asker's client is anonymous, as the
    owner's request was (same identity, same rate limit): the asker must relay
    the 429 (with Retry-After), not ask upstream again itself.  On e529c27 every
    asker of the cluster repeats the refused request once per cool-off."""
    port_a, port_b = free_port(), free_port()
    a_url, b_url = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    data, digest = blob_owned_by(b_url, [a_url])
    upstream.add_blob("library/app", data)
    asker = start_proxy("--port", str(port_a), "--upstream", f"docker={upstream.url}", **peers_env(a_url, b_url))
    start_proxy("--port", str(port_b), "--upstream", f"docker={upstream.url}", **peers_env(b_url, a_url))
    upstream.fault("registry", "/blobs/", "status", count=10, method="GET", status=429,
                   headers=[("Retry-After", "30")])
    status, headers, _ = asker.request("GET", f"/v2/library/app/blobs/{digest}")
    assert status == 429 and headers.get("Retry-After")
    gets = upstream.count(server="registry", method="GET", path_contains="/blobs/")
    assert gets == 1, f"upstream was asked {gets} times for one anonymous pull"


def test_a_peer_refusing_our_proof_shows_on_the_status_page(start_proxy, upstream, peers_env):
    """The asker's clock is 2 minutes ahead (PEER_SKEW is 60 s): the owner
    refuses every peer request with 403 "stale timestamp", and the asker
    quietly fetches upstream itself: the cluster's one-fetch-per-blob is gone
    and the asker's /status.json still shows the owner up with no problem.  The
    refusal must show there (the owner's log does not say who asked)."""
    port_a, port_b = free_port(), free_port()
    a_url, b_url = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    data, digest = blob_owned_by(b_url, [a_url])
    upstream.add_blob("library/app", data)
    asker = start_proxy("--port", str(port_a), "--upstream", f"docker={upstream.url}",
                        ADMIN_ALLOW="127.0.0.1/32", **peers_env(a_url, b_url))
    owner = start_proxy("--port", str(port_b), "--upstream", f"docker={upstream.url}", **peers_env(b_url, a_url))
    asker.clock.advance(120)
    status, body, _ = fetch(asker, f"/v2/library/app/blobs/{digest}")
    assert status == 200 and body == data  # the fallback works
    assert metric(owner, "dockerproxy_peer_served_total", "refused") == 1
    entries = json.loads(asker.request("GET", "/status.json")[2])["shared"]["peers"]
    problem = [entry["last_problem"] for entry in entries if entry["peer"] == b_url][0]
    assert problem, f"the owner refused our proof, and the asker's status says nothing: {entries}"


# 10. XML ###################################################################

def test_a_nested_listing_page_costs_little_memory():
    """A listing page within MAX_S3_LISTING made of nested elements (a hostile
    or broken store) takes ~150 MB and seconds of CPU to parse into a tree on
    e529c27; a few times the page's size is the most it should cost."""
    depth = (dockerproxy.MAX_S3_LISTING - 64) // 7
    body = b"<ListBucketResult>" + b"<a>" * depth + b"</a>" * depth + b"</ListBucketResult>"
    assert len(body) <= dockerproxy.MAX_S3_LISTING
    tracemalloc.start()
    try:
        try:
            dockerproxy.parse_object_list(body)
        except ValueError:
            pass  # refusing it is fine
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * dockerproxy.MAX_S3_LISTING, f"{peak / 2 ** 20:.0f} MiB to parse a 4 MiB page"


def test_a_blob_stored_while_its_records_go_to_the_bucket_is_not_filled_again(start_proxy, upstream, fake_s3,
                                                                             monkeypatch):
    """With a bucket a fill's records are written after it ended.  A second client that
    looked (disk, then bucket) before the first fill stored its blob, and begins after that
    fill ended but before its records are written, is served the stored blob: not a second
    upstream GET (test_s3_cluster's 8 cold clients hit this on 8afc007, 1 run in 8)."""
    proxy = start_proxy("--upstream", f"docker={upstream.url}", **fake_s3.env())
    digest = upstream.add_blob("library/app", os.urandom(300_000))
    path = f"/v2/library/app/blobs/{digest}"
    records, release = threading.Event(), threading.Event()

    def hold_records(request):  # the first fill's first record write only
        if request.method == "PUT" and "/dockerproxy/repos/" in request.key and not records.is_set():
            records.set()
            release.wait(30)
        return None
    fake_s3.hooks.append(hold_records)
    store, fills = proxy.cache.store, proxy.cache.fills
    real_exists, real_copy = store.exists, fills._copy_verified
    first_looked, go, lookers = threading.Event(), threading.Event(), []

    def exists(asked):
        if asked != digest or threading.get_ident() in lookers or threading.current_thread().name == "fill":
            return real_exists(asked)
        lookers.append(threading.get_ident())
        if len(lookers) == 1:
            first_looked.set()
            return real_exists(asked)
        seen = real_exists(asked)  # the second client's look: not stored yet...
        go.set()
        assert records.wait(30), "the first fill ended and writes its records"
        return seen                # ...and it begins once that fill ended, its records still on their way

    def held_copy(*args):
        assert go.wait(30), "the second client looked"
        return real_copy(*args)
    monkeypatch.setattr(store, "exists", exists)
    monkeypatch.setattr(fills, "_copy_verified", held_copy)
    answers = {}
    try:
        first = threading.Thread(target=lambda: answers.setdefault("first", proxy.request("GET", path)))
        first.start()
        assert first_looked.wait(30)
        status, headers, body = proxy.request("GET", path)
    finally:
        release.set()
    first.join(30)
    assert answers["first"][0] == 200 and len(lookers) == 2
    assert status == 200 and dockerproxy.bytes_digest(body, digest) == digest
    assert upstream.count(server="registry", method="GET", path_contains="/blobs/") == 1, upstream.requests


# Found in the last review of the whole change ###############################

def follow(location):
    """A client following a 307 (no proxy): (status, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(location, timeout=10) as response:
        return response.status, response.read()


def test_a_redirect_never_sends_clients_to_bytes_the_store_cut(start_proxy, upstream, fake_s3):
    """The store answers 200 to the single PUT but keeps a cut object (a broken
    gateway, a lying store).  Nothing checks the object after the PUT, and
    S3_REDIRECT sends every client there, even from the instance that holds the
    verified bytes itself; nobody reads it through the proxy, so it is never
    discarded, and each redirect marks it used (the sweep keeps it)."""
    data = os.urandom(5000)
    digest = upstream.add_blob("library/app", data)
    key = dockerproxy.blob_key(PREFIX, digest)

    def truncating(request):
        if request.method == "PUT" and request.key == key:
            fake_s3.put(key, request.body[:-1000])
            return 200, [("ETag", '"x"')], b""
        return None
    fake_s3.hooks.append(truncating)
    proxy = start_proxy("--upstream", f"docker={upstream.url}", S3_REDIRECT="true", **fake_s3.env())
    assert fetch(proxy, f"/v2/library/app/blobs/{digest}")[:2] == (200, data)
    assert proxy.cache.wait_idle(30)
    assert proxy.cache.store.exists(digest)  # the verified bytes are here
    for _ in range(3):
        status, headers, _ = proxy.request("GET", f"/v2/library/app/blobs/{digest}")
        body = data if status == 200 else follow(headers["Location"])[1]
        assert body == data, f"{status}: the client was sent to {len(body)} bytes that are not {digest}"


def test_a_manifest_asked_as_a_blob_first_stays_a_manifest_in_the_bucket(start_proxy, upstream, fake_s3, tmp_path):
    """A client GETs a manifest's digest through /blobs/ (distribution serves it
    so) before anyone pulls it: the bucket gets it as application/octet-stream.
    The real pull's fill finds the bucket 'has' it and uploads nothing, so no
    other instance can ever copy the manifest from the bucket: each one goes
    upstream (a counted Docker Hub pull) for it, until the bucket evicts it."""
    image = upstream.add_image("library/app", "1.0", [os.urandom(500)])
    manifest, digest = image["manifest"], image["digest"]
    upstream.add_blob("library/app", manifest)  # distribution: a manifest is a blob too
    a = start_proxy("--upstream", f"docker={upstream.url}", "--cache-dir", str(tmp_path / "a"), **fake_s3.env())
    b = start_proxy("--upstream", f"docker={upstream.url}", "--cache-dir", str(tmp_path / "b"), **fake_s3.env())
    accept = {"Accept": image["media_type"]}
    assert fetch(a, f"/v2/library/app/blobs/{digest}")[0] == 200          # the hostile client
    assert a.server.proxy.cache.wait_idle(10) and a.server.proxy.shared.uploads.wait_idle(10)
    assert fetch(a, f"/v2/library/app/manifests/{digest}", accept)[0] == 200  # the real pull
    assert a.server.proxy.cache.wait_idle(10) and a.server.proxy.shared.uploads.wait_idle(10)
    before = upstream.count(method="GET", path_contains=f"/manifests/{digest}")
    status, body, _ = fetch(b, f"/v2/library/app/manifests/{digest}", accept)
    assert status == 200 and body == manifest
    assert upstream.count(method="GET", path_contains=f"/manifests/{digest}") == before, \
        "instance B went upstream for a manifest the bucket holds"


def test_client_misses_do_not_exhaust_the_owners_nonce_memory(start_proxy, upstream, peers_env, monkeypatch):
    """A client's GETs of made-up digests (each one a miss the asker sends to the
    owner, signed) fill the owner's nonce memory; full, the owner refuses the
    asker's real requests as 'busy', and the asker passes it over."""
    monkeypatch.setattr(dockerproxy, "MAX_PEER_NONCES", 20)  # stands for 100_000 in 2 x PEER_SKEW
    port_a, port_b = free_port(), free_port()
    a_url, b_url = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    asker = start_proxy("--port", str(port_a), "--upstream", f"docker={upstream.url}", **peers_env(a_url, b_url))
    owner = start_proxy("--port", str(port_b), "--upstream", f"docker={upstream.url}", **peers_env(b_url, a_url))
    for _ in range(40):  # a hostile client: digests that exist nowhere, owned by B; twice the memory in
        _, junk = blob_owned_by(b_url, [a_url], size=8)  # 40 s of 2 x PEER_SKEW (120 s): 2 x MAX_PEER_NONCES
        fetch(asker, f"/v2/library/app/blobs/{junk}")
        for proxy in (asker, owner):
            proxy.clock.advance(1)
    peers = owner.server.proxy.peers
    forgotten = peers._forgotten_up_to
    assert forgotten and peers._take_nonce("a proof of that time, never seen", forgotten) == "replayed"
    for proxy in (asker, owner):  # the next real miss, a few seconds later (well within PEER_SKEW)
        proxy.clock.advance(5)
    data, digest = blob_owned_by(b_url, [a_url])
    upstream.add_blob("library/app", data)
    status, body, _ = fetch(asker, f"/v2/library/app/blobs/{digest}")
    assert status == 200 and body == data
    assert [p["state"] for p in asker.server.proxy.peers.status() if p["peer"] == b_url] == ["up"]
    assert metric(owner, "dockerproxy_peer_served_total", "refused") == 0
    assert peers.status() and len(peers._nonces) <= dockerproxy.MAX_PEER_NONCES


def test_a_revalidated_tag_stays_fresh_with_a_short_manifest_ttl(start_proxy, upstream, fake_s3):
    """MANIFEST_TTL=5 with a bucket: a revalidation that finds the same digest skipped the tag
    entry's write (TAG_REWRITE_INTERVAL=30s), so the bucket entry keeps its old
    'checked' and every request for up to 25 s more goes upstream with a HEAD
    (and writes the anonymous mark): a client loops it at will.  On disk the
    entry is re-dated at each revalidation."""
    upstream.add_image("library/app", "1.0", [os.urandom(500)])
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--manifest-ttl", "5", **fake_s3.env())
    assert fetch(proxy, "/v2/library/app/manifests/1.0")[0] == 200
    assert proxy.server.proxy.cache.wait_idle(10)
    proxy.server.proxy.clock.advance(6)
    heads = lambda: upstream.count(method="HEAD", path_contains="/manifests/1.0")
    before = heads()
    for _ in range(5):
        assert fetch(proxy, "/v2/library/app/manifests/1.0")[0] == 200
    assert heads() - before == 1, f"{heads() - before} HEADs upstream within MANIFEST_TTL of a revalidation"
