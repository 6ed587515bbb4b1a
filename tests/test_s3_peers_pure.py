"""PEERS' pure parts (issue 14): rendezvous hashing, the peer request's proof, the shared-cache
settings' checks and which entry of PEERS an instance is.  No server, no network."""

import hashlib
import os
import random
import socket

import pytest

import dockerproxy
from dockerproxy import ConfigError, own_peer, peer_request_problem, peer_signature, rendezvous_order

PEERS = [f"http://10.0.0.{n}:8080" for n in range(1, 6)]
DIGESTS = ["sha256:" + hashlib.sha256(str(n).encode()).hexdigest() for n in range(1000)]
SECRET = "a-peer-secret-of-32-characters!!"


# rendezvous_order ##############################################################

def test_rendezvous_order_is_deterministic_and_ignores_the_order_peers_are_listed_in():
    shuffled = list(PEERS)
    random.Random(7).shuffle(shuffled)
    for digest in DIGESTS[:100]:
        order = rendezvous_order(PEERS, digest)
        assert sorted(order) == sorted(PEERS)  # every peer once
        assert rendezvous_order(PEERS, digest) == order
        assert rendezvous_order(shuffled, digest) == order
        assert rendezvous_order(tuple(reversed(PEERS)), digest) == order


def test_rendezvous_order_spreads_the_keys():
    owners = [rendezvous_order(PEERS, digest)[0] for digest in DIGESTS]
    for peer in PEERS:  # 200 each on average; a peer owning far fewer or more is a broken score
        assert 120 <= owners.count(peer) <= 280, {p: owners.count(p) for p in PEERS}


@pytest.mark.parametrize("removed", PEERS)
def test_removing_a_peer_moves_only_the_keys_it_owned(removed):
    remaining = [peer for peer in PEERS if peer != removed]
    moved = 0
    for digest in DIGESTS:
        before = rendezvous_order(PEERS, digest)
        after = rendezvous_order(remaining, digest)
        assert after == [peer for peer in before if peer != removed]  # the rest keep their order
        if before[0] == removed:
            moved += 1
            assert after[0] == before[1]  # to its second choice
        else:
            assert after[0] == before[0]
    assert moved > 0


def test_the_order_is_the_score_sha256_of_peer_and_key():
    """Every instance, whatever its version, must agree: the score is fixed (sha256 of "peer\\nkey")."""
    digest = DIGESTS[0]
    expected = sorted(PEERS, key=lambda peer: hashlib.sha256(f"{peer}\n{digest}".encode()).digest(), reverse=True)
    assert rendezvous_order(PEERS, digest) == expected


# peer_request_problem ##########################################################
#
# A proof is "<unix time> <nonce: 32 hex> <signature: 64 hex>", the signature an
# HMAC-SHA256 with PEER_SECRET of (method, the peer asked, path, time, nonce).
# The nonce's single use is Peers.problem()'s to check (test_s3_cluster.py).

NOW = 1_700_000_000
PEER = "http://10.0.0.2:8080"
PATH = "/v2/docker.io/library/alpine/blobs/sha256:" + "a" * 64
NONCE = "0123456789abcdef" * 2


def proof(timestamp, nonce=NONCE, secret=SECRET, method="GET", peer=PEER, path=PATH, signature=None):
    if signature is None:
        signature = peer_signature(secret, method, peer, path, str(timestamp), nonce)
    return f"{timestamp} {nonce} {signature}"


@pytest.mark.parametrize("given, problem", [
    (proof(NOW), ""),
    (proof(NOW - 60), ""),
    (proof(NOW + 60), ""),
    (" " + proof(NOW) + " ", ""),  # surrounding blanks trimmed
    (proof(NOW - 61), "stale timestamp"),
    (proof(NOW + 61), "stale timestamp"),
    (proof(NOW, secret="another-secret-of-32-characters!"), "wrong signature"),
    (proof(NOW, path=PATH.replace("alpine", "busybox")), "wrong signature"),
    (proof(NOW, method="HEAD"), "wrong signature"),
    (proof(NOW, peer="http://10.0.0.3:8080"), "wrong signature"),  # a proof for another peer
    (proof(NOW, signature=proof(NOW + 1).split(" ")[2]), "wrong signature"),  # it covers the time
    (proof(NOW, signature=proof(NOW, nonce="f" * 32).split(" ")[2]), "wrong signature"),  # and the nonce
    (proof(NOW, signature="0" * 64), "wrong signature"),
    (proof(NOW).split(" ", 1)[1], "malformed proof"),  # no timestamp
    ("", "malformed proof"),
    (proof("17000000x0"), "malformed proof"),  # timestamps that are not digits
    (proof("-5"), "malformed proof"),
    (proof("1700000000.5"), "malformed proof"),
    (proof(NOW, nonce="0123"), "malformed proof"),
    (proof(NOW, nonce="g" * 32), "malformed proof"),
    (proof(NOW).upper(), "malformed proof"),
    (proof(NOW).replace(" ", "  ", 1), "malformed proof"),
    (f"{NOW} {peer_signature(SECRET, 'GET', PEER, PATH, str(NOW), '')}", "malformed proof"),  # v1's form
])
def test_peer_request_problem(given, problem):
    assert peer_request_problem(SECRET, "GET", PEER, PATH, given, NOW) == problem


def test_the_signature_is_an_hmac_of_what_is_asked_and_when_never_the_secret():
    signature = peer_signature(SECRET, "GET", PEER, PATH, str(NOW), NONCE)
    assert len(signature) == 64 and int(signature, 16) >= 0
    assert SECRET not in signature
    assert signature != peer_signature(SECRET + "x", "GET", PEER, PATH, str(NOW), NONCE)


# check_shared_config (through load_config) #####################################

def load(tmp_path, **environ):
    """A Config from `environ` alone (no flag but --env-file, so CACHE_DIR="" can empty it)."""
    environ.setdefault("CACHE_DIR", str(tmp_path / "cache"))
    return dockerproxy.load_config(["--env-file", os.devnull], environ)


BUCKET = {"CACHE_S3": "s3://shared-cache/px", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
          "AWS_SECRET_ACCESS_KEY": "bucket-secret-key-value"}
CLUSTER = {"PEERS": "http://127.0.0.1:8081,http://127.0.0.1:8082", "PEER_SECRET": "p" * 16, "PORT": "8081"}


@pytest.mark.parametrize("environ, names", [
    ({**BUCKET, "CACHE_DIR": ""}, ["CACHE_S3", "CACHE_DIR"]),
    ({"CACHE_S3": "s3://shared-cache/px"}, ["CACHE_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]),
    ({**BUCKET, "AWS_SECRET_ACCESS_KEY": ""}, ["CACHE_S3", "AWS_SECRET_ACCESS_KEY"]),
    ({**BUCKET, "AWS_ACCESS_KEY_ID": ""}, ["CACHE_S3", "AWS_ACCESS_KEY_ID"]),
    ({"S3_REDIRECT": "true"}, ["S3_REDIRECT", "CACHE_S3"]),
    ({"CACHE_S3_MAX_SIZE": "100G"}, ["CACHE_S3_", "CACHE_S3"]),
    ({"CACHE_S3_MAX_AGE": "30d"}, ["CACHE_S3_", "CACHE_S3"]),
    ({"CACHE_S3_LIFECYCLE": "true"}, ["CACHE_S3_", "CACHE_S3"]),
    ({**BUCKET, "S3_REDIRECT_BASE": "https://cdn.example"}, ["S3_REDIRECT_BASE", "S3_REDIRECT"]),
    ({**CLUSTER, "CACHE_DIR": ""}, ["PEERS", "CACHE_DIR"]),
    ({**CLUSTER, "PEER_SECRET": ""}, ["PEERS", "PEER_SECRET"]),
    ({**CLUSTER, "PEER_SECRET": "p" * 15}, ["PEERS", "PEER_SECRET", "16"]),
    ({**CLUSTER, "MODE": "debug", "TARGET_UPSTREAM": "https://registry.example"}, ["PEERS", "MODE=debug"]),
    ({"PEER_SELF": "http://127.0.0.1:8081"}, ["PEER_SELF", "PEERS"]),
])
def test_shared_settings_that_do_not_go_together(tmp_path, environ, names):
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, **environ)
    message = str(raised.value)
    for name in names:
        assert name in message, message
    for secret in ("bucket-secret-key-value", "p" * 15, "p" * 16):
        assert secret not in message


@pytest.mark.parametrize("environ", [
    {},
    BUCKET,
    {**BUCKET, "S3_REDIRECT": "true", "S3_REDIRECT_BASE": "https://cdn.example", "CACHE_S3_MAX_SIZE": "1T",
     "CACHE_S3_MAX_AGE": "90d", "CACHE_S3_LIFECYCLE": "true"},
    CLUSTER,  # PEERS with the disk cache alone: allowed
    {**BUCKET, **CLUSTER},
    {**BUCKET, **CLUSTER, "PEER_SELF": "http://127.0.0.1:8082"},
])
def test_shared_settings_that_go_together(tmp_path, environ):
    config = load(tmp_path, **environ)
    expected = tuple(sorted(environ["PEERS"].split(","))) if "PEERS" in environ else ()
    assert config.peers == expected


# own_peer ######################################################################

def foreign_addresses(count):
    """Documentation addresses (RFC 5737) that are not this machine's: a socket cannot bind them.
    (A test machine may have one: this one's eth0 was 192.0.2.2.)"""
    found = []
    for address in ("198.51.100.7", "203.0.113.9", "198.51.100.8", "203.0.113.10", "192.0.2.201"):
        with socket.socket() as probe:
            try:
                probe.bind((address, 0))
            except OSError:
                found.append(address)
    assert len(found) >= count, "this machine has the documentation addresses"
    return found[:count]


def test_peer_self_names_this_instance_whatever_the_port(tmp_path):
    config = load(tmp_path, PEERS="http://10.9.8.7:8080,http://10.9.8.6:8080", PEER_SECRET="p" * 16,
                  PEER_SELF="http://10.9.8.6:8080", PORT="9999")
    assert own_peer(config) == "http://10.9.8.6:8080"


def test_peer_self_must_be_an_entry_of_peers(tmp_path):
    config = load(tmp_path, PEERS="http://10.9.8.7:8080,http://10.9.8.6:8080", PEER_SECRET="p" * 16,
                  PEER_SELF="http://10.9.8.5:8080")
    with pytest.raises(ConfigError, match="PEER_SELF"):
        own_peer(config)


@pytest.mark.parametrize("port, expected", [(8081, "http://127.0.0.1:8081"), (8082, "http://127.0.0.1:8082"),
                                            (8083, "http://127.0.0.1:8083")])
def test_the_entry_on_this_port_at_a_local_address_is_this_instance(tmp_path, port, expected):
    config = load(tmp_path, PEERS="http://127.0.0.1:8081,http://127.0.0.1:8082,http://127.0.0.1:8083",
                  PEER_SECRET="p" * 16, PORT=str(port))
    assert own_peer(config) == expected


def test_an_entry_on_this_port_at_another_machine_is_not_this_instance(tmp_path):
    [other] = foreign_addresses(1)
    config = load(tmp_path, PEERS=f"http://{other}:8081,http://127.0.0.1:8081", PEER_SECRET="p" * 16, PORT="8081")
    assert own_peer(config) == "http://127.0.0.1:8081"


@pytest.mark.parametrize("peers, port, word", [
    ("http://127.0.0.1:8081,http://127.0.0.1:8082", 9000, "none"),         # no entry on this port
    ("http://{0}:8081,http://{1}:8081", 8081, "none"),                     # on this port, other machines
    ("http://127.0.0.1:8081,http://localhost:8081", 8081, "several"),      # two names of this machine
])
def test_no_entry_or_several_is_an_error_asking_for_peer_self(tmp_path, peers, port, word):
    peers = peers.format(*foreign_addresses(2))
    config = load(tmp_path, PEERS=peers, PEER_SECRET="p" * 16, PORT=str(port))
    with pytest.raises(ConfigError) as raised:
        own_peer(config)
    assert word in str(raised.value) and "PEER_SELF" in str(raised.value) and "PEERS" in str(raised.value)
