"""Second attacker pass over the shared cache's fixes (after 1d98301): what the
fixes opened.  Each test fails on the working tree it was written against and
names the behaviour expected instead.

Findings (severity; test):
 1. the owner's 429 is relayed to every client of the asker, also to one with
    its own credentials: the owner's peer request is anonymous (or the route's
    account), whose upstream quota is not this client's.  Before the fix the
    asker fetched upstream with the client's credentials; now one anonymous
    quota spent on the owner (by anyone's anonymous pulls) refuses every
    logged-in client of every instance, for each digest the owner has, for as
    long as the owner's back-off lasts (up to MAX_UPSTREAM_BACKOFF, an hour)
    (medium; test_an_owner_429_is_not_relayed_to_a_client_with_credentials);
 2. the bookkeeping of a tag's fill now runs after the fill ended: a second
    fill of the same tag can start, and end, meanwhile; a late first record
    then writes the older manifest over the newer one in the bucket, fresh
    for MANIFEST_TTL, and every instance serves the tag's old manifest
    although upstream already said otherwise (low-medium;
    test_a_late_tag_record_does_not_overwrite_a_newer_one);
 3. the nonce memory is cleared when full (Recent's crude bound): past
    MAX_PEER_NONCES proofs within 2 x PEER_SKEW, every proof taken so far
    may be replayed again (low;
    test_a_full_nonce_memory_does_not_accept_a_replayed_proof).
"""

import json
import os
import threading

import dockerproxy
from fakeregistry import DOCKER_MANIFEST
from realregistry import free_port, wait_until
from test_s3_review_upstream import blob_owned_by, fetch
from test_s3_review_upstream import fake_s3, upstream  # noqa: F401 (fixtures)


def peers_env(me, *others, secret="peer-secret-0123456789abcdef"):
    return {"PEERS": ",".join([me] + list(others)), "PEER_SELF": me, "PEER_SECRET": secret}


# 1. the owner's 429, relayed to a client whose own quota is untouched ##########

def test_an_owner_429_is_not_relayed_to_a_client_with_credentials(start_proxy, upstream, tmp_path):
    """Upstream answers the owner's (anonymous) peer request 429.  The asker's
    client brings its own credentials: the proxy keeps upstream 429s per
    client identity (UpstreamBackoff) because a logged-in client has a quota of
    its own.  The asker must fetch upstream with the client's credentials, as
    it did before the 429 relay; it relays the owner's 429 instead."""
    port_a, port_b = free_port(), free_port()
    a_url, b_url = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    data, digest = blob_owned_by(b_url, [a_url])
    upstream.add_blob("library/app", data)
    asker = start_proxy("--port", str(port_a), "--upstream", f"docker={upstream.url}",
                        "--cache-dir", str(tmp_path / "a"), **peers_env(a_url, b_url))
    owner = start_proxy("--port", str(port_b), "--upstream", f"docker={upstream.url}",
                        "--cache-dir", str(tmp_path / "b"), **peers_env(b_url, a_url))
    # the anonymous quota (the owner's peer request) is spent; the client's own is not
    upstream.fault("registry", "/blobs/", "status", count=1, method="GET", status=429,
                   headers=[("Retry-After", "600")])
    credentials = {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}  # user:password
    status, body, _ = fetch(asker, f"/v2/library/app/blobs/{digest}", headers=credentials)
    assert owner.server.proxy.metrics.value("dockerproxy_peer_served_total", ("miss",)) >= 1 or \
        upstream.count(server="registry", method="GET", path_contains="/blobs/") >= 1, "the owner was not asked"
    assert status == 200 and body == data, (
        f"a client with its own credentials got {status}: the owner's anonymous 429 was relayed to it")


# 2. a late tag record, written over a newer one ###############################

def test_a_late_tag_record_does_not_overwrite_a_newer_one(start_proxy, upstream, fake_s3):
    """Fill 1 of library/app:v1 (manifest M1) ends; its bookkeeping (record_late)
    waits on a slow bucket PUT of the tag entry.  Upstream moves v1 to M2; the
    next pull of v1 fills M2 and writes its entry.  Then the first PUT goes
    through: the bucket's entry says M1, checked "now", and the tag is a HIT
    on M1 for MANIFEST_TTL on every instance although upstream said M2 last.
    (Before record_late the second fill could not start before the first
    fill's bookkeeping was done: the same key was still running.)"""
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--read-timeout", "30", **fake_s3.env())
    layer = os.urandom(500)
    first = upstream.add_image("library/app", "v1", [layer])
    release, held = threading.Event(), threading.Event()
    tag_puts = []

    def hold_first_tag_put(request):
        if request.method == "PUT" and "/_tags/v1/" in request.key:
            tag_puts.append(json.loads(request.body))
            if len(tag_puts) == 1:
                held.set()
                release.wait(30)  # then served as usual (written)
        return None
    fake_s3.hooks.append(hold_first_tag_put)
    accept = {"Accept": DOCKER_MANIFEST}
    try:
        status, _, body = proxy.request("GET", "/v2/library/app/manifests/v1", accept)
        assert status == 200 and body == first["manifest"]
        assert held.wait(10), "the first fill wrote no tag entry"
        second = upstream.add_image("library/app", "v1", [layer, os.urandom(600)])  # the tag moved
        status, _, body = proxy.request("GET", "/v2/library/app/manifests/v1", accept)
        assert status == 200 and body == second["manifest"], "the second pull did not get the moved tag"
        try:  # on the code under review it lands now; a proxy that orders a tag's writes holds it back
            wait_until(lambda: any(put["digest"] == second["digest"] for put in tag_puts[1:]),
                       timeout=5, what="the second pull's tag entry written")
        except TimeoutError:
            pass
    finally:
        release.set()
    assert proxy.server.proxy.cache.wait_idle(30)
    entries = [json.loads(data) for key, (data, _, _) in fake_s3.objects.items() if "/_tags/v1/" in key]
    assert entries and all(entry["digest"] == second["digest"] for entry in entries), (
        f"the bucket's entry for v1 names {[entry['digest'] for entry in entries]}, "
        f"an older manifest than upstream's last answer {second['digest']}")
    status, headers, body = proxy.request("GET", "/v2/library/app/manifests/v1", accept)
    assert status == 200 and body == second["manifest"], (
        f"the tag is served as {headers.get('Docker-Content-Digest')} ({headers.get('X-Cache')}) "
        f"after upstream moved it to {second['digest']}")


# 3. the nonce memory when full #################################################

def test_a_full_nonce_memory_does_not_accept_a_replayed_proof(monkeypatch):
    """Peers.nonces is a Recent bounded by MAX_PEER_NONCES, and Recent clears
    itself when full: a proof seen on the wire (peer requests are plain HTTP)
    is accepted again after enough legitimate peer requests (100,000 within
    2 x PEER_SKEW on a busy cluster), within its 60 s.  A full memory must
    refuse (or keep refusing replays), never forget every nonce at once."""
    monkeypatch.setattr(dockerproxy, "MAX_PEER_NONCES", 50)
    me, other = "http://127.0.0.1:5001", "http://127.0.0.1:5002"
    config = dockerproxy.load_config(["--env-file", os.devnull, "--cache-dir", "/tmp/unused-cache", "--port", "5001"],
                                     {"PEERS": f"{me},{other}", "PEER_SELF": me,
                                      "PEER_SECRET": "peer-secret-0123456789abcdef"})
    peers = dockerproxy.Peers(config, dockerproxy.Clock(), dockerproxy.Metrics(), me)
    path = "/v2/docker.io/library/app/blobs/sha256:" + "a" * 64
    seen_on_the_wire = peers.proof("GET", me, path)
    assert peers.problem("GET", path, seen_on_the_wire) == ""
    assert peers.problem("GET", path, seen_on_the_wire) == "replayed"
    for _ in range(dockerproxy.MAX_PEER_NONCES):  # a busy cluster's own requests
        assert peers.problem("GET", path, peers.proof("GET", me, path)) in ("", "busy", "replayed")
    assert peers.problem("GET", path, seen_on_the_wire) != "", "a replayed proof was accepted again"
