"""The Docker engine, the client most users have: Debian's dockerd, started by the tests.

One dockerd for the module (tests/dockerengine.py), configured with the
README's own daemon.json (``proxy.example:8080`` replaced by the proxy's
address; every proxy of this module listens on that one port, so the
mirror setting stays right), its HTTP(S)_PROXY the trap: a mirror that
fails makes dockerd try registry-1.docker.io, which the trap records and
the autouse check turns into a failure.  Every upstream is a docker-registry
on 127.0.0.1.  Every image pulled is checked against what was pushed: image
ID (config digest), RepoDigests, and each layer of `docker save` against
the pushed diff_ids.

The module also builds the Dockerfile, from stand-in base images made from
this machine's files (dockerengine.py says how), and runs it as the README
says.  /etc/hosts gets the test names for the module, /etc/docker/certs.d a
CA for one test; both are restored.

Without dockerd (or when it cannot start): a loud skip, a failure under
REQUIRE_INTEROP=1.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess

import pytest

import dockerproxy
from conftest import ROOT
from dockerengine import (BUSYBOX, DOCKER, DOCKERD, SYSTEM_PYTHON, DockerEngine, hosts_entries,
                          import_base_images, saved_layers, trusted_ca)
from realregistry import OCI_INDEX, RealRegistry, free_port, wait_until, write_oci_image, write_oci_index
from test_interop import (HTPASSWD, OPENSSL, PASSWORD, SKOPEO, USER, app_layers, interop_proxy,  # noqa: F401
                          need, nothing_left_loopback, private_registry, run, served, start_token_registry,
                          trap, unavailable)

DOMAIN = "dockerproxy.test"              # CUSTOM_DOMAIN: ghcr.dockerproxy.test is the ghcr route
TLS_NAME = f"tls.{DOMAIN}"               # the HTTPS test's name, on an address outside 127.0.0.0/8
PORT = free_port()                       # every plain-HTTP proxy of this module (the mirror's address)
PROXY_HOST = f"127.0.0.1:{PORT}"


def engine_or_skip():
    need(dockerd=DOCKERD, docker=DOCKER)


def readme_daemon_json() -> dict:
    """README's ```json block with registry-mirrors (the Docker section's /etc/docker/daemon.json)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    blocks = [block for block in re.findall(r"```json\n(.*?)```", readme, re.S) if "registry-mirrors" in block]
    assert len(blocks) == 1, f"README.md has {len(blocks)} daemon.json blocks"
    assert "proxy.example:8080" in blocks[0]
    return json.loads(blocks[0].replace("proxy.example:8080", PROXY_HOST))


def outside_address():
    """An IPv4 address of this machine outside 127.0.0.0/8: dockerd treats every 127.x
    registry as insecure (no certificate check), so HTTPS is proven on another one."""
    listing = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for address in listing:
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", address) and not address.startswith("127."):
            return address
    return None


OUTSIDE = outside_address()


@pytest.fixture
def address():
    if OUTSIDE is None:
        unavailable("this machine has no IPv4 address outside 127.0.0.0/8 for the HTTPS test")
    return OUTSIDE


@pytest.fixture(scope="module")
def engine(trap):
    """dockerd with the README's daemon.json, the test names in /etc/hosts from before it starts
    (Go caches the hosts file for 5 s), and the trap as its proxy for anything else."""
    engine_or_skip()
    environ = trap.environ()
    no_proxy = ",".join(["127.0.0.1", "localhost", f".{DOMAIN}"] + ([OUTSIDE] if OUTSIDE else []))
    environ.update(NO_PROXY=no_proxy, no_proxy=no_proxy)
    names = {f"ghcr.{DOMAIN}": "127.0.0.1", **({TLS_NAME: OUTSIDE} if OUTSIDE else {})}
    with hosts_entries(names):
        try:
            daemon = DockerEngine(readme_daemon_json(), environ)
        except (RuntimeError, TimeoutError) as err:
            unavailable(f"dockerd cannot start here: {str(err)[-500:]}")
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture
def clean_engine(engine):
    """The engine with no image, container or volume left from the test before."""
    yield engine
    for kind, listing in (("container", ["ps", "-aq"]), ("image", ["images", "-q"]),
                          ("volume", ["volume", "ls", "-q"])):
        names = engine.docker(*listing).stdout.split()
        if names:
            engine.docker(kind, "rm", "-f", *sorted(set(names)), check=False)


def docker_hub_registry(workdir) -> RealRegistry:
    """docker-registry with library/small (tags 1 and latest, OCI), library/multi:1 (an index
    for amd64 and arm64) and library/schema2:1 (a Docker schema 2 manifest)."""
    real = RealRegistry(workdir / "server")
    small = write_oci_image(workdir / "small", "1", [{"small.txt": b"a small image" * 100},
                                                      {"etc/small.conf": b"setting"}])
    real.push(workdir / "small", "1", "library/small", "1")
    real.push(workdir / "small", "1", "library/small", "latest")
    multi = write_oci_index(workdir / "multi", "multi")
    real.push(workdir / "multi", "multi", "library/multi", "1", all_images=True)
    old = write_oci_image(workdir / "schema2", "1", [{"old.txt": b"schema 2" * 100}])
    run([SKOPEO, "copy", "--quiet", "--dest-tls-verify=false", "--format", "v2s2",
         f"oci:{workdir / 'schema2'}:1", f"docker://{real.host}/library/schema2:1"])
    raw = subprocess.run([SKOPEO, "inspect", "--raw", "--tls-verify=false",
                          f"docker://{real.host}/library/schema2:1"], capture_output=True, check=True).stdout
    schema2 = json.loads(raw)
    assert schema2["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    old = {**old, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(), "config": schema2["config"]["digest"]}
    real.images = {"small": small, "multi": multi, "schema2": old}
    return real


def check_engine_image(engine, reference, image, repository, digest, workdir):
    """The engine holds `image` under `reference`: its ID is the config digest, `repository@digest`
    is among its RepoDigests, and every layer it saved hashes to a pushed diff_id."""
    inspected = engine.inspect("image", "inspect", reference)[0]
    assert inspected["Id"] == image["config"], inspected["Id"]
    assert f"{repository}@{digest}" in inspected["RepoDigests"], inspected["RepoDigests"]
    assert inspected["RootFS"]["Layers"] == image["diff_ids"]
    config, layers = saved_layers(engine, reference, str(workdir))
    assert (config, layers) == (image["config"], image["diff_ids"])


def manifests_served(proxy, since):
    """Manifests the proxy answered 200 since `since`, GET or HEAD (dockerd asks a tag with a HEAD
    first, and GETs nothing when it holds that digest already)."""
    return [a for a in proxy.answers[since:] if a["status"] == 200 and "/manifests/" in (a["path"] or "")]


def remove_images(engine):
    """`docker rmi` of every image: the next pull starts from nothing."""
    engine.docker("rmi", "-f", *sorted(set(engine.docker("images", "-q").stdout.split())))
    assert engine.docker("images", "-q").stdout.split() == []


# 1. Docker Hub names through registry-mirrors, and again offline ###############

def test_docker_pulls_docker_hub_names_through_the_readme_mirror_and_again_offline(
        clean_engine, interop_proxy, tmp_path, trap):
    """`docker pull small`, `library/small:1`, by digest, `--platform linux/arm64` of an index, a
    schema 2 image: every one through the mirror; then the upstream stopped, every image removed
    and pulled again, from the cache (MANIFEST_TTL=0: tags answered stale)."""
    engine = clean_engine
    upstream = docker_hub_registry(tmp_path / "hub")
    try:
        images = upstream.images
        small, multi, schema2 = images["small"], images["multi"], images["schema2"]
        arm64 = next(image for image in multi["images"] if image["platform"]["architecture"] == "arm64")
        proxy = interop_proxy("--port", str(PORT), "--manifest-ttl", "0", "--upstream", f"docker={upstream.url}")
        pulls = [  # (what a user types, the image, its RepoDigests entry)
            ([f"docker.io/library/small@{small['digest']}"], f"small@{small['digest']}", small,
             f"small@{small['digest']}"),  # first: dockerd asks nothing for a digest it holds
            (["small"], "small", small, f"small@{small['digest']}"),
            (["library/small:1"], "small:1", small, f"small@{small['digest']}"),
            (["--platform", "linux/arm64", "multi:1"], "multi:1", arm64, f"multi@{multi['index']['digest']}"),
            (["schema2:1"], "schema2:1", schema2, f"schema2@{schema2['digest']}"),
        ]

        def pull_all(round):
            start = len(proxy.answers)
            for arguments, reference, image, repo_digest in pulls:
                since = len(proxy.answers)
                engine.docker("pull", *arguments)
                assert manifests_served(proxy, since), (f"{arguments}: not through the mirror", proxy.answers[since:])
                repository, digest = repo_digest.split("@")
                check_engine_image(engine, reference, image, repository, digest, tmp_path)
            blobs = {a["path"].rsplit("/", 1)[1] for a in served(proxy, start) if "/blobs/" in a["path"]}
            assert blobs >= {small["config"], arm64["config"], schema2["config"],
                             *small["layers"], *arm64["layers"], *schema2["layers"]}, round

        pull_all("cold")
        assert any(a["path"].endswith("/manifests/latest") for a in manifests_served(proxy, 0))
        upstream.stop()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", upstream.port), timeout=2).close()
        remove_images(engine)
        offline = len(proxy.answers)
        pull_all("offline")
        tags = [a for a in manifests_served(proxy, offline) if not a["path"].split("/")[-1].startswith("sha256:")]
        assert tags and all(a["x_cache"] == "STALE" for a in tags), tags
        blobs = [a for a in served(proxy, offline) if "/blobs/" in a["path"]]
        assert blobs and all(a["x_cache"] == "HIT" for a in blobs), blobs
    finally:
        upstream.stop()


# 2. Other registries: by path prefix and by host route, and again offline #######

def test_docker_pulls_ghcr_by_path_prefix_and_by_host_route_and_again_offline(
        clean_engine, interop_proxy, tmp_path, trap):
    """`docker pull 127.0.0.1:PORT/ghcr.io/owner/app:latest` and, as the Worker's users do,
    `docker pull ghcr.dockerproxy.test:PORT/owner/app:latest` (CUSTOM_DOMAIN, /etc/hosts):
    a token registry behind both; then offline."""
    need(openssl=OPENSSL)
    engine = clean_engine
    upstream = start_token_registry(tmp_path / "ghcr")
    try:
        image = upstream.images["app"]
        proxy = interop_proxy("--port", str(PORT), "--manifest-ttl", "0", "--custom-domain", DOMAIN,
                              "--upstream", f"ghcr={upstream.url}")
        prefixed, routed = f"{PROXY_HOST}/ghcr.io/owner/app", f"ghcr.{DOMAIN}:{PORT}/owner/app"

        def pull_both(round):
            for repository in (prefixed, routed):
                since = len(proxy.answers)
                engine.docker("pull", f"{repository}:latest")
                answered = manifests_served(proxy, since)
                assert answered, f"{repository}: not through the proxy"
                if repository == routed:
                    assert all(a["host"] == f"ghcr.{DOMAIN}:{PORT}" for a in answered), answered
                check_engine_image(engine, f"{repository}:latest", image, repository, image["digest"], tmp_path)

        pull_both("cold")
        assert "repository:owner/app:pull" in upstream.tokens.scopes(0)
        upstream.stop()
        upstream.tokens.stop()
        remove_images(engine)
        offline = len(proxy.answers)
        pull_both("offline")
        answered = served(proxy, offline)
        assert answered and all(a["x_cache"] in ("HIT", "STALE") for a in answered), answered
        assert {a["path"].rsplit("/", 1)[1] for a in answered if "/blobs/" in a["path"]} >= set(image["layers"])
    finally:
        upstream.stop()
        upstream.tokens.stop()


# 3. docker login, through the proxy, to an htpasswd upstream ####################

def refused(result):
    assert result.returncode != 0, f"pulled without valid credentials:\n{result.stdout}\n{result.stderr}"
    text = result.stderr.lower()
    assert "unauthorized" in text or "authentication required" in text or "no basic auth" in text, result.stderr


def test_docker_login_to_the_proxy_pulls_a_private_image_and_nothing_without_it(
        clean_engine, interop_proxy, private_registry, tmp_path, trap):
    """Refused before login (the upstream's error), pulled after `docker login PROXY`, refused
    again after `docker logout` with the image cached: no byte of it reaches the anonymous daemon."""
    engine = clean_engine
    image = private_registry.images["app"]
    proxy = interop_proxy("--port", str(PORT), "--upstream", f"docker={private_registry.url}")
    reference = f"{PROXY_HOST}/private/app:latest"

    def anonymous_pull_refused():
        since = len(proxy.answers)
        refused(engine.docker("pull", reference, check=False))
        assert served(proxy, since) == [], "a private object went to a daemon without credentials"
        assert any(a["status"] == 401 for a in proxy.answers[since:])

    anonymous_pull_refused()
    engine.docker("login", "--username", USER, "--password-stdin", PROXY_HOST, input=PASSWORD)
    wrong = subprocess.run([DOCKER, "-H", f"unix://{engine.socket}", "login", "--username", USER,
                            "--password-stdin", PROXY_HOST], input="wrong", capture_output=True, text=True,
                           env={**os.environ, "DOCKER_CONFIG": str(tmp_path)})
    assert wrong.returncode != 0, "docker login accepted a wrong password"
    engine.docker("pull", reference)
    check_engine_image(engine, reference, image, reference.rsplit(":", 1)[0], image["digest"], tmp_path)
    engine.docker("logout", PROXY_HOST)
    remove_images(engine)
    anonymous_pull_refused()  # now the cache holds every object of private/app


# 4. The Dockerfile: built from local base images, run as the README says #######

def wait_healthy(engine, container, port):
    """Until the image's HEALTHCHECK calls `container` healthy (or it stopped): healthy, its last
    probe exited 0, and the proxy answered that probe's /healthz on `port`."""
    def state():
        return engine.inspect("container", "inspect", container)[0]["State"]
    wait_until(lambda: state()["Health"]["Status"] == "healthy" or not state()["Running"],
               timeout=60, what=f"{container}'s HEALTHCHECK")
    logs = engine.docker("logs", container).stderr
    assert state()["Health"]["Status"] == "healthy", logs[-3000:]
    probes = state()["Health"]["Log"]
    assert probes and probes[-1]["ExitCode"] == 0, probes
    assert '"GET 127.0.0.1:%d /healthz" route=- status=200' % port in logs


def test_the_image_builds_from_local_bases_runs_as_65532_on_a_named_volume_and_stops_on_sigterm(
        clean_engine, tmp_path, trap):
    """ARG PYTHON_IMAGE / HELPER_IMAGE set to stand-ins; the HEALTHCHECK turns healthy; a pull
    through the container lands in the volume; `docker stop` ends it by SIGTERM (exit 0)."""
    need(busybox=BUSYBOX, python3_11=SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else None)
    engine = clean_engine
    upstream = docker_hub_registry(tmp_path / "hub")
    try:
        bases = import_base_images(engine, str(tmp_path))
        context = tmp_path / "context"  # what the Dockerfile copies, and nothing else
        context.mkdir()
        for name in ("Dockerfile", "dockerproxy.py"):
            shutil.copy(os.path.join(ROOT, name), context / name)
        engine.docker("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={bases['PYTHON_IMAGE']}",
                      "--build-arg", f"HELPER_IMAGE={bases['HELPER_IMAGE']}", "-t", "dockerproxy:test", str(context),
                      timeout=600)
        built = engine.inspect("image", "inspect", "dockerproxy:test")[0]["Config"]
        assert built["User"] == "65532:65532" and built["Healthcheck"]["Test"][0] == "CMD", built
        port = free_port()
        engine.docker("volume", "create", "cache")
        # --network host: this engine has no bridge; -p is what the README's own command uses
        engine.docker("run", "-d", "--name", "dockerproxy", "--network", "host", "--stop-timeout", "30",
                      "--health-interval", "1s", "-v", "cache:/cache", "-e", f"PORT={port}",
                      "-e", f"UPSTREAM_DOCKER={upstream.url}", "dockerproxy:test")

        def state():
            return engine.inspect("container", "inspect", "dockerproxy")[0]["State"]
        wait_healthy(engine, "dockerproxy", port)
        probe = built["Healthcheck"]["Test"][1:]  # the probe itself fails where nothing answers
        failed = engine.docker("exec", "-e", f"PORT={free_port()}", "dockerproxy", *probe, check=False)
        assert failed.returncode == 1, (failed.returncode, failed.stderr[-1000:])
        with open(f"/proc/{state()['Pid']}/status") as file:
            ids = {line.split(":")[0]: line.split()[1:] for line in file if line.startswith(("Uid", "Gid"))}
        assert ids == {"Uid": ["65532"] * 4, "Gid": ["65532"] * 4}, ids

        small = upstream.images["small"]
        reference = f"127.0.0.1:{port}/library/small:1"
        engine.docker("pull", reference)
        check_engine_image(engine, reference, small, reference.rsplit(":", 1)[0], small["digest"], tmp_path)
        volume = engine.inspect("volume", "inspect", "cache")[0]["Mountpoint"]
        for digest in [small["digest"], small["config"], *small["layers"]]:
            path = dockerproxy.object_path(volume, digest)
            wait_until(lambda: os.path.exists(path), what=f"{digest} in the volume")
            assert os.stat(path).st_uid == 65532
        engine.docker("stop", "dockerproxy", timeout=60)
        stopped = state()
        logs = engine.docker("logs", "dockerproxy")
        assert (stopped["Running"], stopped["ExitCode"], stopped["OOMKilled"]) == (False, 0, False), (
            stopped, logs.stderr[-2000:])
        assert "SIGTERM: shutting down" in logs.stderr and "shutdown: done" in logs.stderr

        # With TLS_CERT the HEALTHCHECK asks over HTTPS (the certificate names no 127.0.0.1)
        need(openssl=OPENSSL)
        certificates = tmp_path / "certificates"
        certificates.mkdir()
        _, cert, key = make_ca_and_certificate(certificates, TLS_NAME)
        os.chmod(key, 0o644)  # for uid 65532, in this throwaway directory only
        tls_port = free_port()
        engine.docker("run", "-d", "--name", "dockerproxy-tls", "--network", "host", "--health-interval", "1s",
                      "-v", f"{certificates}:/certificates:ro", "-e", f"PORT={tls_port}",
                      "-e", "TLS_CERT=/certificates/proxy.crt", "-e", "TLS_KEY=/certificates/proxy.key",
                      "-e", f"UPSTREAM_DOCKER={upstream.url}", "dockerproxy:test")
        wait_healthy(engine, "dockerproxy-tls", tls_port)
    finally:
        upstream.stop()


# 5. HTTPS, the CA in /etc/docker/certs.d ######################################

def make_ca_and_certificate(directory, name):
    """A CA, and a certificate for `name` it signed: (ca.crt, proxy.crt, proxy.key)."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, request, cert = directory / "proxy.key", directory / "proxy.csr", directory / "proxy.crt"
    extensions = directory / "san.cnf"
    extensions.write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n")
    run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=dockerproxy test CA",
         "-keyout", str(ca_key), "-out", str(ca_cert)])
    run([OPENSSL, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key),
         "-out", str(request)])
    run([OPENSSL, "x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert)])
    return ca_cert, cert, key


def test_docker_pulls_over_https_trusting_the_ca_in_certs_d(clean_engine, interop_proxy, address, tmp_path, trap):
    """TLS_CERT/TLS_KEY from a CA made now; the name outside 127.0.0.0/8 and in no insecure-registries
    entry, so dockerd checks the certificate: refused untrusted, pulled once certs.d has the CA."""
    need(openssl=OPENSSL)
    engine = clean_engine
    upstream = docker_hub_registry(tmp_path / "hub")
    try:
        ca, cert, key = make_ca_and_certificate(tmp_path, TLS_NAME)
        port = free_port()
        proxy = interop_proxy("--host", address, "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key),
                              "--upstream", f"docker={upstream.url}")
        assert proxy.port == port
        host_port = f"{TLS_NAME}:{port}"
        assert host_port not in readme_daemon_json().get("insecure-registries", [])
        small = upstream.images["small"]
        untrusted = engine.docker("pull", f"{host_port}/library/small:1", check=False)
        assert untrusted.returncode != 0 and "x509" in untrusted.stderr, untrusted.stderr
        with trusted_ca(host_port, ca):
            engine.docker("pull", f"{host_port}/library/small:1")
        check_engine_image(engine, f"{host_port}/library/small:1", small, f"{host_port}/library/small",
                           small["digest"], tmp_path)
        assert served(proxy), "not pulled through the proxy"
    finally:
        upstream.stop()
