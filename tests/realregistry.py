"""Real parts for the tests: Debian's docker-registry as a process, and images.

RealRegistry runs the CNCF distribution registry (Debian package
docker-registry) from a YAML config on a free loopback port, with its storage
in a temporary directory, optionally behind htpasswd basic auth or behind
TokenServer, a token service as Docker Hub and ghcr.io have one (JWTs signed
with a key openssl makes).  write_oci_image() and write_oci_index() write OCI
layouts of generated content that skopeo pushes into it, so no test needs the
network.  Trap is an HTTP proxy for the clients' HTTP(S)_PROXY: whatever a
client would send off this machine arrives there instead, is refused and
recorded.
"""

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

REGISTRY_BINARY = shutil.which("docker-registry") or shutil.which("registry")
SKOPEO = shutil.which("skopeo")
OPENSSL = shutil.which("openssl")
HTPASSWD = shutil.which("htpasswd")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout=20.0, interval=0.05, what="condition"):
    """Poll `predicate` until it is true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout} s")


class LoopbackServer:
    """A ThreadingHTTPServer on a free 127.0.0.1 port, serving in a thread."""

    def __init__(self, handler):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        # a short poll interval: stop() waits up to one in shutdown(), 0.5 s by default
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def answer(self, status, body=b"", content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _TrapHandler(_QuietHandler):
    def handle_any(self):
        self.server.owner.requests.append((self.command, self.path, self.headers.get("host")))
        self.close_connection = True
        self.answer(403, b"trapped: tests never leave loopback\n", "text/plain")

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_CONNECT = do_OPTIONS = handle_any


class Trap(LoopbackServer):
    """An HTTP proxy that refuses every request and records it.

    Clients get it as HTTP_PROXY and HTTPS_PROXY: Go's clients (skopeo, podman,
    ctr) never use a proxy for loopback addresses, so only a request that
    would leave this machine (a fallback to ghcr.io or registry-1.docker.io)
    arrives here, as CONNECT, and is refused before any name is resolved.
    """

    def __init__(self):
        self.requests = []
        super().__init__(_TrapHandler)

    def environ(self):
        return {"HTTP_PROXY": self.url, "HTTPS_PROXY": self.url, "http_proxy": self.url,
                "https_proxy": self.url, "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _TokenHandler(_QuietHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            return self.answer(404, b"{}")
        owner = self.server.owner
        query = urllib.parse.parse_qs(url.query)
        scopes = " ".join(query.get("scope", [])).split()
        authorization = self.headers.get("authorization", "")
        owner.requests.append({"service": query.get("service", [""])[0], "scopes": scopes,
                               "authorization": authorization.split(" ")[0] if authorization else None,
                               "user_agent": self.headers.get("user-agent", "")})
        token = owner.issue(query.get("service", [""])[0], scopes)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300,
                           "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        self.answer(200, body)


class TokenServer(LoopbackServer):
    """A token service (distribution's token auth) that grants every scope to anyone.

    Like Docker Hub for a public repository: a client (or the proxy) must
    fetch a token at the realm the registry names, for the scope it needs,
    and bring it back as Bearer.  Every token request is recorded in
    `requests` (service, scopes, authorization scheme), so a test can see
    which scopes were asked for.  Tokens are RS256 JWTs with the signing
    certificate in x5c, signed by openssl; the registry trusts the certificate.
    """

    ISSUER = "dockerproxy-test-issuer"
    SERVICE = "dockerproxy-test-registry"

    def __init__(self, workdir):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.key = os.path.join(self.workdir, "token.key")
        self.cert = os.path.join(self.workdir, "token.crt")
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=dockerproxy-test-token", "-keyout", self.key, "-out", self.cert],
                       check=True, capture_output=True, timeout=60)
        with open(self.cert) as file:
            self.cert_der = ssl.PEM_cert_to_DER_cert(file.read())
        self.requests = []
        super().__init__(_TokenHandler)
        self.realm = self.url + "/token"

    def issue(self, service, scopes):
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {"iss": self.ISSUER, "sub": "", "aud": service, "exp": now + 300, "nbf": now - 60,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signed = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        signature = subprocess.run([OPENSSL, "dgst", "-sha256", "-sign", self.key],
                                   input=signed.encode(), check=True, capture_output=True,
                                   timeout=30).stdout
        return signed + "." + _b64url(signature)

    def registry_config(self) -> str:
        return (f"auth:\n  token:\n    realm: {self.realm}\n    service: {self.SERVICE}\n"
                f"    issuer: {self.ISSUER}\n    rootcertbundle: {self.cert}\n")

    def scopes(self, since=0):
        """Every scope asked for in the token requests since the `since`-th."""
        return [scope for request in self.requests[since:] for scope in request["scopes"]]


def make_htpasswd_line(user, password) -> str:
    """A bcrypt htpasswd line, as `htpasswd -nbB` makes it."""
    result = subprocess.run([HTPASSWD, "-nbB", user, password], check=True,
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


class RealRegistry:
    """docker-registry serving on 127.0.0.1:<port> from a temporary directory.

    With `htpasswd_line` it wants basic auth (401 with a Basic challenge);
    with `token_server` (a TokenServer) it wants Bearer tokens from there.
    """

    def __init__(self, workdir, htpasswd_line=None, token_server=None):
        self.workdir = str(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        os.makedirs(self.workdir, exist_ok=True)
        config = os.path.join(self.workdir, "config.yml")
        auth = ""
        if htpasswd_line:
            htpasswd = os.path.join(self.workdir, "htpasswd")
            with open(htpasswd, "w") as file:
                file.write(htpasswd_line + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: test-realm\n    path: {htpasswd}\n"
        elif token_server is not None:
            auth = token_server.registry_config()
        with open(config, "w") as file:
            file.write(
                "version: 0.1\n"
                "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.workdir}/storage\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{self.port}\n" + auth)
        self.log_path = os.path.join(self.workdir, "registry.log")
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([REGISTRY_BINARY, "serve", config],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._answers, what=f"registry on {self.url}")

    def _answers(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {open(self.log_path).read()[-2000:]}")
        try:
            urllib.request.urlopen(self.url + "/v2/", timeout=1)
            return True
        except urllib.error.HTTPError:
            return True  # 401 with auth on: it answers
        except OSError:
            return False

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.log.close()

    def access_log(self) -> str:
        """What the registry logged so far (its access log lines included)."""
        with open(self.log_path, errors="replace") as file:
            return file.read()

    def push(self, layout, ref, repository, tag, creds=None, all_images=False):
        """skopeo copy oci:<layout>:<ref> docker://<registry>/<repository>:<tag>."""
        command = [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false"]
        if creds:
            command += ["--dest-creds", creds]
        if all_images:
            command.append("--all")
        command += [f"oci:{layout}:{ref}", f"docker://{self.host}/{repository}:{tag}"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(files: dict) -> tuple:
    """A gzip'd tar of `files` (name -> bytes): (compressed, uncompressed digest)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    uncompressed = raw.getvalue()
    return gzip.compress(uncompressed, mtime=0), sha256(uncompressed)


def write_blob(layout, data: bytes) -> dict:
    digest = sha256(data)
    directory = os.path.join(layout, "blobs", "sha256")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, digest.split(":")[1]), "wb") as file:
        file.write(data)
    return {"digest": digest, "size": len(data)}


def image_manifest(layout, layer_files: list, arch="amd64") -> dict:
    """Write the layers, config and manifest of one image; describe it."""
    layers, diff_ids = [], []
    for files in layer_files:
        compressed, diff_id = make_layer(files)
        layers.append({"mediaType": OCI_LAYER, **write_blob(layout, compressed)})
        diff_ids.append(diff_id)
    config = json.dumps({"architecture": arch, "os": "linux",
                         "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **write_blob(layout, config)},
                "layers": layers}
    body = json.dumps(manifest).encode()
    return {"mediaType": OCI_MANIFEST, **write_blob(layout, body),
            "platform": {"architecture": arch, "os": "linux"},
            "layers": [layer["digest"] for layer in layers],
            "diff_ids": diff_ids,
            "config": manifest["config"]["digest"]}


def write_layout_index(layout, descriptor: dict, ref: str):
    entry = {k: descriptor[k] for k in ("mediaType", "digest", "size")}
    entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
    with open(os.path.join(layout, "oci-layout"), "w") as file:
        json.dump({"imageLayoutVersion": "1.0.0"}, file)
    with open(os.path.join(layout, "index.json"), "w") as file:
        json.dump({"schemaVersion": 2, "manifests": [entry]}, file)


def write_oci_image(layout, ref="latest", layer_files=None, arch="amd64") -> dict:
    """An OCI layout holding one single-platform image; returns its description."""
    layer_files = layer_files or [{"hello.txt": b"hello from " + ref.encode()}]
    image = image_manifest(str(layout), layer_files, arch)
    write_layout_index(str(layout), image, ref)
    return image


def write_oci_index(layout, ref="multi", arches=("amd64", "arm64")) -> dict:
    """An OCI layout holding a multi-platform index; returns index and images."""
    images = [image_manifest(str(layout), [{f"{arch}.txt": f"built for {arch}".encode() * 100}], arch)
              for arch in arches]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{k: image[k] for k in ("mediaType", "digest", "size", "platform")}
                           for image in images]}
    descriptor = {"mediaType": OCI_INDEX, **write_blob(str(layout), json.dumps(index).encode())}
    write_layout_index(str(layout), descriptor, ref)
    return {"index": descriptor, "images": images}
