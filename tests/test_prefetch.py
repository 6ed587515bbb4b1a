"""Prefetch, end to end: the command (standalone and --proxy), the admin API,
keep-warm (PREFETCH_FILE) and pins, against the fake Docker Hub (token realm
and CDN redirects).  The fake's request log proves what crossed the upstream;
a stopped upstream proves what the cache holds."""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import dockerproxy
from conftest import ROOT, RegistryClient, start_proxy_process
from fakeregistry import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST
from realregistry import free_port, wait_until

TOKEN = "prefetch-admin-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ACCEPT_ALL = {"Accept": ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])}
ARM64 = {"architecture": "arm64", "os": "linux", "variant": "v8"}
AMD64 = {"architecture": "amd64", "os": "linux"}
DOCKERPROXY = os.path.join(ROOT, "dockerproxy.py")


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# Content ###################################################################

def add_attestation(fake, repo, subject):
    """A BuildKit attestation manifest of `subject` (an unknown/unknown index entry)."""
    config_bytes = json.dumps({"architecture": "unknown", "os": "unknown", "subject": subject}).encode()
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1", "subject": [{"digest": subject}]}).encode()
    config, layer = fake.add_blob(repo, config_bytes), fake.add_blob(repo, statement)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": OCI_CONFIG, "size": len(config_bytes), "digest": config},
                       "layers": [{"mediaType": "application/vnd.in-toto+json", "size": len(statement),
                                   "digest": layer}]}, indent=2).encode()
    digest = fake.add_manifest(repo, None, body, OCI_MANIFEST)
    return {"manifest": body, "digest": digest, "config": config, "layers": [layer], "size": len(body),
            "media_type": OCI_MANIFEST, "platform": {"architecture": "unknown", "os": "unknown"}}


def add_multiplatform(fake, repo, tag):
    """An OCI index tagged `tag`: amd64, arm64 and an attestation of each (BuildKit's layout).

    Every blob differs between the entries, so a count per digest tells which
    entry was fetched."""
    amd64 = fake.add_image(repo, None, [b"amd64 layer one " * 200, b"amd64 layer two " * 300], platform=AMD64)
    arm64 = fake.add_image(repo, None, [b"arm64 layer one " * 250], platform=ARM64)
    children = {"amd64": amd64, "arm64": arm64,
                "amd64 attestation": add_attestation(fake, repo, amd64["digest"]),
                "arm64 attestation": add_attestation(fake, repo, arm64["digest"])}
    entries = []
    for name, child in children.items():
        entry = {"mediaType": child["media_type"], "size": child["size"], "digest": child["digest"],
                 "platform": child["platform"]}
        if name.endswith("attestation"):
            subject = children[name.split()[0]]["digest"]
            entry["annotations"] = {"vnd.docker.reference.type": "attestation-manifest",
                                    "vnd.docker.reference.digest": subject}
        entries.append(entry)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, indent=2).encode()
    digest = fake.add_manifest(repo, tag, body, OCI_INDEX)
    return {"manifest": body, "digest": digest, "children": children}


def digests_of(image):
    """Every manifest and blob digest of an image (an index's children and theirs)."""
    found = {image["digest"]}
    for child in image.get("children", {"": image}).values():
        found |= {child["digest"], child["config"], *child["layers"]}
    return found


def blobs_of(*images):
    return {digest for image in images for digest in [image["config"], *image["layers"]]}


def index_blobs(image):
    """The blobs of every entry of an index."""
    return blobs_of(*image["children"].values())


# Upstream counters #########################################################

def answered(fake, server, method, path):
    """Requests of the fake with this exact path, not refused for a token (a 401 carries no content)."""
    return sum(1 for r in list(fake.requests) if r["server"] == server and r["method"] == method
               and r["path"] == path and r.get("status") != 401)


def blob_downloads(fake, digest):
    """GETs of a blob's bytes: from the CDN the registry redirects to."""
    return answered(fake, "cdn", "GET", f"/blobs/{digest}")


def mentions(fake, digest):
    """Requests of any kind, to any server of the fake, naming `digest`."""
    return fake.count(path_contains=digest)


def upstream_gets(fake):
    """(server, path) of every answered GET of content (registry and CDN, no token, no /v2/ ping)."""
    return sorted((r["server"], r["path"]) for r in list(fake.requests)
                  if r["method"] == "GET" and r["server"] in ("registry", "cdn")
                  and r.get("status") != 401 and r["path"] not in ("/v2/", "/v2"))


# Clients ###################################################################

def pull_everything(client, repo, tag):
    """What `skopeo copy --all` does: the tag, every manifest it names, every
    blob those name; each body checked against its digest.  The digests served."""
    status, headers, body = client.request("GET", f"/v2/{repo}/manifests/{tag}", ACCEPT_ALL)
    assert status == 200, body
    assert headers["Docker-Content-Digest"] == sha256(body)
    served, documents = {sha256(body)}, [json.loads(body)]
    while documents:
        document = documents.pop()
        for entry in document.get("manifests", []):
            status, _, body = client.request("GET", f"/v2/{repo}/manifests/{entry['digest']}", ACCEPT_ALL)
            assert status == 200 and sha256(body) == entry["digest"], (status, body[:200])
            served.add(entry["digest"])
            documents.append(json.loads(body))
        for blob in [document["config"], *document["layers"]] if "config" in document else []:
            status, _, body = client.request("GET", f"/v2/{repo}/blobs/{blob['digest']}")
            assert status == 200 and sha256(body) == blob["digest"], (status, body[:200])
            served.add(blob["digest"])
    return served


def cli_env(**extra):
    """A clean environment: nothing of this machine's settings reaches the command."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "TERM": "dumb"}
    env.update(extra)
    return env


def run_command(tmp_path, *argv, **environ):
    """python3 dockerproxy.py <argv> as a process, in an empty directory of
    its own (tmp_path/"command"): CompletedProcess (text)."""
    cwd = tmp_path / "command"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, DOCKERPROXY, *argv, "--env-file", os.devnull],
                          capture_output=True, text=True, timeout=120, cwd=str(cwd), env=cli_env(**environ))


def prefetch_command(tmp_path, fake, cache_dir, *argv, **environ):
    return run_command(tmp_path, "prefetch", *argv, "--cache-dir", str(cache_dir), "--upstream", f"docker={fake.url}",
                       **environ)


def log_lines(output):
    """The command's LogView lines, sorted (blobs end in any order), the times
    and the table's padding left out."""
    return sorted(" ".join(re.sub(r"\b\d+\.\d s\b", "T s", line).split()) for line in output.splitlines())


def stored_whole(cache_dir, digest):
    """The cache holds `digest`, its bytes verified now."""
    path = dockerproxy.object_path(str(cache_dir), digest)
    return os.path.exists(path) and dockerproxy.file_digest(path, "sha256") == digest


def ndjson(body):
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def status_document(proxy):
    status, _, body = proxy.request("GET", "/status.json", BEARER)
    assert status == 200, body
    return json.loads(body)


def prefetches_section(html):
    match = re.search(r'<section id="prefetches">.*?</section>', html, re.S)
    assert match, html
    return match.group(0)


@pytest.fixture
def start(start_proxy):
    """start_proxy (whose teardown ends keep-warm threads and prefetches)."""
    return start_proxy


# 1, 2: the command, standalone #############################################

def test_the_command_prefetches_every_platform_and_a_proxy_serves_it_all_with_upstream_down(fake, start, tmp_path):
    image = add_multiplatform(fake, "library/app", "1")
    cache_dir = tmp_path / "shared-cache"
    result = prefetch_command(tmp_path, fake, cache_dir, "app:1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"docker.io/library/app:1: {image['digest']}, {len(index_blobs(image))} blobs" in result.stdout
    assert f"docker.io/library/app:1: done, {len(index_blobs(image))} blobs fetched, 0 cached" in result.stdout
    assert re.search(r"^IMAGE +PLATFORMS +FETCHED", result.stdout, re.M), result.stdout
    assert answered(fake, "registry", "GET", "/v2/library/app/manifests/1") == 1
    for child in image["children"].values():
        assert answered(fake, "registry", "GET", f"/v2/library/app/manifests/{child['digest']}") == 1
    assert all(blob_downloads(fake, digest) == 1 for digest in index_blobs(image))
    fake.close()  # upstream gone: what follows comes from the cache or not at all
    proxy = start("--upstream", f"docker={fake.url}", "--cache-dir", str(cache_dir))
    served = pull_everything(RegistryClient(proxy), "library/app", "1")
    assert served == digests_of(image)


def test_platform_arm64_fetches_only_the_arm64_manifest_its_attestation_and_their_blobs(fake, tmp_path):
    image = add_multiplatform(fake, "library/app", "1")
    arm64, amd64 = image["children"]["arm64"], image["children"]["amd64"]
    wanted = [arm64, image["children"]["arm64 attestation"]]
    result = prefetch_command(tmp_path, fake, tmp_path / "cache", "app:1", "--platform", "linux/arm64")
    assert result.returncode == 0, result.stdout + result.stderr
    downloaded = {path.rpartition("/")[2] for server, path in upstream_gets(fake) if server == "cdn"}
    assert downloaded == blobs_of(*wanted)
    assert all(blob_downloads(fake, digest) == 1 for digest in blobs_of(*wanted))
    manifests = sorted(path for server, path in upstream_gets(fake) if "/manifests/" in path)
    assert manifests == sorted(["/v2/library/app/manifests/1"] +
                               [f"/v2/library/app/manifests/{child['digest']}" for child in wanted])
    for child in (amd64, image["children"]["amd64 attestation"]):
        for digest in digests_of(child):
            assert mentions(fake, digest) == 0, f"{digest} of amd64 was asked upstream"
            assert not os.path.exists(dockerproxy.object_path(str(tmp_path / "cache"), digest))
    assert "linux/arm64/v8, unknown/unknown" in result.stdout


# 3: a prefetch and clients, one download ####################################

def test_a_prefetch_and_four_pulling_clients_download_each_blob_once(fake, start):
    layers = [b"busy layer one " * 20000, b"busy layer two " * 20000]
    image = fake.add_image("library/busy", "1", layers)
    # Each layer's first download stalls after 64 KiB: whoever comes later must join it.
    held = [fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=64 * 1024) for digest in image["layers"]]
    proxy = start("--upstream", f"docker={fake.url}")
    together = threading.Barrier(5, timeout=30)
    results, events = {}, []

    def client(number):
        together.wait()
        results[number] = pull_everything(RegistryClient(proxy), "library/busy", "1")

    def prefetch():
        job = dockerproxy.PrefetchJob(proxy.server.proxy, [(dockerproxy.parse_image_reference("busy:1"), ())],
                                      events.append)
        together.wait()
        results["prefetch"] = job.run()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)] + [threading.Thread(target=prefetch)]
    for thread in threads:
        thread.start()

    def readers():
        return {fill["digest"]: fill["clients"] for fill in proxy.server.proxy.status()["cache"]["fills"]}
    # The clients fetch the first layer first; the prefetch asks for every blob at once.
    try:
        wait_until(lambda: readers().get(image["layers"][0]) == 5 and readers().get(image["layers"][1], 0) >= 1,
                   what="4 clients and the prefetch reading the stalled fills")
    finally:
        fake.release.set()
    for thread in threads:
        thread.join(60)
    assert results.get("prefetch") is True, events
    assert [results.get(n) for n in range(4)] == [digests_of(image)] * 4
    assert [fault.hits for fault in held] == [1, 1]
    for digest in blobs_of(image):
        assert blob_downloads(fake, digest) == 1, digest
        assert answered(fake, "registry", "GET", f"/v2/library/busy/blobs/{digest}") == 1, digest


def test_a_prefetch_asks_for_blobs_with_the_token_it_holds_never_anonymously_first(fake, start):
    """As docker does: the repository's token, had for its manifest, goes with
    every blob request.  A request without it is refused upstream (401), which
    takes the repository's public mark away, and a fill it leads is declined
    for every client that joined it (each then downloads the blob alone)."""
    image = fake.add_image("library/app", "1", [b"layer one " * 100, b"layer two " * 100, b"layer three " * 100])
    proxy = start("--upstream", f"docker={fake.url}", PREFETCH_PARALLEL="3")
    events = []
    job = dockerproxy.PrefetchJob(proxy.server.proxy, [(dockerproxy.parse_image_reference("app:1"), ())],
                                  events.append)
    assert job.run() is True, events
    assert all(blob_downloads(fake, digest) == 1 for digest in blobs_of(image))
    refused = [(r["method"], r["path"]) for r in list(fake.requests)
               if r["server"] == "registry" and "/blobs/" in r["path"] and r.get("status") == 401]
    assert refused == []


# 4: failures ###############################################################

def test_failed_images_are_named_with_their_registry_error_and_the_good_one_is_cached(fake, tmp_path):
    image = add_multiplatform(fake, "library/app", "1")
    fake.add_private_repo("someone/private")
    fake.add_image("someone/private", "1", [b"private layer"])
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    cache_dir = tmp_path / "cache"
    result = prefetch_command(tmp_path, fake, cache_dir, "library/missing:1", "someone/private:1",
                              f"{down}/team/app:1", "app:1", "--extra-routes", f"down=http://{down}")
    assert result.returncode == 1, result.stdout + result.stderr
    for name, code in (("docker.io/library/missing:1", "MANIFEST_UNKNOWN"),
                       ("docker.io/someone/private:1", "UNAUTHORIZED"),
                       (f"{down}/team/app:1", "UNAVAILABLE")):
        assert f"{name}: failed: {code}: " in result.stdout, result.stdout
        row = [line for line in result.stdout.splitlines() if line.startswith(name + " ")]
        assert len(row) == 1 and f"{code}: " in row[0], result.stdout
    assert f"docker.io/library/app:1: done, {len(index_blobs(image))} blobs fetched" in result.stdout
    assert all(stored_whole(cache_dir, digest) for digest in digests_of(image))
    tagged = dockerproxy.Cache(str(cache_dir), 0, 0).tag_entries(fake.url, "library/app", "1")
    assert [entry["digest"] for entry in tagged] == [image["digest"]]


# 5: the admin API ##########################################################

def test_admin_prefetch_streams_ndjson_and_the_status_page_and_metrics_record_it(fake, start):
    image = add_multiplatform(fake, "library/app", "1")
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    body = json.dumps({"images": ["app:1"]}).encode()
    status, headers, _ = proxy.request("POST", "/admin/prefetch", {"Content-Type": "application/json"}, body)
    assert status == 401
    status, headers, answer = proxy.request("POST", "/admin/prefetch", {**BEARER, "Content-Type": "application/json"},
                                            json.dumps({"images": ["Library/App:1"]}).encode())
    assert status == 400 and json.loads(answer)["errors"][0]["code"] == "NAME_INVALID"
    assert fake.count(path_contains="/manifests/") == 0
    status, headers, answer = proxy.request("POST", "/admin/prefetch", {**BEARER, "Content-Type": "application/json"},
                                            body)
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    assert headers["Content-Type"].startswith("application/x-ndjson")
    events = ndjson(answer)
    assert events[0]["event"] == "start" and events[0]["images"] == ["docker.io/library/app:1"]
    assert [event for event in events if event["event"] == "image"][0]["ok"] is True
    assert {event["digest"] for event in events if event["event"] == "blob"} == index_blobs(image)
    assert events[-1]["event"] == "end" and events[-1]["ok"] is True
    assert events[-1]["fetched"] == len(index_blobs(image))
    [job] = status_document(proxy)["prefetches"]
    assert job["source"] == "admin" and job["ok"] is True and job["images"] == job["images_done"] == 1
    assert job["failed"] == 0 and job["ended"] is not None
    status, _, metrics = proxy.request("GET", "/metrics", BEARER)
    assert status == 200
    assert 'dockerproxy_prefetch_images_total{result="ok"} 1' in metrics.decode().splitlines()


def test_a_running_admin_prefetch_shows_on_the_status_page(fake, start):
    image = add_multiplatform(fake, "library/app", "1")
    fake.fault("cdn", image["children"]["amd64"]["layers"][0], "stall")
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    answers = []
    request = threading.Thread(target=lambda: answers.append(proxy.request(
        "POST", "/admin/prefetch", {**BEARER, "Content-Type": "application/json"},
        json.dumps({"images": ["app:1"]}).encode(), timeout=60)))
    request.start()
    try:
        assert fake.wait_stalled(1)
        [job] = status_document(proxy)["prefetches"]
        assert job["ok"] is None and job["ended"] is None and job["source"] == "admin"
        assert job["current"] == ["docker.io/library/app:1"] and job["images_done"] == 0
        status, _, page = proxy.request("GET", "/status", {**BEARER, "Accept": "text/html"})
        assert status == 200
        section = prefetches_section(page.decode())
        assert "docker.io/library/app:1" in section and "running" in section
    finally:
        fake.release.set()
        request.join(60)
    status, _, answer = answers[0]
    assert status == 200 and ndjson(answer)[-1]["ok"] is True
    [job] = status_document(proxy)["prefetches"]
    assert job["ok"] is True


# 6: the command with --proxy ###############################################

def test_the_command_with_proxy_has_the_proxy_prefetch_and_prints_its_progress(fake, start, tmp_path):
    image = add_multiplatform(fake, "library/app", "1")
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    result = run_command(tmp_path, "prefetch", "app:1", "--proxy", proxy.url, ADMIN_TOKEN=TOKEN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"docker.io/library/app:1: {image['digest']}, {len(index_blobs(image))} blobs" in result.stdout
    assert f"docker.io/library/app:1: done, {len(index_blobs(image))} blobs fetched, 0 cached" in result.stdout
    assert re.search(r"^IMAGE +PLATFORMS +FETCHED", result.stdout, re.M), result.stdout
    assert all(stored_whole(proxy.cache.root, digest) for digest in digests_of(image))
    # What the command prints standalone, into a cache of its own, save the times and the blobs' order.
    standalone = prefetch_command(tmp_path, fake, tmp_path / "standalone-cache", "app:1")
    assert standalone.returncode == 0, standalone.stdout + standalone.stderr
    assert log_lines(result.stdout) == log_lines(standalone.stdout)
    assert os.listdir(tmp_path / "command") == [], "the command made a cache of its own"
    fake.reset_counters()
    refused = run_command(tmp_path, "prefetch", "app:1", "--proxy", proxy.url, ADMIN_TOKEN="wrong-token-0123456789")
    assert refused.returncode == 1
    assert f"{proxy.url} refused: UNAUTHORIZED: " in refused.stderr, refused.stderr
    assert fake.requests == []


# 7: keep-warm ##############################################################

def test_keep_warm_fetches_only_the_new_manifest_and_blobs_when_the_tag_moves(fake, start, tmp_path):
    shared = b"shared base layer " * 300
    first = fake.add_image("library/warm", "1", [shared, b"first app layer " * 200])
    listing = tmp_path / "prefetch.txt"
    listing.write_text("# kept warm\nwarm:1\n")
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN, PREFETCH_FILE=str(listing),
                  PREFETCH_INTERVAL="0.5s", MANIFEST_TTL="0")

    def rounds_ended(since):
        return [job for job in status_document(proxy)["prefetches"]
                if job["source"] == "keep-warm" and job["ended"] is not None and job["started"] > since]
    wait_until(lambda: rounds_ended(0), what="the first keep-warm round")
    assert [job["ok"] for job in rounds_ended(0)][-1] is True
    assert all(stored_whole(proxy.cache.root, digest) for digest in digests_of(first))
    fake.reset_counters()
    moved_at = time.time()
    second = fake.add_image("library/warm", "1", [shared, b"second app layer " * 200])
    wait_until(lambda: rounds_ended(moved_at), what="a keep-warm round after the tag moved")
    assert all(job["ok"] is True for job in rounds_ended(moved_at))
    gets = upstream_gets(fake)
    new_blobs = sorted(blobs_of(second) - {first["layers"][0]})
    assert len(new_blobs) == 2 and first["layers"][0] == second["layers"][0]
    assert gets == sorted([("registry", "/v2/library/warm/manifests/1")]
                          + [("registry", f"/v2/library/warm/blobs/{digest}") for digest in new_blobs]
                          + [("cdn", f"/blobs/{digest}") for digest in new_blobs])
    assert fake.count(server="registry", method="HEAD", path="/v2/library/warm/manifests/1") >= 1
    status, headers, body = RegistryClient(proxy).request("GET", "/v2/library/warm/manifests/1", ACCEPT_ALL)
    assert status == 200 and headers["Docker-Content-Digest"] == second["digest"] and body == second["manifest"]


# 8: pins ###################################################################

def test_images_in_prefetch_file_are_never_evicted_by_the_sweep_or_cache_prune(fake, start, tmp_path):
    pinned = fake.add_image("library/pinned", "1", [b"p" * 600])
    other = fake.add_image("library/other", "1", [b"o" * 10])
    pinned_size = pinned["size"] + sum(fake.blob_size(digest) for digest in blobs_of(pinned))
    other_size = other["size"] + sum(fake.blob_size(digest) for digest in blobs_of(other))
    # Without pins the pinned image, the least recently used, goes first; every
    # object fits in CACHE_MAX_SIZE alone and both images in twice it (else a
    # fill is passed through, not cached).
    assert 1024 < pinned_size and pinned_size + other_size <= 2048, (pinned_size, other_size)
    listing = tmp_path / "prefetch.txt"
    listing.write_text("pinned:1\n")
    proxy = start("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN, PREFETCH_FILE=str(listing),
                  CACHE_MAX_SIZE="1K", PREFETCH_PARALLEL="1", PREFETCH_INTERVAL="1h")
    cache_dir = proxy.cache.root

    def ended():
        return [job for job in status_document(proxy)["prefetches"] if job["ended"] is not None]
    wait_until(ended, what="the keep-warm prefetch")
    assert [(job["source"], job["ok"]) for job in ended()] == [("keep-warm", True)]
    assert all(stored_whole(cache_dir, digest) for digest in digests_of(pinned))
    proxy.clock.advance(3600)  # what is pulled now was used an hour after the pinned image
    evicted_before = proxy.server.proxy.metrics.value("dockerproxy_cache_evictions_total")
    pull_everything(RegistryClient(proxy), "library/other", "1")
    assert proxy.cache.wait_idle()
    proxy.cache.sweep()
    assert all(stored_whole(cache_dir, digest) for digest in digests_of(pinned))
    assert not any(os.path.exists(dockerproxy.object_path(str(cache_dir), d)) for d in digests_of(other))
    # All of the other image was stored, then evicted (by this sweep or the evictor's).
    assert proxy.server.proxy.metrics.value("dockerproxy_cache_evictions_total") - evicted_before == 3
    # cache prune, a process of its own, reads PREFETCH_FILE too.
    pull_everything(RegistryClient(proxy), "library/other", "1")
    assert proxy.cache.wait_idle()
    prune = run_command(tmp_path, "cache", "prune", "--cache-dir", str(cache_dir), "--cache-max-size", "1K",
                        "--upstream", f"docker={fake.url}", PREFETCH_FILE=str(listing))
    assert prune.returncode == 0, prune.stdout + prune.stderr
    assert all(stored_whole(cache_dir, digest) for digest in digests_of(pinned))
    assert not any(os.path.exists(dockerproxy.object_path(str(cache_dir), d)) for d in digests_of(other))


def test_cache_prune_without_the_prefetch_file_evicts_the_same_image(fake, start, tmp_path):
    """The control of the test above: the same cache, pruned with no pins, loses the image."""
    pinned = fake.add_image("library/pinned", "1", [b"p" * 600])
    cache_dir = tmp_path / "cache"
    result = prefetch_command(tmp_path, fake, cache_dir, "pinned:1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(stored_whole(cache_dir, digest) for digest in digests_of(pinned))
    listing = tmp_path / "prefetch.txt"
    listing.write_text("pinned:1\n")
    kept = run_command(tmp_path, "cache", "prune", "--cache-dir", str(cache_dir), "--cache-max-size", "1K",
                       "--upstream", f"docker={fake.url}", PREFETCH_FILE=str(listing))
    assert kept.returncode == 0 and "removed: 0" in kept.stdout, kept.stdout + kept.stderr
    pruned = run_command(tmp_path, "cache", "prune", "--cache-dir", str(cache_dir), "--cache-max-size", "1K",
                         "--upstream", f"docker={fake.url}")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert not all(stored_whole(cache_dir, digest) for digest in digests_of(pinned))


@pytest.mark.parametrize("content, why", [
    (None, "No such file or directory"),
    ("alpine:3.20\nLibrary/Alpine:1\n", "line 2: 'Library/Alpine:1': repository names must be lowercase"),
    ("alpine:3.20 linux\n", "line 1: 'linux' is not a platform"),
], ids=["missing file", "uppercase name", "bad platform"])
def test_a_bad_prefetch_file_at_start_exits_2_naming_it(tmp_path, content, why):
    listing = tmp_path / "prefetch.txt"
    if content is not None:
        listing.write_text(content)
    result = run_command(tmp_path, "--host", "127.0.0.1", "--port", "0", "--cache-dir", str(tmp_path / "cache"),
                         PREFETCH_FILE=str(listing))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"dockerproxy.py: error: {listing}: {why}" in result.stderr


# 9: beside a running proxy #################################################

def test_a_standalone_prefetch_beside_a_running_proxy_is_served_by_it_with_upstream_down(fake, tmp_path):
    image = add_multiplatform(fake, "library/app", "1")
    cache_dir = tmp_path / "cache"
    process, running = start_proxy_process(fake.url, cache_dir, free_port())
    try:
        result = prefetch_command(tmp_path, fake, cache_dir, "app:1")
        assert result.returncode == 0, result.stdout + result.stderr
        fake.close()
        served = pull_everything(RegistryClient(running), "library/app", "1")
        assert served == digests_of(image)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(10)
