"""The storage seams (BlobStore, TagIndex, AccessRecords) and Fills, without sockets.

Each seam is tested through its operations only, so a second backend can be
run through the same tests by adding it to the `backend` fixture.
"""

import errno
import hashlib
import http.client
import io
import json
import os
import shutil
import threading
import time

import pytest

import dockerproxy
from conftest import MovableClock
from rawupstream import ScriptedUpstream

UPSTREAM = "https://registry-1.docker.io"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["disk"])
def backend(request, tmp_path):
    """(blob store, tag index, access records, clock) of one backend."""
    clock, trouble = MovableClock(), dockerproxy.DiskTrouble()
    root = str(tmp_path / "cache")
    return (dockerproxy.BlobStore(root, clock), dockerproxy.TagIndex(root, clock, trouble),
            dockerproxy.AccessRecords(root, clock, trouble), clock)


def put(store, data, media_type=None):
    digest = digest_of(data)
    spool = store.new_spool(digest)
    spool.write(data)
    spool.finish(len(data))
    is_new = store.put(spool, digest, media_type)
    spool.close()
    return digest, is_new


# Blob store ################################################################

def test_a_put_object_is_there_by_digest_with_its_media_type(backend):
    store = backend[0]
    blob, is_new = put(store, b"layer bytes")
    manifest, _ = put(store, b'{"schemaVersion":2}', DOCKER_MANIFEST)
    assert is_new and store.exists(blob) and store.media_type(blob) is None
    assert store.media_type(manifest) == DOCKER_MANIFEST
    file, size = store.open(blob)
    assert (file.read(), size) == (b"layer bytes", 11)
    store.close(file)
    assert store.digest_of(blob) == blob
    assert put(store, b"layer bytes")[1] is False  # the same bytes again: nothing new


def test_objects_lists_what_is_stored_with_size_and_last_use(backend):
    store, _, _, clock = backend
    first, _ = put(store, b"first")
    clock.advance(100)
    second, _ = put(store, b"second!")
    listed = {stored.digest: stored for stored in store.objects()}
    assert set(listed) == {first, second}
    assert listed[second].size == 7 and listed[second].last_used - listed[first].last_used >= 99


def test_an_object_being_read_is_in_use_until_closed(backend):
    store = backend[0]
    digest, _ = put(store, b"data")
    assert not store.in_use(digest)
    file, _ = store.open(digest)
    assert store.in_use(digest)
    store.close(file)
    assert not store.in_use(digest)


def test_deleted_and_absent_objects(backend):
    store = backend[0]
    digest, _ = put(store, b"{}", DOCKER_MANIFEST)
    store.delete(digest)
    assert not store.exists(digest) and store.open(digest) is None and store.media_type(digest) is None
    store.delete(digest)  # twice is fine
    assert store.objects() == []


def test_a_discarded_spool_leaves_nothing(backend):
    store = backend[0]
    spool = store.new_spool(digest_of(b"x"))
    spool.write(b"partial")
    spool.discard()
    spool.close()
    assert store.objects() == [] and dockerproxy.remove_abandoned_temps(store.root) == 0


# Tag index #################################################################

def test_a_tag_entry_per_accept_kind_and_when_it_was_checked(backend):
    _, tags, _, clock = backend
    digest = digest_of(b"m")
    tags.put(UPSTREAM, "library/a", "1", "docker-manifest", digest, DOCKER_MANIFEST)
    clock.advance(30)
    tags.put(UPSTREAM, "library/a", "1", "oci-index", digest, "application/vnd.oci.image.index.v1+json")
    assert tags.kinds(UPSTREAM, "library/a", "1") == ["docker-manifest", "oci-index"]
    entry = tags.get(UPSTREAM, "library/a", "1", "docker-manifest")
    assert entry["digest"] == digest and clock.time() - entry["checked"] >= 30
    assert tags.get("https://ghcr.io", "library/a", "1", "docker-manifest") is None
    tags.drop(UPSTREAM, "library/a", "1")
    assert tags.kinds(UPSTREAM, "library/a", "1") == []


def test_prune_drops_entries_whose_manifest_is_gone(backend):
    store, tags, _, _ = backend
    kept, _ = put(store, b"kept", DOCKER_MANIFEST)
    tags.put(UPSTREAM, "library/a", "kept", "any", kept, DOCKER_MANIFEST)
    tags.put(UPSTREAM, "library/a", "gone", "any", digest_of(b"gone"), DOCKER_MANIFEST)
    assert tags.prune(store.exists) == 1
    assert tags.get(UPSTREAM, "library/a", "kept", "any") and not tags.get(UPSTREAM, "library/a", "gone", "any")


# Access records ############################################################

def test_links_and_anonymous_pull_markers_per_upstream_and_repository(backend):
    _, _, records, clock = backend
    digest = digest_of(b"layer")
    records.link(UPSTREAM, "library/a", [digest])
    assert records.linked_since(UPSTREAM, "library/a", digest) is not None
    assert records.linked_since(UPSTREAM, "library/b", digest) is None
    assert records.linked_since("https://ghcr.io", "library/a", digest) is None
    assert records.public_since(UPSTREAM, "library/a") is None
    records.mark_public(UPSTREAM, "library/a")
    marked = records.public_since(UPSTREAM, "library/a")
    clock.advance(50)
    records.mark_public(UPSTREAM, "library/a")
    assert records.public_since(UPSTREAM, "library/a") - marked >= 50
    assert records.repositories() == 1


# Fills #####################################################################

class Answer:
    """An upstream answer as a fill reads it."""

    def __init__(self, body, length=None):
        self.body = io.BytesIO(body)
        self.length = len(body) if length is None else length
        self.headers = {"content-length": str(self.length)}
        self.closed = False

    def readinto(self, buffer):
        return self.body.readinto(buffer)

    def release(self):
        pass

    def close(self):
        self.closed = True


def fill(store, data, digest, length=None):
    """Run one fill to its end: (its state, what the verified callback saw)."""
    budget = dockerproxy.Budget(0, lambda: None)
    fills = dockerproxy.Fills(store, budget, dockerproxy.DiskTrouble(), 4)
    seen = []
    job, leader = fills.begin(("key",), None, 0.0)
    assert leader and fills.begin(("key",), "other", 0.0)[0] is job
    reader = fills.start(job, Answer(data, length), digest, [], None, lambda d, spool: seen.append(d))
    assert fills.wait_idle(30) and fills.in_flight() == []
    fills.close_reader(job, reader)
    return job.state, seen, budget


def test_a_verified_fill_is_stored_and_counted(backend):
    store = backend[0]
    data = b"x" * 100000
    state, seen, budget = fill(store, data, digest_of(data))
    assert state == dockerproxy.Fill.DONE and seen == [digest_of(data)]
    assert (budget.size, budget.reserved) == (100000, 0)
    assert store.exists(digest_of(data))


@pytest.mark.parametrize("body, digest, length", [
    (b"tampered", digest_of(b"original"), None),      # wrong bytes
    (b"short", digest_of(b"short"), 10),              # fewer bytes than announced
])
def test_a_bad_fill_stores_nothing(backend, body, digest, length):
    store = backend[0]
    state, seen, budget = fill(store, body, digest, length)
    assert state == dockerproxy.Fill.FAILED and seen == [] and (budget.size, budget.reserved) == (0, 0)
    assert store.objects() == [] and dockerproxy.remove_abandoned_temps(store.root) == 0


def test_wait_idle_waits_for_a_running_fill(backend):
    store = backend[0]
    fills = dockerproxy.Fills(store, dockerproxy.Budget(0, lambda: None), dockerproxy.DiskTrouble(), 4)
    job, _ = fills.begin(("key",), None, 0.0)
    assert fills.wait_idle(0.01) is False
    ended = threading.Thread(target=fills.end, args=(job, dockerproxy.Fill.DECLINED))
    ended.start()
    assert fills.wait_idle(30)
    ended.join()


# What a broken disk or a hand-edited cache leaves ##########################

def test_verify_removes_files_where_the_store_puts_nothing(tmp_path):
    cache = dockerproxy.Cache(str(tmp_path / "cache"), 0, 0)
    digest, _ = put(cache.store, b"kept")
    stray = tmp_path / "cache" / "blobs" / "sha256" / "zz" / ("a" * 64)
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"misplaced")
    report = cache.verify()
    assert report["bad_removed"] == 1 and not stray.exists() and cache.store.exists(digest)


def test_a_media_type_file_that_is_not_ours_reads_as_none(backend):
    store = backend[0]
    digest, _ = put(store, b"{}", DOCKER_MANIFEST)
    with open(dockerproxy.object_path(store.root, digest) + ".type", "wb") as file:
        file.write(b"\xff\xfe not utf-8")
    assert store.media_type(digest) is None


def test_a_cache_command_reports_a_disk_error_instead_of_raising(tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    put(dockerproxy.BlobStore(str(root), MovableClock()), b"an object")

    def failing_disk(*args, **kwargs):
        raise OSError(5, "Input/output error", str(root))
    monkeypatch.setattr(dockerproxy.BlobStore, "objects", failing_disk)
    status = dockerproxy.main(["cache", "stats", "--cache-dir", str(root), "--env-file", "/dev/null"], {})
    err = capsys.readouterr().err
    assert status == 1 and "Input/output error" in err and "Traceback" not in err


def test_an_object_that_cannot_be_read_is_left_out_of_listings(backend):
    store = backend[0]
    digest, _ = put(store, b"fine")
    loop = dockerproxy.object_path(store.root, "sha256:" + "ab" * 32)
    os.makedirs(os.path.dirname(loop), exist_ok=True)
    os.symlink(loop, loop)  # stat() says ELOOP
    assert [stored.digest for stored in store.objects()] == [digest]


def test_fills_beyond_max_fills_are_refused_and_reservations_beyond_the_budget_too(backend):
    store = backend[0]
    budget = dockerproxy.Budget(1000, lambda: None)
    fills = dockerproxy.Fills(store, budget, dockerproxy.DiskTrouble(), 2)
    first, second = fills.begin(("a",), None, 0.0)[0], fills.begin(("b",), None, 0.0)[0]
    assert fills.begin(("c",), None, 0.0) == (None, False)          # MAX_FILLS running
    assert fills.begin(("a",), "x", 0.0) == (first, False)          # joining is not a new fill
    assert fills.start(first, Answer(b"x" * 600), None, [], None, lambda d, s: None) is not None
    assert fills.start(second, Answer(b"y" * 600), None, [], None, lambda d, s: None) is None  # 1200 > 1000
    fills.end(second, dockerproxy.Fill.DECLINED)
    assert fills.wait_idle(30) and budget.reserved == 0


def test_a_fill_whose_clients_left_stops_unless_it_fits_without_eviction(backend):
    store = backend[0]
    for size_stored, stops in ((0, False), (900, True)):
        budget = dockerproxy.Budget(1000, lambda: None)
        budget.stored(size_stored)
        fills = dockerproxy.Fills(store, budget, dockerproxy.DiskTrouble(), 2)
        job, _ = fills.begin(("k", size_stored), None, 0.0)
        stalled = threading.Event()
        answer = Answer(b"z" * 500)
        read = answer.readinto

        def slow_readinto(buffer, read=read):
            stalled.wait(30)
            return read(buffer[:100])
        answer.readinto = slow_readinto
        reader = fills.start(job, answer, None, [], None, lambda d, s: None)
        fills.close_reader(job, reader)  # its only client leaves
        stalled.set()
        assert fills.wait_idle(30)
        assert (job.state == dockerproxy.Fill.FAILED) is stops, size_stored


# A fill's digest, computed beside it #######################################

MiB = 1024 * 1024


def make_spool(tmp_path, data):
    spool = dockerproxy.Spool(str(tmp_path), "review")
    spool.reserve(len(data))
    spool.write(data)
    return spool


@pytest.mark.parametrize("failure", ["EIO on read-back", "spool shorter than written"])
def test_a_hasher_that_failed_gives_no_digest(tmp_path, monkeypatch, failure):
    """A read-back that fails, or a spool shorter than what was written, is a failure,
    never the digest of the prefix that was hashed."""
    data = os.urandom(5 * MiB)
    spool = make_spool(tmp_path, data)
    if failure == "spool shorter than written":
        os.ftruncate(spool.fd, 2 * MiB)
    else:
        real = os.preadv

        def preadv(fd, buffers, offset):
            if threading.current_thread().name == "hash" and offset >= 2 * MiB:
                raise OSError(errno.EIO, "Input/output error")
            return real(fd, buffers, offset)
        monkeypatch.setattr(dockerproxy.os, "preadv", preadv)
        monkeypatch.setattr(threading, "excepthook", lambda args: None)
    hashing = dockerproxy.HashBeside(spool, "sha256")
    hashing.landed(None, len(data))
    try:
        digest = hashing.finish()
    except Exception:
        return  # a failure reported: what the fill needs
    finally:
        spool.close()
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest(), "a digest of a prefix, as if all was hashed"


def test_a_fill_is_hashed_as_it_lands_when_no_thread_can_start(tmp_path, monkeypatch):
    def no_thread(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(dockerproxy.HashBeside, "start", no_thread)
    spool = make_spool(tmp_path, b"x")
    assert isinstance(dockerproxy.hashing_for(spool, "sha256", 8 * MiB), dockerproxy.HashInline)
    spool.close()


def exactly_4_mib_manifest():
    document = {"schemaVersion": 2, "mediaType": dockerproxy.OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": "sha256:" + "0" * 64, "size": 2},
                "layers": [], "annotations": {"pad": ""}}
    base = len(json.dumps(document).encode())
    document["annotations"]["pad"] = "x" * (dockerproxy.MAX_MANIFEST_SIZE - base)
    body = json.dumps(document).encode()
    assert len(body) == dockerproxy.MAX_MANIFEST_SIZE == dockerproxy.HASH_BESIDE_MIN
    return body


def test_a_tag_manifest_is_never_stored_under_a_digest_it_does_not_have(start_proxy, monkeypatch):
    """A tag's manifest with no Docker-Content-Digest is filled with digest=None, so
    nothing checks HashBeside's answer: at exactly MAX_MANIFEST_SIZE (== HASH_BESIDE_MIN)
    a read-back error stores it under the digest of the prefix hashed (here the empty
    string's, sha256:e3b0...), and the tag points there."""
    body = exactly_4_mib_manifest()
    upstream = ScriptedUpstream()
    path = "/v2/library/a/manifests/1"
    upstream.script[path] = (f"HTTP/1.1 200 OK\r\nContent-Type: {dockerproxy.OCI_MANIFEST}\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    real = os.preadv

    def preadv(fd, buffers, offset):
        if threading.current_thread().name == "hash":
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)
    monkeypatch.setattr(dockerproxy.os, "preadv", preadv)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    try:
        proxy = start_proxy("--upstream", f"docker={upstream.url}")
        try:
            proxy.request("GET", path, {"Accept": dockerproxy.OCI_MANIFEST})
        except http.client.IncompleteRead:
            pass  # the fill failed, and the client sees it: what must happen
        assert proxy.cache.wait_idle(20)
        for stored in proxy.cache.store.objects():
            file, size = proxy.cache.store.open(stored.digest)
            try:
                content = os.pread(file.fileno(), size, 0)
            finally:
                proxy.cache.store.close(file)
            actual = "sha256:" + hashlib.sha256(content).hexdigest()
            assert stored.digest == actual, f"{len(content)} bytes stored as {stored.digest}"
    finally:
        upstream.close()




def test_a_small_file_is_written_even_when_a_purge_removes_its_directory_meanwhile(tmp_path, monkeypatch):
    """A purge's rmtree between the temporary file and its rename made the rename
    fail with ENOENT, logged as a disk that cannot be written (the broken-upstream
    review's purge race)."""
    target = tmp_path / "repos" / "library" / "app" / "_tags" / "1" / "docker-manifest.json"
    real_write_all, purged = dockerproxy.write_all, []

    def write_then_purge(fd, data):
        real_write_all(fd, data)
        if not purged:
            purged.append(True)
            shutil.rmtree(tmp_path / "repos" / "library" / "app")
    monkeypatch.setattr(dockerproxy, "write_all", write_then_purge)
    dockerproxy.write_atomic(str(target), b'{"digest": "sha256:x"}')
    assert purged and target.read_bytes() == b'{"digest": "sha256:x"}'
    assert os.listdir(target.parent) == ["docker-manifest.json"]  # no temporary file left


def test_an_access_link_is_made_even_when_a_purge_removes_its_directory_meanwhile(tmp_path, monkeypatch):
    records = dockerproxy.AccessRecords(str(tmp_path), dockerproxy.Clock(), dockerproxy.DiskTrouble())
    digest = "sha256:" + "a" * 64
    path = dockerproxy.link_path(str(tmp_path), "https://u", "library/app", digest)
    real_makedirs, purged = os.makedirs, []

    def makedirs_then_purge(name, *args, **kwargs):
        real_makedirs(name, *args, **kwargs)
        if name == os.path.dirname(path) and not purged:
            purged.append(True)
            shutil.rmtree(name)
    monkeypatch.setattr(dockerproxy.os, "makedirs", makedirs_then_purge)
    records.link("https://u", "library/app", [digest])
    assert purged and os.path.exists(path)


class WatchedLock:
    """A lock that says when a thread waits for it (a second sweep, here)."""

    def __init__(self):
        self.lock, self.waiting = threading.Lock(), threading.Event()

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            self.waiting.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def test_a_sweep_counts_its_evictions_before_the_next_sweep_can_run(tmp_path, monkeypatch):
    """One who runs a sweep right after another (an operator's, the tests') sees the other's
    evictions counted: the count is added before the sweep lets the next one in."""
    cache = dockerproxy.Cache(str(tmp_path / "cache"), 100, 0, clock=MovableClock(), metrics=dockerproxy.Metrics())
    for index in range(3):
        put(cache.store, bytes([index]) * 60)
    cache._sweep_lock = lock = WatchedLock()
    counting, go, real_add = threading.Event(), threading.Event(), cache.metrics.add

    def held_add(name, labels=(), amount=1):
        if threading.current_thread().name == "first sweep":
            counting.set()
            go.wait(30)
        real_add(name, labels, amount)
    monkeypatch.setattr(cache.metrics, "add", held_add)
    first = threading.Thread(target=cache.sweep, name="first sweep")
    first.start()
    assert counting.wait(30), "the first sweep counts its evictions"
    seen = []
    second = threading.Thread(target=lambda: (cache.sweep(), seen.append(
        cache.metrics.value("dockerproxy_cache_evictions_total"))))
    second.start()
    deadline = time.monotonic() + 30
    while second.is_alive() and not lock.waiting.is_set() and time.monotonic() < deadline:
        second.join(0.01)  # until it waits for the first sweep, or ran past it
    go.set()
    first.join(30)
    second.join(30)
    removed = 3 - len(cache.store.objects())
    assert removed >= 1 and seen == [removed]
