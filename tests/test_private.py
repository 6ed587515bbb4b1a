"""Private content: no client that upstream would refuse ever gets a private object.

The matrix asks for each object of a private image (the manifest by tag and by
digest, the config and a layer, with GET and HEAD) as a refused client: with
no credentials, with a token fetched without them, with a wrong password, with
another user's token, with the owner's token for another repository, and with
an expired token; before and after the owner pulled the image through the
proxy (so that it is cached), with the upstream up, answering 503, or stopped.
Every answer is checked for the object's bytes, its digest and a success
status; the module's figure is the number of objects leaked (goal: 0).

Then one test per case that a one-line weakening of the access rules once got
through the rest of the suite: joining a fill in progress, the stale paths, an
anonymous marker past its TTL, a corrupted manifest by tag, an http realm named
by an https upstream, and the cross-repository leak through manifest references.
"""

import base64
import collections
import http.client
import json
import socket
import ssl
import threading

import pytest

from conftest import RegistryClient
from dockerproxy import ACCESS_TTL, accept_kind
from fakeregistry import (DOCKER_LAYER, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX,
                          OCI_MANIFEST, FakeRegistry)
from realregistry import wait_until

ACCEPT_ALL = ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])
USERS = {"alice": "alice-pa55", "bob": "bob-pa55"}
PRIVATE = "alice/private"
OWNERS = {PRIVATE: {"alice"}, "alice/other": {"alice"}}
# Larger than the stall point of the fill tests, and than one sendfile-free answer.
PRIVATE_LAYER = b"alice's private layer\n" * 15000
FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
NONDISTRIBUTABLE_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
PLATFORM = {"architecture": "amd64", "os": "linux"}


# The fake upstream, with owners ##############################################

class OwnedRegistry(FakeRegistry):
    """The fake upstream, where a private repository is pulled by its owners only.

    FakeRegistry alone lets every user who logs in pull every private
    repository; Docker Hub grants a user's token only the repositories the
    user may pull, and silently leaves the other scopes out.
    """

    def __init__(self, owners=OWNERS, users=USERS):
        super().__init__(users=users, private_repos=set(owners))
        self.owners = owners

    def _issue_token(self, scopes, username, with_refresh):
        granted = [scope for scope in scopes if self.may_pull(username, scope)]
        return super()._issue_token(granted, username, with_refresh)

    def may_pull(self, username, scope):
        name = scope.partition(":")[2].rpartition(":")[0]
        return name not in self.private_repos or username in self.owners.get(name, ())


# Clients ####################################################################

Answer = collections.namedtuple("Answer", "status headers body complete")
PrivateObject = collections.namedtuple("PrivateObject", "path data digest")


def ask(proxy, method, path, authorization=None, accept=ACCEPT_ALL):
    """One request as a client sends it, no challenge followed; a body cut
    short is kept (complete=False): a refusal may arrive that way."""
    headers = {"Accept": accept}
    if authorization:
        headers["Authorization"] = authorization
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        try:
            body, complete = response.read(), True
        except http.client.IncompleteRead as short:
            body, complete = short.partial, False
        return Answer(response.status, response.headers, body, complete)
    finally:
        connection.close()


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def login(proxy, repository, user=None, password=None):
    """'Bearer <token>' from the proxy's /v2/auth, as docker gets it; None if refused."""
    headers = {"Authorization": basic(user, password)} if user else {}
    status, _, body = proxy.request(
        "GET", f"/v2/auth?service={FakeRegistry.service}&scope=repository:{repository}:pull", headers)
    return f"Bearer {json.loads(body)['token']}" if status == 200 else None


def leaked(answer, obj):
    """Whether an answer gave a client any of `obj`: a success, its bytes or its digest."""
    return (answer.status < 400 or obj.data in answer.body
            or answer.headers.get("Docker-Content-Digest") == obj.digest)


def receives(answer, method, obj):
    """Whether an answer is the whole object (a HEAD: its headers; a CDN's answer names no digest)."""
    return (answer.status == 200 and answer.complete
            and answer.headers.get("Docker-Content-Digest", obj.digest) == obj.digest
            and answer.body == (b"" if method == "HEAD" else obj.data))


def break_upstream(fake, how):
    if how == "answering 503":
        fake.fault("registry", "/v2/", "status", count=10 ** 6, status=503)
    elif how == "answering 500":
        fake.fault("registry", "/v2/", "status", count=10 ** 6, status=500)
    elif how == "stopped":
        fake.close()
    else:
        assert how == "up"


# Alice's private image ######################################################

class PrivateImage:
    """An image on an OwnedRegistry (alice's private one unless told), and a proxy in front of it."""

    def __init__(self, fake, proxy, repository=PRIVATE, tag="1"):
        self.fake, self.proxy, self.repository, self.tag = fake, proxy, repository, tag
        image = fake.add_image(repository, tag, [PRIVATE_LAYER])
        config = b"".join(fake.iter_blob(image["config"]))
        base = f"/v2/{repository}"
        self.objects = {
            "manifest by tag": PrivateObject(f"{base}/manifests/{tag}", image["manifest"], image["digest"]),
            "manifest by digest": PrivateObject(f"{base}/manifests/{image['digest']}", image["manifest"],
                                                image["digest"]),
            "config blob": PrivateObject(f"{base}/blobs/{image['config']}", config, image["config"]),
            "layer blob": PrivateObject(f"{base}/blobs/{image['layers'][0]}", PRIVATE_LAYER, image["layers"][0]),
        }

    def pull(self, authorization):
        """What docker does with the owner's token; every object is then cached."""
        for obj in self.objects.values():
            answer = ask(self.proxy, "GET", obj.path, authorization)
            assert receives(answer, "GET", obj), answer
        assert self.proxy.cache.wait_idle(), "fills stored"
        assert all(self.proxy.cache.store.exists(obj.digest) for obj in self.objects.values())


@pytest.fixture
def private_image(start_proxy):
    with OwnedRegistry() as fake:
        yield PrivateImage(fake, start_proxy("--upstream", f"docker={fake.url}"))


def refused_credentials(state, image):
    """The Authorization a refused client brings (None: none at all)."""
    proxy, fake = image.proxy, image.fake
    if state == "no credentials":
        return None
    if state == "anonymous token":
        return login(proxy, PRIVATE)
    if state == "wrong password":
        assert login(proxy, PRIVATE, "alice", "wrong") is None  # no token for it: it is sent as it is
        return basic("alice", "wrong")
    if state == "another user's token":
        return login(proxy, PRIVATE, "bob", USERS["bob"])
    if state == "token for another repository":
        return login(proxy, "alice/other", "alice", USERS["alice"])
    assert state == "expired token"
    token = login(proxy, PRIVATE, "alice", USERS["alice"])
    fake.expire_tokens()
    return token


# The matrix #################################################################

STATES = ["no credentials", "anonymous token", "wrong password", "another user's token",
          "token for another repository", "expired token"]
OBJECTS = ["manifest by tag", "manifest by digest", "config blob", "layer blob"]
TIMINGS = ["before any authorised pull", "after an authorised pull"]
UPSTREAMS = ["up", "answering 503", "stopped"]


class LeakCount:
    """The module's figure: requests by refused clients, and objects they got, per group of tests."""

    def __init__(self):
        self.asked = collections.Counter()
        self.leaked = collections.Counter()

    def got(self, group, answer, obj):
        """Count one refused client's answer; True if it leaked `obj`."""
        self.asked[group] += 1
        self.leaked[group] += leaked(answer, obj)
        return leaked(answer, obj)

    def summary(self):
        groups = ", ".join(f"{group} {self.leaked[group]}/{self.asked[group]}" for group in self.asked)
        return (f"private content: {sum(self.leaked.values())} objects leaked to "
                f"{sum(self.asked.values())} requests by refused clients ({groups})")


@pytest.fixture(scope="module")
def leaks(request):
    """The LeakCount of this module, printed at its end."""
    count = LeakCount()
    yield count
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and count.asked:
        with capture.global_and_fixture_disabled():  # what capsys.disabled() does, at module scope
            reporter.write_line("\n" + count.summary())


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("kind", OBJECTS)
@pytest.mark.parametrize("state", STATES)
def test_a_client_upstream_refuses_never_gets_a_private_object(private_image, leaks,
                                                               state, kind, method, timing, upstream):
    image, proxy = private_image, private_image.proxy
    obj = image.objects[kind]
    refused = refused_credentials(state, image)
    alice = login(proxy, PRIVATE, "alice", USERS["alice"])
    if timing == "after an authorised pull":
        image.pull(alice)
    break_upstream(image.fake, upstream)

    answer = ask(proxy, method, obj.path, refused)
    assert not leaks.got("matrix", answer, obj), answer
    if upstream == "up":
        assert answer.status == 401, answer  # our challenge: upstream's refusal, passed on

    # The owner still gets it: from upstream, or from the cache while upstream fails.
    answer = ask(proxy, method, obj.path, alice)
    if timing == "after an authorised pull" or upstream == "up":
        assert receives(answer, method, obj), answer
        if upstream != "up":
            assert answer.headers["X-Cache"] in ("HIT", "STALE")
    else:
        assert answer.status >= 500, answer  # nothing cached, upstream failing: nothing to serve


def test_a_revoked_token_is_refused_once_its_grant_is_older_than_ACCESS_TTL(private_image, leaks):
    image, proxy = private_image, private_image.proxy
    alice = login(proxy, PRIVATE, "alice", USERS["alice"])
    image.pull(alice)
    image.fake.expire_tokens()
    proxy.clock.advance(ACCESS_TTL + 1)
    for failure in ("up", "answering 503"):
        break_upstream(image.fake, failure)
        answers = {kind: ask(proxy, "GET", obj.path, alice) for kind, obj in image.objects.items()}
        got = [kind for kind, obj in image.objects.items() if leaks.got("rule cases", answers[kind], obj)]
        assert got == [], (failure, answers)
        assert failure != "up" or all(answer.status == 401 for answer in answers.values()), answers


# (a) Fills in progress ######################################################

def hold_the_fill(fake, obj, kind):
    """Make upstream stop mid-body on the owner's GET, until fake.release is set."""
    if kind == "layer blob":
        fake.fault("cdn", obj.digest, "stall", after_headers=True, after_bytes=100000)
    else:
        fake.fault("registry", obj.path, "stall", method="GET", after_headers=True, after_bytes=100)


@pytest.mark.parametrize("kind", ["layer blob", "manifest by tag"])
@pytest.mark.parametrize("state", ["no credentials", "another user's token"])
def test_a_refused_client_never_joins_the_owners_fill_in_progress(private_image, leaks, state, kind):
    image, proxy, fake = private_image, private_image.proxy, private_image.fake
    obj = image.objects[kind]
    refused = refused_credentials(state, image)
    alice = login(proxy, PRIVATE, "alice", USERS["alice"])
    assert receives(ask(proxy, "GET", image.objects["config blob"].path, alice), "GET", image.objects["config blob"])
    hold_the_fill(fake, obj, kind)  # the owner's next object, her grant fresh from the first
    answers = {}

    def get(who, authorization):
        answers[who] = ask(proxy, "GET", obj.path, authorization)
    owner = threading.Thread(target=get, args=("alice", alice))
    owner.start()
    assert fake.wait_stalled(1)
    wait_until(lambda: proxy.cache.fills.in_flight(), what="the owner's fill in flight")
    other = threading.Thread(target=get, args=("refused", refused))
    other.start()
    # Either it is answered at once (upstream refuses it), or it follows the fill.
    wait_until(lambda: "refused" in answers or any(fill.followers > 1 for fill in proxy.cache.fills.in_flight()),
               what="the refused client answered or following")
    fake.release.set()
    owner.join(30)
    other.join(30)
    assert receives(answers["alice"], "GET", obj)
    assert not leaks.got("rule cases", answers["refused"], obj), answers["refused"]
    assert answers["refused"].status == 401, answers["refused"]


def test_a_fill_in_progress_is_never_joined_through_another_repository(private_image, leaks):
    image, proxy, fake = private_image, private_image.proxy, private_image.fake
    layer = image.objects["layer blob"]
    fake.add_image("someone/public", "1", [b"a public layer"])
    stranger = RegistryClient(proxy)  # anonymous, with a pull of a public repository behind it
    assert stranger.request("GET", "/v2/someone/public/manifests/1", {"Accept": ACCEPT_ALL})[0] == 200
    alice = login(proxy, PRIVATE, "alice", USERS["alice"])
    hold_the_fill(fake, layer, "layer blob")
    answers = {}

    def get(who, path, authorization):
        answers[who] = ask(proxy, "GET", path, authorization)
    owner = threading.Thread(target=get, args=("alice", layer.path, alice))
    owner.start()
    assert fake.wait_stalled(1)
    other = threading.Thread(target=get, args=("stranger", f"/v2/someone/public/blobs/{layer.digest}",
                                                f"Bearer {stranger.token}"))
    other.start()
    wait_until(lambda: "stranger" in answers or any(fill.followers > 1 for fill in proxy.cache.fills.in_flight()),
               what="the stranger answered or following")
    fake.release.set()
    owner.join(30)
    other.join(30)
    assert receives(answers["alice"], "GET", layer)
    assert not leaks.got("rule cases", answers["stranger"], layer), answers["stranger"]
    assert answers["stranger"].status == 404, answers["stranger"]  # upstream: not in that repository


# (b) The stale tag path #####################################################

@pytest.mark.parametrize("accept", ["the pulled types", "any type"])
@pytest.mark.parametrize("age", ["within MANIFEST_TTL", "past MANIFEST_TTL"])
@pytest.mark.parametrize("failure", ["answering 500", "answering 503", "stopped"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_anonymous_client_gets_no_cached_private_tag_while_upstream_fails(private_image, leaks, method,
                                                                           failure, age, accept):
    image, proxy = private_image, private_image.proxy
    obj = image.objects["manifest by tag"]
    alice = login(proxy, PRIVATE, "alice", USERS["alice"])
    image.pull(alice)
    if age == "past MANIFEST_TTL":
        proxy.clock.advance(proxy.config.manifest_ttl + 1)
    accept = ACCEPT_ALL if accept == "the pulled types" else "*/*"  # another kind: a fill of its own
    break_upstream(image.fake, failure)
    answer = ask(proxy, method, obj.path, None, accept)
    assert not leaks.got("rule cases", answer, obj) and answer.status >= 500, answer
    # the stale path is there, for the owner, whose grant is fresh
    answer = ask(proxy, method, obj.path, alice, accept)
    assert receives(answer, method, obj) and answer.headers["X-Cache"] in ("HIT", "STALE"), answer


# (c) The access check ########################################################

@pytest.mark.parametrize("failure", ["answering 500", "answering 503", "stopped"])
@pytest.mark.parametrize("kind", ["layer blob", "config blob", "manifest by digest"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_anonymous_client_gets_no_cached_private_object_when_the_access_check_fails(private_image, leaks,
                                                                                     method, kind, failure):
    image, proxy = private_image, private_image.proxy
    obj = image.objects[kind]
    alice = login(proxy, PRIVATE, "alice", USERS["alice"])
    image.pull(alice)
    break_upstream(image.fake, failure)
    answer = ask(proxy, method, obj.path)
    assert not leaks.got("rule cases", answer, obj) and answer.status >= 500, answer
    answer = ask(proxy, method, obj.path, alice)
    assert receives(answer, method, obj) and answer.headers["X-Cache"] == "HIT", answer


# (d) A public repository made private #######################################

@pytest.fixture
def made_private(start_proxy):
    """team/app pulled anonymously while public, then made private upstream,
    then ACCESS_TTL passes on the proxy's clock."""
    with OwnedRegistry(owners={}) as fake:
        image = PrivateImage(fake, start_proxy("--upstream", f"docker={fake.url}"), "team/app")
        image.pull(login(image.proxy, "team/app"))  # anonymous: a token fetched without credentials
        fake.add_private_repo("team/app")
        image.proxy.clock.advance(ACCESS_TTL + 1)
        yield image


def test_an_anonymous_pull_older_than_ACCESS_TTL_no_longer_opens_a_repository_made_private(made_private, leaks):
    image = made_private
    for client in ("no credentials", "anonymous token"):
        authorization = login(image.proxy, "team/app") if client == "anonymous token" else None
        answers = {kind: ask(image.proxy, "GET", obj.path, authorization) for kind, obj in image.objects.items()}
        got = [kind for kind, obj in image.objects.items() if leaks.got("rule cases", answers[kind], obj)]
        assert got == [], (client, answers)
        assert all(answer.status == 401 for answer in answers.values()), (client, answers)


@pytest.mark.parametrize("failure", ["answering 503", "stopped"])
def test_a_repository_upstream_refused_anonymously_stays_closed_when_upstream_then_fails(made_private, leaks,
                                                                                         failure):
    image = made_private
    for obj in image.objects.values():
        assert ask(image.proxy, "GET", obj.path).status == 401
    break_upstream(image.fake, failure)
    answers = {kind: ask(image.proxy, "GET", obj.path) for kind, obj in image.objects.items()}
    got = [kind for kind, obj in image.objects.items() if leaks.got("rule cases", answers[kind], obj)]
    assert got == [], answers


# (e) A corrupted manifest by tag #############################################

def test_a_corrupted_manifest_fetched_by_tag_is_never_cached_nor_sent_as_a_clean_200(private_image):
    image, proxy, fake = private_image, private_image.proxy, private_image.fake
    obj = image.objects["manifest by tag"]
    alice = login(proxy, PRIVATE, "alice", USERS["alice"])
    # The manifest's first bytes flipped; its Docker-Content-Digest header stays right.
    fake.fault("registry", obj.path, "corrupt", method="GET")
    answer = ask(proxy, "GET", obj.path, alice)
    assert answer.status >= 400 or not answer.complete, answer
    assert proxy.cache.wait_idle(), "fill ended"
    assert proxy.cache.store.objects() == []
    assert proxy.cache.tag(fake.url, PRIVATE, image.tag, accept_kind(ACCEPT_ALL)) is None
    assert receives(ask(proxy, "GET", obj.path, alice), "GET", obj)  # the retry gets the real one


# (f) An https upstream naming an http realm ##################################

class TLSFront:
    """https on a port of its own, relayed as plain bytes to a server of the fake."""

    def __init__(self, backend_url, certificate):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*certificate)
        self.backend = ("127.0.0.1", int(backend_url.rpartition(":")[2]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept_forever, daemon=True).start()

    def accept_forever(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.relay, args=(client,), daemon=True).start()

    def relay(self, client):
        try:
            front = self.context.wrap_socket(client, server_side=True)
            back = socket.create_connection(self.backend)
        except OSError:
            client.close()
            return
        threading.Thread(target=pump, args=(back, front), daemon=True).start()
        pump(front, back)

    def close(self):
        self.listener.close()


def pump(source, sink):
    """Bytes from source to sink until either side ends; then both are closed."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        source.close()
        sink.close()


@pytest.fixture
def https_upstream(certificate, monkeypatch):
    """The fake's registry behind https, trusted by the proxy; its realm stays http."""
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])  # read when the proxy first needs TLS
    with OwnedRegistry() as fake:
        front = TLSFront(fake.url, certificate)
        fake.image = fake.add_image(PRIVATE, "1", [PRIVATE_LAYER])
        assert fake.realm.startswith("http://")
        yield fake, front
        front.close()


def test_an_https_upstream_naming_an_http_realm_never_gets_a_clients_password_sent_there(start_proxy,
                                                                                         https_upstream):
    fake, front = https_upstream
    proxy = start_proxy("--upstream", f"docker={front.url}")
    answer = ask(proxy, "GET", f"/v2/auth?service={fake.service}&scope=repository:{PRIVATE}:pull",
                 basic("alice", USERS["alice"]))
    assert fake.count(server="registry", path="/v2/") >= 1, "the https upstream answered the proxy"
    assert fake.count(server="auth") == 0 and fake.token_requests == []
    assert answer.status != 200 or json.loads(answer.body)["token"] == "dockerproxy-anonymous", answer


def test_an_https_upstream_naming_an_http_realm_never_gets_the_proxys_password_sent_there(start_proxy,
                                                                                          https_upstream):
    fake, front = https_upstream
    proxy = start_proxy("--upstream", f"docker={front.url}",
                        UPSTREAM_DOCKER_USERNAME="alice", UPSTREAM_DOCKER_PASSWORD=USERS["alice"])
    answer = ask(proxy, "GET", f"/v2/{PRIVATE}/manifests/1")
    assert fake.count(server="registry", path="/v2/") >= 1, "the https upstream answered the proxy"
    assert fake.count(server="auth") == 0 and fake.token_requests == []
    assert answer.status >= 400 and fake.image["manifest"] not in answer.body, answer


# (g) Manifests that name another repository's digests (defect 1) ############

def descriptor(media_type, digest, size=1, **extra):
    return dict({"mediaType": media_type, "size": size, "digest": digest}, **extra)


def naming_manifest(fake, repository, tag, entry, digest):
    """A manifest pushed to `repository` whose `entry` names `digest`, which the repository does not hold."""
    if entry == "nothing":
        fake.add_image(repository, tag, [b"the attacker's own layer"])
        return
    if entry.startswith("an index entry"):
        document = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST,
                    "manifests": [descriptor(DOCKER_MANIFEST, digest, platform=PLATFORM)]}
    elif entry == "the config":
        document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, digest),
                    "layers": []}
    else:
        layer = {"a layer": descriptor(DOCKER_LAYER, digest),
                 "a foreign layer with urls": descriptor(FOREIGN_LAYER, digest,
                                                         urls=["https://example.invalid/layer.tar.gz"]),
                 "a non-distributable layer": descriptor(NONDISTRIBUTABLE_LAYER, digest,
                                                         urls=["https://example.invalid/layer.tar.gz"])}[entry]
        config = descriptor(OCI_CONFIG, fake.add_blob(repository, json.dumps(PLATFORM).encode()))
        document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}
    fake.add_manifest(repository, tag, json.dumps(document).encode(), document["mediaType"])


# what the attacker's manifest names, and which of the victim's objects that is
NAMING = [("nothing", "layer blob"), ("a layer", "layer blob"), ("a foreign layer with urls", "layer blob"),
          ("a non-distributable layer", "layer blob"), ("the config", "config blob"),
          ("an index entry", "layer blob"), ("an index entry", "manifest by digest")]


@pytest.fixture
def two_upstreams(start_proxy):
    """Docker route -> the victim's registry (which also holds attacker/public),
    ghcr route -> another registry that also holds an attacker/public."""
    with OwnedRegistry() as hub, OwnedRegistry(owners={}) as ghcr:
        proxy = start_proxy("--upstream", f"docker={hub.url}", "--upstream", f"ghcr={ghcr.url}")
        yield proxy, hub, ghcr


@pytest.mark.parametrize("route", ["the same upstream", "another registry's path prefix"])
@pytest.mark.parametrize("entry, kind", NAMING)
def test_a_public_manifest_naming_a_cached_private_digest_never_opens_it(two_upstreams, leaks, route, entry, kind):
    proxy, hub, ghcr = two_upstreams
    victim = PrivateImage(hub, proxy)
    victim.pull(login(proxy, PRIVATE, "alice", USERS["alice"]))
    private = victim.objects[kind]
    attacker_fake, prefix = (hub, "") if route == "the same upstream" else (ghcr, "ghcr.io/")
    naming_manifest(attacker_fake, "attacker/public", "evil", entry, private.digest)
    attacker = RegistryClient(proxy)  # anonymous, with the token docker would fetch
    status, _, _ = attacker.request("GET", f"/v2/{prefix}attacker/public/manifests/evil", {"Accept": ACCEPT_ALL})
    assert status == 200
    section = "manifests" if kind.startswith("manifest") else "blobs"
    path = f"/v2/{prefix}attacker/public/{section}/{private.digest}"
    answers = {method: ask(proxy, method, path, f"Bearer {attacker.token}") for method in ("GET", "HEAD")}
    got = [method for method, answer in answers.items() if leaks.got("cross-repository", answer, private)]
    assert got == [], answers
    assert all(answer.status == 404 for answer in answers.values()), answers  # upstream: not in this repository


def test_a_cached_blob_first_asked_through_another_public_repository_costs_one_head_not_a_download(private_image):
    image, proxy, fake = private_image, private_image.proxy, private_image.fake
    image.pull(login(proxy, PRIVATE, "alice", USERS["alice"]))
    layer = image.objects["layer blob"]
    # Upstream really holds the same bytes in a public repository (a digest is all it takes).
    public = fake.add_image("someone/public", "1", [PRIVATE_LAYER])
    assert public["layers"] == [layer.digest]
    client = RegistryClient(proxy)
    assert client.request("GET", "/v2/someone/public/manifests/1", {"Accept": ACCEPT_ALL})[0] == 200
    fake.reset_counters()
    answer = ask(proxy, "GET", f"/v2/someone/public/blobs/{layer.digest}", f"Bearer {client.token}")
    assert receives(answer, "GET", layer)
    upstream_requests = [(r["method"], r["server"], r.get("status")) for r in fake.requests]
    assert upstream_requests == [("HEAD", "registry", 200)], "one HEAD upstream, no download"
    fake.reset_counters()
    answer = ask(proxy, "GET", f"/v2/someone/public/blobs/{layer.digest}", f"Bearer {client.token}")
    assert receives(answer, "GET", layer) and fake.requests == []  # confirmed: linked from now on
