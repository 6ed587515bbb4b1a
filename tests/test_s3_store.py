"""CACHE_S3: the bucket as the cache's shared tier, on a real S3 server (SeaweedFS, tests/s3server.py).

What lands in the bucket is read back with boto3 (never with dockerproxy.py's
own client), so each check is against an independent S3 client.

1. Start-up: a wrong secret (or unknown key) stops the process with exit 2 and
   one line naming AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the secret nowhere;
   an unknown bucket likewise, naming it; an S3 endpoint that does not answer
   is one warning, and the proxy serves from upstream and CACHE_DIR.
2. An upload cut between two parts (the S3 server killed) leaves no object;
   the next start on the same CACHE_DIR aborts it (its journal); another
   instance's upload is aborted at start only once older than STALE_UPLOAD_AGE.
3. A blob below MULTIPART_THRESHOLD goes up in one PUT, a larger one in
   parts; both hash to their digest in the bucket; uploads are counted.
4. Two proxies on one bucket, no PEERS: what A pulled B serves from the bucket
   (blobs, a HEAD, a tag) without asking upstream, keeping a hot copy; a
   bucket object whose bytes were changed behind the proxies' backs is never
   served as good, is deleted, and the next GET fetches it from upstream.
5. The sweep: least recently used first (last use markers count), nothing
   with CACHE_S3_LIFECYCLE or on an instance that is not the sweeper (which
   counts), CACHE_S3_MAX_AGE.
6. The AWS secret and PEER_SECRET appear nowhere: /status.json, /status,
   /metrics, a 307's Location, the DEBUG log, repr(config).

Parts 2 to 5 run the proxy in this process (conftest's start_proxy), where
MULTIPART_THRESHOLD, PART_SIZE and STALE_UPLOAD_AGE can be lowered; 1 and 6
run dockerproxy.py as a process.  A missing SeaweedFS or boto3 skips loudly,
or fails under REQUIRE_INTEROP=1 (conftest's s3server fixture).
"""

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys

import pytest

import dockerproxy
from cluster import clean_environ, make_cluster
from conftest import ROOT, RegistryClient, RunningProxy, proxy_config
from fakeregistry import DOCKER_MANIFEST, OCI_MANIFEST, sha256_digest
from realregistry import free_port, wait_until

DOCKERPROXY = os.path.join(ROOT, "dockerproxy.py")
PREFIX = "px"
MIB = 1 << 20
ACCEPT = {"Accept": ", ".join([DOCKER_MANIFEST, OCI_MANIFEST])}

make_cluster = make_cluster  # cluster.py's processes on this test's bucket


# Helpers ###################################################################

def s3_settings(server, bucket, **extra):
    return {"CACHE_S3": f"s3://{bucket}/{PREFIX}", "S3_ENDPOINT": server.endpoint,
            "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key, **extra}


def key_of(digest):
    return dockerproxy.blob_key(PREFIX + "/", digest)


def wait_for_keeper(proxy):
    """Until the bucket keeper's first round ended: the aborts of start-up, then a count."""
    wait_until(lambda: shared_of(proxy).counted is not None, timeout=60, what="the keeper's first round")


def shared_of(proxy):
    return proxy.server.proxy.shared


def metric(proxy, name, *labels):
    return proxy.server.proxy.metrics.value(name, tuple(labels))


def get_blob(proxy, repository, digest, method="GET"):
    """A blob through the proxy, as a client does it (token dance included): (status, headers, body)."""
    return RegistryClient(proxy).request(method, f"/v2/{repository}/blobs/{digest}")


def digest_of(body):
    return "sha256:" + hashlib.sha256(body).hexdigest()


def upstream_asked(fake, text, method=None):
    """Requests to the fake registry (not its token server) whose path contains `text`,
    but those answered 401 (asking for a token: nothing was sent)."""
    return sum(1 for r in list(fake.requests) if r["server"] == "registry" and text in r["path"]
               and (method is None or r["method"] == method) and r.get("status") != 401)


def traceback_free(log):
    assert "Traceback" not in log, log[-4000:]


def run_to_exit(tmp_path, env, timeout=60):
    """dockerproxy.py with `env`, expected to stop before serving: CompletedProcess."""
    return subprocess.run(
        [sys.executable, DOCKERPROXY, "--host", "127.0.0.1", "--port", str(free_port()), "--env-file", os.devnull,
         "--cache-dir", str(tmp_path / "cache"), "--upstream", "docker=http://127.0.0.1:9"],
        env={**clean_environ(), **env}, capture_output=True, text=True, timeout=timeout)


# 1. Start-up ####################################################################

@pytest.mark.parametrize("wrong", ["secret", "access key"])
def test_refused_credentials_stop_the_start_with_one_line(s3bucket, tmp_path, wrong):
    server, bucket = s3bucket
    env = s3_settings(server, bucket)
    if wrong == "secret":
        env["AWS_SECRET_ACCESS_KEY"] = secret = "wrong-" + server.secret_key[::-1]
    else:
        env["AWS_ACCESS_KEY_ID"], secret = "AKIANOBODYKNOWSTHIS", server.secret_key
    result = run_to_exit(tmp_path, env)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dockerproxy.py: error: CACHE_S3:"), lines
    assert "AWS_ACCESS_KEY_ID" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0], lines
    assert bucket in lines[0], lines
    assert secret not in result.stderr + result.stdout
    assert server.secret_key not in result.stderr + result.stdout
    traceback_free(result.stderr)


def test_unknown_bucket_stops_the_start_naming_it(s3bucket, tmp_path):
    server, _ = s3bucket
    result = run_to_exit(tmp_path, s3_settings(server, "no-such-bucket-here"))
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dockerproxy.py: error: CACHE_S3:") and "s3://no-such-bucket-here/" in lines[0], lines
    assert "no such bucket" in lines[0], lines
    assert server.secret_key not in result.stderr + result.stdout
    traceback_free(result.stderr)


def test_unreachable_bucket_at_start_is_a_warning_and_the_proxy_serves(fake, make_cluster):
    """S3_ENDPOINT on a port nobody listens on: the proxy starts, warns once, serves from upstream and CACHE_DIR."""
    layer = os.urandom(100_000)
    image = fake.add_image("library/offline", "1", [layer])
    nowhere = f"http://127.0.0.1:{free_port()}"
    [proxy] = make_cluster(fake.url).start(1, peers=False, env={"S3_ENDPOINT": nowhere})
    client = RegistryClient(RunningProxy(port=proxy.port))
    for round in ("upstream", "cache"):
        status, headers, body = client.request("GET", "/v2/library/offline/manifests/1", ACCEPT)
        assert status == 200 and digest_of(body) == image["digest"], (round, status, body[:300])
        for digest in image["layers"] + [image["config"]]:
            status, headers, body = client.request("GET", f"/v2/library/offline/blobs/{digest}")
            assert status == 200 and digest_of(body) == digest, (round, status, body[:300])
            assert headers["X-Cache"] == ("MISS" if round == "upstream" else "HIT"), (round, dict(headers))
    assert upstream_asked(fake, image["layers"][0], "GET") == 1
    proxy.stop()
    log = proxy.log()
    warnings = [line for line in log.splitlines() if "does not answer" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and nowhere.split("//")[1] in warnings[0], log[-4000:]
    traceback_free(log)


# 2. Uploads cut short, and stale ones ###############################################

@pytest.fixture
def small_parts(monkeypatch):
    """Multipart from 6 MiB, in parts of 5 MiB (S3's smallest part but the last)."""
    monkeypatch.setattr(dockerproxy, "MULTIPART_THRESHOLD", 6 * MIB)
    monkeypatch.setattr(dockerproxy, "PART_SIZE", 5 * MIB)


def test_an_upload_cut_between_parts_is_aborted_at_the_next_start(private_s3server, start_proxy, fake, small_parts,
                                                                  tmp_path):
    server = private_s3server
    bucket = server.create_bucket("cut-upload")
    digest = fake.add_pattern_blob("library/big", 16 * MIB, seed=7)
    proxy = start_proxy("--upstream", f"docker={fake.url}", **s3_settings(server, bucket))
    bucket_client = shared_of(proxy).bucket
    upload_part, parts = bucket_client.upload_part, []

    def kill_server_before_part_2(key, upload_id, number, *rest):
        if number == 2:
            server.stop(signal.SIGKILL)  # between part 1 (stored) and part 2
        parts.append((key, upload_id, number))
        return upload_part(key, upload_id, number, *rest)

    bucket_client.upload_part = kill_server_before_part_2
    status, _, body = get_blob(proxy, "library/big", digest)
    assert status == 200 and digest_of(body) == digest  # the client is served: the upload comes after
    assert proxy.cache.wait_idle(120), "the fill and its upload ended"
    assert [number for _, _, number in parts] == [1, 2], parts
    [(key, upload_id, _)] = parts[:1]
    assert key == key_of(digest)
    assert metric(proxy, "dockerproxy_s3_uploads_total", "failed") == 1
    assert metric(proxy, "dockerproxy_s3_uploads_total", "ok") == 0
    journal = dockerproxy.UploadJournal(os.path.join(str(tmp_path / "cache"), dockerproxy.UPLOAD_JOURNAL))
    assert journal.entries() == [(upload_id, key)]  # the abort could not reach the bucket

    server.restart()
    assert server.head(bucket, key) is None, "a cut upload left an object"
    assert [(k, u) for k, u, _ in server.pending_uploads(bucket)] == [(key, upload_id)]
    # The next start on this CACHE_DIR aborts what its journal holds.
    again = start_proxy("--upstream", f"docker={fake.url}", **s3_settings(server, bucket))
    wait_for_keeper(again)  # it aborts in its keeper thread (a slow bucket must not hold start-up)
    assert server.pending_uploads(bucket) == []
    assert server.head(bucket, key) is None
    assert journal.entries() == []


def test_another_instances_upload_is_aborted_at_start_only_when_stale(s3bucket, start_proxy, fake, monkeypatch,
                                                                      tmp_path):
    server, bucket = s3bucket
    theirs = key_of(sha256_digest(b"another instance's blob"))
    outside = "elsewhere/" + theirs[len(PREFIX) + 1:]  # not under this proxy's prefix
    their_upload = server.start_multipart(bucket, theirs, part=b"x" * 1000)
    server.start_multipart(bucket, outside, part=b"y" * 1000)

    wait_for_keeper(start_proxy("--upstream", f"docker={fake.url}", **s3_settings(server, bucket)))
    pending = sorted((key, upload_id) for key, upload_id, _ in server.pending_uploads(bucket))
    assert (theirs, their_upload) in pending and len(pending) == 2, "a fresh upload of another instance was aborted"

    monkeypatch.setattr(dockerproxy, "STALE_UPLOAD_AGE", 0.0)
    wait_for_keeper(start_proxy("--cache-dir", str(tmp_path / "other-cache"), "--upstream", f"docker={fake.url}",
                                **s3_settings(server, bucket)))
    assert [key for key, _, _ in server.pending_uploads(bucket)] == [outside]


# 3. Uploads: one PUT, or parts ##################################################

def test_small_blob_in_one_put_large_one_in_parts(s3bucket, start_proxy, fake, small_parts):
    server, bucket = s3bucket
    small = fake.add_blob("library/up", os.urandom(300_000))
    large = fake.add_pattern_blob("library/up", 13 * MIB, seed=3)
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_ALLOW="127.0.0.1/32",
                        **s3_settings(server, bucket))
    bucket_client, calls = shared_of(proxy).bucket, []

    def spy(name):
        method = getattr(bucket_client, name)

        def called(*args):
            calls.append((name,) + args[:1] + (args[-2:] if name == "put_file" else args[2:3]))
            return method(*args)
        return called

    for name in ("put_file", "start_upload", "upload_part", "complete_upload"):
        setattr(bucket_client, name, spy(name))
    for digest in (small, large):
        status, _, body = get_blob(proxy, "library/up", digest)
        assert status == 200 and digest_of(body) == digest
    assert proxy.cache.wait_idle(120)

    # the small one: one PUT, its x-amz-content-sha256 the digest's own hex
    assert [call for call in calls if call[1] == key_of(small)] == [
        ("put_file", key_of(small), small.split(":")[1], "application/octet-stream")]
    # the large one: 5 + 5 + 3 MiB
    large_calls = [call[0] if call[0] != "upload_part" else ("upload_part", call[2])
                   for call in calls if call[1] == key_of(large)]
    assert large_calls == ["start_upload", ("upload_part", 1), ("upload_part", 2), ("upload_part", 3),
                           "complete_upload"], calls
    for digest, size in ((small, 300_000), (large, 13 * MIB)):
        assert server.head(bucket, key_of(digest))["size"] == size
        assert server.sha256_of(bucket, key_of(digest)) == digest  # what landed
    assert server.head(bucket, key_of(large))["etag"].strip('"').endswith("-3")  # S3's mark of 3 parts
    assert server.pending_uploads(bucket) == []
    status, _, text = proxy.request("GET", "/metrics")
    assert status == 200
    assert 'dockerproxy_s3_uploads_total{result="ok"} 2' in text.decode().splitlines()
    assert 'dockerproxy_s3_uploads_total{result="failed"} 0' in text.decode().splitlines()


# 4. The bucket tier between two proxies ##############################################

def test_what_one_proxy_pulled_another_serves_from_the_bucket(s3bucket, start_proxy, fake, tmp_path):
    server, bucket = s3bucket
    layers = [os.urandom(200_000), os.urandom(300_000)]
    image = fake.add_image("library/tier", "v1", layers)
    settings = s3_settings(server, bucket)
    a = start_proxy("--cache-dir", str(tmp_path / "a"), "--upstream", f"docker={fake.url}", **settings)
    b = start_proxy("--cache-dir", str(tmp_path / "b"), "--upstream", f"docker={fake.url}", **settings)

    client = RegistryClient(a)
    status, _, body = client.request("GET", "/v2/library/tier/manifests/v1", ACCEPT)
    assert status == 200 and digest_of(body) == image["digest"]
    for digest in [image["config"]] + image["layers"]:
        status, _, body = client.request("GET", f"/v2/library/tier/blobs/{digest}")
        assert status == 200 and digest_of(body) == digest
    assert a.cache.wait_idle(60)
    for digest in [image["digest"], image["config"]] + image["layers"]:
        assert server.sha256_of(bucket, key_of(digest)) == digest
    fake.reset_counters()

    first, second = image["layers"]
    client = RegistryClient(b)
    # a blob only the bucket holds: a HIT, copied into B's CACHE_DIR, upstream not asked
    status, headers, body = client.request("GET", f"/v2/library/tier/blobs/{first}")
    assert (status, headers["X-Cache"], digest_of(body)) == (200, "HIT", first)
    assert b.cache.wait_idle(60)
    assert b.cache.store.exists(first), "no hot copy in B's CACHE_DIR"
    # a HEAD: its size from the bucket, upstream not asked, nothing copied
    status, headers, body = client.request("HEAD", f"/v2/library/tier/blobs/{second}")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) == len(layers[1]) and headers["Docker-Content-Digest"] == second
    assert not b.cache.store.exists(second)
    # the tag A pulled: a HIT on B (tag entry and manifest from the bucket)
    status, headers, body = client.request("GET", "/v2/library/tier/manifests/v1", ACCEPT)
    assert (status, headers["X-Cache"], digest_of(body)) == (200, "HIT", image["digest"])
    assert upstream_asked(fake, first) == upstream_asked(fake, second) == 0, fake.requests
    assert upstream_asked(fake, "/manifests/") == 0, fake.requests

    # The bucket's copy of `second` damaged behind the proxies' backs (same length):
    damaged = bytes(byte ^ 0xFF for byte in layers[1][:64]) + layers[1][64:]
    server.put(bucket, key_of(second), damaged, content_type="application/octet-stream")
    try:
        status, headers, body = client.request("GET", f"/v2/library/tier/blobs/{second}")
    except http.client.IncompleteRead:  # cut short: the bytes did not verify
        status, body = None, None
    assert not (status == 200 and digest_of(body) != second), "damaged bytes served whole as the blob"
    wait_until(lambda: server.head(bucket, key_of(second)) is None, timeout=30,
               what="the damaged object deleted from the bucket")
    assert not b.cache.store.exists(second)
    assert upstream_asked(fake, second, "GET") == 0
    # the next GET: from upstream, right, and uploaded again
    status, headers, body = client.request("GET", f"/v2/library/tier/blobs/{second}")
    assert (status, headers["X-Cache"], digest_of(body)) == (200, "MISS", second)
    assert upstream_asked(fake, second, "GET") == 1
    assert b.cache.wait_idle(60)
    assert server.sha256_of(bucket, key_of(second)) == second


# 5. The sweep ##############################################################################

class Sweeping:
    """A SharedStore on the bucket, made here (no keeper thread sweeping on its own)."""

    def __init__(self, tmp_path, server, bucket, **settings):
        config = proxy_config(tmp_path, **s3_settings(server, bucket, **settings))
        self.metrics, clock = dockerproxy.Metrics(), dockerproxy.Clock()
        self.shared = dockerproxy.SharedStore(dockerproxy.Bucket(config, clock, self.metrics), config, clock,
                                              self.metrics)


def stored_at(server, bucket, key):
    return server.head(bucket, key)["last_modified"].timestamp()


def put_blob(server, bucket, data):
    digest = sha256_digest(data)
    server.put(bucket, key_of(digest), data, content_type="application/octet-stream")
    return digest


def next_second(server, bucket, after):
    """Poll until the S3 server stamps a new object later than `after` (its times are in seconds)."""
    probe = f"{PREFIX}/probe"

    def later():
        server.put(bucket, probe, b"")
        return stored_at(server, bucket, probe) > after
    wait_until(later, timeout=10, interval=0.1, what="the S3 server's next second")


def blobs_in(server, bucket):
    return {key: size for key, size in server.objects(bucket, f"{PREFIX}/docker/").items()}


def test_sweep_evicts_the_least_recently_used_and_only_as_the_sweeper(s3bucket, tmp_path):
    server, bucket = s3bucket
    old = put_blob(server, bucket, os.urandom(1000))           # stored first, used last
    next_second(server, bucket, stored_at(server, bucket, key_of(old)))
    unused = put_blob(server, bucket, os.urandom(1000))        # the least recently used
    next_second(server, bucket, stored_at(server, bucket, key_of(unused)))
    new = put_blob(server, bucket, os.urandom(1000))
    marker = Sweeping(tmp_path, server, bucket).shared.uses
    marker.used(old)
    assert marker.flush() == 1
    assert stored_at(server, bucket, dockerproxy.used_key(PREFIX + "/", old)) > stored_at(server, bucket, key_of(unused))
    everything = {key_of(digest): 1000 for digest in (old, unused, new)}
    assert blobs_in(server, bucket) == everything

    # CACHE_S3_LIFECYCLE: the bucket's own rules decide; the sweeper removes nothing, counts.
    lifecycle = Sweeping(tmp_path, server, bucket, CACHE_S3_MAX_SIZE="2500", CACHE_S3_LIFECYCLE="true").shared
    assert lifecycle.sweep(True)["removed"] == 0
    assert blobs_in(server, bucket) == everything
    # Not the sweeper: counts only.
    counting = Sweeping(tmp_path, server, bucket, CACHE_S3_MAX_SIZE="2500").shared
    assert counting.sweep(False)["removed"] == 0
    assert blobs_in(server, bucket) == everything
    status = counting.status()
    assert (status["objects"], status["size_bytes"], status["max_size_bytes"]) == (3, 3000, 2500)
    # The sweeper: over 2500, down to 90% of it: one object goes, the least recently used.
    sweeper = Sweeping(tmp_path, server, bucket, CACHE_S3_MAX_SIZE="2500")
    result = sweeper.shared.sweep(True)
    assert (result["removed"], result["freed_bytes"], result["size_bytes"]) == (1, 1000, 2000)
    assert blobs_in(server, bucket) == {key_of(old): 1000, key_of(new): 1000}
    assert sweeper.metrics.value("dockerproxy_s3_evictions_total") == 1
    assert (sweeper.shared.status()["objects"], sweeper.shared.status()["size_bytes"]) == (2, 2000)


def test_sweep_removes_what_is_unused_longer_than_max_age(s3bucket, tmp_path):
    server, bucket = s3bucket
    stale = put_blob(server, bucket, os.urandom(500))
    shared = Sweeping(tmp_path, server, bucket).shared
    shared.uses.used(stale)
    shared.uses.flush()
    used = dockerproxy.used_key(PREFIX + "/", stale)
    last_use = max(stored_at(server, bucket, key_of(stale)), stored_at(server, bucket, used))
    wait_until(lambda: dockerproxy.time.time() - last_use > 2.5, timeout=10, what="the object unused for 2.5 s")
    fresh = put_blob(server, bucket, os.urandom(700))

    assert Sweeping(tmp_path, server, bucket, CACHE_S3_MAX_AGE="2s", CACHE_S3_LIFECYCLE="true").shared.sweep(
        True)["removed"] == 0
    result = Sweeping(tmp_path, server, bucket, CACHE_S3_MAX_AGE="2s").shared.sweep(True)
    assert (result["removed"], result["freed_bytes"], result["size_bytes"]) == (1, 500, 700)
    assert blobs_in(server, bucket) == {key_of(fresh): 700}
    assert server.head(bucket, used) is None, "the last use marker of a removed object stayed"


# 6. Secrets ######################################################################################

def test_secrets_appear_nowhere(fake, make_cluster):
    """Two peers (signed requests between them), S3_REDIRECT, DEBUG=true: neither the AWS secret nor
    PEER_SECRET in a 307's Location, /status.json, /status, /metrics, either log, or repr(config)."""
    cluster = make_cluster(fake.url)
    server, bucket = cluster.s3server, cluster.bucket
    a, b = cluster.start(2, env={"S3_REDIRECT": "true", "DEBUG": "true"})
    secrets = (server.secret_key, cluster.secret)
    config = dockerproxy.load_config(["--env-file", os.devnull], a.env)  # the process's settings
    assert config.aws_secret_access_key == server.secret_key and config.peer_secret == cluster.secret
    assert not any(secret in repr(config) for secret in secrets), repr(config)

    image = fake.add_image("library/quiet", "1", [os.urandom(50_000 + n) for n in range(4)])
    blobs = image["layers"] + [image["config"]]
    client = RegistryClient(RunningProxy(port=a.port))
    status, _, body = client.request("GET", "/v2/library/quiet/manifests/1", ACCEPT)
    assert status == 200
    for digest in blobs:
        assert client.request("GET", f"/v2/library/quiet/blobs/{digest}")[0] == 200
    # the blobs B owns, A asked B for (signed with PEER_SECRET)
    owned_by_b = [d for d in blobs if dockerproxy.rendezvous_order(cluster.peers, d)[0] == b.url]
    assert a.metric("dockerproxy_peer_requests_total", result="ok") == len(owned_by_b)
    wait_until(lambda: all(server.head(bucket, key_of(d)) for d in blobs), timeout=30, what="the uploads")
    status, headers, _ = client.request("GET", f"/v2/library/quiet/blobs/{blobs[0]}")
    assert status == 307
    seen = [headers["Location"]]
    for proxy in (a, b):
        for path in ("/status.json", "/status", "/metrics"):
            status, _, body = proxy.request("GET", path)
            assert status == 200, (path, body[:300])
            seen.append(body.decode())
    document = json.loads(seen[1])
    assert document["shared"]["bucket"]["bucket"] == f"s3://{bucket}/{PREFIX}/"
    assert sorted(peer["peer"] for peer in document["shared"]["peers"]) == sorted(cluster.peers)
    for proxy in (a, b):
        proxy.stop()
        log = proxy.log()
        assert " DEBUG " in log and "/healthz" in log, log[-2000:]
        seen.append(log)
    for text in seen:
        for secret in secrets:
            assert secret not in text
