"""Prefetch (issue 13) with real parts: what `dockerproxy.py prefetch` stored serves real clients offline.

The command runs as a process, as an operator runs it, into a CACHE_DIR; then
the upstream is stopped and a proxy process is started on that CACHE_DIR, and
skopeo (`copy --all`) and containerd (`ctr images pull`, with the README's
hosts.toml) pull the image through it with nothing upstream to ask.  Every
blob they got must hash to the digest that was pushed, and the proxy's access
log must show each manifest and blob answered from the cache.

Upstreams, all on 127.0.0.1:
* Debian's docker-registry (realregistry.RealRegistry) with a two-platform
  OCI index pushed by skopeo --all, as an EXTRA_ROUTES route: the command
  names the image by the registry's host:port, as docker would;
* the fake Docker Hub (fakeregistry.FakeRegistry: token realm, blobs
  redirected to a CDN) as the docker route's upstream.

A Docker reference cannot carry "127.0.0.1:PORT" as a path component (no ":"
in a path component), so skopeo cannot name the EXTRA_ROUTES registry by a
path prefix on the proxy: the proxy process makes that route its
DEFAULT_ROUTE for skopeo, and containerd names it by ?ns=127.0.0.1:PORT
(the README's _default/hosts.toml), as it does for any registry.

With `--platform linux/arm64` the registry's own access log shows that only
the arm64 image's manifest, config and layers were fetched.

Tools as in test_interop.py, whose fixtures and helpers this module uses: a
missing skopeo, docker-registry or containerd/ctr skips loudly, or fails
under REQUIRE_INTEROP=1.  Clients run with HTTP(S)_PROXY on the trap, so a
fallback to a public registry fails the test.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest

import test_interop
from conftest import ROOT, RunningProxy
from realregistry import (OCI_INDEX, OCI_MANIFEST, RealRegistry, free_port, make_layer, wait_until,
                          write_oci_index)
from fakeregistry import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST
from test_interop import containerd_hosts_dir, run, sha256_file, skopeo

# test_interop.py's fixtures, the same here: the trap every client's HTTP(S)_PROXY points at (and
# the check after each test that nothing reached it), and a containerd of its own, driven with ctr.
trap = test_interop.trap
nothing_left_loopback = test_interop.nothing_left_loopback
containerd = test_interop.containerd

DOCKERPROXY = os.path.join(ROOT, "dockerproxy.py")
REPOSITORY, TAG = "library/multi", "1"

# the proxy's access log: INFO 127.0.0.1 "GET host /v2/..." route=local status=200 ... cache=hit upstream=-
PROXY_ACCESS = re.compile(r'"(?P<method>GET|HEAD) \S+ (?P<path>/v2/\S+/(?:manifests|blobs)/\S+)" '
                          r'route=(?P<route>\S+) status=(?P<status>\d+) .*?cache=(?P<cache>\S+) '
                          r'upstream=(?P<upstream>\S+)')
# docker-registry's access log: "GET /v2/library/multi/blobs/sha256:... HTTP/1.1" 200 193 "" "dockerproxy/..."
REGISTRY_ACCESS = re.compile(r'"(?P<method>[A-Z]+) /v2/(?P<name>\S+)/(?P<kind>manifests|blobs)/(?P<reference>\S+) '
                             r'HTTP/[\d.]+" (?P<status>\d+) \d+ "[^"]*" "(?P<agent>[^"]*)"')


# The command and the proxy, as processes ######################################

def prefetch(cache_dir, *args, env=None):
    """`dockerproxy.py prefetch --json ARGS` into cache_dir, which must succeed: its events."""
    result = run([sys.executable, DOCKERPROXY, "prefetch", "--json", "--env-file", os.devnull,
                  "--cache-dir", str(cache_dir), *args], env=env)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert events and events[-1]["event"] == "end" and events[-1]["ok"] is True, result.stdout
    return events


def event(events, kind):
    [found] = [item for item in events if item["event"] == kind]
    return found


class ProxyProcess:
    """dockerproxy.py serving on a free port, its log (access lines included) in a file."""

    def __init__(self, workdir, cache_dir, *flags, env=None):
        self.log_path = os.path.join(str(workdir), "proxy.log")
        self.port = free_port()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, DOCKERPROXY, "--host", "127.0.0.1", "--port", str(self.port),
                 "--env-file", os.devnull, "--cache-dir", str(cache_dir), *flags],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.client = RunningProxy(port=self.port)
        self.host = self.client.host
        try:
            wait_until(self._serving, what="proxy process start")
        except BaseException:
            self.stop()
            raise

    def _serving(self):
        assert self.process.poll() is None, f"the proxy exited {self.process.returncode}:\n{self.log()}"
        try:
            return self.client.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def log(self):
        with open(self.log_path, errors="replace") as file:
            return file.read()

    def stop(self):
        """SIGTERM, and wait: every access line is in the log once it returns."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def answers(self):
        """Its answers to manifest and blob requests, from its access log (call after stop())."""
        return [match.groupdict() for match in map(PROXY_ACCESS.search, self.log().splitlines()) if match]


@pytest.fixture
def proxy_process(tmp_path):
    """proxy_process(cache_dir, *flags, env=None) -> ProxyProcess; each is stopped after the test."""
    started = []

    def start(cache_dir, *flags, env=None):
        workdir = tmp_path / f"proxy-{len(started)}"
        workdir.mkdir()
        started.append(ProxyProcess(workdir, cache_dir, *flags, env=env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def check_answered_from_cache(proxy, served):
    """Every manifest and blob answer came from the cache, no upstream asked (a tag: stale, as its
    revalidation failed; a Docker Hub short name: the proxy's own 301 to library/); and every tag or
    digest of `served` was asked for."""
    proxy.stop()
    answers = proxy.answers()
    assert answers, proxy.log()
    for answer in answers:
        assert answer["upstream"] == "-", (answer, proxy.log())
        if answer["status"] == "301":
            assert answer["route"] == "docker" and not answer["path"].startswith("/v2/library/"), answer
            continue
        by_digest = "/sha256:" in answer["path"]
        assert answer["status"] == "200", (answer, proxy.log())
        assert answer["cache"] in (("hit",) if by_digest else ("hit", "stale")), (answer, proxy.log())
    asked = {answer["path"].split("?")[0].rsplit("/", 1)[1] for answer in answers if answer["status"] == "200"}
    assert asked >= set(served), proxy.log()


def refuses_connections(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


# What the clients got ##########################################################

def check_oci_layout(directory, index_digest, digests):
    """A skopeo oci: layout holding the index `index_digest` and exactly `digests`, each hashing to its name."""
    with open(os.path.join(directory, "index.json")) as file:
        layout = json.load(file)
    assert [entry["digest"] for entry in layout["manifests"]] == [index_digest]
    blobs = os.path.join(directory, "blobs", "sha256")
    stored = {"sha256:" + name for name in os.listdir(blobs)}
    assert stored == set(digests)
    for digest in stored:
        assert sha256_file(os.path.join(blobs, digest.split(":")[1])) == digest


def layout_digests(layout):
    """Every blob of an OCI layout, by its digest (the files are named by their sha256)."""
    return {"sha256:" + name for name in os.listdir(os.path.join(str(layout), "blobs", "sha256"))}


def image_digests(images):
    """Manifests, configs and layers of images described by write_oci_index or FakeRegistry.add_image."""
    return {digest for image in images for digest in [image["digest"], image["config"], *image["layers"]]}


def copy_all(proxy, name, destination, trap):
    skopeo("copy", "--all", "--src-tls-verify=false", f"docker://{proxy.host}/{name}", f"oci:{destination}:copy",
           env=trap.environ())


# The registry ##################################################################

@pytest.fixture
def index_registry(tmp_path):
    """A docker-registry of its own (a test stops it), with library/multi:1, an OCI index of linux/amd64
    and linux/arm64 pushed by skopeo --all; `.layout` is the OCI layout pushed, `.multi` its description."""
    real = RealRegistry(tmp_path / "registry")
    real.layout = tmp_path / "multi"
    real.multi = write_oci_index(real.layout, "multi", ("amd64", "arm64"))
    real.push(real.layout, "multi", REPOSITORY, TAG, all_images=True)
    yield real
    real.stop()


def extra_route(registry):
    """The registry as an EXTRA_ROUTES route: named by its host:port in image names and ?ns=."""
    return {"EXTRA_ROUTES": f"local={registry.url}"}


def prefetch_from_registry_then_stop_it(registry, cache_dir):
    """Prefetch <host:port>/library/multi:1, every platform; stop the registry."""
    events = prefetch(cache_dir, f"{registry.host}/{REPOSITORY}:{TAG}", env=extra_route(registry))
    resolved = event(events, "resolved")
    assert resolved["digest"] == registry.multi["index"]["digest"]
    assert sorted(resolved["platforms"]) == ["linux/amd64", "linux/arm64"]
    registry.stop()
    assert refuses_connections(registry.port)


# 1. An index prefetched from a real registry, pulled offline ####################

def test_skopeo_copies_every_platform_of_an_index_prefetched_from_a_registry_now_stopped(
        index_registry, proxy_process, tmp_path, trap):
    cache_dir = tmp_path / "cache"
    prefetch_from_registry_then_stop_it(index_registry, cache_dir)
    # skopeo cannot put "127.0.0.1:PORT" in a path: the route is the proxy's default one for it
    proxy = proxy_process(cache_dir, "--default-route", "local", "--upstream", f"docker=http://127.0.0.1:{free_port()}",
                          env=extra_route(index_registry))
    copy_all(proxy, f"{REPOSITORY}:{TAG}", tmp_path / "copy", trap)
    multi = index_registry.multi
    assert layout_digests(index_registry.layout) == {multi["index"]["digest"]} | image_digests(multi["images"])
    check_oci_layout(tmp_path / "copy", multi["index"]["digest"], layout_digests(index_registry.layout))
    check_answered_from_cache(proxy, {TAG} | image_digests(multi["images"]))


def test_ctr_pulls_an_index_prefetched_from_a_registry_now_stopped_by_its_ns(
        index_registry, proxy_process, containerd, tmp_path):
    """ctr pull 127.0.0.1:PORT/library/multi:1 with the README's _default/hosts.toml: ?ns=127.0.0.1:PORT."""
    cache_dir = tmp_path / "cache"
    prefetch_from_registry_then_stop_it(index_registry, cache_dir)
    proxy = proxy_process(cache_dir, "--upstream", f"docker=http://127.0.0.1:{free_port()}",
                          env=extra_route(index_registry))
    reference = f"{index_registry.host}/{REPOSITORY}:{TAG}"
    containerd.pull(reference, containerd_hosts_dir(tmp_path / "certs.d", proxy), "--platform", "linux/amd64")
    multi = index_registry.multi
    [amd64] = [image for image in multi["images"] if image["platform"]["architecture"] == "amd64"]
    lines = containerd.ctr("images", "ls").stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert reference in rows and rows[reference][2] == multi["index"]["digest"], lines
    present = set(containerd.ctr("content", "ls", "--quiet").stdout.split())
    for digest in [multi["index"]["digest"], amd64["digest"], amd64["config"], *amd64["layers"]]:
        assert digest in present
        blob = subprocess.run([test_interop.CTR, "--address", containerd.address, "--namespace", "test",
                               "content", "get", digest], capture_output=True, timeout=60, check=True).stdout
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest
    check_answered_from_cache(proxy, [TAG, amd64["digest"], amd64["config"], *amd64["layers"]])
    # the proxy's default route is docker: only containerd's ?ns=127.0.0.1:PORT chose this one
    assert all(answer["route"] == "local" for answer in proxy.answers()), proxy.log()


# 2. An index prefetched from the fake Docker Hub, pulled offline #################

def fake_index(fake, media_types):
    """library/xyz:tag on the fake Docker Hub: an index of a linux/amd64 and a linux/arm64 image."""
    manifest_type, index_type = media_types
    images = []
    for arch in ("amd64", "arm64"):
        layers = [make_layer({f"{arch}/{n}.txt": f"layer {n} for {arch}".encode() * 64})[0] for n in range(2)]
        images.append(fake.add_image("library/xyz", None, layers, manifest_type,
                                     {"architecture": arch, "os": "linux"}))
    return fake.add_index("library/xyz", "tag", images, index_type), images


@pytest.mark.parametrize("media_types", [(OCI_MANIFEST, OCI_INDEX), (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)],
                         ids=["oci", "docker"])
def test_skopeo_copies_every_platform_of_an_index_prefetched_from_docker_hub_now_gone(
        fake, proxy_process, tmp_path, trap, media_types):
    """Through the token realm and the CDN redirect into the cache; then by every docker.io name, offline."""
    index, images = fake_index(fake, media_types)
    cache_dir = tmp_path / "cache"
    events = prefetch(cache_dir, "library/xyz:tag", "--upstream", f"docker={fake.url}")
    assert event(events, "resolved")["digest"] == index
    assert fake.count(server="auth") >= 1 and fake.count(server="cdn", method="GET") == 4 + 2  # layers, configs
    fake.close()
    assert refuses_connections(int(fake.url.rsplit(":", 1)[1]))
    proxy = proxy_process(cache_dir, "--upstream", f"docker={fake.url}")
    expected = {index} | image_digests(images)
    for number, name in enumerate(["library/xyz:tag", "xyz:tag", "docker.io/library/xyz:tag"]):
        if media_types[0] == OCI_MANIFEST:
            copy_all(proxy, name, tmp_path / f"copy-{number}", trap)
            check_oci_layout(tmp_path / f"copy-{number}", index, expected)
        else:  # an oci: layout would have the Docker types converted (new digests): dir: keeps them
            destination = tmp_path / f"copy-{number}"
            skopeo("copy", "--all", "--src-tls-verify=false", f"docker://{proxy.host}/{name}", f"dir:{destination}",
                   env=trap.environ())
            assert sha256_file(destination / "manifest.json") == index
            for image in images:
                assert sha256_file(destination / f"{image['digest'].split(':')[1]}.manifest.json") == image["digest"]
                for digest in [image["config"], *image["layers"]]:
                    assert sha256_file(destination / digest.split(":")[1]) == digest
    check_answered_from_cache(proxy, {"tag"} | image_digests(images))


# 3. --platform: only that platform's blobs are asked upstream ####################

def registry_requests(registry, since, kind):
    """(method, reference) of the requests for `kind` in the registry's access log after `since` (whatever their
    User-Agent: the prefetch is the only client then)."""
    found = [match.groupdict() for match in map(REGISTRY_ACCESS.search, registry.access_log()[since:].splitlines())
             if match]
    return sorted((item["method"], item["reference"]) for item in found
                  if item["kind"] == kind and item["name"] == REPOSITORY)


def test_prefetch_of_one_platform_gets_only_its_manifest_config_and_layers_from_the_registry(
        index_registry, tmp_path):
    multi = index_registry.multi
    [arm64] = [image for image in multi["images"] if image["platform"]["architecture"] == "arm64"]
    since = len(index_registry.access_log())
    events = prefetch(tmp_path / "cache", f"{index_registry.host}/{REPOSITORY}:{TAG}", "--platform", "linux/arm64",
                      env=extra_route(index_registry))
    resolved = event(events, "resolved")
    assert resolved["platforms"] == ["linux/arm64"] and resolved["blobs"] == 1 + len(arm64["layers"])
    wanted = sorted(("GET", digest) for digest in [arm64["config"], *arm64["layers"]])
    wait_until(lambda: len(registry_requests(index_registry, since, "blobs")) >= len(wanted),
               what="the prefetch's blob requests in the registry's access log")
    assert registry_requests(index_registry, since, "blobs") == wanted
    assert registry_requests(index_registry, since, "manifests") == sorted([("GET", TAG), ("GET", arm64["digest"])])
    image = event(events, "image")
    assert image["ok"] and image["fetched"] == len(wanted) and image["cached"] == 0
