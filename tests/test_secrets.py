"""Secrets stay where they belong: a full pull with the proxy's own upstream
account and DEBUG=true, then every log line, every header and body a client
got, and every file under CACHE_DIR searched for each password, each Basic
string, every token and refresh token the fake upstream issued, and the
signatures of the CDN URLs it redirected to.

One place may hold a secret: the answer to a client's own token request holds
the token (and refresh token) issued for that request.  Nothing else does.
The figure is the number of occurrences found (goal 0); FIGURES keeps it per
run for the README's security section.
"""

import base64
import hashlib
import json
import logging
import os
import socket
import threading
import urllib.parse

import pytest

import dockerproxy
from conftest import RegistryClient, start_proxy_process
from fakeregistry import DOCKER_MANIFEST, SIGNATURE_PREFIX, FakeRegistry
from realregistry import free_port

MANIFEST_ACCEPT = {"Accept": DOCKER_MANIFEST}
PROXY_USER, PROXY_PASSWORD = "proxyaccount", "pr0xy-secret-pa55"
CLIENT_USER, CLIENT_PASSWORD = "alice", "alice-secret-pa55"

# Occurrences found by each run, named by its test: the README quotes them.
FIGURES = {}


class IssuingRegistry(FakeRegistry):
    """The fake Docker Hub, noting every token and refresh token it issues, and to whom."""

    def __init__(self, **kwargs):
        self.issued = []  # (username or None, "token" | "refresh token", value)
        self._issued_lock = threading.Lock()
        super().__init__(**kwargs)

    def _issue_token(self, scopes, username, with_refresh):
        reply = super()._issue_token(scopes, username, with_refresh)
        answer = json.loads(b"".join(reply.chunks))
        with self._issued_lock:
            self.issued.append((username, "token", answer["token"]))
            if "refresh_token" in answer:
                self.issued.append((username, "refresh token", answer["refresh_token"]))
        return reply


@pytest.fixture
def upstream():
    """Private repositories, the proxy's account and a client's account, blobs behind a signed CDN."""
    with IssuingRegistry(users={PROXY_USER: PROXY_PASSWORD, CLIENT_USER: CLIENT_PASSWORD},
                         private_repos={"team/app", "team/tool"}) as fake:
        fake.images = {
            "team/app": fake.add_image("team/app", "1", [b"app layer one" * 100, b"app layer two" * 50]),
            "team/tool": fake.add_image("team/tool", "2", [b"tool layer" * 80]),
        }
        yield fake


# What clients got ###############################################################

class Answer:
    """One answer a client received; its body may hold the secrets in `allowed`."""

    def __init__(self, request, status, headers, body, allowed=()):
        self.request = request
        self.head = f"{status}\n{headers}"
        self.body = body.decode("latin-1")
        self.allowed = allowed

    def places(self):
        return [(f"headers of the answer to {self.request}", self.head, ()),
                (f"body of the answer to {self.request}", self.body, self.allowed)]


class RecordingProxy:
    """A RunningProxy for one client, keeping every answer that client got.

    A token answer may hold what the fake issued, during that very request, to
    this client's own account (None: anonymous): its own token."""

    def __init__(self, running, fake, answers, user=None):
        self.running = running
        self.host = running.host
        self.fake = fake
        self.answers = answers
        self.user = user

    def request(self, method, path, headers=None, body=None, host=None, timeout=30):
        issued_before = len(self.fake.issued)
        status, answer_headers, answer_body = self.running.request(method, path, headers, body, host, timeout)
        allowed = set()
        if urllib.parse.urlsplit(path).path == "/v2/auth":
            allowed = {value for user, _, value in self.fake.issued[issued_before:] if user == self.user}
        self.answers.append(Answer(f"{method} {path}", status, answer_headers, answer_body, allowed))
        return status, answer_headers, answer_body


def raw_exchange(port, request):
    """A request http.client would not send as it is; everything that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request.encode("latin-1"))
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def pull(client, fake, repository, tag):
    """The manifest by tag, then the config and every layer, each checked."""
    image = fake.images[repository]
    status, _, body = client.request("GET", f"/v2/{repository}/manifests/{tag}", MANIFEST_ACCEPT)
    assert status == 200 and body == image["manifest"], (status, body[:200])
    for digest in [image["config"]] + image["layers"]:
        status, _, blob = client.request("GET", f"/v2/{repository}/blobs/{digest}")
        assert status == 200 and hashlib.sha256(blob).hexdigest() == digest.split(":")[1], status


def full_pull(running, fake):
    """Every way a client meets the proxy's auth; returns every answer clients got."""
    answers = []

    def client(user=None, password=None, post=False):
        return RegistryClient(RecordingProxy(running, fake, answers, user), user, password, post=post)
    basic = "Basic " + base64.b64encode(f"{CLIENT_USER}:{CLIENT_PASSWORD}".encode()).decode()
    status, headers, _ = RecordingProxy(running, fake, answers).request("GET", "/v2/")
    assert status == 401
    # The proxy's account serves clients without credentials, so no pull of a client
    # with credentials is challenged: each fetches its token as the /v2/ challenge says.
    challenge = dict(dockerproxy.parse_challenge(headers["WWW-Authenticate"])[1], scope="repository:team/app:pull")
    with_basic_ping = RecordingProxy(running, fake, answers, CLIENT_USER)
    assert with_basic_ping.request("GET", "/v2/", {"Authorization": basic})[0] == 401
    # GET /v2/auth with Basic credentials, as docker does after `docker login`
    with_basic = client(CLIENT_USER, CLIENT_PASSWORD)
    with_basic.token = with_basic.fetch_token(challenge)
    pull(with_basic, fake, "team/app", "1")
    assert with_basic.request("GET", "/v2/")[0] == 200
    # POST /v2/auth with a password, as containerd does: the answer carries a refresh token
    with_password = client(CLIENT_USER, CLIENT_PASSWORD, post=True)
    with_password.token = with_password.fetch_token(challenge)
    pull(with_password, fake, "team/app", "1")
    refresh_token = json.loads(with_password.token_answers[-1][1])["refresh_token"]
    # POST /v2/auth with that refresh token, then a pull with the token it brings
    by_refresh = RecordingProxy(running, fake, answers, CLIENT_USER)
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "service": fake.service,
            "scope": "repository:team/app:pull", "client_id": "test"}
    status, _, body = by_refresh.request("POST", "/v2/auth", {"Content-Type": "application/x-www-form-urlencoded"},
                                         urllib.parse.urlencode(form).encode())
    assert status == 200, body
    refreshed = client(CLIENT_USER)
    refreshed.token = json.loads(body)["token"]
    pull(refreshed, fake, "team/app", "1")
    # GET /v2/auth carrying the refresh token in its query (the Worker's shape)
    query = urllib.parse.urlencode({"scope": "repository:team/app:pull", "service": fake.service,
                                    "grant_type": "refresh_token", "refresh_token": refresh_token})
    assert by_refresh.request("GET", "/v2/auth?" + query, {"Authorization": basic})[0] == 200
    # no credentials: the token a client fetches anyway, then the proxy pulls with its own account
    anonymous = client()
    anonymous.token = anonymous.fetch_token(dict(challenge, scope="repository:team/tool:pull"))
    pull(anonymous, fake, "team/tool", "2")
    pull(client(), fake, "team/app", "1")
    return answers


# Searching ######################################################################

def secrets_of(fake):
    """{what it is: its value} for everything that must not leak."""
    found = {}
    for user, password in fake.users.items():
        found[f"password of {user}"] = password
        found[f"Basic credentials of {user}"] = base64.b64encode(f"{user}:{password}".encode()).decode()
    for number, (user, kind, value) in enumerate(fake.issued):
        found[f"{kind} #{number} issued to {user or 'anonymous'}"] = value
    found["a signed CDN URL"] = SIGNATURE_PREFIX
    return found


def cache_files(root):
    """(place, text) of every file under the cache dir, its path included."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                yield f"cache file {os.path.relpath(path, root)}", path + "\n" + file.read().decode("latin-1")


def occurrences(fake, places):
    """Every (secret, place) where a secret appears, counted; `places` are (place, text, allowed)."""
    found = []
    for what, value in secrets_of(fake).items():
        for place, text, allowed in places:
            count = text.count(value)
            if count and value not in allowed:
                found.append(f"{what} in {place} ({count}x)")
    return found


def places_of(answers, log_text, stderr, cache_dir):
    """(place, text, secrets it may hold) of everything a run left where someone may read it."""
    places = [place for answer in answers for place in answer.places()]
    places += [(f"log line {line!r:.120}", line, ()) for line in log_text.splitlines()]
    places += [(f"stderr line {line!r:.120}", line, ()) for line in stderr.splitlines()]
    places += [(place, text, ()) for place, text in cache_files(cache_dir)]
    return places


def figure(name, found, places):
    """Record and print a run's figure; its text, with the first occurrences, explains a failure."""
    FIGURES[name] = f"{len(found)} occurrences in {len(places)} places"
    print(f"secrets figure: {name}: {FIGURES[name]}")
    return f"{name}: {FIGURES[name]}\n  " + "\n  ".join(found[:20])


# The tests ######################################################################

def auth_file(tmp_path, fake):
    """A docker config.json whose "auth" entry names the fake's host."""
    path = tmp_path / "config.json"
    auth = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    path.write_text(json.dumps({"auths": {urllib.parse.urlsplit(fake.url).netloc: {"auth": auth}}}))
    return str(path)


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no cache"])
@pytest.mark.parametrize("account", ["UPSTREAM_DOCKER_PASSWORD", "REGISTRY_AUTH_FILE"])
def test_a_full_pull_with_debug_logging_leaks_no_password_token_or_signature(
        start_proxy, upstream, caplog, capsys, tmp_path, account, cached):
    caplog.set_level(logging.DEBUG, logger="dockerproxy")
    flags = ["--upstream", f"docker={upstream.url}", "--debug"] + ([] if cached else ["--cache-dir", ""])
    if account == "REGISTRY_AUTH_FILE":
        proxy = start_proxy(*flags, "--registry-auth-file", auth_file(tmp_path, upstream))
    else:
        proxy = start_proxy(*flags, UPSTREAM_DOCKER_USERNAME=PROXY_USER, UPSTREAM_DOCKER_PASSWORD=PROXY_PASSWORD)
    answers = full_pull(proxy, upstream)
    cache_dir = str(tmp_path / "cache")
    if cached:
        assert proxy.cache.wait_idle(), "fills stored"
    assert {user for user, _, _ in upstream.issued} == {CLIENT_USER, PROXY_USER}, "both accounts were used"
    assert any(record.levelno == logging.DEBUG for record in caplog.records), "DEBUG lines were logged"
    places = places_of(answers, caplog.text, capsys.readouterr().err, cache_dir)
    found = occurrences(upstream, places)
    report = figure(f"full pull, {account}, {'cache' if cached else 'no cache'}", found, places)
    assert not found, report


def test_a_real_process_with_debug_logging_leaks_no_password_token_or_signature(upstream, tmp_path, monkeypatch):
    for name in list(os.environ):  # the process reads its settings from the environment
        if name.startswith("UPSTREAM_") or name == "REGISTRY_AUTH_FILE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("DEBUG", "true")
    monkeypatch.setenv("UPSTREAM_DOCKER_USERNAME", PROXY_USER)
    monkeypatch.setenv("UPSTREAM_DOCKER_PASSWORD", PROXY_PASSWORD)
    cache_dir = tmp_path / "cache"
    process, running = start_proxy_process(upstream.url, cache_dir, free_port())
    try:
        answers = full_pull(running, upstream)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert " DEBUG " in stderr, "the process logged at DEBUG"
    places = places_of(answers, "", stderr, str(cache_dir))
    found = occurrences(upstream, places)
    report = figure("full pull, real process", found, places)
    assert not found, report


def test_a_refresh_token_in_a_refused_token_request_stays_out_of_the_log(start_proxy, upstream, caplog, capsys):
    """Token requests the proxy cannot serve still carry a client's secret in their query."""
    proxy = start_proxy("--upstream", f"docker={upstream.url}", "--debug")
    caplog.set_level(logging.DEBUG, logger="dockerproxy")
    answers = []
    client = RegistryClient(RecordingProxy(proxy, upstream, answers, CLIENT_USER), CLIENT_USER, CLIENT_PASSWORD,
                            post=True)
    pull(client, upstream, "team/app", "1")
    refresh_token = json.loads(client.token_answers[-1][1])["refresh_token"]
    query = "?grant_type=refresh_token&refresh_token=" + refresh_token
    recorder = RecordingProxy(proxy, upstream, answers, CLIENT_USER)
    # Content-Length in superscript digits: str.isdigit() accepts them, int() does not
    recorder.request("POST", "/v2/auth" + query, {"Content-Length": "\u00b2", "Content-Type":
                                                 "application/x-www-form-urlencoded"}, b"ab")
    # an absolute-form target whose host urllib cannot parse
    target = "http://[x/v2/auth" + query
    answer = raw_exchange(proxy.port, f"GET {target} HTTP/1.1\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n")
    answers.append(Answer(f"GET {target}", "", "", answer))
    places = places_of(answers, caplog.text, capsys.readouterr().err, proxy.cache.root)
    found = occurrences(upstream, places)
    report = figure("refused token requests", found, places)
    assert not found, report
