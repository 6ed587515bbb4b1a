"""Real parts for the tests: Debian's docker-registry as a process, and images.

RealRegistry runs the CNCF distribution registry (Debian package
docker-registry) from a YAML config on a free loopback port, with its storage
in a temporary directory, optionally behind htpasswd basic auth.
write_oci_image() and write_oci_index() write OCI layouts of generated
content that skopeo pushes into it, so no test needs the network.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request

REGISTRY_BINARY = shutil.which("docker-registry") or shutil.which("registry")
SKOPEO = shutil.which("skopeo")

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


class RealRegistry:
    """docker-registry serving on 127.0.0.1:<port> from a temporary directory."""

    def __init__(self, workdir, htpasswd_line=None):
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
