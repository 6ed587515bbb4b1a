"""Per-client rate limits and the access policy (issue 12, "Protection"), end
to end over real sockets.

What this file proves, against the fake Docker Hub (and two more fakes for
other routes) on 127.0.0.1, with an in-process proxy whose clock only the
tests move, or a real process for SIGHUP:

* RATE_LIMIT_REQUESTS: a client's bucket holds one minute's allowance; the
  request past it gets 429 TOOMANYREQUESTS and a Retry-After, after which it
  is admitted (and not before); /healthz, /health, /readyz and /metrics are
  never counted.
* RATE_LIMIT_BYTES: the download that crosses the limit is delivered whole
  (relayed or from the cache); the next request gets 429 until its
  Retry-After has passed.
* RATE_LIMIT_TRANSFERS: while one blob download is held upstream, a second
  one from the same client gets 429 at once and is never asked upstream
  (a HEAD is no download); the first completes with every byte right, and
  after it another download is admitted.
* RATE_LIMIT_EXEMPT lifts the limits.  TRUSTED_PROXIES gives each
  X-Forwarded-For client its own bucket, and an address a client writes to
  the left of its own changes nothing; from a peer not trusted the header is
  ignored.  IPv6 clients share a bucket per /64.
* ALLOW_CLIENTS: every path but the probes gets 403 DENIED (BLOCK_MESSAGE as
  its message) without any upstream request; a client the trusted proxy
  names inside the list is served.
* ALLOW_IMAGES / DENY_IMAGES: every way to ask for a refused image (manifest
  by tag or digest, blob, tag list, referrers, path prefixes, ?ns=, a token
  by GET or POST) gets 403 DENIED with no upstream request, even when the
  cache holds it; allowed images pull; patterns name each route's registry
  (docker.io, ghcr.io, an EXTRA_ROUTES host:port).
* SIGHUP re-reads an @file of patterns; a bad or missing file keeps the old
  ones; SIGTERM then exits 0.
* dockerproxy_client_refusals_total counts each refusal once, by reason, and
  dockerproxy_ratelimit_clients the clients with a budget.
"""

import hashlib
import json
import signal
import threading
import time
import urllib.parse

import pytest

import dockerproxy
from conftest import RegistryClient, start_proxy_process
from fakeregistry import FakeRegistry
from realregistry import free_port, wait_until
from test_cache import ACCEPT_ALL, pull
from test_status import counted, sample, scrape

MIB = 1024 * 1024
SERVICE = FakeRegistry.service
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# Helpers ###################################################################

def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def netloc(url):
    return urllib.parse.urlsplit(url).netloc


def still(proxy):
    """Stop the proxy's clock: from now on only advance() moves it, so a bucket
    refills when the test says, never by the milliseconds a slow machine takes."""
    clock, at_time, at_monotonic = proxy.clock, time.time(), time.monotonic()
    clock.time = lambda: at_time + clock.offset
    clock.monotonic = lambda: at_monotonic + clock.offset


def limited(start_proxy, fake, *flags):
    """A proxy on the fake with `flags`, its clock still, /metrics open, and
    /readyz ready whatever this machine's disk holds."""
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--metrics-public", "true",
                        "--ready-min-free", "1", *flags)
    still(proxy)
    return proxy


def open_image(fake, repo="library/alpine"):
    """A small image, on a fake that asks no token: each GET below is one
    request to the proxy, with no token dance to count."""
    fake.auth_required = False
    return fake.add_image(repo, "1", [b"the layer of " + repo.encode()])


def error(body):
    [only] = json.loads(body)["errors"]
    return only


def too_many(answer, limit):
    """Assert a 429 TOOMANYREQUESTS for `limit`; its Retry-After in seconds."""
    status, headers, body = answer
    assert status == 429, body
    assert error(body)["code"] == "TOOMANYREQUESTS" and error(body)["detail"] == {"limit": limit}, body
    assert headers["Retry-After"].isdigit() and int(headers["Retry-After"]) >= 1, headers["Retry-After"]
    return int(headers["Retry-After"])


def denied(answer, detail, message=None):
    """Assert a 403 DENIED with `detail` (and `message`, if given)."""
    status, _, body = answer
    assert status == 403, body
    assert error(body)["code"] == "DENIED" and error(body)["detail"] == detail, body
    assert message is None or error(body)["message"] == message, body


def forwarded(address):
    return {"X-Forwarded-For": address}


def exhaust(proxy, path, allowance, headers=None):
    """`allowance` GETs of `path` admitted, the next refused: the whole bucket
    of whoever `headers` make the client."""
    headers = {**ACCEPT_ALL, **(headers or {})}
    for n in range(allowance):
        status, _, body = proxy.request("GET", path, headers)
        assert status == 200, (n, headers, body)
    too_many(proxy.request("GET", path, headers), "RATE_LIMIT_REQUESTS")


def status_of(proxy, path, headers=None):
    return proxy.request("GET", path, {**ACCEPT_ALL, **(headers or {})})[0]


class Download(threading.Thread):
    """A blob GET in a thread: its status and the digest of what it received."""

    def __init__(self, proxy, path, headers=None):
        super().__init__(daemon=True)
        self.proxy, self.path, self.headers = proxy, path, headers
        self.result = None

    def run(self):
        status, _, body = self.proxy.request("GET", self.path, self.headers)
        self.result = (status, len(body), sha256(body))


def refusals(proxy, headers=None):
    """dockerproxy_client_refusals_total by reason, and the limiter's clients, as /metrics shows them."""
    samples, _ = scrape(proxy, headers=headers or {})
    reasons = ("requests", "bytes", "transfers", "client", "image")
    counts = {reason: sample(samples, "dockerproxy_client_refusals_total", reason=reason) for reason in reasons}
    return counts, sample(samples, "dockerproxy_ratelimit_clients")


# 1. RATE_LIMIT_REQUESTS ####################################################

def test_the_request_past_a_minutes_allowance_gets_429_until_its_retry_after(start_proxy, fake):
    image = open_image(fake)
    proxy = limited(start_proxy, fake, "--rate-limit-requests", "20")
    manifest = f"/v2/library/alpine/manifests/{image['digest']}"
    for n in range(20):  # the first fills the cache, the others are hits: all count
        status, _, body = proxy.request("GET", manifest, ACCEPT_ALL)
        assert status == 200 and body == image["manifest"], (n, body)
    retry_after = too_many(proxy.request("GET", manifest, ACCEPT_ALL), "RATE_LIMIT_REQUESTS")
    assert retry_after == 3  # one request of 20 a minute: 3 s (the clock stands still)
    assert status_of(proxy, "/v2/") == 429  # /v2/ is a registry request too
    # The probes and /metrics are not the registry API: never counted, never refused.
    for path in ("/healthz", "/health", "/readyz", "/metrics") * 3:
        assert proxy.request("GET", path)[0] == 200, path

    proxy.clock.advance(retry_after - 1)  # not before
    too_many(proxy.request("GET", manifest, ACCEPT_ALL), "RATE_LIMIT_REQUESTS")
    proxy.clock.advance(1)
    status, _, body = proxy.request("GET", manifest, ACCEPT_ALL)
    assert status == 200 and body == image["manifest"]
    # Three seconds refilled one request, no more.
    too_many(proxy.request("GET", manifest, ACCEPT_ALL), "RATE_LIMIT_REQUESTS")
    assert refusals(proxy)[0]["requests"] == 4


# 2. RATE_LIMIT_BYTES #######################################################

def test_the_download_that_crosses_the_byte_limit_is_whole_and_the_next_request_waits(start_proxy, fake):
    image = open_image(fake)
    big = fake.add_pattern_blob("library/alpine", 4 * MIB, seed=21)
    proxy = limited(start_proxy, fake, "--rate-limit-bytes", "1M")
    manifest, blob = f"/v2/library/alpine/manifests/{image['digest']}", f"/v2/library/alpine/blobs/{big}"
    assert status_of(proxy, manifest) == 200  # a few hundred bytes of the 1 MiB
    status, _, body = proxy.request("GET", blob)  # relayed as it is filled: 4 MiB, never cut at 1
    assert (status, len(body), sha256(body)) == (200, 4 * MIB, big)
    counted(proxy)  # the bytes are counted when the answer ends, after its last byte left

    retry_after = too_many(proxy.request("GET", manifest, ACCEPT_ALL), "RATE_LIMIT_BYTES")
    # 3 MiB over an allowance of 1 MiB an hour: three hours to pay it back
    assert 3 * 3600 <= retry_after <= 3 * 3600 + 60, retry_after
    assert proxy.request("GET", "/healthz")[0] == 200
    proxy.clock.advance(retry_after)
    # From the cache this time (sendfile), and again whole though it crosses the limit.
    status, headers, body = proxy.request("GET", blob)
    assert (status, len(body), sha256(body)) == (200, 4 * MIB, big) and headers["X-Cache"] == "HIT"
    counted(proxy)
    too_many(proxy.request("GET", manifest, ACCEPT_ALL), "RATE_LIMIT_BYTES")
    assert refusals(proxy)[0]["bytes"] == 2


# 3. RATE_LIMIT_TRANSFERS ###################################################

def test_a_second_download_at_once_is_refused_and_the_first_completes(start_proxy, fake):
    open_image(fake)
    first, second = (fake.add_pattern_blob("library/alpine", 4 * MIB, seed=seed) for seed in (31, 32))
    proxy = limited(start_proxy, fake, "--rate-limit-transfers", "1")
    fake.fault("cdn", first, "stall")  # held before its headers, until release
    download = Download(proxy, f"/v2/library/alpine/blobs/{first}")
    download.start()
    try:
        assert fake.wait_stalled(1), "the first download reached the CDN"
        assert too_many(proxy.request("GET", f"/v2/library/alpine/blobs/{second}"), "RATE_LIMIT_TRANSFERS") == 1
        assert fake.count(path_contains=second) == 0  # refused before anyone was asked
        # A HEAD sends no blob: it is no download, and is answered meanwhile.
        assert proxy.request("HEAD", f"/v2/library/alpine/blobs/{second}")[0] == 200
        assert download.is_alive()
    finally:
        fake.release.set()
        download.join(30)
    assert download.result == (200, 4 * MIB, first)
    counted(proxy)  # the download has ended on the proxy's side too
    status, _, body = proxy.request("GET", f"/v2/library/alpine/blobs/{second}")
    assert (status, len(body), sha256(body)) == (200, 4 * MIB, second)
    assert refusals(proxy)[0]["transfers"] == 1


# 4. RATE_LIMIT_EXEMPT ######################################################

def test_an_exempt_client_is_never_refused(start_proxy, fake):
    image = open_image(fake)
    proxy = limited(start_proxy, fake, "--rate-limit-requests", "20", "--rate-limit-exempt", "127.0.0.0/8")
    for n in range(60):  # three minutes' allowance, at once
        assert status_of(proxy, f"/v2/library/alpine/manifests/{image['digest']}") == 200, n
    counts, clients = refusals(proxy)
    assert counts["requests"] == 0 and clients == 0  # no budget is even kept for it


# 5. TRUSTED_PROXIES and IPv6 ###############################################

ALLOWANCE = 2  # --rate-limit-requests in these tests: a bucket is emptied in three requests


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(start_proxy, fake):
    image = open_image(fake)
    proxy = limited(start_proxy, fake, "--rate-limit-requests", str(ALLOWANCE), "--trusted-proxies", "127.0.0.1/32")
    manifest = f"/v2/library/alpine/manifests/{image['digest']}"
    exhaust(proxy, manifest, ALLOWANCE, forwarded("198.51.100.7"))
    # An address written to the left of its own is the client's invention: .7 still.
    assert status_of(proxy, manifest, forwarded("198.51.100.8, 198.51.100.7")) == 429
    assert status_of(proxy, manifest, {"X-Forwarded-For": "198.51.100.8", "x-forwarded-for": "198.51.100.7"}) == 429
    # Another client's bucket is full, and the trusted proxy's own too.
    exhaust(proxy, manifest, ALLOWANCE, forwarded("198.51.100.8"))
    exhaust(proxy, manifest, ALLOWANCE)
    # The trusted proxy's own address in the chain is skipped, not taken as the client.
    assert status_of(proxy, manifest, forwarded("198.51.100.9, 127.0.0.1")) == 200


@pytest.mark.parametrize("trust", [(), ("--trusted-proxies", "192.0.2.0/24"), ("--trust-proxy-headers", "true")],
                         ids=["no trusted proxies", "the peer not among them", "trusted for the logs only"])
def test_from_a_peer_not_trusted_x_forwarded_for_is_ignored(start_proxy, fake, trust):
    image = open_image(fake)
    proxy = limited(start_proxy, fake, "--rate-limit-requests", str(ALLOWANCE), *trust)
    manifest = f"/v2/library/alpine/manifests/{image['digest']}"
    exhaust(proxy, manifest, ALLOWANCE, forwarded("198.51.100.7"))
    for headers in (forwarded("198.51.100.8"), forwarded("2001:db8::1"), {}):
        assert status_of(proxy, manifest, headers) == 429, headers  # all the peer's bucket


def test_ipv6_clients_share_a_bucket_per_64(start_proxy, fake):
    image = open_image(fake)
    proxy = limited(start_proxy, fake, "--rate-limit-requests", str(ALLOWANCE), "--trusted-proxies", "127.0.0.1/32")
    manifest = f"/v2/library/alpine/manifests/{image['digest']}"
    exhaust(proxy, manifest, ALLOWANCE, forwarded("2001:db8::1"))
    assert status_of(proxy, manifest, forwarded("2001:db8::2")) == 429
    assert status_of(proxy, manifest, forwarded("2001:db8:0:0:ffff:ffff:ffff:ffff")) == 429
    exhaust(proxy, manifest, ALLOWANCE, forwarded("2001:db8:0:1::1"))  # the next /64: a full bucket
    assert refusals(proxy)[1] == 2


# 6. ALLOW_CLIENTS ##########################################################

def every_kind_of_request(image, repo="library/alpine"):
    """(method, path, headers, body): the registry API, tokens, and the operator's pages."""
    token_form = urllib.parse.urlencode({"grant_type": "password", "service": SERVICE, "client_id": "test",
                                         "scope": f"repository:{repo}:pull", "username": "alice",
                                         "password": "secret"}).encode()
    query = urllib.parse.urlencode({"service": SERVICE, "scope": f"repository:{repo}:pull"})
    return [("GET", "/", None, None), ("GET", "/v2/", None, None),
            ("GET", f"/v2/{repo}/manifests/1", ACCEPT_ALL, None),
            ("GET", f"/v2/{repo}/manifests/{image['digest']}", ACCEPT_ALL, None),
            ("GET", f"/v2/{repo}/blobs/{image['layers'][0]}", None, None),
            ("GET", f"/v2/{repo}/tags/list", None, None),
            ("GET", f"/v2/auth?{query}", None, None), ("POST", "/v2/auth", FORM, token_form),
            ("GET", "/metrics", None, None), ("GET", "/status", None, None), ("GET", "/status.json", None, None),
            ("GET", "/routes", None, None), ("POST", "/admin/purge", FORM, b"image=alpine")]


def test_allow_clients_refuses_every_path_but_the_probes_before_any_upstream_request(start_proxy, fake):
    image = fake.add_image("library/alpine", "1", [b"layer"])
    common = ("--upstream", f"docker={fake.url}", "--metrics-public", "true", "--admin-allow", "127.0.0.1",
              "--ready-min-free", "1")
    proxy = start_proxy(*common, "--allow-clients", "10.0.0.0/8")
    for method, path, headers, body in every_kind_of_request(image):
        denied(proxy.request(method, path, headers, body), {"client": "127.0.0.1"},
               "this mirror does not serve your address")
    assert fake.requests == [] and fake.token_requests == []
    for path in ("/healthz", "/health", "/readyz"):
        assert proxy.request("GET", path)[0] == 200, path

    # The operator's message, when there is one.
    message = "see https://mirror.example/policy"
    worded = start_proxy(*common, "--allow-clients", "10.0.0.0/8", "--block-message", message)
    for path in ("/v2/", "/metrics"):
        denied(worded.request("GET", path), {"client": "127.0.0.1"}, message)

    # A client inside the list, as a trusted reverse proxy names it, is served.
    fake.auth_required = False
    behind = start_proxy(*common, "--allow-clients", "10.0.0.0/8", "--trusted-proxies", "127.0.0.1/32")
    inside, outside = forwarded("10.1.2.3"), forwarded("192.0.2.1")
    for path in (f"/v2/library/alpine/manifests/{image['digest']}", "/metrics", "/status.json"):
        assert status_of(behind, path, inside) == 200, path
        denied(behind.request("GET", path, outside), {"client": "192.0.2.1"})
    assert refusals(behind, inside)[0]["client"] == 3


# 7. ALLOW_IMAGES and DENY_IMAGES ###########################################

POLICY = ("--allow-images", "docker.io/library/*", "--deny-images", "docker.io/library/evil*")


def asks_for(repo, image, token):
    """(method, path, headers, body): every way to ask for `repo`, with a token upstream gave for it."""
    bearer = {**ACCEPT_ALL, "Authorization": f"Bearer {token}"}
    layer, digest = image["layers"][0], image["digest"]
    paths = [f"/v2/{repo}/manifests/1", f"/v2/{repo}/manifests/{digest}", f"/v2/{repo}/blobs/{layer}",
             f"/v2/{repo}/blobs/{image['config']}", f"/v2/{repo}/tags/list", f"/v2/{repo}/referrers/{digest}",
             f"/v2/docker.io/{repo}/manifests/1", f"/v2/index.docker.io/{repo}/blobs/{layer}",
             f"/v2/{repo}/manifests/{digest}?ns=docker.io"]
    asks = [(method, path, bearer, None) for path in paths for method in ("GET", "HEAD")]
    scope = f"repository:{repo}:pull"
    for scopes in ([scope], [f"repository:docker.io/{repo}:pull"], ["repository:library/alpine:pull", scope]):
        query = urllib.parse.urlencode([("service", SERVICE)] + [("scope", s) for s in scopes])
        asks.append(("GET", f"/v2/auth?{query}", {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, None))
    form = urllib.parse.urlencode({"grant_type": "password", "service": SERVICE, "scope": scope,
                                   "client_id": "test", "username": "alice", "password": "secret"})
    return asks + [("POST", "/v2/auth", FORM, form.encode())]


def test_a_refused_image_gets_403_before_any_upstream_request_even_from_the_cache(start_proxy, fake):
    fake.add_user("alice", "secret")
    alpine = fake.add_image("library/alpine", "1", [b"alpine layer"])
    refused = {repo: fake.add_image(repo, "1", [repo.encode() + b" layer"])
               for repo in ("library/evil", "someone/app")}  # denied; outside the allowed
    # Pulled into the cache while no policy was set; then a proxy with one on the same CACHE_DIR.
    unguarded, tokens = start_proxy("--upstream", f"docker={fake.url}"), {}
    for repo in refused:
        client = RegistryClient(unguarded)
        pull(client, repo, "1")
        tokens[repo] = client.token
    guarded = start_proxy("--upstream", f"docker={fake.url}", "--metrics-public", "true", *POLICY)
    fake.reset_counters()

    for repo, image in refused.items():
        for method, path, headers, body in asks_for(repo, image, tokens[repo]):
            answer = guarded.request(method, path, headers, body)
            if method == "HEAD":  # no body to read the code from
                assert answer[0] == 403, (method, path)
            else:
                denied(answer, {"image": f"docker.io/{repo}"}, "this image is not served by this mirror")
    assert fake.requests == [] and fake.token_requests == []
    asked = sum(len(asks_for(repo, image, "")) for repo, image in refused.items())
    assert refusals(guarded)[0]["image"] == asked

    # The cache does hold them: the proxy without the policy serves them.
    layer = refused["library/evil"]["layers"][0]
    status, _, body = unguarded.request("GET", f"/v2/library/evil/blobs/{layer}",
                                        {"Authorization": f"Bearer {tokens['library/evil']}"})
    assert status == 200 and sha256(body) == layer
    # An allowed image pulls, token and all.
    client = RegistryClient(guarded)
    _, digests = pull(client, "library/alpine", "1")
    assert digests == [alpine["config"]] + alpine["layers"]
    # The cached bytes of a refused image are not had under an allowed name:
    # upstream says library/alpine holds no such blob.
    status, _, body = client.request("GET", f"/v2/library/alpine/blobs/{layer}")
    assert status == 404 and sha256(body) != layer


def test_patterns_name_the_registry_of_each_route(start_proxy, fake):
    with FakeRegistry() as ghcr, FakeRegistry() as extra:
        host = netloc(extra.url)  # an EXTRA_ROUTES route's images are named by its host:port
        for registry, repo in ((ghcr, "myorg/team/app"), (ghcr, "myorgevil/app"), (extra, "myorg/app"),
                               (extra, "yours/app"), (fake, "library/alpine"), (fake, "library/busybox")):
            registry.add_image(repo, "1", [f"{repo} layer".encode()])
        proxy = start_proxy("--upstream", f"docker={fake.url}", "--upstream", f"ghcr={ghcr.url}",
                            "--extra-routes", f"mine={extra.url}",
                            "--allow-images", f"ghcr.io/myorg/*, {host}/myorg/*, docker.io/library/alpine")
        for name in ("ghcr.io/myorg/team/app", f"{host}/myorg/app", "library/alpine", "docker.io/library/alpine"):
            pull(RegistryClient(proxy), name, "1")
        asked = len(ghcr.requests) + len(extra.requests) + len(fake.requests)
        # path name -> the image name the patterns see
        refused = {"ghcr.io/myorgevil/app": "ghcr.io/myorgevil/app", f"{host}/yours/app": f"{host}/yours/app",
                   f"{host}/myorg": f"{host}/myorg", "library/busybox": "docker.io/library/busybox"}
        for name, image in refused.items():
            denied(proxy.request("GET", f"/v2/{name}/manifests/1", ACCEPT_ALL), {"image": image})
        assert len(ghcr.requests) + len(extra.requests) + len(fake.requests) == asked


def test_a_pattern_file_is_read_at_its_path_as_written(start_proxy, fake, tmp_path):
    # Patterns are lower-cased (image names are); a file's path must not be:
    # /etc/dockerproxy/Images.txt is another file than images.txt.
    directory = tmp_path / "Policy"
    directory.mkdir()
    (directory / "Images.txt").write_text("docker.io/library/alpine\n")
    fake.add_image("library/alpine", "1", [b"alpine layer"])
    fake.add_image("library/other", "1", [b"other layer"])
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--allow-images", f"@{directory / 'Images.txt'}")
    pull(RegistryClient(proxy), "library/alpine", "1")
    denied(proxy.request("GET", "/v2/library/other/manifests/1", ACCEPT_ALL), {"image": "docker.io/library/other"})


# A glob check_pattern accepts but Python 3.8's re cannot compile (3.9 on
# turns a reversed range into "match nothing").
UNCOMPILABLE = "docker.io/library/[z-a]"


def test_a_glob_python_cannot_compile_is_a_setting_error_or_matches_nothing(start_proxy, fake):
    try:
        proxy = start_proxy("--upstream", f"docker={fake.url}", "--allow-images", UNCOMPILABLE)
    except dockerproxy.ConfigError:
        return  # refused as a setting, with a message: fine
    denied(proxy.request("GET", "/v2/library/alpine/manifests/1", ACCEPT_ALL), {"image": "docker.io/library/alpine"})


# 8. SIGHUP re-reads the pattern files ######################################

class StderrLines(threading.Thread):
    """Reads a process's stderr as it comes, so the pipe never fills and blocks
    it, and so a test can wait for a line."""

    def __init__(self, process):
        super().__init__(daemon=True)
        self.process, self.lines = process, []

    def run(self):
        for line in self.process.stderr:
            self.lines.append(line)

    def count(self, text):
        return sum(text in line for line in list(self.lines))

    @property
    def text(self):
        return "".join(self.lines)


class PatternProcess:
    """dockerproxy.py as a real process (signals), its ALLOW_IMAGES read from a file."""

    def __init__(self, fake, tmp_path, text):
        for repo in ("library/alpine", "library/other"):
            fake.add_image(repo, "1", [f"{repo} layer".encode()])
        self.file = tmp_path / "images.txt"
        self.file.write_text(text)
        self.process, self.running = start_proxy_process(fake.url, tmp_path / "cache", free_port(),
                                                         flags=("--allow-images", f"@{self.file}"))
        self.log = StderrLines(self.process)
        self.log.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.join(10)

    def status(self, repo):
        """The status of a client's GET of `repo`:1, token dance included."""
        return RegistryClient(self.running).request("GET", f"/v2/{repo}/manifests/1", ACCEPT_ALL)[0]

    def reload(self, text):
        """The file rewritten (removed if `text` is None), then SIGHUP."""
        if text is None:
            self.file.unlink()
        else:
            self.file.write_text(text)
        self.process.send_signal(signal.SIGHUP)

    def stop(self):
        """SIGTERM: its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def test_sighup_rereads_the_pattern_file_and_a_bad_one_keeps_the_old_patterns(fake, tmp_path):
    with PatternProcess(fake, tmp_path, "# only alpine\ndocker.io/library/alpine\n") as proxy:
        assert proxy.status("library/other") == 403 and proxy.status("library/alpine") == 200
        proxy.reload("docker.io/library/*\n")
        wait_until(lambda: proxy.status("library/other") != 403, what="library/other allowed after SIGHUP")
        assert proxy.status("library/other") == 200
        assert proxy.log.count("image patterns reloaded: 1 allowed, 0 denied") == 1

        # A bad line: nothing of the file is taken (its good first line alone
        # would refuse library/other), the patterns before it stay.
        proxy.reload("docker.io/library/alpine\ndocker.io/library/$bad\n")
        wait_until(lambda: proxy.log.count("the old ones stay") == 1, what="the bad file refused")
        assert proxy.status("library/other") == 200
        # So do they when the file is gone.
        proxy.reload(None)
        wait_until(lambda: proxy.log.count("the old ones stay") == 2, what="the missing file refused")
        assert proxy.status("library/other") == 200
        assert proxy.stop() == 0
    assert "Traceback" not in proxy.log.text, proxy.log.text
    assert proxy.log.count("image patterns not reloaded, the old ones stay") == 2, proxy.log.text


def test_sighup_goes_on_working_after_a_glob_python_cannot_compile(fake, tmp_path):
    with PatternProcess(fake, tmp_path, "docker.io/library/alpine\n") as proxy:
        proxy.reload(UNCOMPILABLE + "\n")
        # Taken (it matches nothing) or refused (the old patterns stay): either is logged.
        wait_until(lambda: proxy.log.count("image patterns") or "Traceback" in proxy.log.text,
                   what="the reload's outcome logged")
        assert "Traceback" not in proxy.log.text, proxy.log.text
        proxy.reload("docker.io/library/other\n")
        wait_until(lambda: proxy.status("library/other") == 200, what="the next SIGHUP taken")
        assert proxy.status("library/alpine") == 403
        assert proxy.stop() == 0
    assert "Traceback" not in proxy.log.text, proxy.log.text


# 9. The refusals in /metrics ###############################################

def test_each_refusal_is_counted_once_by_its_reason(start_proxy, fake):
    image = open_image(fake)
    small = fake.add_blob("library/alpine", b"small blob")
    big = fake.add_pattern_blob("library/alpine", 4 * MIB, seed=91)
    fake.add_image("someone/app", "1", [b"someone's layer"])
    proxy = limited(start_proxy, fake, "--rate-limit-requests", "5", "--rate-limit-bytes", "1M",
                    "--rate-limit-transfers", "1", "--trusted-proxies", "127.0.0.1/32",
                    "--allow-clients", "127.0.0.0/8,198.51.100.0/24", "--allow-images", "docker.io/library/*")
    manifest = f"/v2/library/alpine/manifests/{image['digest']}"

    # requests: two past the allowance of 5
    exhaust(proxy, manifest, 5, forwarded("198.51.100.1"))
    assert status_of(proxy, manifest, forwarded("198.51.100.1")) == 429
    # bytes: one request after a 4 MiB download
    assert status_of(proxy, f"/v2/library/alpine/blobs/{big}", forwarded("198.51.100.2")) == 200
    counted(proxy)
    too_many(proxy.request("GET", manifest, forwarded("198.51.100.2")), "RATE_LIMIT_BYTES")
    # transfers: one second download while the first is held
    fake.fault("cdn", small, "stall")
    download = Download(proxy, f"/v2/library/alpine/blobs/{small}", forwarded("198.51.100.3"))
    download.start()
    try:
        assert fake.wait_stalled(1)
        too_many(proxy.request("GET", f"/v2/library/alpine/blobs/{big}", forwarded("198.51.100.3")),
                 "RATE_LIMIT_TRANSFERS")
    finally:
        fake.release.set()
        download.join(30)
    assert download.result[0] == 200
    # client: three requests from outside ALLOW_CLIENTS, whatever they ask
    for path in ("/v2/", manifest, "/metrics"):
        denied(proxy.request("GET", path, forwarded("10.0.0.1")), {"client": "10.0.0.1"})
    # image: a manifest and a token outside ALLOW_IMAGES
    for path in ("/v2/someone/app/manifests/1", f"/v2/auth?service={SERVICE}&scope=repository:someone/app:pull"):
        denied(proxy.request("GET", path, forwarded("198.51.100.4")), {"image": "docker.io/someone/app"})

    counts, clients = refusals(proxy)
    assert counts == {"requests": 2, "bytes": 1, "transfers": 1, "client": 3, "image": 2}
    assert clients == 4  # 198.51.100.1 to .4; 10.0.0.1 was refused before any budget
