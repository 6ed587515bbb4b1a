"""Real parts: Debian's docker-registry as the upstream; skopeo, podman and containerd as clients.

Every upstream is a docker-registry on 127.0.0.1: an anonymous one, one behind
a token service (as Docker Hub and ghcr.io are) and one behind htpasswd basic
auth.  Every route a test uses points at one of them, and every client runs
with HTTP(S)_PROXY set to a trap (realregistry.Trap) that records and refuses
whatever would leave the machine: a fallback to the real ghcr.io or Docker Hub
fails the test instead of reaching the network.

podman and containerd are configured with the README's own ```toml snippets
(``proxy.example:8080`` replaced by the proxy's address), so the snippets
users copy are the ones tested.

Skipped with a loud reason when a tool is missing, except under CI
(REQUIRE_INTEROP=1), where a missing tool fails the run: a green CI always
means the real clients ran.  skopeo and docker-registry are needed by the whole
module (they make the upstreams); podman, containerd/ctr, htpasswd and openssl
by the tests that use them.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.parse

import pytest

from conftest import ROOT, RegistryClient
from realregistry import (HTPASSWD, OPENSSL, REGISTRY_BINARY, SKOPEO, OCI_INDEX, OCI_MANIFEST,
                          RealRegistry, TokenServer, Trap, make_htpasswd_line, wait_until,
                          write_oci_image, write_oci_index)

REQUIRED = bool(os.environ.get("REQUIRE_INTEROP"))

MISSING = [name for name, path in (("docker-registry", REGISTRY_BINARY), ("skopeo", SKOPEO)) if not path]
if MISSING:
    if REQUIRED:
        raise RuntimeError(f"REQUIRE_INTEROP is set but {', '.join(MISSING)} missing")
    pytest.skip(f"INTEROP TESTS SKIPPED: {', '.join(MISSING)} not installed", allow_module_level=True)

PODMAN = shutil.which("podman")
CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")

ACCEPT_MANIFESTS = ", ".join([OCI_MANIFEST, OCI_INDEX,
                              "application/vnd.docker.distribution.manifest.v2+json",
                              "application/vnd.docker.distribution.manifest.list.v2+json"])
USER, PASSWORD = "puller", "s3cret-pass"


def need(**tools):
    """Skip this test loudly when a tool is missing; fail instead under REQUIRE_INTEROP."""
    missing = [name for name, path in tools.items() if not path]
    if not missing:
        return
    if REQUIRED:
        pytest.fail(f"REQUIRE_INTEROP is set but {', '.join(missing)} missing", pytrace=False)
    pytest.skip(f"INTEROP TEST SKIPPED: {', '.join(missing)} not installed")


def unavailable(reason):
    """A tool that is installed but cannot run here: skip loudly, fail under REQUIRE_INTEROP."""
    if REQUIRED:
        pytest.fail(f"REQUIRE_INTEROP is set but {reason}", pytrace=False)
    pytest.skip(f"INTEROP TEST SKIPPED: {reason}")


def sha256_file(path):
    with open(path, "rb") as file:
        return "sha256:" + hashlib.sha256(file.read()).hexdigest()


def run(command, env=None, check=True, timeout=120):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=None if env is None else {**os.environ, **env})
    if check:
        assert result.returncode == 0, (
            f"{' '.join(map(str, command))} exited {result.returncode}\n"
            f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
    return result


# The upstreams and the trap ################################################

@pytest.fixture(scope="module")
def trap():
    """Where any client request that would leave loopback ends up (and is refused)."""
    server = Trap()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def nothing_left_loopback(trap):
    """After each test: no client tried a public registry (a mirror fallback would show here)."""
    before = len(trap.requests)
    yield
    unexpected = trap.requests[before:]
    del trap.requests[before:]
    assert unexpected == [], "a client tried to leave loopback through the trap"


def expect_fallback(trap, since, host):
    """A client refused by its mirror tried the registry itself, as configured: only the trap saw it."""
    attempts = trap.requests[since:]
    assert attempts and all(r[:2] == ("CONNECT", f"{host}:443") for r in attempts), attempts
    del trap.requests[since:]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Anonymous docker-registry: library/hello:latest and the two-platform library/multi:1."""
    workdir = tmp_path_factory.mktemp("registry")
    real = RealRegistry(workdir / "server")
    images = {"hello": write_oci_image(workdir / "hello", "latest")}
    real.push(workdir / "hello", "latest", "library/hello", "latest")
    images["multi"] = write_oci_index(workdir / "multi", "multi")
    real.push(workdir / "multi", "multi", "library/multi", "1", all_images=True)
    real.images = images
    yield real
    real.stop()


def app_layers(name):
    return [{f"{name}/bin.txt": f"the {name} program".encode() * 50},
            {f"etc/{name}.conf": f"setting for {name}".encode()}]


def start_token_registry(workdir):
    """docker-registry behind a token service, with owner/app:latest (two layers) and library/hello."""
    tokens = TokenServer(workdir / "token")
    real = RealRegistry(workdir / "server", token_server=tokens)
    real.tokens = tokens
    real.images = {"app": write_oci_image(workdir / "app", "latest", app_layers("app")),
                   "hello": write_oci_image(workdir / "hello", "latest")}
    real.push(workdir / "app", "latest", "owner/app", "latest")
    real.push(workdir / "hello", "latest", "library/hello", "latest")
    return real


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    need(openssl=OPENSSL)
    real = start_token_registry(tmp_path_factory.mktemp("token-registry"))
    yield real
    real.stop()
    real.tokens.stop()


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory):
    """docker-registry behind htpasswd basic auth, with private/app:latest pushed with credentials."""
    need(htpasswd=HTPASSWD)
    workdir = tmp_path_factory.mktemp("private-registry")
    real = RealRegistry(workdir / "server", htpasswd_line=make_htpasswd_line(USER, PASSWORD))
    real.images = {"app": write_oci_image(workdir / "app", "latest", app_layers("private"))}
    real.push(workdir / "app", "latest", "private/app", "latest", creds=f"{USER}:{PASSWORD}")
    yield real
    real.stop()


# The proxy, recording what it answered ######################################

@pytest.fixture
def interop_proxy(start_proxy):
    """start_proxy(), with `.answers`: one dict per response (method, path with query, host, status, x_cache)."""

    def start(*argv, **environ):
        proxy = start_proxy(*argv, **environ)
        answers = []

        class Recording(proxy.server.RequestHandlerClass):
            def send_response(self, code, message=None):
                self._answer = {"method": getattr(self, "command", None), "path": getattr(self, "path", ""),
                                "host": self.headers.get("host") if getattr(self, "headers", None) else None,
                                "authorization": bool(getattr(self, "headers", None)
                                                      and self.headers.get("authorization")),
                                "status": code, "x_cache": None}
                answers.append(self._answer)
                super().send_response(code, message)

            def send_header(self, keyword, value):
                if keyword.lower() == "x-cache" and getattr(self, "_answer", None):
                    self._answer["x_cache"] = value
                super().send_header(keyword, value)

        proxy.server.RequestHandlerClass = Recording
        proxy.answers = answers
        proxies.append(proxy)
        return proxy

    proxies = []
    yield start
    for proxy in proxies:
        errors = [a for a in proxy.answers if a["status"] == 500]
        assert errors == [], f"the proxy answered 500 (internal error, traceback in its log): {errors}"


def registry_answers(proxy, kind, since=0):
    """The proxy's answers to /v2/<name>/<kind>/... requests (kind: manifests or blobs)."""
    return [a for a in proxy.answers[since:] if a["path"] and f"/{kind}/" in a["path"]]


def served(proxy, since=0):
    """Manifests and blobs the proxy answered 200 (or 206) since `since`."""
    return [a for a in proxy.answers[since:] if a["status"] in (200, 206) and a["method"] == "GET"
            and re.search(r"/(manifests|blobs)/", a["path"] or "")]


# What the clients got #######################################################

def check_dir_copy(directory, image):
    """A skopeo dir: copy of one image: its manifest, config and every layer, each by its digest."""
    assert sha256_file(os.path.join(directory, "manifest.json")) == image["digest"]
    for digest in image["layers"] + [image["config"]]:
        assert sha256_file(os.path.join(directory, digest.split(":")[1])) == digest


def check_pulled_by_http(client, path_of, image, query=""):
    """GET the manifest by tag and every blob it names; each must hash to what was pushed."""
    status, headers, body = client.request("GET", path_of("manifests/latest") + query,
                                           {"Accept": ACCEPT_MANIFESTS})
    assert status == 200, body
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image["digest"]
    assert headers["Docker-Content-Digest"] == image["digest"]
    manifest = json.loads(body)
    assert [layer["digest"] for layer in manifest["layers"]] == image["layers"]
    for digest in image["layers"] + [image["config"]]:
        status, _, blob = client.request("GET", path_of(f"blobs/{digest}") + query)
        assert status == 200, blob
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest


def skopeo(*args, env=None):
    return run([SKOPEO, *args], env=env).stdout


# README snippets ###########################################################

def readme_toml_snippets():
    """README's ```toml blocks, by the /etc/... file named in the paragraph just before each."""
    with open(os.path.join(ROOT, "README.md")) as file:
        text = file.read()
    snippets = {}
    for match in re.finditer(r"^```toml\n(.*?)^```", text, re.S | re.M):
        paragraph = text[:match.start()].rstrip().rsplit("\n\n", 1)[-1]
        paths = re.findall(r"`(/etc/[^`\s]+(?:hosts\.toml|registries\.conf))`", paragraph)
        if paths:
            snippets[paths[-1]] = match.group(1)
    return snippets


def readme_snippet(path, proxy):
    snippets = readme_toml_snippets()
    assert path in snippets, f"README.md has no ```toml block for {path} (found: {sorted(snippets)})"
    text = snippets[path]
    assert "proxy.example:8080" in text, f"README's {path} snippet does not name proxy.example:8080"
    return text.replace("proxy.example:8080", proxy.host)


CONTAINERD_HOSTS = ("/etc/containerd/certs.d/docker.io/hosts.toml",
                    "/etc/containerd/certs.d/_default/hosts.toml")
PODMAN_REGISTRIES = "/etc/containers/registries.conf"


def containerd_hosts_dir(directory, proxy):
    """The README's hosts.toml files under `directory`, as under /etc/containerd/certs.d."""
    for path in CONTAINERD_HOSTS:
        relative = os.path.relpath(path, "/etc/containerd/certs.d")
        os.makedirs(os.path.join(directory, os.path.dirname(relative)), exist_ok=True)
        with open(os.path.join(directory, relative), "w") as file:
            file.write(readme_snippet(path, proxy))
    return str(directory)


# podman #####################################################################

class Podman:
    """podman with its own storage, configuration and registries.conf; nothing of the machine's."""

    def __init__(self, workdir, registries_conf, trap):
        self.workdir = str(workdir)
        for name in ("root", "tmp", "home", "run"):
            os.makedirs(os.path.join(self.workdir, name), exist_ok=True)
        # podman refuses a runroot longer than 50 characters: a short one in /tmp, removed by close().
        self.runroot = tempfile.mkdtemp(prefix="podman-run-", dir="/tmp")
        path = lambda name: self.runroot if name == "runroot" else os.path.join(self.workdir, name)  # noqa: E731
        files = {"registries.conf": registries_conf, "containers.conf": "", "auth.json": "{}",
                 "storage.conf": f'[storage]\ndriver = "vfs"\nrunroot = "{path("runroot")}"\n'
                                 f'graphroot = "{path("root")}"\n',
                 "policy.json": json.dumps({"default": [{"type": "insecureAcceptAnything"}]})}
        for name, text in files.items():
            with open(path(name), "w") as file:
                file.write(text)
        self.env = {**trap.environ(), "CONTAINERS_CONF": path("containers.conf"),
                    "CONTAINERS_REGISTRIES_CONF": path("registries.conf"),
                    "REGISTRIES_CONFIG_PATH": path("registries.conf"),
                    "CONTAINERS_STORAGE_CONF": path("storage.conf"),
                    "REGISTRY_AUTH_FILE": path("auth.json"), "HOME": path("home"),
                    "XDG_RUNTIME_DIR": path("run"), "XDG_CONFIG_HOME": path("home"),
                    "TMPDIR": path("tmp")}
        self.base = [PODMAN, "--root", path("root"), "--runroot", path("runroot"),
                     "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                     "--events-backend", "file", "--tmpdir", path("tmp")]
        self.policy = path("policy.json")

    def __call__(self, *args, check=True):
        return run(self.base + list(args), env=self.env, check=check)

    def pull(self, reference, *flags, check=True):
        return self("pull", "--signature-policy", self.policy, *flags, reference, check=check)

    def inspect(self, reference):
        [answer] = json.loads(self("image", "inspect", "--format", "json", reference).stdout)
        return answer

    def close(self):
        shutil.rmtree(self.runroot, ignore_errors=True)


@pytest.fixture
def make_podman(trap):
    """make_podman(workdir, registries_conf) -> Podman with empty storage; cleaned up after the test."""
    made = []

    def make(workdir, registries_conf):
        need(podman=PODMAN)
        made.append(Podman(workdir, registries_conf, trap))
        return made[-1]

    yield make
    for podman in made:
        podman.close()


def check_podman_image(podman, reference, image):
    """podman stored the pushed image: manifest digest, image ID (config digest), diff_ids."""
    answer = podman.inspect(reference)
    assert answer["Digest"] == image["digest"]
    assert "sha256:" + answer["Id"] == image["config"]
    assert answer["RootFS"]["Layers"] == image["diff_ids"]


# containerd #################################################################

class Containerd:
    """A containerd of its own (root, state, socket in a temporary directory), driven with ctr."""

    def __init__(self, workdir, trap):
        # A unix socket path must stay under 108 bytes: keep it short.
        self.workdir = tempfile.mkdtemp(prefix="ctrd-", dir=str(workdir))
        self.address = os.path.join(self.workdir, "sock")
        config = os.path.join(self.workdir, "config.toml")
        with open(config, "w") as file:
            file.write(f'''version = 2
root = "{self.workdir}/root"
state = "{self.workdir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.overlayfs"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.workdir}/opt"
''')
        self.env = trap.environ()
        self.log_path = os.path.join(self.workdir, "containerd.log")
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([CONTAINERD, "--config", config], stdout=self.log,
                                        stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        try:
            wait_until(self._serving, timeout=30, what="containerd socket")
        except (TimeoutError, RuntimeError) as err:
            self.stop()
            raise RuntimeError(f"containerd did not start: {err}\n{self.log_tail()}") from None

    def _serving(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"containerd exited {self.process.returncode}")
        if not os.path.exists(self.address):
            return False
        return run([CTR, "--address", self.address, "version"], check=False).returncode == 0

    def log_tail(self):
        with open(self.log_path, errors="replace") as file:
            return file.read()[-3000:]

    def ctr(self, *args, check=True):
        return run([CTR, "--address", self.address, "--namespace", "test", *args], env=self.env, check=check)

    def pull(self, reference, hosts_dir, *flags, check=True):
        return self.ctr("images", "pull", "--snapshotter", "native", "--hosts-dir", hosts_dir,
                        *flags, reference, check=check)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


def start_containerd(workdir, trap):
    need(containerd=CONTAINERD, ctr=CTR)
    try:
        return Containerd(workdir, trap)
    except RuntimeError as err:
        unavailable(str(err))


@pytest.fixture(scope="module")
def containerd(tmp_path_factory, trap):
    daemon = start_containerd(tmp_path_factory.mktemp("containerd"), trap)
    yield daemon
    daemon.stop()


def check_containerd_image(daemon, reference, image):
    """ctr has the image (its manifest digest) and every blob, each hashing to its digest."""
    lines = daemon.ctr("images", "ls").stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert reference in rows, lines
    assert rows[reference][2] == image["digest"], rows[reference]
    present = set(daemon.ctr("content", "ls", "--quiet").stdout.split())
    for digest in [image["digest"], image["config"]] + image["layers"]:
        assert digest in present
        blob = subprocess.run([CTR, "--address", daemon.address, "--namespace", "test",
                               "content", "get", digest], capture_output=True, timeout=60, check=True).stdout
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest


# 1. skopeo and plain HTTP by every routing form ###############################

@pytest.mark.parametrize("upstream", ["anonymous", "token"])
@pytest.mark.parametrize("name", ["library/hello", "hello"])
def test_skopeo_pulls_docker_hub_names_long_and_short(interop_proxy, registry, token_registry,
                                                      tmp_path, trap, upstream, name):
    """`docker://PROXY/hello`: the library/ redirect, and (token upstream) the scope asked for is library/hello."""
    real = registry if upstream == "anonymous" else token_registry
    proxy = interop_proxy("--upstream", f"docker={real.url}")
    image = real.images["hello"]
    tokens_before = len(token_registry.tokens.requests)
    answer = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{proxy.host}/{name}",
                               env=trap.environ()))
    assert answer["Digest"] == image["digest"]
    assert answer["Layers"] == image["layers"]
    skopeo("copy", "--src-tls-verify=false", f"docker://{proxy.host}/{name}:latest", f"dir:{tmp_path / 'out'}",
           env=trap.environ())
    check_dir_copy(tmp_path / "out", image)
    if name == "hello":
        redirects = [a for a in proxy.answers if a["status"] == 301]
        assert redirects and all(a["path"].startswith("/v2/hello/") for a in redirects)
    if upstream == "token":
        # skopeo asks the proxy for a token for `name`; upstream is asked for library/hello only.
        client_scopes = [v for a in proxy.answers if a["path"].startswith("/v2/auth?")
                         for k, v in urllib.parse.parse_qsl(a["path"].split("?", 1)[1]) if k == "scope"]
        assert f"repository:{name}:pull" in client_scopes, client_scopes
        asked = token_registry.tokens.scopes(tokens_before)
        assert "repository:library/hello:pull" in asked
        assert not any(scope.startswith("repository:hello:") for scope in asked), asked
    else:
        assert not token_registry.tokens.requests[tokens_before:]


@pytest.mark.parametrize("form", ["host", "ns"])
def test_http_client_token_dance_by_host_route_and_by_ns(interop_proxy, registry, token_registry, form):
    """ghcr.example.test:PORT or ?ns=ghcr.io: the proxy's Bearer challenge, its /v2/auth, every blob."""
    proxy = interop_proxy("--custom-domain", "example.test", "--upstream", f"ghcr={token_registry.url}",
                          "--upstream", f"docker={registry.url}")
    before = len(token_registry.tokens.requests)
    if form == "host":
        client = RegistryClient(proxy, host=f"ghcr.example.test:{proxy.port}")
        query = ""
    else:
        client = RegistryClient(proxy)
        query = "?ns=ghcr.io"
    check_pulled_by_http(client, lambda rest: f"/v2/owner/app/{rest}", token_registry.images["app"], query)
    # The client was challenged, got its token at the proxy's /v2/auth, which got it upstream.
    assert client.token_answers and client.token_answers[0][0] == 200
    assert "repository:owner/app:pull" in token_registry.tokens.scopes(before)
    auth = [a for a in proxy.answers if a["path"].startswith("/v2/auth")]
    assert auth and (form == "host" or all("ns=ghcr.io" in a["path"] for a in auth))


def test_skopeo_by_path_prefix_through_a_token_registry(interop_proxy, token_registry, tmp_path, trap):
    """`docker://PROXY/ghcr.io/owner/app`: the prefix picks the route and is removed upstream.

    The default route needs a token too, as Docker Hub does: skopeo's /v2/ ping
    (which goes to the default route) is challenged, so skopeo fetches a token
    at the proxy's /v2/auth, which takes the route from the scope's prefix.
    """
    proxy = interop_proxy("--upstream", f"ghcr={token_registry.url}", "--upstream", f"docker={token_registry.url}")
    before = len(token_registry.tokens.requests)
    skopeo("copy", "--src-tls-verify=false", f"docker://{proxy.host}/ghcr.io/owner/app:latest",
           f"dir:{tmp_path / 'out'}", env=trap.environ())
    check_dir_copy(tmp_path / "out", token_registry.images["app"])
    blobs = registry_answers(proxy, "blobs")
    assert blobs and all(a["path"].startswith("/v2/ghcr.io/owner/app/") for a in blobs)
    asked = token_registry.tokens.scopes(before)
    assert "repository:owner/app:pull" in asked
    assert not any("ghcr.io/" in scope for scope in asked), asked


def test_skopeo_by_path_prefix_to_a_token_registry_when_the_default_route_is_anonymous(
        interop_proxy, registry, token_registry, tmp_path, trap):
    proxy = interop_proxy("--upstream", f"ghcr={token_registry.url}", "--upstream", f"docker={registry.url}")
    result = run([SKOPEO, "copy", "--src-tls-verify=false", f"docker://{proxy.host}/ghcr.io/owner/app:latest",
                  f"dir:{tmp_path / 'out'}"], env=trap.environ(), check=False)
    assert result.returncode == 0, result.stderr
    check_dir_copy(tmp_path / "out", token_registry.images["app"])


def test_skopeo_copies_every_platform_of_an_index_by_path_prefix(interop_proxy, registry, tmp_path, trap):
    proxy = interop_proxy("--upstream", f"ghcr={registry.url}", "--upstream", f"docker={registry.url}")
    skopeo("copy", "--all", "--src-tls-verify=false",
           f"docker://{proxy.host}/ghcr.io/library/multi:1", f"dir:{tmp_path / 'out'}", env=trap.environ())
    multi = registry.images["multi"]
    assert sha256_file(tmp_path / "out" / "manifest.json") == multi["index"]["digest"]
    for image in multi["images"]:
        assert sha256_file(tmp_path / "out" / f"{image['digest'].split(':')[1]}.manifest.json") == image["digest"]
        for digest in image["layers"] + [image["config"]]:
            assert sha256_file(tmp_path / "out" / digest.split(":")[1]) == digest


def test_skopeo_override_arch_gets_the_arm64_image_of_an_index(interop_proxy, registry, tmp_path, trap):
    proxy = interop_proxy("--upstream", f"docker={registry.url}")
    skopeo("copy", "--override-arch", "arm64", "--override-os", "linux", "--src-tls-verify=false",
           f"docker://{proxy.host}/library/multi:1", f"dir:{tmp_path / 'out'}", env=trap.environ())
    amd64, arm64 = registry.images["multi"]["images"]
    assert arm64["platform"]["architecture"] == "arm64"
    check_dir_copy(tmp_path / "out", arm64)
    for digest in amd64["layers"]:
        assert not (tmp_path / "out" / digest.split(":")[1]).exists()


# 2. podman with the README's registries.conf ###################################

@pytest.mark.parametrize("reference", ["ghcr.io/owner/app:latest", "docker.io/library/hello:latest"])
def test_podman_pulls_through_the_readme_registries_conf(interop_proxy, registry, token_registry,
                                                         make_podman, tmp_path, reference):
    """The README's [[registry.mirror]] path-prefix form: only the proxy is asked."""
    need(podman=PODMAN)
    # ghcr.io/owner/app on the token registry behind an anonymous default route (podman's /v2/
    # ping goes there); docker.io/library/hello on the anonymous one.
    proxy = interop_proxy("--upstream", f"ghcr={token_registry.url}", "--upstream", f"docker={registry.url}")
    podman = make_podman(tmp_path / "podman", readme_snippet(PODMAN_REGISTRIES, proxy))
    podman.pull(reference)
    real, key = (token_registry, "app") if reference.startswith("ghcr.io") else (registry, "hello")
    image = real.images[key]
    check_podman_image(podman, reference, image)
    prefix = "/v2/" + reference.rsplit(":", 1)[0] + "/"
    blobs = [a for a in registry_answers(proxy, "blobs") if a["method"] == "GET" and a["status"] == 200]
    assert {a["path"].rsplit("/", 1)[1] for a in blobs} >= set(image["layers"])
    assert all(a["path"].startswith(prefix) for a in registry_answers(proxy, "manifests") + blobs)


# 3. containerd with the README's hosts.toml ####################################

@pytest.mark.parametrize("reference", ["docker.io/library/hello:latest", "ghcr.io/owner/app:latest"])
def test_containerd_pulls_through_the_readme_hosts_toml(interop_proxy, registry, token_registry, containerd,
                                                        tmp_path, reference):
    """certs.d/docker.io and certs.d/_default from the README: every request carries ?ns=<registry>."""
    proxy = interop_proxy("--upstream", f"ghcr={token_registry.url}", "--upstream", f"docker={registry.url}")
    hosts_dir = containerd_hosts_dir(tmp_path / "certs.d", proxy)
    containerd.pull(reference, hosts_dir)
    registry_host = reference.split("/", 1)[0]
    real, key = (token_registry, "app") if registry_host == "ghcr.io" else (registry, "hello")
    image = real.images[key]
    check_containerd_image(containerd, reference, image)
    repository = reference.split("/", 1)[1].rsplit(":", 1)[0]
    requests = registry_answers(proxy, "manifests") + registry_answers(proxy, "blobs")
    assert requests
    for answer in requests:
        assert answer["path"].startswith(f"/v2/{repository}/"), answer
        assert answer["path"].endswith(f"?ns={registry_host}"), answer
    got = {a["path"].split("?")[0].rsplit("/", 1)[1] for a in registry_answers(proxy, "blobs")
           if a["status"] == 200}
    assert got >= set(image["layers"])
    if registry_host == "ghcr.io":  # a token registry: containerd followed the proxy's realm, ns kept
        auth = [a for a in proxy.answers if a["path"].startswith("/v2/auth")]
        assert auth and all("ns=ghcr.io" in a["path"] and a["status"] == 200 for a in auth), auth


# 4. Offline: the registry stopped, every client pulls from the cache ###########

@pytest.mark.parametrize("client", ["skopeo", "podman", "containerd"])
def test_a_client_pulls_again_from_the_cache_when_the_registry_is_down(
        client, interop_proxy, make_podman, tmp_path_factory, tmp_path, trap):
    """Pull, stop registry and token service, pull again into empty storage: all from the cache.

    MANIFEST_TTL=0, so the second pull revalidates the tag and must fall back
    to the cached manifest (X-Cache: STALE); every blob is a HIT.
    """
    need(openssl=OPENSSL, **{"podman": dict(podman=PODMAN), "containerd": dict(containerd=CONTAINERD, ctr=CTR),
                             "skopeo": {}}[client])
    upstream = start_token_registry(tmp_path_factory.mktemp("offline-registry"))
    daemons = []
    try:
        image = upstream.images["app"]
        proxy = interop_proxy("--manifest-ttl", "0", "--upstream", f"ghcr={upstream.url}",
                              "--upstream", f"docker={upstream.url}")
        reference = "ghcr.io/owner/app:latest"

        def pull(round):
            (tmp_path / round).mkdir()
            if client == "skopeo":
                skopeo("copy", "--src-tls-verify=false", f"docker://{proxy.host}/{reference}",
                       f"dir:{tmp_path / round / 'skopeo'}", env=trap.environ())
                check_dir_copy(tmp_path / round / "skopeo", image)
            elif client == "podman":  # a new, empty storage each time
                podman = make_podman(tmp_path / round / "podman", readme_snippet(PODMAN_REGISTRIES, proxy))
                podman.pull(reference)
                check_podman_image(podman, reference, image)
            else:  # a new containerd, with an empty content store, each time
                daemon = start_containerd(tmp_path / round, trap)
                daemons.append(daemon)
                daemon.pull(reference, containerd_hosts_dir(tmp_path / round / "certs.d", proxy))
                check_containerd_image(daemon, reference, image)

        pull("warm")
        assert not any(a["x_cache"] == "STALE" for a in proxy.answers)
        upstream.stop()
        upstream.tokens.stop()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", upstream.port), timeout=2).close()
        offline = len(proxy.answers)
        pull("offline")
        tags = [a for a in registry_answers(proxy, "manifests", offline)
                if a["path"].split("?")[0].endswith("/manifests/latest")]
        assert tags and all(a["status"] == 200 and a["x_cache"] == "STALE" for a in tags), tags
        blobs = [a for a in registry_answers(proxy, "blobs", offline) if a["method"] == "GET"]
        assert blobs and all(a["status"] == 200 and a["x_cache"] == "HIT" for a in blobs), blobs
        assert {a["path"].split("?")[0].rsplit("/", 1)[1] for a in blobs} >= set(image["layers"])
    finally:
        for daemon in daemons:
            daemon.stop()
        upstream.stop()
        upstream.tokens.stop()


# 5. A private repository behind htpasswd ######################################

def refused(result):
    assert result.returncode != 0, f"pulled without valid credentials:\n{result.stdout}\n{result.stderr}"
    text = result.stderr.lower()
    assert "unauthorized" in text or "authentication required" in text, result.stderr


def test_skopeo_pulls_a_basic_auth_private_repository_only_with_credentials(
        interop_proxy, private_registry, tmp_path, trap):
    """The Basic challenge goes through unchanged; the right credentials pull, others get nothing, cold or cached."""
    proxy = interop_proxy("--upstream", f"ghcr={private_registry.url}",
                          "--upstream", f"docker={private_registry.url}")
    source = f"docker://{proxy.host}/ghcr.io/private/app:latest"
    (tmp_path / "auth.json").write_text("{}")
    env = {**trap.environ(), "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"), "HOME": str(tmp_path)}

    def without_valid_credentials(round):
        since = len(proxy.answers)
        for name, creds in (("none", ["--src-no-creds"]), ("wrong", ["--src-creds", f"{USER}:wrong"])):
            refused(run([SKOPEO, "copy", "--src-tls-verify=false", *creds, source,
                         f"dir:{tmp_path / f'{round}-{name}'}"], env=env, check=False))
        assert served(proxy, since) == [], "a private object went to a client without valid credentials"
        challenges = [a for a in proxy.answers[since:] if a["status"] == 401]
        assert challenges, "no 401 reached the client"

    without_valid_credentials("cold")
    skopeo("copy", "--src-tls-verify=false", "--src-creds", f"{USER}:{PASSWORD}", source,
           f"dir:{tmp_path / 'out'}", env=env)
    check_dir_copy(tmp_path / "out", private_registry.images["app"])
    # Now the proxy's cache holds every object of private/app: still nothing without credentials.
    without_valid_credentials("cached")


def test_podman_pulls_a_basic_auth_private_repository_only_with_credentials(
        interop_proxy, private_registry, make_podman, tmp_path, trap):
    """--creds on the proxy's own name, and `podman login` to the proxy with the README mirror.

    (containers/image does not send --creds, or a login for ghcr.io, to a
    mirror: a mirror's credentials are looked up under the mirror's own name.)
    """
    proxy = interop_proxy("--upstream", f"ghcr={private_registry.url}",
                          "--upstream", f"docker={private_registry.url}")
    image = private_registry.images["app"]
    registries_conf = readme_snippet(PODMAN_REGISTRIES, proxy)
    direct = f"{proxy.host}/ghcr.io/private/app:latest"

    def without_valid_credentials(round):
        since = len(proxy.answers)
        podman = make_podman(tmp_path / round, registries_conf)
        fallback = len(trap.requests)
        refused(podman.pull("ghcr.io/private/app:latest", check=False))
        expect_fallback(trap, fallback, "ghcr.io")  # registries.conf: the mirror, then ghcr.io itself
        refused(podman.pull(direct, "--tls-verify=false", check=False))
        refused(podman.pull(direct, "--tls-verify=false", "--creds", f"{USER}:wrong", check=False))
        assert served(proxy, since) == [], "a private object went to a client without valid credentials"

    without_valid_credentials("cold")
    podman = make_podman(tmp_path / "creds", registries_conf)
    podman.pull(direct, "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}")
    check_podman_image(podman, direct, image)
    podman = make_podman(tmp_path / "login", registries_conf)
    podman("login", "--tls-verify=false", "--username", USER, "--password", PASSWORD, proxy.host)
    podman.pull("ghcr.io/private/app:latest")
    check_podman_image(podman, "ghcr.io/private/app:latest", image)
    without_valid_credentials("cached")


def test_skopeo_pulls_over_https_trusting_the_proxy_certificate(interop_proxy, registry, tmp_path, trap):
    """TLS_CERT/TLS_KEY: a certificate made now with openssl, verified by skopeo (no --tls-verify=false)."""
    need(openssl=OPENSSL)
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = certs / "proxy.crt", tmp_path / "proxy.key"
    run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)])
    proxy = interop_proxy("--upstream", f"docker={registry.url}", "--tls-cert", str(cert), "--tls-key", str(key))
    reference = f"docker://{proxy.host}/library/hello:latest"
    skopeo("copy", "--src-cert-dir", str(certs), "--src-tls-verify=true", reference, f"dir:{tmp_path / 'out'}",
           env=trap.environ())
    check_dir_copy(tmp_path / "out", registry.images["hello"])
    untrusted = run([SKOPEO, "inspect", "--tls-verify=true", reference], env=trap.environ(), check=False)
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr


# 6. Protection: a limit must not break an ordinary pull #######################

# As many layers as containers/image downloads at once (its MaxParallelDownloads, 6).
LAYERS = 6

# What an operator would write in BLOCK_MESSAGE: the user must get to read it.
BLOCK = "this mirror serves library/other images only; see the platform wiki"


@pytest.fixture(scope="module")
def layered(registry, tmp_path_factory):
    """library/layers:latest in the anonymous registry: LAYERS layers of distinct content."""
    layout = tmp_path_factory.mktemp("layered") / "layers"
    files = [{f"layer{n}/data.bin": f"layer {n} ".encode() * (500 * (n + 1))} for n in range(LAYERS)]
    image = write_oci_image(layout, "latest", files)
    registry.push(layout, "latest", "library/layers", "latest")
    return image


def copy_layers(proxy, destination, trap, *options):
    """skopeo [options] copy of library/layers:latest through `proxy`, not checked.

    It must end within 60 s: a client left hanging raises TimeoutExpired, a failure.
    """
    return run([SKOPEO, *options, "copy", "--src-tls-verify=false",
                f"docker://{proxy.host}/library/layers:latest", destination],
               env=trap.environ(), check=False, timeout=60)


def counted(proxy, since=0):
    """The proxy's answers to the requests its rate limits count (every /v2 request): (path, status)."""
    return [(a["path"].split("?")[0], a["status"]) for a in proxy.answers[since:]
            if (a["path"] or "").startswith("/v2/")]


def check_oci_copy(directory, image):
    """A skopeo oci: copy of one image: the index names its manifest; every blob hashes to its digest."""
    with open(os.path.join(directory, "index.json")) as file:
        assert [m["digest"] for m in json.load(file)["manifests"]] == [image["digest"]]
    for digest in [image["digest"], image["config"]] + image["layers"]:
        assert sha256_file(os.path.join(directory, "blobs", "sha256", digest.split(":")[1])) == digest


def test_skopeo_pulls_a_multi_layer_image_within_limits_a_pull_fits_in(
        interop_proxy, registry, layered, tmp_path, trap):
    """A limit must not break an ordinary pull: 30 requests a minute, 64 MiB an hour, 6 downloads at once.

    One skopeo copy of this image makes 10 requests the limits count (skopeo
    1.9.3, measured): GET /v2/ (401), GET /v2/auth (a token), the manifest by
    tag, and one GET per blob, 6 layers and the config.  (Its https:// probe
    first gets a 400 before any route, and is not counted.)  So the two copies
    below make 20 of the 30 a minute.  To dir: skopeo downloads one blob at a
    time (that destination is not thread-safe), to oci: up to 6 at once, hence
    6 transfers; and the 7 blob downloads to dir: in a row would trip a limit
    of 6 if a finished download were not given back.  The image weighs a few
    KiB: 64 MiB is a limit for real images (and bytes are counted at each
    answer's end, so a layer bigger than what is left would still not be cut).
    """
    proxy = interop_proxy("--upstream", f"docker={registry.url}", "--rate-limit-requests", "30",
                          "--rate-limit-bytes", "64M", "--rate-limit-transfers", "6")
    result = copy_layers(proxy, f"dir:{tmp_path / 'dir'}", trap)
    assert result.returncode == 0, result.stderr
    check_dir_copy(tmp_path / "dir", layered)
    one_copy = counted(proxy)
    blobs = [request for request in one_copy if "/blobs/" in request[0]]
    assert len(blobs) == LAYERS + 1 and len(one_copy) == len(blobs) + 3, one_copy  # the 10 above
    result = copy_layers(proxy, f"oci:{tmp_path / 'oci'}:latest", trap)
    assert result.returncode == 0, result.stderr
    check_oci_copy(tmp_path / "oci", layered)
    assert [a for a in proxy.answers if a["status"] in (429, 503)] == []
    assert len(proxy.server.proxy.limits) == 1, "the limits did not count this client"


def test_a_request_budget_too_small_for_a_pull_stops_skopeo_at_once_with_a_429(
        interop_proxy, registry, layered, tmp_path, trap):
    """--rate-limit-requests 1: skopeo's /v2/ ping takes it, its token request gets 429.

    containers/image does not retry a 429 from a token service (it does
    others: next test), and says "too many requests to registry" for any 429
    of a token or a blob, without the body's TOOMANYREQUESTS: that the answer
    is a well-formed registry error is checked on the wire, the same client
    asking again.
    """
    proxy = interop_proxy("--upstream", f"docker={registry.url}", "--rate-limit-requests", "1")
    result = copy_layers(proxy, f"dir:{tmp_path / 'out'}", trap)
    assert result.returncode != 0 and "too many requests to registry" in result.stderr, result.stderr
    assert counted(proxy) == [("/v2/", 401), ("/v2/auth", 429)]
    assert served(proxy) == []
    status, headers, body = proxy.request("GET", "/v2/auth?scope=repository:library/layers:pull&service=docker")
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 60  # a minute's single request comes back within one
    [error] = json.loads(body)["errors"]
    assert error["code"] == "TOOMANYREQUESTS" and error["detail"] == {"limit": "RATE_LIMIT_REQUESTS"}, error


def test_skopeo_waits_out_the_retry_after_of_a_429_on_a_blob(interop_proxy, registry, layered, tmp_path, trap):
    """--rate-limit-requests 3: ping, token and manifest take them; the first blob gets 429.

    The proxy says Retry-After: 20 (a request every 20 s).  containers/image
    retries a 429 up to 5 times, sleeping its Retry-After (60 s at most): this
    copy would end well, one blob every 20 s.  Its --command-timeout ends it
    in the first sleep, which its debug log shows: the 429 was read as a
    registry's rate limit, with its delay, not as a broken connection.
    """
    proxy = interop_proxy("--upstream", f"docker={registry.url}", "--rate-limit-requests", "3")
    result = copy_layers(proxy, f"dir:{tmp_path / 'out'}", trap, "--debug", "--command-timeout", "10s")
    assert result.returncode != 0 and "context deadline exceeded" in result.stderr, result.stderr
    waits = re.findall(r"Too many requests to http://127\.0\.0\.1:\d+/v2/library/layers/blobs/sha256:[0-9a-f]{64}"
                       r": sleeping for (\d+)\.0+ seconds", result.stderr)
    header = re.findall(r"Detected 'Retry-After' header \\?\"(\d+)\\?\"", result.stderr)
    assert waits and waits == header and 1 <= int(waits[0]) <= 20, result.stderr[-3000:]
    assert [status for _, status in counted(proxy)] == [401, 200, 200, 429], counted(proxy)


def test_skopeo_copy_of_an_image_outside_allow_images_is_denied_before_any_upstream_request(
        interop_proxy, registry, layered, tmp_path, trap):
    """ALLOW_IMAGES without library/layers: refused at the token request, as the issue
    asks (no upstream request at all).  skopeo reads no body of a failed token
    request: it prints "403 (Forbidden)", and the message is in the answer, which
    docker prints ("denied: ..."); the README says so."""
    proxy = interop_proxy("--upstream", f"docker={registry.url}", "--allow-images", "docker.io/library/other*",
                          "--block-message", BLOCK)
    result = copy_layers(proxy, f"dir:{tmp_path / 'out'}", trap)
    assert result.returncode != 0
    assert served(proxy) == [] and 403 in [status for _, status in counted(proxy)], counted(proxy)
    assert "403 (Forbidden)" in result.stderr, result.stderr
    status, _, body = proxy.request("GET", "/v2/auth?service=x&scope=repository:library/layers:pull")
    error = json.loads(body)["errors"][0]
    assert (status, error["code"], error["message"]) == (403, "DENIED", BLOCK)
