"""The disk cache, end to end: the fake upstream's counters prove what reached it."""

import hashlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest

import dockerproxy
from conftest import ROOT, RegistryClient, RunningProxy, start_proxy_process
from fakeregistry import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, FakeRegistry
from realregistry import free_port, wait_until

ACCEPT_ALL = {"Accept": ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])}


def blob_gets(fake, digest):
    """Upstream blob GETs that were answered (a 401 asking for a token is not a download)."""
    return sum(1 for r in fake.requests if r["server"] == "registry" and r["method"] == "GET"
               and r["path"].endswith(f"/blobs/{digest}") and r.get("status") != 401)


def files_under(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def temp_files(root):
    return [p for p in files_under(root) if os.path.basename(p).startswith(dockerproxy.TEMP_PREFIX)]


def cache_root(proxy):
    return proxy.cache.root


def settled(proxy):
    """Clients get their last byte once it is verified; the fsync, rename and
    index entries follow in the fill's thread.  Tests that look at the cache
    files directly wait for that (a request for the same object waits itself)."""
    assert proxy.cache.wait_idle(), "fills stored"


def pull(client, repo, tag, accept=ACCEPT_ALL):
    """What a client does: the manifest by tag, then every blob it names, each hashed."""
    status, headers, body = client.request("GET", f"/v2/{repo}/manifests/{tag}", accept)
    assert status == 200, body
    manifest = json.loads(body)
    digests = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
    for digest in digests:
        status, _, blob = client.request("GET", f"/v2/{repo}/blobs/{digest}")
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == digest
    settled(client.proxy)
    return headers, digests


class HeldClient:
    """A client that sends a GET and then reads nothing until told."""

    def __init__(self, proxy, path, headers=None):
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.socket.connect(("127.0.0.1", proxy.port))
        lines = [f"GET {path} HTTP/1.1", f"Host: {proxy.host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.socket.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def read_all(self):
        response = http.client.HTTPResponse(self.socket)
        response.begin()
        body = response.read()
        self.socket.close()
        return response.status, body


# Hits ######################################################################

def test_second_pull_makes_no_upstream_blob_get_and_digests_no_request_at_all(proxy, fake):
    image = fake.add_image("library/alpine", "3", [b"layer one" * 1000, b"layer two" * 1000])
    pull(RegistryClient(proxy), "library/alpine", "3")
    assert all(blob_gets(fake, d) == 1 for d in image["layers"])
    fake.reset_counters()
    headers, _ = pull(RegistryClient(proxy), "library/alpine", "3")
    assert headers["X-Cache"] == "HIT"
    assert fake.count(path_contains="/blobs/") == 0
    client = RegistryClient(proxy)
    for digest in image["layers"]:
        status, headers, _ = client.request("GET", f"/v2/library/alpine/blobs/{digest}")
        assert status == 200 and headers["X-Cache"] == "HIT"
        assert headers["Docker-Content-Digest"] == digest and headers["ETag"] == f'"{digest}"'
        assert headers["Content-Type"] == "application/octet-stream"
    status, headers, body = client.request("GET", f"/v2/library/alpine/manifests/{image['digest']}", ACCEPT_ALL)
    assert status == 200 and headers["Content-Type"] == DOCKER_MANIFEST and body == image["manifest"]
    assert fake.count(server="registry", path_contains="/library/alpine/") == 0


def test_large_blob_is_cached_and_served_whole(proxy, fake):
    digest = fake.add_pattern_blob("library/big", 64 * 1024 * 1024 + 17, seed=3)
    client = RegistryClient(proxy)
    for expected in ("MISS", "HIT"):
        status, headers, body = client.request("GET", f"/v2/library/big/blobs/{digest}")
        assert status == 200 and headers["X-Cache"] == expected
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    assert blob_gets(fake, digest) == 1


def test_range_on_a_cached_blob_gets_206(proxy, fake):
    data = bytes(range(256)) * 400
    digest = fake.add_blob("library/alpine", data)
    client = RegistryClient(proxy)
    assert client.request("GET", f"/v2/library/alpine/blobs/{digest}")[0] == 200
    fake.reset_counters()
    for header, start, end in [("bytes=100-", 100, len(data) - 1), ("bytes=5-9", 5, 9), ("bytes=-10", len(data) - 10, len(data) - 1)]:
        status, headers, body = client.request("GET", f"/v2/library/alpine/blobs/{digest}", {"Range": header})
        assert status == 206 and body == data[start:end + 1]
        assert headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
    status, headers, _ = client.request("GET", f"/v2/library/alpine/blobs/{digest}", {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    assert fake.count() == 0


def test_head_of_a_cached_object_never_touches_upstream(proxy, fake):
    image = fake.add_image("library/alpine", "3", [b"x" * 100000])
    pull(RegistryClient(proxy), "library/alpine", "3")
    fake.reset_counters()
    client = RegistryClient(proxy)
    status, headers, body = client.request("HEAD", f"/v2/library/alpine/blobs/{image['layers'][0]}")
    assert status == 200 and body == b"" and headers["Content-Length"] == "100000"
    status, headers, body = client.request("HEAD", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert status == 200 and body == b"" and headers["Docker-Content-Digest"] == image["digest"]
    assert fake.count() == 0


def test_head_of_an_uncached_blob_asks_upstream_with_head_not_get(proxy, fake):
    digest = fake.add_blob("library/alpine", b"h" * 5000)
    status, headers, body = RegistryClient(proxy).request("HEAD", f"/v2/library/alpine/blobs/{digest}")
    assert status == 200 and headers["Content-Length"] == "5000" and body == b""
    assert fake.count(method="GET", path_contains="/blobs/") == 0
    assert fake.count(server="cdn") == 0
    heads = [r for r in fake.requests if r["method"] == "HEAD" and "/blobs/" in r["path"] and r.get("status") != 401]
    assert len(heads) == 1
    assert not proxy.cache.store.exists(digest)


def test_manifest_head_then_get_serves_the_whole_body(proxy, fake):
    image = fake.add_image("library/alpine", "3", [b"x"])
    client = RegistryClient(proxy)
    status, headers, body = client.request("HEAD", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert status == 200 and body == b""
    status, headers, body = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert status == 200 and body == image["manifest"]
    status, headers, body = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert headers["X-Cache"] == "HIT" and body == image["manifest"]


def test_cache_keys_keep_registries_apart(start_proxy):
    with FakeRegistry() as hub, FakeRegistry() as ghcr:
        hub_image = hub.add_image("owner/app", "1", [b"from docker hub"])
        ghcr_image = ghcr.add_image("owner/app", "1", [b"from ghcr"])
        proxy = start_proxy("--upstream", f"docker={hub.url}", "--upstream", f"ghcr={ghcr.url}")
        for path, image in [("/v2/owner/app/manifests/1", hub_image), ("/v2/ghcr.io/owner/app/manifests/1", ghcr_image)] * 2:
            status, _, body = RegistryClient(proxy).request("GET", path, ACCEPT_ALL)
            assert status == 200 and body == image["manifest"]


# Tags and Accept ###########################################################

def rewind_tag_checks(proxy, seconds):
    """Move the proxy's clock `seconds` on, as if MANIFEST_TTL had passed."""
    settled(proxy)
    proxy.clock.advance(seconds)


def test_tag_is_served_from_cache_within_ttl_and_revalidated_by_head_after(proxy, fake):
    old = fake.add_image("library/alpine", "3", [b"old"])
    client = RegistryClient(proxy)
    assert client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)[2] == old["manifest"]
    new = fake.add_image("library/alpine", "3", [b"new"])  # the tag moves upstream
    fake.reset_counters()
    status, headers, body = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert body == old["manifest"] and headers["X-Cache"] == "HIT"
    assert fake.count(server="registry") == 0
    rewind_tag_checks(proxy, proxy.config.manifest_ttl + 1)
    status, headers, body = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert status == 200 and body == new["manifest"] and headers["X-Cache"] == "MISS"
    assert fake.count(method="HEAD", path_contains="/manifests/3") == 1
    assert fake.count(method="GET", path_contains="/manifests/3") == 1
    rewind_tag_checks(proxy, proxy.config.manifest_ttl + 1)
    fake.reset_counters()
    status, headers, body = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert body == new["manifest"] and headers["X-Cache"] == "HIT"
    assert fake.count(method="HEAD") == 1 and fake.count(method="GET", server="registry") == 0


def test_a_manifest_is_only_served_as_a_type_the_client_accepts(proxy, fake):
    amd = fake.add_image("library/multi", None, [b"amd"], media_type=OCI_MANIFEST)
    oci_index = fake.add_index("library/multi", "1", [amd], media_type=OCI_INDEX)
    docker_amd = fake.add_image("library/multi", None, [b"amd-docker"])
    docker_list = fake.add_index("library/multi", "1", [docker_amd], media_type=DOCKER_MANIFEST_LIST)
    client = RegistryClient(proxy)
    oci_only = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
    docker_only = {"Accept": f"{DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}"}
    for round_ in ("MISS", "HIT"):
        status, headers, _ = client.request("GET", "/v2/library/multi/manifests/1", oci_only)
        assert headers["Content-Type"] == OCI_INDEX and headers["Docker-Content-Digest"] == oci_index
        assert headers["X-Cache"] == round_
        status, headers, _ = client.request("GET", "/v2/library/multi/manifests/1", docker_only)
        assert headers["Content-Type"] == DOCKER_MANIFEST_LIST and headers["Docker-Content-Digest"] == docker_list
        assert headers["X-Cache"] == round_
    # by digest: the cached OCI index is not sent to a client that accepts only docker types
    status, headers, _ = client.request("GET", f"/v2/library/multi/manifests/{oci_index}", docker_only)
    assert headers.get("X-Cache") != "HIT"
    status, headers, _ = client.request("GET", f"/v2/library/multi/manifests/{oci_index}", oci_only)
    assert headers["X-Cache"] == "HIT" and headers["Content-Type"] == OCI_INDEX
    # the per-platform manifests are cached too
    status, headers, _ = client.request("GET", f"/v2/library/multi/manifests/{amd['digest']}", oci_only)
    status, headers, _ = client.request("GET", f"/v2/library/multi/manifests/{amd['digest']}", oci_only)
    assert headers["X-Cache"] == "HIT"


# Fills #####################################################################

def test_eight_concurrent_cold_gets_make_one_upstream_get(proxy, fake):
    digest = fake.add_pattern_blob("library/alpine", 8 * 1024 * 1024, seed=1)
    client = RegistryClient(proxy)
    client.request("HEAD", f"/v2/library/alpine/blobs/{digest}")  # token first
    fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=100000)
    headers = {"Authorization": f"Bearer {client.token}"}
    results = []

    def get():
        results.append(RunningProxy(proxy.server).request("GET", f"/v2/library/alpine/blobs/{digest}", headers))
    threads = [threading.Thread(target=get) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert fake.wait_stalled(1)

    def all_following():
        fills = proxy.cache.fills.in_flight()
        return len(fills) == 1 and fills[0].followers == 8
    wait_until(all_following, what="8 clients on one fill")
    fake.release.set()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8
    for status, answer, body in results:
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
    assert blob_gets(fake, digest) == 1 and fake.count(server="cdn", method="GET") == 1


def test_fill_completes_for_the_cache_when_its_first_client_disconnects(proxy, fake):
    digest = fake.add_pattern_blob("library/alpine", 4 * 1024 * 1024, seed=2)
    client = RegistryClient(proxy)
    client.request("HEAD", f"/v2/library/alpine/blobs/{digest}")
    fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=100000)
    first = socket.create_connection(("127.0.0.1", proxy.port))
    first.sendall(f"GET /v2/library/alpine/blobs/{digest} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {client.token}\r\n\r\n".encode())
    assert fake.wait_stalled(1)
    first.close()
    fake.release.set()
    wait_until(lambda: proxy.cache.store.exists(digest), what="fill committed")
    fake.reset_counters()
    status, headers, body = client.request("GET", f"/v2/library/alpine/blobs/{digest}")
    assert status == 200 and headers["X-Cache"] == "HIT"
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest and fake.count(server="cdn") == 0


@pytest.mark.parametrize("fault", [{"kind": "truncate", "nbytes": 5000}, {"kind": "corrupt"}])
def test_a_bad_upstream_body_caches_nothing_and_the_client_sees_a_failed_transfer(proxy, fake, fault):
    digest = fake.add_blob("library/alpine", os.urandom(300000))
    client = RegistryClient(proxy)
    client.request("HEAD", f"/v2/library/alpine/blobs/{digest}")
    fake.fault("cdn", digest, **fault)
    with pytest.raises(http.client.IncompleteRead):
        client.request("GET", f"/v2/library/alpine/blobs/{digest}")
    assert proxy.cache.wait_idle(), "fill ended"
    assert not proxy.cache.store.exists(digest)
    assert temp_files(cache_root(proxy)) == []
    status, _, body = client.request("GET", f"/v2/library/alpine/blobs/{digest}")  # the retry works
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest


def test_two_proxies_sharing_a_cache_dir_never_half_write(start_proxy, fake, tmp_path):
    shared = str(tmp_path / "shared")
    first = start_proxy("--upstream", f"docker={fake.url}", "--cache-dir", shared)
    second = start_proxy("--upstream", f"docker={fake.url}", "--cache-dir", shared)
    digest = fake.add_pattern_blob("library/alpine", 6 * 1024 * 1024, seed=5)
    results = []

    def get(proxy):
        client = RegistryClient(proxy)
        results.append(client.request("GET", f"/v2/library/alpine/blobs/{digest}"))
    threads = [threading.Thread(target=get, args=(p,)) for p in (first, second, first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r[0] for r in results] == [200] * 4
    assert all("sha256:" + hashlib.sha256(r[2]).hexdigest() == digest for r in results)
    assert dockerproxy.file_digest(dockerproxy.object_path(shared, digest), "sha256") == digest
    assert temp_files(shared) == []


# Upstream down #############################################################

def test_upstream_down_cached_image_still_pulls_and_uncached_gives_502(start_proxy, tmp_path):
    fake = FakeRegistry()
    image = fake.add_image("library/alpine", "3", [b"offline layer" * 100])
    missing = fake.add_blob("library/alpine", b"never pulled")
    proxy = start_proxy("--upstream", f"docker={fake.url}")
    pull(RegistryClient(proxy), "library/alpine", "3")
    fake.close()
    rewind_tag_checks(proxy, proxy.config.manifest_ttl + 1)
    client = RegistryClient(proxy)
    status, headers, _ = proxy.request("GET", "/v2/")
    assert status == 401 and "/v2/auth" in headers["WWW-Authenticate"]
    headers, digests = pull(client, "library/alpine", "3")
    assert headers["X-Cache"] == "STALE" and headers["Warning"].startswith("110 ")
    assert digests == [image["config"]] + image["layers"]
    status, _, body = proxy.request("GET", "/v2/auth?service=x&scope=repository:library/alpine:pull")
    assert status == 200 and json.loads(body)["token"] == dockerproxy.ANONYMOUS_TOKEN
    status, _, body = client.request("GET", f"/v2/library/alpine/blobs/{missing}")
    assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize("status", [500, 503, 429])
def test_upstream_errors_serve_the_cached_tag_as_stale(proxy, fake, status):
    image = fake.add_image("library/alpine", "3", [b"x"])
    client = RegistryClient(proxy)
    client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    settled(proxy)
    rewind_tag_checks(proxy, proxy.config.manifest_ttl + 1)
    fake.fault("registry", "/manifests/3", "status", status=status)
    answer_status, headers, body = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert answer_status == 200 and headers["X-Cache"] == "STALE" and body == image["manifest"]


def test_upstream_timeout_serves_stale_and_uncached_gives_504(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--read-timeout", "0.5")
    fake.add_image("library/alpine", "3", [b"x"])
    client = RegistryClient(proxy)
    client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    settled(proxy)
    rewind_tag_checks(proxy, proxy.config.manifest_ttl + 1)
    fake.fault("registry", "/manifests/", "stall", count=2)
    status, headers, _ = client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    assert status == 200 and headers["X-Cache"] == "STALE"
    status, _, _ = client.request("GET", "/v2/library/alpine/manifests/4", ACCEPT_ALL)
    fake.release.set()
    assert status == 504


# Private repositories ######################################################

def test_private_content_is_never_served_from_cache_to_a_refused_client(start_proxy):
    with FakeRegistry(users={"alice": "s3cret"}, private_repos={"alice/private"}) as fake:
        image = fake.add_image("alice/private", "1", [b"private layer" * 100])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        pull(RegistryClient(proxy, "alice", "s3cret"), "alice/private", "1")
        layer = image["layers"][0]
        assert proxy.cache.store.exists(layer)
        anonymous = RegistryClient(proxy)
        for path in [f"/v2/alice/private/blobs/{layer}", f"/v2/alice/private/manifests/{image['digest']}",
                     "/v2/alice/private/manifests/1"]:
            fake.reset_counters()
            status, headers, body = anonymous.request("GET", path, ACCEPT_ALL)
            assert status == 401 and b"private layer" not in body
            assert fake.count(method="GET", path_contains="/blobs/") == 0
        # the owner still gets it from the cache (a HEAD checks her token, no download)
        fake.reset_counters()
        status, headers, body = RegistryClient(proxy, "alice", "s3cret").request("GET", f"/v2/alice/private/blobs/{layer}")
        assert status == 200 and headers["X-Cache"] == "HIT"
        assert fake.count(method="GET", path_contains="/blobs/") == 0


def test_public_content_is_served_with_no_upstream_request_even_for_another_client(proxy, fake):
    image = fake.add_image("library/alpine", "3", [b"public"])
    pull(RegistryClient(proxy), "library/alpine", "3")
    fake.reset_counters()
    status, headers, _ = proxy.request("GET", f"/v2/library/alpine/blobs/{image['layers'][0]}")
    assert status == 200 and headers["X-Cache"] == "HIT"
    assert fake.count() == 0


# Limits ####################################################################

def test_eviction_keeps_the_cache_under_its_limit_but_not_a_blob_being_served(start_proxy, fake):
    limit = 24 * 1024 * 1024
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--cache-max-size", "24M")
    cache, client = proxy.cache, RegistryClient(proxy)
    served = fake.add_pattern_blob("library/alpine", 16 * 1024 * 1024, seed=10)
    assert client.request("GET", f"/v2/library/alpine/blobs/{served}")[0] == 200
    held = HeldClient(proxy, f"/v2/library/alpine/blobs/{served}", {"Authorization": f"Bearer {client.token}"})
    served_path = dockerproxy.object_path(cache.root, served)
    wait_until(lambda: cache.store.in_use(served), what="blob being served")
    proxy.clock.advance(86400)  # what is filled now was used a day after it: it is the least recent
    for seed in range(4):
        digest = fake.add_pattern_blob("library/alpine", 4 * 1024 * 1024, seed=20 + seed)
        assert client.request("GET", f"/v2/library/alpine/blobs/{digest}")[0] == 200
    cache.sweep()
    assert cache.stats()["size_bytes"] <= limit
    assert os.path.exists(served_path), "the blob being served was evicted"
    status, body = held.read_all()
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == served


def test_evicted_manifest_drops_its_tag_entry(proxy, fake):
    image = fake.add_image("library/alpine", "3", [b"x"])
    client = RegistryClient(proxy)
    client.request("GET", "/v2/library/alpine/manifests/3", ACCEPT_ALL)
    settled(proxy)
    cache = proxy.cache
    os.unlink(dockerproxy.object_path(cache.root, image["digest"]))
    assert cache.sweep()["tags_dropped"] == 1
    assert cache.stats()["tag_entries"] == 0


def test_objects_unused_longer_than_max_age_are_removed(start_proxy, fake):
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--cache-max-age", "1d")
    digest = fake.add_blob("library/alpine", b"old")
    RegistryClient(proxy).request("GET", f"/v2/library/alpine/blobs/{digest}")
    settled(proxy)
    path = dockerproxy.object_path(cache_root(proxy), digest)
    assert proxy.cache.sweep()["removed"] == 0
    proxy.clock.advance(2 * 86400)
    assert proxy.cache.sweep()["removed"] == 1 and not os.path.exists(path)


# Real processes ############################################################

def start_process(fake, cache_dir, port, preexec_fn=None):
    return start_proxy_process(fake.url, cache_dir, port, preexec_fn)


def test_sigkill_mid_fill_leaves_no_bad_entry_and_restart_cleans_up(fake, tmp_path):
    cache_dir = str(tmp_path / "cache")
    digest = fake.add_pattern_blob("library/alpine", 8 * 1024 * 1024, seed=4)
    port = free_port()
    process, running = start_process(fake, cache_dir, port)
    client = RegistryClient(running)
    client.request("HEAD", f"/v2/library/alpine/blobs/{digest}")
    fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=1024 * 1024)
    held = HeldClient(running, f"/v2/library/alpine/blobs/{digest}", {"Authorization": f"Bearer {client.token}"})
    assert fake.wait_stalled(1)
    wait_until(lambda: temp_files(cache_dir), what="a temporary file mid-fill")
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    held.socket.close()
    fake.release.set()
    process, running = start_process(fake, cache_dir, port)
    try:
        assert temp_files(cache_dir) == []
        result = subprocess.run([sys.executable, os.path.join(ROOT, "dockerproxy.py"), "cache", "verify",
                                 "--cache-dir", cache_dir, "--env-file", os.devnull],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "bad_removed: 0" in result.stdout, result.stdout + result.stderr
        status, _, body = RegistryClient(running).request("GET", f"/v2/library/alpine/blobs/{digest}")
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
    finally:
        process.terminate()
        process.wait(10)


def test_cache_verify_removes_a_corrupted_entry_and_stats_counts(proxy, fake, tmp_path):
    image = fake.add_image("library/alpine", "3", [b"a" * 1000, b"b" * 2000])
    pull(RegistryClient(proxy), "library/alpine", "3")
    root = cache_root(proxy)
    bad = dockerproxy.object_path(root, image["layers"][0])
    with open(bad, "r+b") as file:
        file.write(b"X")
    command = [sys.executable, os.path.join(ROOT, "dockerproxy.py"), "cache"]
    settings = ["--cache-dir", root, "--env-file", os.devnull]
    stats = subprocess.run(command + ["stats"] + settings, capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0 and "objects: 4" in stats.stdout and "manifests: 1" in stats.stdout
    verify = subprocess.run(command + ["verify"] + settings, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 1 and "bad_removed: 1" in verify.stdout
    assert not os.path.exists(bad)
    again = subprocess.run(command + ["verify"] + settings, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "checked: 3" in again.stdout
    prune = subprocess.run(command + ["prune", "--cache-max-size", "1K"] + settings, capture_output=True, text=True, timeout=60)
    assert prune.returncode == 0 and "removed: " in prune.stdout
    assert dockerproxy.Cache(root, 1024, 0).stats()["size_bytes"] <= 1024


def test_a_full_disk_degrades_to_pass_through_with_one_warning(fake, tmp_path):
    cache_dir = str(tmp_path / "cache")
    os.makedirs(cache_dir)
    limit = 256 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    digests = [fake.add_pattern_blob("library/alpine", 2 * 1024 * 1024, seed=30 + i) for i in range(2)]
    process, running = start_process(fake, cache_dir, free_port(), small_files)
    try:
        client = RegistryClient(running)
        for digest in digests + digests:
            status, headers, body = client.request("GET", f"/v2/library/alpine/blobs/{digest}")
            assert status == 200 and headers["X-Cache"] == "MISS"
            assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    finally:
        process.terminate()
        _, log = process.communicate(timeout=10)
    assert log.count("cache cannot write") == 1, log
    assert "Traceback" not in log
    assert temp_files(cache_dir) == []


def test_empty_cache_dir_turns_the_cache_off(start_proxy, fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proxy = start_proxy("--upstream", f"docker={fake.url}", "--cache-dir", "")
    digest = fake.add_blob("library/alpine", b"uncached")
    client = RegistryClient(proxy)
    for _ in range(2):
        status, headers, _ = client.request("GET", f"/v2/library/alpine/blobs/{digest}")
        assert status == 200 and headers["X-Cache"] == "MISS"
    assert blob_gets(fake, digest) == 2
    assert proxy.cache is None and os.listdir(tmp_path) == []


def test_a_token_from_a_refresh_token_is_not_anonymous(start_proxy):
    """docker with a stored identity token POSTs grant_type=refresh_token without Authorization."""
    with FakeRegistry(users={"alice": "s3cret"}, private_repos={"alice/private"}) as fake:
        image = fake.add_image("alice/private", "1", [b"private layer" * 100])
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        login = urllib.parse.urlencode({"grant_type": "password", "username": "alice", "password": "s3cret",
                                        "service": fake.service, "client_id": "docker", "scope": ""}).encode()
        refresh_token = json.loads(proxy.request("POST", "/v2/auth", form, body=login)[2])["refresh_token"]
        refresh = urllib.parse.urlencode({"grant_type": "refresh_token", "refresh_token": refresh_token,
                                          "service": fake.service, "client_id": "docker",
                                          "scope": "repository:alice/private:pull"}).encode()
        token = json.loads(proxy.request("POST", "/v2/auth", form, body=refresh)[2])["token"]
        layer = image["layers"][0]
        assert proxy.request("GET", f"/v2/alice/private/blobs/{layer}", {"Authorization": f"Bearer {token}"})[0] == 200
        status, _, body = proxy.request("GET", f"/v2/alice/private/blobs/{layer}")
        assert status == 401 and b"private layer" not in body


def test_an_unusable_redirect_ends_the_fill_so_later_requests_do_not_wait(start_proxy):
    with FakeRegistry(redirect_location="http://127.0.0.1:99999/x") as fake:
        digest = fake.add_blob("library/alpine", b"y" * 1000)
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        client = RegistryClient(proxy)
        client.request("HEAD", f"/v2/library/alpine/blobs/{digest}")
        for _ in range(2):
            status, _, body = client.request("GET", f"/v2/library/alpine/blobs/{digest}")
            assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert proxy.cache.fills.in_flight() == []


def test_relayed_head_answers_return_their_upstream_connection_to_the_pool(start_proxy):
    with FakeRegistry(auth_required=False) as fake:
        digest = fake.add_blob("library/alpine", b"z" * 1000)
        proxy = start_proxy("--upstream", f"docker={fake.url}")
        for _ in range(3):
            status, headers, _ = proxy.request("HEAD", f"/v2/library/alpine/blobs/{digest}")
            assert status == 200 and headers["Content-Length"] == "1000"
            # the answer goes out before the handler releases the connection: poll
            wait_until(lambda: proxy.upstreams.idle_count() == 1,
                       timeout=5, what="the connection back in the pool")
