"""A registry that redirects every request to another registry, which asks for a token (issue 9, defect 18).

registry.k8s.io answers each /v2/<name>/... request with a 307 to a regional
Artifact Registry host, and Scarf-fronted registries (lscr.io) redirect to
ghcr.io; the registry redirected to answers 401 with a Bearer challenge of its
own realm.  Here the front is a real nginx whose only job is that 307 (path
and query kept), and the target is Debian's docker-registry behind its own
token service (realregistry.TokenServer), all on 127.0.0.1.  The proxy's k8s
route points at the front; skopeo and containerd pull through the proxy.

The proxy must fetch an anonymous token at the target's realm (plain http is
allowed there only because the target is on loopback), retry once, and keep
that token per (target host, repository): one token request per repository
and pull, none when the pull is repeated (MANIFEST_TTL=0 makes the second pull
revalidate its tag through the front with a HEAD, which needs the token; every
blob then comes from the cache).  Neither the client's credentials nor the
proxy's own account for the route ever reach the target's token service.

Not tested here: the refusal of an http realm on a host that is neither
loopback nor configured needs a second, non-loopback host.

Tools as in test_interop.py (whose helpers and fixtures this module uses):
a missing nginx, openssl or containerd skips loudly, or fails under
REQUIRE_INTEROP=1.
"""

import hashlib
import os
import re
import shutil
import subprocess
import urllib.request

import pytest

import test_interop
from realregistry import (OPENSSL, RealRegistry, TokenServer, free_port, wait_until, write_oci_image,
                          write_oci_index)
from test_interop import (CTR, app_layers, check_containerd_image, check_dir_copy, containerd_hosts_dir, need,
                          registry_answers, sha256_file, skopeo, start_containerd)

# test_interop.py's fixtures, the same here: the trap every client's HTTP(S)_PROXY points at (and
# the check after each test that nothing reached it), and the proxy that records what it answered.
trap = test_interop.trap
nothing_left_loopback = test_interop.nothing_left_loopback
interop_proxy = test_interop.interop_proxy

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

# repository and tag on the target, pulled as registry.k8s.io/<repository>:<tag>
IMAGES = {"app": ("owner/app", "latest"), "multi": ("library/multi", "1")}
CLIENT_PASSWORD = "client-s3cret"
PROXY_PASSWORD = "proxy-account-s3cret"


# registry.k8s.io (kubernetes/registry.k8s.io, cmd/archeio, makeV2Handler) answers /v2/ itself
# with 200, an empty body and Docker-Distribution-Api-Version ("we always return 200 OK so it will
# not attempt to request an auth token"), and every other /v2/ path, manifests and blobs alike, with
# a 307 to Artifact Registry, the path kept.  The front does the same, query string kept too.
FRONT_CONF = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log {prefix}/access.log;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location ~ ^/v2/?$ {{
      add_header Docker-Distribution-Api-Version registry/2.0 always;
      return 200;
    }}
    location /v2/ {{ return 307 http://{target_host}$request_uri; }}
    location / {{ return 404; }}
  }}
}}
"""


class RedirectingFront:
    """nginx on a free loopback port, configured by FRONT_CONF to redirect to `target_host`.

    It runs in the foreground (daemon off) with its own prefix, pid file,
    error and access logs; stop() ends it by its process id.
    """

    def __init__(self, workdir, target_host):
        self.prefix = str(workdir)
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(self.prefix, name), exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.error_log = os.path.join(self.prefix, "error.log")
        self.access_log_path = os.path.join(self.prefix, "access.log")
        conf = os.path.join(self.prefix, "nginx.conf")
        with open(conf, "w") as file:
            file.write(FRONT_CONF.format(prefix=self.prefix, port=self.port, target_host=target_host))
        self.process = subprocess.Popen([NGINX, "-e", self.error_log, "-c", conf, "-p", self.prefix],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(self._answers, timeout=10, what=f"nginx on {self.url}")
        except (TimeoutError, RuntimeError):
            self.stop()
            raise

    def _answers(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"nginx exited {self.process.returncode}: {self.errors()}")
        try:
            with urllib.request.urlopen(self.url + "/v2/", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def errors(self):
        try:
            with open(self.error_log, errors="replace") as file:
                return file.read()[-2000:]
        except OSError:
            return ""

    def access_log(self):
        with open(self.access_log_path, errors="replace") as file:
            return file.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """docker-registry behind its own token service: owner/app:latest and the two-platform library/multi:1."""
    need(openssl=OPENSSL)
    workdir = tmp_path_factory.mktemp("target")
    tokens = TokenServer(workdir / "token")
    real = None
    try:
        real = RealRegistry(workdir / "server", token_server=tokens)
        real.tokens = tokens
        real.images = {"app": write_oci_image(workdir / "app", "latest", app_layers("app")),
                       "multi": write_oci_index(workdir / "multi", "multi")}
        real.push(workdir / "app", "latest", "owner/app", "latest")
        real.push(workdir / "multi", "multi", "library/multi", "1", all_images=True)
        yield real
    finally:
        if real is not None:
            real.stop()
        tokens.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory, target):
    need(nginx=NGINX)
    nginx = RedirectingFront(tmp_path_factory.mktemp("front"), target.host)
    try:
        yield nginx
    finally:
        nginx.stop()


def start_k8s_proxy(interop_proxy, front, **environ):
    """The proxy with its k8s route (registry.k8s.io) on the front, also the default route (for /v2/).

    MANIFEST_TTL=0: every pull of a tag asks the front again (a HEAD).
    """
    return interop_proxy("--upstream", f"k8s={front.url}", "--default-route", "k8s",
                         "--manifest-ttl", "0", **environ)


def objects_of(target, name):
    """(manifest digests, blob digests) the image or index `name` consists of."""
    image = target.images[name]
    images = image["images"] if "images" in image else [image]
    manifests = [image["index"]["digest"]] if "index" in image else []
    manifests += [each["digest"] for each in images]
    blobs = [digest for each in images for digest in each["layers"] + [each["config"]]]
    return manifests, blobs


def check_skopeo_copy(directory, target, name):
    """A skopeo dir: copy: every manifest and blob, each hashing to what was pushed to the target."""
    if name == "app":
        return check_dir_copy(directory, target.images[name])
    multi = target.images[name]
    assert sha256_file(os.path.join(directory, "manifest.json")) == multi["index"]["digest"]
    for image in multi["images"]:
        hexdigest = image["digest"].split(":")[1]
        assert sha256_file(os.path.join(directory, f"{hexdigest}.manifest.json")) == image["digest"]
        for digest in image["layers"] + [image["config"]]:
            assert sha256_file(os.path.join(directory, digest.split(":")[1])) == digest


def check_containerd_pull(daemon, reference, target, name):
    """ctr has the image or index (its digest), and every manifest and blob of it, each verified."""
    if name == "app":
        return check_containerd_image(daemon, reference, target.images[name])
    rows = [line.split() for line in daemon.ctr("images", "ls").stdout.splitlines()[1:] if line.strip()]
    assert [row[2] for row in rows if row[0] == reference] == [target.images[name]["index"]["digest"]], rows
    manifests, blobs = objects_of(target, name)
    for digest in manifests + blobs:
        content = subprocess.run([CTR, "--address", daemon.address, "--namespace", "test",
                                  "content", "get", digest], capture_output=True, timeout=60, check=True).stdout
        assert "sha256:" + hashlib.sha256(content).hexdigest() == digest


def check_cold_pull(target, front, name, tokens_before, front_log_before):
    """What the first pull through a new proxy cost: one anonymous token, every object through the front."""
    repository, tag = IMAGES[name]
    asked = target.tokens.requests[tokens_before:]
    # One token for the repository, asked without any Authorization: neither the client's
    # credentials nor the proxy's account went to the realm the redirect target named.
    assert [request["authorization"] for request in asked] == [None], asked
    assert [request["scopes"] for request in asked] == [[f"repository:{repository}:pull"]], asked
    assert asked[0]["service"] == TokenServer.SERVICE
    # The front redirected what the proxy asked for: the tag (GET, or containerd's HEAD), an
    # index's manifests and every blob; the clients' copies were checked against the target's digests.
    manifests, blobs = objects_of(target, name)
    paths = [f"manifests/{tag}"] + [f"manifests/{digest}" for digest in manifests[1:]]
    paths += [f"blobs/{digest}" for digest in blobs]
    redirected = [re.compile(rf'"(GET|HEAD) /v2/{re.escape(repository)}/{re.escape(path)}(\?\S*)? HTTP/1.1" 307 ')
                  for path in paths]
    wait_until(lambda: all(line.search(front.access_log()[front_log_before:]) for line in redirected),
               timeout=10, what="the front's log of every object it redirected")


def check_warm_pull(proxy, target, name, answers_before, tokens_before, registry_log_before):
    """The second pull: no token asked, the tag revalidated at the target with the cached one, all else HIT."""
    repository, tag = IMAGES[name]
    assert target.tokens.requests[tokens_before:] == [], "the token of (target host, repository) was not reused"
    head = re.compile(rf'"HEAD /v2/{re.escape(repository)}/manifests/{re.escape(tag)}(\?\S*)? HTTP/1.1" 200 ')
    wait_until(lambda: head.search(target.access_log()[registry_log_before:]), timeout=10,
               what="the target's log of the tag's revalidation HEAD, accepted with the cached token")
    manifests = registry_answers(proxy, "manifests", answers_before)
    blobs = [a for a in registry_answers(proxy, "blobs", answers_before) if a["method"] == "GET"]
    assert manifests and all(a["status"] == 200 and a["x_cache"] == "HIT" for a in manifests + blobs), (
        manifests + blobs)
    assert {a["path"].split("?")[0].rsplit("/", 1)[1] for a in blobs} == set(objects_of(target, name)[1])


@pytest.mark.parametrize("name", ["app", "multi"])
def test_skopeo_pulls_through_a_front_that_redirects_to_a_token_registry(
        name, interop_proxy, target, front, tmp_path, trap):
    """`skopeo copy [--all] docker://PROXY/registry.k8s.io/<name>`: the target gets an anonymous token.

    The client brings credentials (for the proxy's /v2/auth) and the proxy has
    an account of its own for the route (UPSTREAM_K8S_USERNAME): neither may
    reach the token service the redirect target names.
    """
    proxy = start_k8s_proxy(interop_proxy, front, UPSTREAM_K8S_USERNAME="proxy-account",
                            UPSTREAM_K8S_PASSWORD=PROXY_PASSWORD)
    repository, tag = IMAGES[name]
    source = f"docker://{proxy.host}/registry.k8s.io/{repository}:{tag}"

    def pull(round):
        skopeo("copy", "--src-tls-verify=false", "--src-creds", f"someone:{CLIENT_PASSWORD}",
               *(["--all"] if name == "multi" else []), source, f"dir:{tmp_path / round}", env=trap.environ())
        check_skopeo_copy(tmp_path / round, target, name)

    tokens_before, front_log_before = len(target.tokens.requests), len(front.access_log())
    pull("cold")
    check_cold_pull(target, front, name, tokens_before, front_log_before)
    # skopeo did bring its credentials, to the proxy's /v2/auth (which gave it the proxy's placeholder).
    assert any(a["path"].startswith("/v2/auth") and a["authorization"] for a in proxy.answers), proxy.answers
    assert proxy.cache.wait_idle(), "the cold pull's fills settled"
    answers_before, tokens_before = len(proxy.answers), len(target.tokens.requests)
    registry_log_before = len(target.access_log())
    pull("warm")
    check_warm_pull(proxy, target, name, answers_before, tokens_before, registry_log_before)


@pytest.mark.parametrize("name", ["app", "multi"])
def test_containerd_pulls_through_a_front_that_redirects_to_a_token_registry(
        name, interop_proxy, target, front, tmp_path, trap):
    """`ctr images pull registry.k8s.io/<name>` with the README's _default/hosts.toml, anonymously.

    Every request carries ?ns=registry.k8s.io; the second pull is a new
    containerd with an empty content store.
    """
    proxy = start_k8s_proxy(interop_proxy, front)
    repository, tag = IMAGES[name]
    reference = f"registry.k8s.io/{repository}:{tag}"
    daemons = []

    def pull(round):
        (tmp_path / round).mkdir()
        daemon = start_containerd(tmp_path / round, trap)
        daemons.append(daemon)
        daemon.pull(reference, containerd_hosts_dir(tmp_path / round / "certs.d", proxy),
                    *(["--all-platforms"] if name == "multi" else []))
        check_containerd_pull(daemon, reference, target, name)

    try:
        tokens_before, front_log_before = len(target.tokens.requests), len(front.access_log())
        pull("cold")
        check_cold_pull(target, front, name, tokens_before, front_log_before)
        assert proxy.cache.wait_idle(), "the cold pull's fills settled"
        answers_before, tokens_before = len(proxy.answers), len(target.tokens.requests)
        registry_log_before = len(target.access_log())
        pull("warm")
        check_warm_pull(proxy, target, name, answers_before, tokens_before, registry_log_before)
        requests = registry_answers(proxy, "manifests") + registry_answers(proxy, "blobs")
        assert requests and all(a["path"].endswith("?ns=registry.k8s.io") for a in requests), requests
    finally:
        for daemon in daemons:
            daemon.stop()
