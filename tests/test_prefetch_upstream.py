"""Prefetch after the broken-upstream review: one test per finding.

Each test failed on the code before the review's fixes (0a1c1ab): a download
read 256 KiB before it reported progress, saw a cancel or could be given up,
so a trickling upstream held a prefetch (and a cancel) forever; an image was
called ok although its manifest was passed on uncached, was no manifest at
all, was an index of indexes, or named blobs of another size than theirs; a
blob without a Content-Length was downloaded twice; a manifest nested past
the JSON parser's depth was a 500 and an "internal error" traceback.

Finding 8 (chosen_manifests keeping one of two index entries equal as values)
has no test: entries equal as values have the same platform and the same
attestation target, so both are chosen or neither is, and the old `entry not
in chosen` chose exactly what the id-based test chooses.  What changed is
its cost (quadratic before), and timings are not asserted."""

import base64
import hashlib
import json
import logging
import re
import threading

import pytest

import dockerproxy
from conftest import RegistryClient
from fakeregistry import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST
from rawupstream import RawUpstream, response
from realregistry import wait_until


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def start(start_proxy):
    """start_proxy (whose teardown ends keep-warm threads and prefetches)."""
    return start_proxy


class Running:
    """A PrefetchJob of `names` run in a thread: its events, its result once run() returned."""

    def __init__(self, proxy, *names):
        self.events = []
        self.result = {}
        self.job = dockerproxy.PrefetchJob(proxy.server.proxy, [(dockerproxy.parse_image_reference(name), ())
                                                               for name in names], self.events.append)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            self.result["ok"] = self.job.run()
        except BaseException as err:  # reported by the test, not lost in a thread
            self.result["raised"] = repr(err)

    def ended(self, timeout=60):
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def image(self, name):
        return {event["image"]: event for event in list(self.events) if event["event"] == "image"}[name]


def prefetch(proxy, *names):
    """Run a PrefetchJob to its end: (the Running job, the image event of names[0])."""
    running = Running(proxy, *names)
    assert running.ended(), f"the prefetch did not end; events so far: {running.events}"
    assert "raised" not in running.result, running.result
    assert running.events[-1]["event"] == "end", running.events
    return running, running.image(str(dockerproxy.parse_image_reference(names[0])))


def error_of(image_event):
    assert image_event["ok"] is False, image_event
    return image_event["error"]


def descriptor(digest, size, media_type=OCI_LAYER):
    return {"mediaType": media_type, "size": size, "digest": digest}


def index_of(entries):
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def image_manifest(config, layers):
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}).encode()


# 1: a trickling upstream ###################################################

CONFIG = b'{"architecture":"amd64","os":"linux"}'
LAYER_SIZE = 8 * 1024 * 1024   # announced; a trickle never sends it all
PIECE = 512                    # bytes every PACE seconds: 5 KiB/s, 256 KiB in 51 s
PACE = 0.1
LAYER = sha256(b"never sent whole")  # the digest does not matter: the bytes never all arrive
TRICKLE_MANIFEST = image_manifest(descriptor(sha256(CONFIG), len(CONFIG), OCI_CONFIG),
                                  [descriptor(LAYER, LAYER_SIZE)])


class Trickle:
    """A registry whose one layer comes PIECE bytes every PACE seconds (never
    silent for READ_TIMEOUT) until stop is set: a slow link, not a stall."""

    def __init__(self):
        self.stop = threading.Event()
        self.layer_started = threading.Event()
        self.upstream = RawUpstream(self.answer)

    def answer(self, request, connection):
        if "/manifests/" in request.path:
            connection.sendall(response(headers=[f"Content-Type: {OCI_MANIFEST}",
                                                 f"Content-Length: {len(TRICKLE_MANIFEST)}",
                                                 f"Docker-Content-Digest: {sha256(TRICKLE_MANIFEST)}"],
                                        body=TRICKLE_MANIFEST if request.method == "GET" else b""))
            return True
        if request.path.endswith(sha256(CONFIG)):
            connection.sendall(response(headers=[f"Content-Length: {len(CONFIG)}"],
                                        body=CONFIG if request.method == "GET" else b""))
            return True
        connection.sendall(response(headers=[f"Content-Length: {LAYER_SIZE}"]))
        self.layer_started.set()
        while not self.stop.wait(PACE):  # the pace of a slow link, not a wait for the proxy
            connection.sendall(b"t" * PIECE)
        return False

    def close(self):
        self.stop.set()
        self.upstream.close()


@pytest.fixture
def trickle():
    upstream = Trickle()
    yield upstream
    upstream.close()


@pytest.fixture
def trickling(trickle, start):
    """A prefetch of the trickled image, running; cut at the end of the test
    (the upstream first, so that even a cancel that waits for a read returns)."""
    proxy = start("--upstream", f"docker={trickle.upstream.url}", READ_TIMEOUT="2", CONNECT_TIMEOUT="1")
    running = Running(proxy, "trickle:1")
    running.proxy = proxy
    yield running
    trickle.close()
    threading.Thread(target=running.job.cancel, daemon=True).start()
    running.ended(30)


def layer_progress(running):
    """bytes_done of the progress events that count bytes of the layer (beyond the config)."""
    return [event["bytes_done"] for event in list(running.events)
            if event["event"] == "progress" and event["bytes_done"] > len(CONFIG)]


def test_a_trickling_blob_reports_progress_while_it_downloads(trickling):
    # 3 progress events take 1.5 s (one each 0.5 s); 256 KiB, which the old code read first, take 51 s.
    wait_until(lambda: len(layer_progress(trickling)) >= 3, timeout=20, what="3 progress events of the trickled layer")
    done = layer_progress(trickling)
    assert done == sorted(set(done)), done
    assert trickling.thread.is_alive()  # still downloading: the progress came during it


def test_cancel_returns_while_a_worker_read_is_blocked_on_a_trickle_and_run_ends(trickling, trickle):
    proxy = trickling.proxy

    def layer_read():
        fills = proxy.server.proxy.status()["cache"]["fills"]
        return any(fill["digest"] == LAYER and fill["clients"] >= 1 for fill in fills)
    assert trickle.layer_started.wait(20), trickling.events
    wait_until(layer_read, what="the prefetch reading the trickled layer's fill")
    canceller = threading.Thread(target=trickling.job.cancel, daemon=True)
    canceller.start()
    canceller.join(15)
    assert not canceller.is_alive(), "cancel() did not return while the trickle went on"
    assert trickling.ended(15), "run() did not end after cancel()"
    assert trickling.result == {"ok": False}
    assert trickling.events[-1]["event"] == "end" and trickling.events[-1]["ok"] is False
    assert not trickle.stop.is_set()  # the upstream was still sending: the cancel, not its end, stopped it


def test_a_blob_averaging_under_orphan_min_rate_after_orphan_grace_is_given_up_naming_the_rate(
        trickle, start, monkeypatch):
    monkeypatch.setattr(dockerproxy, "ORPHAN_GRACE", 1.0)
    proxy = start("--upstream", f"docker={trickle.upstream.url}", READ_TIMEOUT="2", CONNECT_TIMEOUT="1")
    running = Running(proxy, "trickle:1")
    try:
        assert running.ended(30), f"a 5 KiB/s download went on past ORPHAN_GRACE; events: {running.events}"
    finally:
        trickle.close()
        if running.thread.is_alive():
            threading.Thread(target=running.job.cancel, daemon=True).start()
            running.ended(30)
    assert running.result == {"ok": False}
    error = error_of(running.image("docker.io/library/trickle:1"))
    assert error["code"] == "UNAVAILABLE", error
    minimum = dockerproxy.human_bytes(dockerproxy.ORPHAN_MIN_RATE)
    assert re.search(rf"came at [0-9.]+ (B|KiB)/s, under {minimum}/s", error["message"]), error
    assert running.events[-1]["event"] == "end"


# 2: a manifest the proxy passes on uncached ###############################

SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
UNCACHED = {
    "no Content-Type": {"headers": {"Content-Type": None}},
    "a schema 1 signed Content-Type": {"headers": {"Content-Type": SCHEMA1_SIGNED}},
    "no digest, ended by the close": {"headers": {"Docker-Content-Digest": None}, "content_length": None},
}


@pytest.mark.parametrize("case", sorted(UNCACHED))
def test_an_image_whose_manifest_the_proxy_passes_on_uncached_fails_manifest_invalid_not_cached(fake, start, case):
    image = fake.add_image("library/unc", "1", [b"uncached manifest layer " * 100])
    fake.fault("registry", "/manifests/1", "framing", count=100, **UNCACHED[case])
    proxy = start("--upstream", f"docker={fake.url}")
    running, event = prefetch(proxy, "unc:1")
    error = error_of(event)
    assert error["code"] == "MANIFEST_INVALID" and "not cached" in error["message"], error
    assert not proxy.cache.store.exists(image["digest"])
    end = running.events[-1]
    assert (end["event"], end["ok"], end["failed"]) == ("end", False, 1), end


def signed_schema1(layer):
    """(a signed schema 1 manifest, its payload): libtrust's JWS, whose digest
    (Docker-Content-Digest, as Docker Hub sends it) is its payload's, the
    signatures left out; so no proxy can check it and none caches it."""
    payload = json.dumps({"schemaVersion": 1, "name": "library/s1", "tag": "1", "architecture": "amd64",
                          "fsLayers": [{"blobSum": layer}], "history": [{"v1Compatibility": "{}"}]}, indent=3).encode()
    length = payload.rindex(b"}")
    tail = base64.urlsafe_b64encode(payload[length:]).decode().rstrip("=")
    protected = base64.urlsafe_b64encode(json.dumps({"formatLength": length, "formatTail": tail}).encode())
    signatures = [{"header": {"alg": "ES256"}, "signature": "c2lnbmF0dXJl",
                   "protected": protected.decode().rstrip("=")}]
    body = payload[:length].rstrip() + b',\n   "signatures": ' + json.dumps(signatures).encode() + payload[length:]
    return body, payload


def test_an_image_whose_signed_schema_1_manifest_the_proxy_passes_on_uncached_fails_manifest_invalid_not_cached(
        fake, start):
    layer = fake.add_blob("library/s1", b"schema 1 layer " * 100)
    body, payload = signed_schema1(layer)
    fake.add_manifest("library/s1", "1", body, OCI_MANIFEST)
    fake.fault("registry", "/library/s1/manifests/", "framing", count=100,
               headers={"Content-Type": SCHEMA1_SIGNED, "Docker-Content-Digest": sha256(payload)})
    proxy = start("--upstream", f"docker={fake.url}")
    running, event = prefetch(proxy, "s1:1")
    error = error_of(event)
    assert error["code"] == "MANIFEST_INVALID" and "not cached" in error["message"], error
    assert running.events[-1]["event"] == "end"


# 3: a blob without a Content-Length #######################################

def test_a_blob_without_content_length_fails_with_that_reason_after_one_download(fake, start):
    image = fake.add_image("library/chunky", "1", [b"chunked layer " * 20000])
    layer = image["layers"][0]
    fake.fault("cdn", layer, "no_length", count=100)
    proxy = start("--upstream", f"docker={fake.url}")
    _, event = prefetch(proxy, "chunky:1")
    error = error_of(event)
    assert error["code"] == "UNAVAILABLE" and "without a Content-Length" in error["message"], error
    assert fake.count(server="cdn", method="GET", path_contains=layer) == 1


# 4: an index whose entry is an index ######################################

def test_an_index_whose_entry_is_an_index_fails_manifest_invalid_nested(fake, start):
    image = fake.add_image("library/nest", None, [b"nested layer " * 100])
    inner = index_of([{"mediaType": image["media_type"], "digest": image["digest"], "size": image["size"],
                       "platform": image["platform"]}])
    fake.add_manifest("library/nest", None, inner, OCI_INDEX)
    fake.add_manifest("library/nest", "1", index_of([{"mediaType": OCI_INDEX, "digest": sha256(inner),
                                                      "size": len(inner), "platform": image["platform"]}]), OCI_INDEX)
    proxy = start("--upstream", f"docker={fake.url}")
    _, event = prefetch(proxy, "nest:1")
    error = error_of(event)
    assert error["code"] == "MANIFEST_INVALID" and "nested" in error["message"], error


# 5: manifests no client could pull ########################################

A, B = sha256(b"a"), sha256(b"b")
CONFIG_DESCRIPTOR = descriptor(A, 10, OCI_CONFIG)
LAYER_DESCRIPTOR = descriptor(B, 20)
PLATFORM_ENTRY = {"mediaType": OCI_MANIFEST, "digest": A, "size": 10,
                  "platform": {"os": "linux", "architecture": "amd64"}}


def image_document(config=CONFIG_DESCRIPTOR, layers=(LAYER_DESCRIPTOR,), **changes):
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": list(layers)}
    document.update(changes)
    return {key: value for key, value in document.items() if value is not None}


BROKEN = {
    "a layer's size a string": image_document(layers=[{**LAYER_DESCRIPTOR, "size": "20"}]),
    "a layer's size negative": image_document(layers=[{**LAYER_DESCRIPTOR, "size": -1}]),
    "a layer's size missing": image_document(layers=[{"mediaType": OCI_LAYER, "digest": B}]),
    "a layer's size a bool": image_document(layers=[{**LAYER_DESCRIPTOR, "size": True}]),
    "a layer's digest in capitals": image_document(layers=[{**LAYER_DESCRIPTOR, "digest": B.upper()}]),
    "a layer's digest md5": image_document(layers=[{**LAYER_DESCRIPTOR, "digest": "md5:" + "0" * 32}]),
    "a layer's digest a list": image_document(layers=[{**LAYER_DESCRIPTOR, "digest": [B]}]),
    "a layer a string": image_document(layers=[B]),
    "layers not a list": {**image_document(), "layers": {"0": LAYER_DESCRIPTOR}},
    "the config missing": image_document(config=None),
    "the config's digest bad": image_document(config={**CONFIG_DESCRIPTOR, "digest": "sha256:x"}),
    "an index without manifests": {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []},
    "an index of strings": {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [A]},
    "an index's manifests an object": {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {"x": PLATFORM_ENTRY}},
    "an index entry's size a string": {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                       "manifests": [{**PLATFORM_ENTRY, "size": "10"}]},
    "a list": [],
    "a string": "x",
    "null": None,
    "a number": 123,
    "an empty object": {},
    "schemaVersion 2 alone": {"schemaVersion": 2},
    "schemaVersion 3": image_document(schemaVersion=3),
    "a schema 1 without fsLayers": {"schemaVersion": 1, "name": "library/x", "tag": "1"},
    "a schema 1 with a bad blobSum": {"schemaVersion": 1, "fsLayers": [{"blobSum": "sha256:x"}]},
}

PULLABLE = {
    "an image": image_document(),
    "an image without layers": image_document(layers=()),
    "an image with a foreign layer": image_document(layers=[{**LAYER_DESCRIPTOR, "urls": ["https://example.com/l"]}]),
    "an index": {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [PLATFORM_ENTRY]},
    "an index entry without a platform": {"schemaVersion": 2, "manifests": [{"digest": A, "size": 10}]},
    "a schema 1": {"schemaVersion": 1, "fsLayers": [{"blobSum": A}, {"blobSum": A}]},
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_manifest_problem_names_what_makes_a_manifest_unpullable(case):
    assert dockerproxy.manifest_problem(BROKEN[case])


@pytest.mark.parametrize("case", sorted(PULLABLE))
def test_manifest_problem_finds_nothing_in_a_pullable_manifest(case):
    assert dockerproxy.manifest_problem(PULLABLE[case]) == ""


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_image_whose_manifest_no_client_could_pull_fails_manifest_invalid(fake, start, case):
    fake.add_blob("library/broken", b"a")
    fake.add_blob("library/broken", b"b")
    media_type = OCI_INDEX if isinstance(BROKEN[case], dict) and "manifests" in BROKEN[case] else OCI_MANIFEST
    fake.add_manifest("library/broken", "1", json.dumps(BROKEN[case]).encode(), media_type)
    proxy = start("--upstream", f"docker={fake.url}")
    running, event = prefetch(proxy, "broken:1")
    assert error_of(event)["code"] == "MANIFEST_INVALID", event
    assert running.events[-1]["ok"] is False


# 6: a descriptor whose size is not its blob's ############################

@pytest.mark.parametrize("already", ["fetched", "cached"])
@pytest.mark.parametrize("lie", [+100, -100])
def test_a_layer_whose_manifest_size_is_not_its_real_size_fails_manifest_invalid_naming_both(
        fake, start, lie, already):
    layer = b"real bytes " * 1000
    config = fake.add_blob("library/lie", CONFIG)
    digest = fake.add_blob("library/lie", layer)
    fake.add_manifest("library/lie", "1", image_manifest(descriptor(config, len(CONFIG), OCI_CONFIG),
                                                         [descriptor(digest, len(layer) + lie)]), OCI_MANIFEST)
    proxy = start("--upstream", f"docker={fake.url}")
    if already == "cached":  # a client pulled the layer before: the prefetch only asks with a HEAD
        status, _, body = RegistryClient(proxy).request("GET", f"/v2/library/lie/blobs/{digest}")
        assert status == 200 and body == layer
        wait_until(lambda: proxy.cache.store.exists(digest), what="the layer stored")
    _, event = prefetch(proxy, "lie:1")
    error = error_of(event)
    assert error["code"] == "MANIFEST_INVALID", error
    assert re.search(rf"\b{len(layer)}\b", error["message"]) and re.search(rf"\b{len(layer) + lie}\b",
                                                                           error["message"]), error


# 7: a manifest nested deeper than the JSON parser goes ####################

DEEP = b"[" * 100000 + b"]" * 100000
DEEP_ANSWERS = {  # how upstream sends it: the fake's framing fault, and what a prefetch then says
    "as a manifest": (None, "MANIFEST_INVALID", "not JSON"),
    # (no media type: the proxy passes it on uncached, and that is what the prefetch says first)
    "without a Content-Type": ({"headers": {"Content-Type": None}}, "MANIFEST_INVALID", "not cached"),
    "with a digest it does not match": ({"headers": {"Docker-Content-Digest": sha256(b"other")}},
                                        "UNAVAILABLE", "upstream sent a manifest that is not"),
    "without a digest, ended by the close": ({"headers": {"Docker-Content-Digest": None}, "content_length": None},
                                             "UNAVAILABLE", "broke off a manifest"),
}


def add_deep(fake, answer):
    fake.add_manifest("library/deep", "1", DEEP, OCI_MANIFEST)
    framing = DEEP_ANSWERS[answer][0]
    if framing is not None:
        fake.fault("registry", "/library/deep/manifests/1", "framing", count=100, **framing)


def problems(caplog):
    """Log records of an internal error: ERROR and above, or any with a traceback."""
    return [f"{record.levelname} {record.getMessage()}" for record in caplog.records
            if record.levelno >= logging.ERROR or record.exc_info or "internal error" in record.getMessage()]


# (Without a Content-Type a client was answered before as now: the proxy parsed nothing.)
@pytest.mark.parametrize("answer", sorted(set(DEEP_ANSWERS) - {"without a Content-Type"}))
def test_a_client_pulling_a_manifest_nested_past_the_json_parser_gets_no_500_and_no_traceback(
        fake, start, caplog, answer):
    caplog.set_level(logging.DEBUG)
    add_deep(fake, answer)
    proxy = start("--upstream", f"docker={fake.url}")
    status, _, body = RegistryClient(proxy).request("GET", "/v2/library/deep/manifests/1",
                                                     {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
    assert status != 500, body[:300]
    assert problems(caplog) == []


@pytest.mark.parametrize("answer", sorted(DEEP_ANSWERS))
def test_a_prefetch_of_a_manifest_nested_past_the_json_parser_fails_with_a_clear_code_and_no_error_log(
        fake, start, caplog, answer):
    caplog.set_level(logging.DEBUG)
    add_deep(fake, answer)
    fake.add_image("library/fine", "1", [b"fine layer " * 100])
    proxy = start("--upstream", f"docker={fake.url}")
    running, event = prefetch(proxy, "deep:1", "fine:1")
    _, code, words = DEEP_ANSWERS[answer]
    error = error_of(event)
    assert error["code"] == code and words in error["message"], error
    assert running.image("docker.io/library/fine:1")["ok"] is True
    assert problems(caplog) == []


# Second attacker pass #######################################################

def test_a_cancel_while_a_manifest_is_awaited_sends_no_request_again_and_the_job_ends(start, fake):
    """cancel() shuts the connections down; the request waiting for its answer then saw what
    looks like a kept-alive connection's end, and was sent again on a new connection nobody
    closed, which waited for the whole stalled answer (second attacker pass)."""
    fake.add_image("library/slow", "1", [b"layer-bytes"])
    proxy = start("--upstream", f"docker={fake.url}", READ_TIMEOUT="60")
    fake.fault("registry", "/library/slow/manifests/1", "stall", count=10, timeout=60)
    running = Running(proxy, "slow:1")
    try:
        assert fake.wait_stalled(1, timeout=20)
        running.job.cancel()
        assert running.ended(timeout=20), "run() still waits for the stalled answer after cancel()"
        assert fake.stalled_count == 1  # the manifest was not asked again
        assert "raised" not in running.result and running.events[-1]["event"] == "end"
        assert running.image("docker.io/library/slow:1")["error"]["message"] == "prefetch cancelled"
    finally:
        fake.release.set()
