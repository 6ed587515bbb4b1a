"""A gentle upstream (issue 12, "Protection"), end to end over real sockets.

What this file proves, against the fake Docker Hub (or a raw upstream) on
127.0.0.1 and an in-process proxy whose clock the tests move:

* An upstream 429 is remembered per (upstream, client identity) until its
  Retry-After (delay-seconds or an HTTP date; 60 s when there is none):
  meanwhile cached content is served from the cache (a tag marked STALE) and
  anything else gets 429 TOOMANYREQUESTS with the time left, and in neither
  case is the upstream asked.  A client with credentials of its own is
  another identity and is not held back by the anonymous clients' 429.
* The circuit breaker: after 5 transport failures in a row the upstream is
  not tried for 5 s (503 and Retry-After, a cached tag served stale), then
  tried once, reopened for 10 s when that fails too, and closed by any
  answer.  /status.json and /metrics show it.
* MAX_UPSTREAM_REQUESTS (requests per upstream host awaiting their answer's
  head): requests beyond the limit queue (as many as the limit), more get
  503 with Retry-After: 1 at once, and the queued ones complete.  Slots never leak: not after a queue, nor after any
  of the upstream failures the fake can inject.  A request never waits for
  a slot it holds itself (a redirect target's token from the same host).
"""

import email.utils
import hashlib
import http.client
import http.server
import json
import threading
import urllib.parse

import pytest

from conftest import RegistryClient
from rawupstream import ScriptedUpstream, response
from realregistry import LoopbackServer, wait_until
from test_cache import ACCEPT_ALL, pull
from test_status import scrape, sample, status_json

RETRY_AFTER = 30              # what the upstream's 429 asks for, in seconds
PAST_ACCESS_TTL = 601         # past MANIFEST_TTL (60 s) and ACCESS_TTL (600 s)
PATIENT = "10"                # CONNECT_TIMEOUT, also how long a queued request waits for a slot
UNTIL_CLEARED = 1000          # a fault count no test exhausts: it lasts until clear_faults()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def error_code(body):
    return json.loads(body)["errors"][0]["code"]


def metric(proxy, name, *labels):
    return proxy.server.proxy.metrics.value(name, tuple(labels))


def upstream_errors(proxy, route="docker"):
    return proxy.server.proxy.metrics.total("dockerproxy_upstream_errors_total", route=route)


def netloc(url):
    return urllib.parse.urlsplit(url).netloc


def fake_hosts(fake):
    return [netloc(url) for url in (fake.url, fake.auth_url, fake.cdn_url)]


def add_image(fake, repo, label):
    """An image of two small layers whose bytes only `label` gives."""
    layers = [hashlib.shake_256(f"{label}-{n}".encode()).digest(40_000 + n) for n in range(2)]
    return fake.add_image(repo, "1", layers)


def cached_requests(image, repo):
    """The paths of everything a pull of `image` cached: tag, digest, blobs."""
    paths = [f"/v2/{repo}/manifests/1", f"/v2/{repo}/manifests/{image['digest']}"]
    return paths + [f"/v2/{repo}/blobs/{d}" for d in [image["config"]] + image["layers"]]


def slots_free(proxy, hosts):
    """No upstream request holds a MAX_UPSTREAM_REQUESTS slot of any of `hosts`
    (a slot is held from the request to its answer's head, whatever ends it)."""
    slots = proxy.upstreams.slots
    wait_until(lambda: all(slots.in_flight(host) == 0 for host in hosts), what="every upstream slot given back")


def waiting(proxy, host):
    # UpstreamSlots has no public count of its queue; the test must know the
    # queued request is there before it sends the one that finds the queue full.
    return proxy.upstreams.slots._waiting.get(host, 0)


def attempt(client, path, headers=None):
    """A request that may end in a cut body: its status, or the exception's name."""
    try:
        return client.request("GET", path, headers)[0]
    except (http.client.HTTPException, OSError) as err:
        return type(err).__name__


# Remembered upstream 429s ##################################################

def test_upstream_429_is_remembered_cache_answers_and_nothing_is_asked(proxy, fake):
    image = add_image(fake, "library/alpine", "alpine")
    add_image(fake, "library/busybox", "busybox")
    debian = add_image(fake, "library/debian", "debian")
    client = RegistryClient(proxy)
    pull(client, "library/alpine", "1")
    # Past ACCESS_TTL: without the 429, every cached object would cost a HEAD upstream.
    proxy.clock.advance(PAST_ACCESS_TTL)
    fault = fake.fault("registry", "/library/alpine/manifests/1", "status", status=429, retry_after=RETRY_AFTER)

    # The one request that meets the 429: its tag is served stale.
    status, headers, body = client.request("GET", "/v2/library/alpine/manifests/1", ACCEPT_ALL)
    assert fault.hits == 1
    assert status == 200 and headers["X-Cache"] == "STALE" and body == image["manifest"]

    # Ten requests for cached content: all from the cache, none upstream
    # (which would answer them: the fault was for one request only).
    before = len(fake.requests)
    for path in cached_requests(image, "library/alpine") * 2:
        status, headers, body = client.request("GET", path, ACCEPT_ALL)
        assert status == 200, (path, body)
        if path.endswith("/manifests/1"):
            assert headers["X-Cache"] == "STALE" and body == image["manifest"]
        else:
            assert sha256(body) == path.rsplit("/", 1)[1] == headers["Docker-Content-Digest"]
            assert headers["X-Cache"] == "HIT"
    assert len(fake.requests) == before, fake.requests[before:]

    # Uncached content, manifest or blob: 429 with the time left, nobody asked.
    held_back = metric(proxy, "dockerproxy_upstream_held_back_total", "docker", "429")
    for path in ("/v2/library/busybox/manifests/1", f"/v2/library/debian/blobs/{debian['layers'][0]}"):
        status, headers, body = RegistryClient(proxy).request("GET", path, ACCEPT_ALL)
        assert status == 429 and error_code(body) == "TOOMANYREQUESTS", body
        assert 1 <= int(headers["Retry-After"]) <= RETRY_AFTER
    assert len(fake.requests) == before, fake.requests[before:]
    assert metric(proxy, "dockerproxy_upstream_held_back_total", "docker", "429") == held_back + 2

    # A client with credentials of its own is another identity: it is asked for.
    fake.add_user("alice", "secret")
    alice = RegistryClient(proxy, "alice", "secret")
    assert alice.request("GET", "/v2/")[0] == 200  # docker's ping: the token comes with the credentials
    pull(alice, "library/debian", "1")
    assert fake.count(server="registry", path_contains="/library/debian/") > 0
    assert RegistryClient(proxy).request("GET", "/v2/library/busybox/manifests/1", ACCEPT_ALL)[0] == 429

    # Once Retry-After has passed, upstream is asked again.
    fake.clear_faults()
    proxy.clock.advance(RETRY_AFTER)
    before = len(fake.requests)
    pull(RegistryClient(proxy), "library/busybox", "1")
    assert fake.count(server="registry", path_contains="/library/busybox/") > 0
    assert len(fake.requests) > before


def test_http_date_retry_after_holds_back_until_that_date(proxy, fake):
    add_image(fake, "library/dated", "dated")
    # An HTTP date has whole seconds: this one is 29 to 30 s away.
    when = email.utils.formatdate(proxy.clock.time() + RETRY_AFTER, usegmt=True)
    fake.fault("registry", "/manifests/", "status", status=429, retry_after=when)
    assert RegistryClient(proxy).request("GET", "/v2/library/dated/manifests/1", ACCEPT_ALL)[0] == 429
    before = len(fake.requests)
    status, headers, body = RegistryClient(proxy).request("GET", "/v2/library/dated/manifests/1", ACCEPT_ALL)
    assert status == 429 and error_code(body) == "TOOMANYREQUESTS"
    assert RETRY_AFTER - 2 <= int(headers["Retry-After"]) <= RETRY_AFTER
    assert len(fake.requests) == before
    proxy.clock.advance(RETRY_AFTER)
    pull(RegistryClient(proxy), "library/dated", "1")
    assert len(fake.requests) > before


def test_429_without_retry_after_holds_back_for_60_seconds(start_proxy):
    # The fake always sends a Retry-After with its 429: a scripted upstream sends none.
    body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
    with ScriptedUpstream() as upstream:
        upstream.script["/v2/library/x/manifests/1"] = response(
            "429 Too Many Requests", ["Content-Type: application/json", f"Content-Length: {len(body)}",
                                      "Connection: close"], body)
        proxy = start_proxy("--upstream", f"docker={upstream.url}")

        def ask():
            status, headers, body = proxy.request("GET", "/v2/library/x/manifests/1", ACCEPT_ALL)
            assert status == 429, body
            return headers.get("Retry-After")

        ask()
        asked = len(upstream.requests)
        assert ask() == "60" and len(upstream.requests) == asked
        proxy.clock.advance(59)
        assert ask() == "1" and len(upstream.requests) == asked
        proxy.clock.advance(2)
        ask()
        assert len(upstream.requests) == asked + 1


# The circuit breaker #######################################################

class NotFound(http.server.BaseHTTPRequestHandler):
    """The upstream come back: a registry that knows no manifest."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format, *args):
        pass


def docker_route(proxy):
    [route] = [route for route in status_json(proxy, headers={})["routes"] if route["name"] == "docker"]
    return route


def circuit_gauge(proxy):
    samples, _ = scrape(proxy, headers={})
    return sample(samples, "dockerproxy_upstream_circuit_open", route="docker")


def fails_upstream(proxy, tag):
    """A request for an uncached tag that tries the upstream and fails."""
    errors = upstream_errors(proxy)
    status, _, body = proxy.request("GET", f"/v2/library/gone/manifests/{tag}", ACCEPT_ALL)
    assert status in (502, 504), body
    assert upstream_errors(proxy) == errors + 1


def held_back_by_circuit(proxy, tag):
    """A request for an uncached tag refused at once, the upstream not tried; its Retry-After."""
    errors = upstream_errors(proxy)
    held = metric(proxy, "dockerproxy_upstream_held_back_total", "docker", "circuit")
    status, headers, body = proxy.request("GET", f"/v2/library/gone/manifests/{tag}", ACCEPT_ALL)
    assert status == 503 and error_code(body) == "UNAVAILABLE", body
    assert upstream_errors(proxy) == errors
    assert metric(proxy, "dockerproxy_upstream_held_back_total", "docker", "circuit") == held + 1
    return int(headers["Retry-After"])


def test_circuit_opens_after_five_failures_and_any_answer_closes_it(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--admin-allow", "127.0.0.1",
                        "--connect-timeout", "1")
    image = add_image(fake, "library/alpine", "alpine")
    pull(RegistryClient(proxy), "library/alpine", "1")
    # The upstream goes away: its port is closed, a connection is refused at once.
    port = urllib.parse.urlsplit(fake.url).port
    fake.close()
    proxy.clock.advance(61)  # past MANIFEST_TTL: the cached tag would be checked upstream

    for n in range(5):
        fails_upstream(proxy, f"t{n}")
    assert 1 <= held_back_by_circuit(proxy, "t5") <= 5
    route = docker_route(proxy)
    assert route["circuit"]["failures_in_a_row"] == 5 and 0 < route["circuit"]["open_seconds"] <= 5
    assert circuit_gauge(proxy) == 1

    # The cached tag is served stale, without trying the upstream.
    errors = upstream_errors(proxy)
    status, headers, body = RegistryClient(proxy).request("GET", "/v2/library/alpine/manifests/1", ACCEPT_ALL)
    assert status == 200 and headers["X-Cache"] == "STALE" and body == image["manifest"]
    assert upstream_errors(proxy) == errors

    # After the back-off one request tries again; it fails: open twice as long.
    proxy.clock.advance(5)
    fails_upstream(proxy, "t6")
    assert 5 < held_back_by_circuit(proxy, "t7") <= 10
    assert 5 < docker_route(proxy)["circuit"]["open_seconds"] <= 10

    # The upstream comes back on its port: one answer closes the circuit.
    proxy.clock.advance(10)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), NotFound)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        status, _, body = proxy.request("GET", "/v2/library/gone/manifests/t8", ACCEPT_ALL)
        assert status == 404, body
        route = docker_route(proxy)
        assert route["circuit"] == {"open_seconds": 0, "failures_in_a_row": 0}
        assert circuit_gauge(proxy) == 0
    finally:
        server.shutdown()
        server.server_close()


# MAX_UPSTREAM_REQUESTS #####################################################

def get_blob(client, repo, digest, results):
    status, _, body = client.request("GET", f"/v2/{repo}/blobs/{digest}")
    results[digest] = (status, sha256(body))


def test_requests_beyond_the_limit_queue_and_beyond_the_queue_get_503(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--max-upstream-requests", "1",
                        "--connect-timeout", PATIENT)
    repo = "library/slots"
    first, second, third = (fake.add_blob(repo, hashlib.shake_256(b"%d" % n).digest(200_000)) for n in range(3))
    token_holder = RegistryClient(proxy)
    assert token_holder.request("GET", f"/v2/{repo}/tags/list")[0] == 200

    def client():
        one = RegistryClient(proxy)
        one.token = token_holder.token  # no token dance: each request is one blob GET
        return one

    registry, cdn = netloc(fake.url), netloc(fake.cdn_url)
    fake.fault("cdn", first, "stall")
    results, threads = {}, []
    for digest in (first, second):
        threads.append(threading.Thread(target=get_blob, args=(client(), repo, digest, results)))
        threads[-1].start()
        if digest == first:
            assert fake.wait_stalled(1), "the first blob's CDN GET stalled"
            # It holds the CDN's one slot; the registry's came back at the redirect.
            wait_until(lambda: proxy.upstreams.slots.in_flight(registry) == 0, what="registry slot back")
            assert proxy.upstreams.slots.in_flight(cdn) == 1
    wait_until(lambda: waiting(proxy, cdn) == 1, what="the second blob queued for the CDN")

    busy = metric(proxy, "dockerproxy_upstream_held_back_total", "docker", "busy")
    status, headers, body = client().request("GET", f"/v2/{repo}/blobs/{third}")
    assert status == 503 and error_code(body) == "UNAVAILABLE" and headers["Retry-After"] == "1", body
    assert fake.count(server="cdn", path_contains=third) == 0
    assert metric(proxy, "dockerproxy_upstream_held_back_total", "docker", "busy") == busy + 1

    fake.release.set()
    for thread in threads:
        thread.join(30)
    assert results == {first: (200, first), second: (200, second)}
    slots_free(proxy, fake_hosts(fake))

    # A leaked slot would turn these into 503s.
    for n in range(20):
        add_image(fake, f"library/seq{n}", f"seq{n}")
        pull(RegistryClient(proxy), f"library/seq{n}", "1")
    slots_free(proxy, fake_hosts(fake))


class OneHostRegistry(http.server.BaseHTTPRequestHandler):
    """A registry with its token realm on its own host (as ghcr.io and quay.io
    have): GET /token gives a token, a blob GET without it gets 401."""

    protocol_version = "HTTP/1.1"
    TOKEN = "one-host-token"

    def do_GET(self):
        blobs = self.server.owner.blobs
        host = "127.0.0.1:%d" % self.server.server_address[1]
        if self.path.startswith("/token"):
            return self.answer(200, json.dumps({"token": self.TOKEN}).encode())
        if self.headers.get("Authorization") != f"Bearer {self.TOKEN}":
            challenge = f'Bearer realm="http://{host}/token",service="one-host"'
            return self.answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', [("WWW-Authenticate", challenge)])
        return self.answer(200, blobs[self.path.rsplit("/", 1)[1]])

    def answer(self, status, body, headers=()):
        self.send_response(status)
        for name, value in [("Content-Length", str(len(body)))] + list(headers):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def test_a_token_request_never_waits_for_a_slot_its_own_request_holds(start_proxy, fake):
    # The upstream redirects a blob GET to a registry that asks for a token
    # whose realm is on that registry's own host: the proxy must not hold its
    # slot there (the 401 in hand) while it asks that host for the token, or
    # with one slot per host the pull waits out CONNECT_TIMEOUT and fails.
    target = LoopbackServer(OneHostRegistry)
    try:
        data = b"a layer kept by a registry with its realm on its own host"
        digest = sha256(data)
        target.blobs = {digest: data}
        fake.auth_required = False
        fake.add_blob("library/pause", data)
        fake.redirect_location = lambda digest, repo: f"{target.url}/v2/images/pause/blobs/{digest}"
        proxy = start_proxy("--upstream", f"docker={fake.url}", "--max-upstream-requests", "1",
                            "--connect-timeout", "2")
        status, _, body = proxy.request("GET", f"/v2/library/pause/blobs/{digest}")
        assert (status, body) == (200, data), body
        slots_free(proxy, fake_hosts(fake) + [target.host])
    finally:
        target.stop()


# Upstream failure kind -> (server, what it strikes, fault options), each met by one request.
FAILURES = {
    "truncate": ("cdn", "layer", {"kind": "truncate", "nbytes": 1000}),
    "reset": ("cdn", "layer", {"kind": "reset", "nbytes": 1000}),
    "corrupt": ("cdn", "layer", {"kind": "corrupt"}),
    "close": ("registry", "manifest", {"kind": "close"}),
    "500": ("registry", "manifest", {"kind": "status", "status": 500}),
    "429": ("registry", "manifest", {"kind": "status", "status": 429, "retry_after": RETRY_AFTER}),
    # lengths that disagree: the answer is refused as it is parsed, before it can hold a slot
    "framing": ("registry", "manifest", {"kind": "framing", "content_length": [10, 20]}),
    # silent past READ_TIMEOUT (1 s here); the fake gives up on its own a little later
    "timeout": ("registry", "manifest", {"kind": "stall", "timeout": 3}),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_no_slot_leaks_after_an_upstream_failure(start_proxy, fake, failure):
    # One slot per host and a short wait for it: a leaked slot turns the pulls below into 503s.
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--max-upstream-requests", "1",
                        "--connect-timeout", "2", "--read-timeout", "1")
    repo = "library/failing"
    image = add_image(fake, repo, failure)
    server, strikes, options = FAILURES[failure]
    options = dict(options)
    kind = options.pop("kind")
    if failure == "429":
        # Met by a client with its own credentials: the anonymous pull below is another identity.
        fake.add_user("alice", "secret")
        client = RegistryClient(proxy, "alice", "secret")
        assert client.request("GET", "/v2/")[0] == 200
    else:
        client = RegistryClient(proxy)
        assert client.request("GET", f"/v2/{repo}/tags/list")[0] == 200  # the token, before the fault
    if strikes == "layer":
        target, path = image["layers"][0], f"/v2/{repo}/blobs/{image['layers'][0]}"
    else:
        target, path = "/manifests/", f"/v2/{repo}/manifests/1"
    fault = fake.fault(server, target, kind, count=UNTIL_CLEARED, **options)
    outcome = attempt(client, path, ACCEPT_ALL)
    assert fault.hits >= 1 and outcome != 200, outcome
    if failure == "429":
        assert attempt(client, path, ACCEPT_ALL) == 429  # held back, for that client only
    proxy.cache.wait_idle()
    slots_free(proxy, fake_hosts(fake))
    fake.clear_faults()

    pull(RegistryClient(proxy), repo, "1")
    pull(RegistryClient(proxy), repo, "1")  # from the cache this time, after the same checks
    slots_free(proxy, fake_hosts(fake))
