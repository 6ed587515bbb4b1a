"""The metrics count what happened, exactly (issue 11): after one cold pull, one
warm pull, one stale serve and one pull by eight clients that the upstream holds
until all eight have joined, every counter has the value the sequence implies;
the upstream's own request log is the witness for what reached it.  Also the
JSON log lines, /readyz, and the exposition's shape."""

import hashlib
import http.client
import json
import logging
import os
import re
import threading

import pytest

import dockerproxy
from conftest import MovableClock, RegistryClient, RunningProxy, raw_request
from realregistry import wait_until
from test_cache import ACCEPT_ALL, pull, rewind_tag_checks, settled

TOKEN = "metrics-test-token-0123456789"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(proxy):
    """/metrics as {(name, ((label, value), ...)): float}, once every request
    before it is counted: a request is counted after its last byte, and its
    connection's slot is given back after that."""
    wait_until(lambda: proxy.server.proxy.connections.count == 0, what="earlier requests counted")
    status, headers, body = proxy.request("GET", "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4"), body
    samples = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        key = (name, tuple(sorted(LABEL.findall(labels or ""))))
        assert key not in samples, f"series twice: {line!r}"
        samples[key] = float(value)
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples, name, **labels):
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= set(series))


class Tally:
    """What the test's clients saw: bytes of blob and manifest answers by cache outcome."""

    def __init__(self):
        self.bytes = {"hit": 0, "miss": 0, "stale": 0}
        self.lock = threading.Lock()

    def add(self, headers, body):
        with self.lock:
            self.bytes[headers["X-Cache"].lower()] += len(body)


@pytest.fixture
def metered(start_proxy, fake):
    return start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)


def counted_pull(client, tally, repository, tag):
    status, headers, body = client.request("GET", f"/v2/{repository}/manifests/{tag}", ACCEPT_ALL)
    assert status == 200, body
    tally.add(headers, body)
    manifest = json.loads(body)
    for digest in [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]:
        status, headers, blob = client.request("GET", f"/v2/{repository}/blobs/{digest}")
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == digest
        tally.add(headers, blob)
    settled(client.proxy)
    return len(body), manifest


def coalesced_pull(proxy, fake, client, tally, repository, digest, clients=8):
    """`clients` GETs of one blob; the upstream holds its body until all have joined the fill."""
    fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=100000)
    headers = {"Authorization": f"Bearer {client.token}"}
    results = []

    def get():
        results.append(RunningProxy(proxy.server).request("GET", f"/v2/{repository}/blobs/{digest}", headers))
    threads = [threading.Thread(target=get) for _ in range(clients)]
    for thread in threads:
        thread.start()
    assert fake.wait_stalled(1)

    def all_following():
        fills = proxy.cache.fills.in_flight()
        return len(fills) == 1 and fills[0].followers == clients
    wait_until(all_following, what=f"{clients} clients on one fill")
    fake.release.set()
    for thread in threads:
        thread.join(60)
    assert len(results) == clients
    for status, headers, body in results:
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
        tally.add(headers, body)
    settled(proxy)


def upstream_answers(fake):
    """The fake's log: {(method, code): count} of every answer it sent, on all three servers."""
    answers = {}
    for record in fake.requests:
        key = (record["method"], str(record["status"]))
        answers[key] = answers.get(key, 0) + 1
    return answers


def test_every_counter_after_a_cold_warm_stale_and_coalesced_pull(metered, fake):
    before = scrape(metered)
    tally = Tally()
    fake.add_image("library/app", "1", [b"layer one" * 100])
    big = fake.add_pattern_blob("library/app", 8 * 1024 * 1024, seed=11)
    client = RegistryClient(metered)

    manifest_size, manifest = counted_pull(client, tally, "library/app", "1")      # cold
    assert tally.bytes["hit"] == 0 and tally.bytes["stale"] == 0
    counted_pull(client, tally, "library/app", "1")                                # warm
    rewind_tag_checks(metered, metered.config.manifest_ttl + 1)
    fake.fault("registry", "/manifests/1", "status", status=503)
    status, headers, body = client.request("GET", "/v2/library/app/manifests/1", ACCEPT_ALL)  # stale
    assert status == 200 and headers["X-Cache"] == "STALE"
    tally.add(headers, body)
    coalesced_pull(metered, fake, client, tally, "library/app", big)               # 8 clients
    after = scrape(metered)

    small_blobs = sum(fake.blob_size(d) for d in [manifest["config"]["digest"]] +
                      [layer["digest"] for layer in manifest["layers"]])
    big_size = 8 * 1024 * 1024

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    # cache outcomes: manifest cold miss, warm hit, stale; blobs 2 cold misses, 2 warm hits, 8 on one fill
    assert {r: delta("dockerproxy_cache_requests_total", type="manifest", result=r)
            for r in dockerproxy.CACHE_RESULTS} == {"hit": 1, "miss": 1, "stale": 1, "bypass": 0}
    assert {r: delta("dockerproxy_cache_requests_total", type="blob", result=r)
            for r in dockerproxy.CACHE_RESULTS} == {"hit": 2, "miss": 2 + 8, "stale": 0, "bypass": 0}
    assert delta("dockerproxy_cache_fill_waiters_total") == 7
    assert delta("dockerproxy_cache_verify_failures_total") == 0
    assert delta("dockerproxy_cache_evictions_total") == 0
    # bytes to clients: what came from upstream for them (the cold pull, the fill's
    # first client) and what the cache gave (warm, stale, and the 7 who joined)
    assert delta("dockerproxy_cache_bytes_served_total", source="upstream") == \
        manifest_size + small_blobs + big_size == tally.bytes["miss"] - 7 * big_size
    assert delta("dockerproxy_cache_bytes_served_total", source="cache") == \
        tally.bytes["hit"] + tally.bytes["stale"] + 7 * big_size
    # the cache now: 3 blobs and 1 manifest
    assert value(after, "dockerproxy_cache_objects") == 4
    assert value(after, "dockerproxy_cache_size_bytes") == manifest_size + small_blobs + big_size
    assert value(after, "dockerproxy_fills_in_flight") == 0
    # distribution's counters
    assert {t: delta("registry_proxy_requests_total", type=t) for t in ("manifest", "blob")} == \
        {"manifest": 3, "blob": 12}
    assert {t: delta("registry_proxy_hits_total", type=t) for t in ("manifest", "blob")} == \
        {"manifest": 2, "blob": 2}
    assert {t: delta("registry_proxy_misses_total", type=t) for t in ("manifest", "blob")} == \
        {"manifest": 1, "blob": 10}
    assert delta("registry_proxy_pulled_bytes_total", type="blob") == small_blobs + big_size
    assert delta("registry_proxy_pulled_bytes_total", type="manifest") == manifest_size
    assert delta("registry_proxy_pushed_bytes_total") == sum(tally.bytes.values())
    # upstream: the fake's own log of answers is the witness, server by server
    answers = upstream_answers(fake)
    for (method, code), count in answers.items():
        assert delta("dockerproxy_upstream_requests_total", route="docker", method=method, code=code) == count, \
            (method, code, answers)
    assert delta("dockerproxy_upstream_requests_total") == sum(answers.values())
    assert delta("dockerproxy_upstream_errors_total", route="docker", kind="5xx") == 1
    assert delta("dockerproxy_upstream_errors_total") == 1
    assert delta("dockerproxy_upstream_bytes_total", route="docker") >= small_blobs + big_size + manifest_size
    # client requests by endpoint: each client GET once (and the token dance)
    assert delta("dockerproxy_http_requests_total", endpoint="manifest", code="200") == 3
    assert delta("dockerproxy_http_requests_total", endpoint="blob", code="200") == 2 + 2 + 8
    assert delta("dockerproxy_http_request_duration_seconds_count", endpoint="blob") == \
        delta("dockerproxy_http_requests_total", endpoint="blob")


# JSON log lines ############################################################

@pytest.fixture
def json_log():
    """The proxy's log as LOG_FORMAT=json writes it: a list of lines."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))
    handler = Collect()
    handler.setFormatter(dockerproxy.JsonLines())
    logger = logging.getLogger("dockerproxy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def readme_json_log_line():
    """The README's example of an access line in JSON."""
    readme = open(os.path.join(os.path.dirname(dockerproxy.__file__), "README.md"), encoding="utf-8").read()
    examples = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", readme, re.S) if '"level"' in block]
    assert len(examples) == 1
    return examples[0]


def test_json_log_lines_are_one_object_each_with_every_field(start_proxy, fake, json_log):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--trust-proxy-headers", "true")
    fake.add_image("library/app", "1", [b"layer"])
    client = RegistryClient(proxy)
    pull(client, "library/app", "1")
    pull(client, "library/app", "1")
    wait_until(lambda: proxy.server.proxy.connections.count == 0, what="every request logged")
    access = [json.loads(line) for line in json_log if '"status"' in line]
    assert access, json_log
    documented = readme_json_log_line()
    for line in access:
        assert set(line) == set(documented), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) and line["level"] == "info"
    manifests = [line for line in access if "/manifests/" in line["path"] and line["status"] == 200]
    assert [line["cache"] for line in manifests] == ["miss", "hit"]
    assert manifests[0]["upstream_status"] == 200 and manifests[0]["route"] == "docker"
    assert isinstance(manifests[0]["bytes"], int) and manifests[0]["bytes"] > 0


@pytest.mark.parametrize("head, hostile", [
    # a quote, a newline escape and a JSON-looking tail in the path, and its query's secret
    (b'GET /v2/x"}\x1b[31m/manifests/1?password=hunter2 HTTP/1.1\r\nHost: a\r\n\r\n', b"hunter2"),
    # a Host header that tries to close the object and start another
    (b'GET /healthz HTTP/1.1\r\nHost: h"}\r\n{"level":"error\r\n\r\n', None),
    # an X-Forwarded-For that is not an address (trusted proxy headers): the peer is logged
    (b'GET /healthz HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4", "level": "error\r\n\r\n', None),
    (b'G\x00T\x7f /v2/ HTTP/1.1\r\nHost: a\r\n\r\n', None),
])
def test_json_log_escapes_what_a_client_chose(start_proxy, json_log, head, hostile):
    proxy = start_proxy("--trust-proxy-headers", "true")
    raw_request(proxy, head)
    wait_until(lambda: any('"status"' in line for line in json_log), what="the access line")
    for line in json_log:
        assert "\n" not in line and "\x1b" not in line and "\x00" not in line
        parsed = json.loads(line)
        assert parsed["level"] in ("info", "warning")
        if "client" in parsed:
            assert parsed["client"] == "127.0.0.1"
        if hostile:
            assert hostile.decode() not in line


# /readyz ###################################################################

def test_ready_when_the_cache_is_writable_with_room(start_proxy):
    proxy = start_proxy(ADMIN_TOKEN=TOKEN)
    status, _, body = proxy.request("GET", "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready", "problems": []})


def test_not_ready_with_less_free_space_than_ready_min_free(start_proxy):
    free = dockerproxy.free_bytes(os.path.dirname(os.path.abspath(__file__)))
    proxy = start_proxy("--ready-min-free", str(free * 4 // 1024 + 1) + "K")
    status, _, body = proxy.request("GET", "/readyz")
    answer = json.loads(body)
    assert status == 503 and answer["status"] == "not ready"
    assert len(answer["problems"]) == 1 and "READY_MIN_FREE" in answer["problems"][0]
    assert proxy.request("GET", "/healthz")[0] == 200


def test_not_ready_when_the_cache_directory_cannot_be_written(start_proxy, tmp_path):
    proxy = start_proxy()
    root = proxy.cache.root
    moved = str(tmp_path / "moved-away")
    os.rename(root, moved)
    with open(root, "w") as blocker:  # a file where the directory was: root cannot write into it either
        blocker.write("not a directory")
    try:
        status, _, body = proxy.request("GET", "/readyz")
        assert status == 503 and "not writable" in json.loads(body)["problems"][0]
        assert proxy.request("GET", "/healthz")[0] == 200  # liveness never touches the disk
    finally:
        os.unlink(root)
        os.rename(moved, root)
    assert proxy.request("GET", "/readyz")[0] == 200
    assert not [name for name in os.listdir(root) if "ready" in name]  # the probe file is gone


def test_not_ready_while_draining(start_proxy):
    proxy = start_proxy()
    proxy.server.proxy.draining.set()
    status, _, body = proxy.request("GET", "/readyz")
    assert status == 503 and json.loads(body)["problems"] == ["shutting down"]
    assert proxy.request("GET", "/healthz")[0] == 200


# Counting under upstream faults (the broken-upstream review) ##############

from rawupstream import RawUpstream, response as raw_response  # noqa: E402

BLOB = os.urandom(5000)
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def raw_blob_upstream(status_line, headers, body, keep_open=True):
    """An upstream whose every blob GET gets these exact bytes; anything else 404."""
    def answer(request, connection):
        if "/blobs/" in request.path:
            connection.sendall(raw_response(status_line, headers, body))
            return keep_open
        connection.sendall(raw_response("404 Not Found", ["Content-Length: 2"], b"{}"))
        return True
    return RawUpstream(answer)


def blob_get_deltas(start_proxy, upstream, *argv):
    """(client status, X-Cache, {series: delta}) of one blob GET through a new proxy."""
    proxy = start_proxy("--upstream", f"docker={upstream.url}", *argv, ADMIN_TOKEN=TOKEN)
    before = scrape(proxy)
    try:
        status, headers, _ = proxy.request("GET", f"/v2/library/x/blobs/{BLOB_DIGEST}")
    except http.client.IncompleteRead:  # relayed as it came: cut short
        status, headers = "cut", {}
    after = scrape(proxy)
    changed = {key: after[key] - before.get(key, 0) for key in after
               if key[0].startswith(("dockerproxy_upstream_errors", "dockerproxy_cache_requests"))
               and after[key] != before.get(key, 0)}
    return status, headers.get("X-Cache"), changed


def series(name, **labels):
    return (name, tuple(sorted(labels.items())))


@pytest.mark.parametrize("argv", [(), ("--cache-dir", "")])
def test_a_ratelimit_header_of_superscript_digits_is_ignored_not_an_error(start_proxy, argv):
    """'²' passes str.isdigit() but not int(): it turned a good 200 into a 502."""
    headers = [f"Content-Length: {len(BLOB)}", f"Docker-Content-Digest: {BLOB_DIGEST}", "ratelimit-remaining: \xb2"]
    with raw_blob_upstream("200 OK", headers, BLOB) as upstream:
        status, _, changed = blob_get_deltas(start_proxy, upstream, *argv)
    assert status == 200
    assert not [key for key in changed if key[0] == "dockerproxy_upstream_errors_total"], changed


def test_an_error_answer_with_a_cut_body_is_one_error(start_proxy):
    with raw_blob_upstream("503 Service Unavailable", ["Content-Length: 100"], b"x" * 10, keep_open=False) as upstream:
        status, _, changed = blob_get_deltas(start_proxy, upstream)
    assert status in (502, 503, "cut")
    assert {key: value for key, value in changed.items() if key[0] == "dockerproxy_upstream_errors_total"} == {
        series("dockerproxy_upstream_errors_total", route="docker", kind="5xx"): 1}


def test_a_2xx_the_cache_does_not_keep_is_a_bypass(start_proxy):
    with raw_blob_upstream("203 Non-Authoritative Information", [f"Content-Length: {len(BLOB)}"], BLOB) as upstream:
        status, _, changed = blob_get_deltas(start_proxy, upstream)
    assert status == 203
    assert {key: value for key, value in changed.items() if key[0] == "dockerproxy_cache_requests_total"} == {
        series("dockerproxy_cache_requests_total", type="blob", result="bypass"): 1}


@pytest.mark.parametrize("fault", [
    {"kind": "framing", "content_length": [200000, 100]},        # two lengths: refused, once
    {"kind": "framing", "chunked": True, "content_length": 200000},
    {"kind": "redirect", "location": "{target}", "count": 20},   # a loop past MAX_REDIRECTS
    {"kind": "redirect", "location": "ftp://127.0.0.1/x"},       # a redirect the proxy refuses
])
def test_each_refused_upstream_answer_is_one_error(start_proxy, fake, fault):
    digest = fake.add_blob("library/x", BLOB)
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    client = RegistryClient(proxy)
    client.request("HEAD", f"/v2/library/x/blobs/{digest}")  # the token first
    fault = dict(fault)
    fake.fault("cdn", digest, fault.pop("kind"), count=fault.pop("count", 1), **fault)
    before = scrape(proxy)
    status, _, _ = client.request("GET", f"/v2/library/x/blobs/{digest}")
    after = scrape(proxy)
    assert status == 502
    assert total(after, "dockerproxy_upstream_errors_total") - total(before, "dockerproxy_upstream_errors_total") == 1


def test_upstream_status_codes_add_at_most_the_registered_ones():
    assert dockerproxy.status_label(404) == "404" and dockerproxy.status_label(429) == "429"
    assert {dockerproxy.status_label(code) for code in range(100, 600)} - {"other"} <= {
        str(code) for code in dockerproxy.REGISTERED_STATUSES}
    assert dockerproxy.status_label(599) == dockerproxy.status_label(1000) == "other"
    assert dockerproxy.status_label(0) == "none"


# Activity: pulls as the status page names them #############################

def served_request(when, endpoint, reference, size, cache="miss", client="10.0.0.7"):
    return dockerproxy.Served(when, client, "GET", endpoint, "docker", 200, size, 0.01, cache,
                              "upstream", False, "library/alpine", reference, 200)


def test_a_pull_whose_blob_is_counted_before_its_tag_is_named_by_the_tag():
    """Blobs come on other connections; one can end before the tag's request is
    counted.  The pull was then named without its tag, on the page and in the
    day's most pulled images (the browser review)."""
    clock = MovableClock()
    activity = dockerproxy.Activity(clock)
    route = dockerproxy.BUILTIN_ROUTES[0]
    now = clock.time()
    activity.served(served_request(now, "blob", "sha256:" + "b" * 64, 1000), route)
    activity.served(served_request(now + 0.01, "tag", "3.20", 500), route)
    activity.served(served_request(now + 0.02, "blob", "sha256:" + "c" * 64, 2000), route)
    document = activity.document(now + 1)
    assert [pull["image"] for pull in document["recent_pulls"]] == ["docker.io/library/alpine:3.20"]
    assert document["recent_pulls"][0]["bytes"] == 3500
    assert [(entry["image"], entry["pulls"], entry["bytes"]) for entry in document["top_images"]] == [
        ("docker.io/library/alpine:3.20", 1, 3500)]


@pytest.mark.parametrize("forwarded, logged", [
    ("10.0.0.7", "10.0.0.7"),
    ("1.2.3.4, 10.0.0.7", "10.0.0.7"),              # the last: the one our reverse proxy appended
    ("fe80::1%<img src=x onerror=alert(1)>", "fe80::1"),  # a zone (Python 3.9+ keeps it) is dropped
    ('10.0.0.7", "level": "error', "127.0.0.1"),    # not an address: the peer
    ("", "127.0.0.1"),
])
def test_the_client_address_behind_a_trusted_proxy(forwarded, logged):
    import email.message
    headers = email.message.Message()
    headers["X-Forwarded-For"] = forwarded
    assert dockerproxy.client_address("127.0.0.1", headers, True) == logged
    assert dockerproxy.client_address("127.0.0.1", headers, False) == "127.0.0.1"


# Cardinality ###############################################################

def test_ten_thousand_repository_names_add_no_series(metered, fake):
    """A client choosing names (and tags, digests, hosts) cannot grow /metrics:
    label values come from fixed sets.  A few requests first, so the status
    codes the names will get (401 without a token, 404 with one) have their
    series already: a code not seen before may add one."""
    client = RegistryClient(metered)
    client.request("GET", "/v2/warm/up/manifests/latest")
    headers = {"Authorization": f"Bearer {client.token}", "Host": metered.host}

    def ask(names):
        connection = http.client.HTTPConnection("127.0.0.1", metered.port, timeout=30)
        try:
            for number in names:
                kind = ("manifests/v%d" % number, "blobs/sha256:%064x" % number, "tags/list")[number % 3]
                connection.request("GET", f"/v2/lib/n{number}/{kind}", headers=headers)
                connection.getresponse().read()
        finally:
            connection.close()
    ask(range(3))                 # each kind's answer once
    scrape(metered)               # and a scrape's own series
    before = set(scrape(metered))
    ask(range(3, 10003))
    after = set(scrape(metered))
    assert after - before == set(), sorted(after - before)[:10]
    status = json.loads(metered.request("GET", "/status.json", {"Authorization": f"Bearer {TOKEN}"})[2])
    assert len(status["recent_pulls"]) <= dockerproxy.RECENT_PULLS
    assert len(status["top_images"]) <= dockerproxy.TOP_ROWS
