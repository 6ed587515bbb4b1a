"""Prefetch after the hostile-client review: one test per finding.

Each test failed on the code before the review's fixes (abc34a8): an image
outside the route table or with an odd index entry cut the whole prefetch;
platform lists and repeated images were not bounded; --proxy printed a hostile
proxy's bytes raw and died on odd URLs and events; an upstream's newline
forged a line of the log view; registry hosts were not checked; prefetches
were not held to half of MAX_FILLS; admin prefetches kept keep-warm out."""

import http.client
import http.server
import json
import logging
import threading

import pytest

import dockerproxy
from rawupstream import RawUpstream, response
from realregistry import wait_until
from test_prefetch import BEARER, TOKEN, blobs_of, ndjson, prefetch_command, run_command, status_document, stored_whole

JSON_BEARER = {**BEARER, "Content-Type": "application/json"}


@pytest.fixture
def start(start_proxy):
    """start_proxy (whose teardown ends keep-warm threads and prefetches)."""
    return start_proxy


def admin_prefetch(proxy, images, **fields):
    """POST /admin/prefetch with the admin token, read to its end: (status, events or the error body)."""
    try:
        status, _, body = proxy.request("POST", "/admin/prefetch", JSON_BEARER,
                                        json.dumps({"images": images, **fields}).encode(), timeout=30)
    except http.client.IncompleteRead as err:
        pytest.fail(f"the NDJSON stream was cut before its end: {err.partial!r}")
    return status, (ndjson(body) if status == 200 else json.loads(body))


def image_events(events):
    return {event["image"]: event for event in events if event["event"] == "image"}


def tracebacks(caplog):
    """Log records that carry an exception (a traceback in the proxy's log)."""
    return [record.getMessage() for record in caplog.records if record.exc_info]


# 1: an image whose registry is not in the route table ######################

UNROUTED = "evil.example.com/a/b:1"


def test_admin_prefetch_fails_an_unrouted_registry_denied_and_streams_the_others_to_the_end_event(fake, start):
    good = fake.add_image("library/alpine", "1", [b"alpine layer " * 50])
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    status, events = admin_prefetch(proxy, [UNROUTED, "alpine:1"])
    assert status == 200, events
    assert events[-1]["event"] == "end" and events[-1]["ok"] is False and events[-1]["failed"] == 1, events
    images = image_events(events)
    assert images[UNROUTED]["ok"] is False
    assert images[UNROUTED]["error"]["code"] == "DENIED"
    assert "evil.example.com" in images[UNROUTED]["error"]["message"]
    assert images["docker.io/library/alpine:1"]["ok"] is True
    assert all(stored_whole(proxy.cache.root, digest) for digest in blobs_of(good))


def test_keep_warm_still_fetches_the_images_after_an_unrouted_line(fake, start, tmp_path):
    warm = fake.add_image("library/warm", "1", [b"warm layer " * 50])
    listing = tmp_path / "prefetch.txt"
    listing.write_text(f"{UNROUTED}\nwarm:1\n")
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN, PREFETCH_FILE=str(listing),
                  PREFETCH_INTERVAL="0")

    def rounds():
        return [job for job in status_document(proxy)["prefetches"]
                if job["source"] == "keep-warm" and job["ended"] is not None]
    wait_until(rounds, what="the keep-warm round")
    assert all(stored_whole(proxy.cache.root, digest) for digest in blobs_of(warm))
    [job] = rounds()
    assert job["ok"] is False and job["failed"] == 1 and job["images_done"] == 2, job


def test_the_command_names_an_unrouted_registry_denied_and_exits_1_without_a_traceback(fake, tmp_path):
    fake.add_image("library/alpine", "1", [b"alpine layer " * 50])
    result = prefetch_command(tmp_path, fake, tmp_path / "cache", UNROUTED, "alpine:1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"{UNROUTED}: failed: DENIED: " in result.stdout, result.stdout
    assert "docker.io/library/alpine:1: done, 2 blobs fetched" in result.stdout, result.stdout


# 2: an upstream index entry whose mediaType cannot go into a header ##########

def test_an_index_entry_media_type_with_crlf_or_non_latin1_fails_or_passes_that_image_alone(fake, start, tmp_path,
                                                                                          caplog):
    caplog.set_level(logging.INFO, "dockerproxy")
    for repo, media_type in (("library/crlf", "application/vnd.x\r\nX-Injected: 1"),
                             ("library/snowman", "application/vnd.\u2603")):
        child = fake.add_image(repo, None, [repo.encode() * 50])
        fake.add_index(repo, "1", [(child["digest"], child["size"], media_type, child["platform"])])
    fake.add_image("library/after", "1", [b"after layer " * 50])
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    status, events = admin_prefetch(proxy, ["crlf:1", "snowman:1", "after:1"])
    assert status == 200, events
    assert events[-1]["event"] == "end", events
    images = image_events(events)
    assert sorted(images) == ["docker.io/library/after:1", "docker.io/library/crlf:1", "docker.io/library/snowman:1"]
    assert images["docker.io/library/after:1"]["ok"] is True
    for name in ("docker.io/library/crlf:1", "docker.io/library/snowman:1"):
        error = images[name].get("error")
        assert images[name]["ok"] is True or (error["code"] != "UNKNOWN" and error["message"]), images[name]
    assert tracebacks(caplog) == []
    result = prefetch_command(tmp_path, fake, tmp_path / "command-cache", "crlf:1")  # not the proxy's cache
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr
    assert "docker.io/library/crlf:1: " in result.stdout, result.stdout


# 3: amplification: platforms and repeated images ############################

def test_admin_prefetch_of_more_than_16_distinct_platforms_is_refused_name_invalid(fake, start):
    fake.add_image("library/app", "1", [b"app layer " * 50])
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    platforms = [f"linux/arch{number}" for number in range(570)]
    status, answer = admin_prefetch(proxy, ["app:1"], platforms=platforms)
    assert status == 400, answer
    assert answer["errors"][0]["code"] == "NAME_INVALID"
    assert fake.count(path_contains="/manifests/") == 0


def test_admin_prefetch_of_one_image_named_1000_times_runs_it_once(fake, start):
    fake.add_image("library/app", "1", [b"app layer " * 50])
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    spellings = ["app:1", "library/app:1", "docker.io/library/app:1", "index.docker.io/library/app:1"]
    status, events = admin_prefetch(proxy, spellings * 250)
    assert status == 200, events
    assert events[0]["event"] == "start" and events[0]["images"] == ["docker.io/library/app:1"]
    assert [event["image"] for event in events if event["event"] == "image"] == ["docker.io/library/app:1"]
    assert events[-1]["event"] == "end" and events[-1]["ok"] is True and events[-1]["images"] == 1


# 4: the command with --proxy against a hostile "proxy" #######################

class HostileProxy:
    """A "proxy" for --proxy on 127.0.0.1: every POST answered with `status`, `content_type` and `body`."""

    def __init__(self, status, content_type, body):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append(self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.posts = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile_proxy():
    started = []

    def run(status, content_type, body):
        started.append(HostileProxy(status, content_type, body))
        return started[-1]
    yield run
    for server in started:
        server.close()


def test_the_command_escapes_a_proxy_refusal_with_terminal_escapes_and_a_newline(hostile_proxy, tmp_path):
    message = "\x1b]0;owned-title\x07\x1b[2J\x1b[31mRED\nforged: a line of its own"
    body = json.dumps({"errors": [{"code": "DENIED", "message": message}]}).encode()
    proxy = hostile_proxy(401, "application/json", body)
    result = run_command(tmp_path, "prefetch", "alpine:1", "--proxy", proxy.url, ADMIN_TOKEN=TOKEN)
    assert proxy.posts == ["/admin/prefetch"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "\x1b" not in result.stdout + result.stderr and "\x07" not in result.stdout + result.stderr
    assert f"{proxy.url} refused: DENIED: " in result.stderr, result.stderr
    assert not any(line.startswith("forged") for line in result.stderr.splitlines()), result.stderr


@pytest.mark.parametrize("stream", [
    b"[1,2]\n",
    b'"an event"\n{"event":"end","ok":true}\n',
    b'{"event":"image"}\n{"event":"end","ok":true}\n',
    b'{"event":"resolved","image":"docker.io/library/alpine:1"}\n{"event":"end","ok":true}\n',
], ids=["not an object", "a string", "image event missing fields", "resolved event missing fields"])
def test_the_command_exits_1_without_a_traceback_on_a_proxy_stream_of_non_events(hostile_proxy, tmp_path, stream):
    proxy = hostile_proxy(200, "application/x-ndjson", stream)
    result = run_command(tmp_path, "prefetch", "alpine:1", "--proxy", proxy.url, ADMIN_TOKEN=TOKEN)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"dockerproxy.py prefetch: {proxy.url}" in result.stderr, result.stderr


# 5: an upstream's error message with a newline ##############################

def test_an_upstream_error_message_with_a_newline_stays_on_one_line_of_the_log_view(tmp_path):
    forged = "docker.io/library/alpine:1: done, 7 blobs fetched, 0 cached"
    body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": f"manifest unknown\n{forged}"}]}).encode()

    def answer(request, connection):
        connection.sendall(response("404 Not Found", ["Content-Type: application/json",
                                                      f"Content-Length: {len(body)}", "Connection: close"], body))
        return False
    with RawUpstream(answer) as upstream:
        result = run_command(tmp_path, "prefetch", "alpine:1", "--cache-dir", str(tmp_path / "cache"),
                             "--upstream", f"docker={upstream.url}")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"docker.io/library/alpine:1: failed: MANIFEST_UNKNOWN: manifest unknown\\n{forged}" in lines, lines
    assert not any(line.startswith(forged) for line in lines), lines
    assert not any(line.startswith(forged) for line in result.stderr.splitlines()), result.stderr


# 6: registry hosts ##########################################################

@pytest.mark.parametrize("text", [
    "\x1b[31m.x/a",
    'a"b.c/x',
    "host.x:99999999/a",
    "host.x:65536/a",
    "bad_host.x/a",
], ids=["escape", "quote", "port too long", "port over 65535", "underscore"])
def test_parse_image_reference_refuses_a_registry_that_is_not_a_host_and_port(text):
    with pytest.raises(ValueError):
        dockerproxy.parse_image_reference(text)


# 7: bad --proxy URLs ########################################################

@pytest.mark.parametrize("url", [
    "http://[::1",
    "http://127.0.0.1:notaport",
    "http://u:p@127.0.0.1:1",
], ids=["open IPv6 bracket", "port not a number", "user and password"])
def test_the_command_exits_2_naming_a_bad_proxy_url_without_a_traceback(tmp_path, url):
    result = run_command(tmp_path, "prefetch", "alpine:1", "--proxy", url, ADMIN_TOKEN=TOKEN)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "dockerproxy.py prefetch: error: --proxy " in result.stderr, result.stderr


# 8: all prefetches share half of MAX_FILLS ##################################

def test_a_prefetch_downloads_at_most_half_of_max_fills_blobs_at_once(fake, start):
    image = fake.add_image("library/wide", "1", [b"wide layer one " * 100, b"wide layer two " * 100,
                                                 b"wide layer three " * 100])
    assert len(blobs_of(image)) == 4
    fake.fault("cdn", "/blobs/", "stall", count=4)  # every download held until release
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN, MAX_FILLS="4", PREFETCH_PARALLEL="4")
    answers = []
    request = threading.Thread(target=lambda: answers.append(admin_prefetch(proxy, ["wide:1"])))
    request.start()
    try:
        assert fake.wait_stalled(2)
        # 4 workers, 4 blobs: a third download would reach the CDN at once.
        assert not fake.wait_stalled(3, timeout=1.0)
        assert fake.count(server="cdn", method="GET") == 2
    finally:
        fake.release.set()
        request.join(60)
    [(status, events)] = answers
    assert status == 200 and events[0]["parallel"] == 4, events
    assert events[-1]["event"] == "end" and events[-1]["ok"] is True and events[-1]["fetched"] == 4, events
    assert all(fake.count(server="cdn", method="GET", path=f"/blobs/{digest}") == 1 for digest in blobs_of(image))


# 9: keep-warm and admin prefetches ##########################################

class Job:
    """What Prefetches.begin reads of a job."""

    def __init__(self, source):
        self.source = source


def test_keep_warm_is_admitted_while_four_admin_prefetches_run_and_a_fifth_admin_is_not():
    prefetches = dockerproxy.Prefetches()
    for _ in range(4):
        prefetches.begin(Job("admin"))
    prefetches.begin(Job("keep-warm"))
    with pytest.raises(dockerproxy.RegistryError) as refused:
        prefetches.begin(Job("admin"))
    assert refused.value.status == 503 and refused.value.code == "UNAVAILABLE"


def test_the_command_exits_2_naming_a_bad_prefetch_file_of_its_settings_without_a_traceback(tmp_path):
    """PREFETCH_FILE comes with the server's settings (.env, environment): the command builds the
    proxy's parts, which read it; a bad one is a bad argument, not a crash (final read)."""
    listed = tmp_path / "prefetch.txt"
    listed.write_text("Alpine:1\n")
    result = run_command(tmp_path, "prefetch", "alpine:1", "--cache-dir", str(tmp_path / "cache"),
                         "--prefetch-file", str(listed))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert "prefetch.txt" in result.stderr and "line 1" in result.stderr
