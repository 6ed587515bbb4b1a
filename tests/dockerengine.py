"""A real Docker engine for the tests: Debian's dockerd, started with a throwaway
data root, socket and daemon.json, and stopped by its PID; stand-in base images
for the Dockerfile, made from this machine's own files; /etc/hosts and
/etc/docker/certs.d entries that are removed after.

    engine = DockerEngine(workdir, {"registry-mirrors": [...]}, trap.environ())
    engine.docker("pull", "alpine")          # the client, on this engine only
    engine.stop()

dockerd runs as the issue describes: vfs storage, no iptables, no bridge (this
machine has no network to give containers; the container test uses
--network host).  Its HTTP(S)_PROXY is the tests' trap, so a fallback to
registry-1.docker.io is refused and recorded, never sent.

The stand-in base images (no image registry is reachable here):
- python_image_tar(): Debian's own python3.11 (the interpreter distroless's
  python3-debian12 image ships), its standard library and the shared
  libraries it and its extension modules load, /etc/passwd with nonroot
  (65532), /tmp; imported with ENTRYPOINT ["/usr/bin/python3"], as distroless's.
- helper_image_tar(): busybox-static's /bin/busybox as /bin/sh, mkdir and chown.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile

from realregistry import wait_until

DOCKERD = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
# The client next to the engine (Debian's), not another one earlier in PATH.
DOCKER = next((path for path in ("/usr/bin/docker",) if os.access(path, os.X_OK)), None) or shutil.which("docker")
BUSYBOX = next((path for path in ("/bin/busybox", "/usr/bin/busybox") if os.access(path, os.X_OK)), None)
SYSTEM_PYTHON = "/usr/bin/python3.11"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class DockerEngine:
    """dockerd on a socket of its own under a short temporary directory (socket paths are limited)."""

    def __init__(self, daemon_json: dict, environ: dict):
        self.root = tempfile.mkdtemp(prefix="dk", dir="/tmp")
        self.socket = os.path.join(self.root, "docker.sock")
        self.client_config = os.path.join(self.root, "client")  # DOCKER_CONFIG: docker login writes here
        os.makedirs(self.client_config)
        with open(os.path.join(self.root, "daemon.json"), "w") as file:
            json.dump(daemon_json, file)
        self.log_path = os.path.join(self.root, "dockerd.log")
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [DOCKERD, "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--data-root", os.path.join(self.root, "data"), "--exec-root", os.path.join(self.root, "exec"),
             "--pidfile", os.path.join(self.root, "pid"), "-H", f"unix://{self.socket}",
             "--config-file", os.path.join(self.root, "daemon.json")],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **environ})
        try:
            wait_until(self._answers, timeout=START_TIMEOUT, interval=0.1, what="dockerd answering")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"dockerd exited {self.process.returncode}: {self.log_text()[-3000:]}")
        return os.path.exists(self.socket) and self.docker("version", check=False).returncode == 0

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as file:
            return file.read()

    def docker(self, *args, check=True, timeout=180, input=None):
        """The docker client on this engine: CompletedProcess (text); check: exit 0 or AssertionError."""
        result = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", *args], capture_output=True, text=True,
                                timeout=timeout, input=input,
                                env={**os.environ, "DOCKER_CONFIG": self.client_config})
        if check:
            assert result.returncode == 0, (f"docker {' '.join(args)} exited {result.returncode}\n"
                                            f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
        return result

    def inspect(self, *args) -> list:
        return json.loads(self.docker(*args).stdout)

    def stop(self):
        """SIGTERM to dockerd's PID (its containers stop with it), then its data root goes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        # vfs copies each layer: do not leave them behind; first what dockerd left mounted
        # under its root (its network namespace file), deepest first
        for mount_point in sorted(mounts_under(self.root), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount_point], capture_output=True)
        left = mounts_under(self.root)
        assert not left, f"still mounted after dockerd stopped: {left}"
        shutil.rmtree(self.root)


def mounts_under(root) -> list:
    """Mount points at or below `root`, from /proc/self/mountinfo (field 5; octal escapes for spaces)."""
    with open("/proc/self/mountinfo") as file:
        points = [line.split()[4].encode().decode("unicode_escape") for line in file]
    return [point for point in points if point == root or point.startswith(root.rstrip("/") + "/")]


# Stand-in base images ########################################################

def _directory(tar, name, mode=0o755):
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    tar.addfile(info)


def _symlink(tar, name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    tar.addfile(info)


def _file(tar, path, arcname=None):
    info = tar.gettarinfo(path, arcname=(arcname or path).lstrip("/"))
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.isreg():
        with open(path, "rb") as file:
            tar.addfile(info, file)
    else:
        tar.addfile(info)


def _text(tar, name, text):
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def shared_libraries(path) -> set:
    """What the dynamic linker loads for `path`, as ldd names them."""
    listing = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return set(re.findall(r"(/\S+) \(0x", listing))


def python_image_tar(destination):
    """A root file system with Debian's python3.11 as /usr/bin/python3 (see the module docstring)."""
    stdlib = "/usr/lib/python3.11"
    libraries = shared_libraries(SYSTEM_PYTHON)
    for directory, _, files in os.walk(os.path.join(stdlib, "lib-dynload")):
        for name in files:
            libraries |= shared_libraries(os.path.join(directory, name))
    libraries.add("/lib/x86_64-linux-gnu/libgcc_s.so.1")  # glibc loads it for pthread_exit (threads ending)
    skipped = {"test", "__pycache__", "idlelib", "tkinter", "ensurepip", "lib2to3", "turtledemo"}
    with tarfile.open(destination, "w") as tar:
        for directory in ("etc", "lib", "lib/x86_64-linux-gnu", "lib64", "usr", "usr/bin", "usr/lib",
                          "usr/lib/x86_64-linux-gnu"):
            _directory(tar, directory)
        _directory(tar, "tmp", 0o1777)
        for library in sorted(libraries):
            real = os.path.realpath(library)
            _file(tar, real)
            if real != library:
                _symlink(tar, library.lstrip("/"), real)
        _file(tar, SYSTEM_PYTHON)
        _symlink(tar, "usr/bin/python3", "python3.11")
        for directory, subdirectories, files in os.walk(stdlib):
            subdirectories[:] = [name for name in subdirectories if name not in skipped]
            _file(tar, directory)
            for name in files:
                _file(tar, os.path.join(directory, name))
        _text(tar, "etc/passwd", "root:x:0:0:root:/root:/sbin/nologin\n"
                                 "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
        _text(tar, "etc/group", "root:x:0:\nnonroot:x:65532:\n")


def helper_image_tar(destination):
    with tarfile.open(destination, "w") as tar:
        _directory(tar, "bin")
        _file(tar, BUSYBOX, "bin/busybox")
        for command in ("sh", "mkdir", "chown"):
            _symlink(tar, f"bin/{command}", "busybox")


def import_base_images(engine, workdir) -> dict:
    """The stand-ins, imported into `engine`: {"PYTHON_IMAGE": name, "HELPER_IMAGE": name}."""
    python_tar, helper_tar = os.path.join(workdir, "python.tar"), os.path.join(workdir, "helper.tar")
    python_image_tar(python_tar)
    helper_image_tar(helper_tar)
    engine.docker("import", "--change", 'ENTRYPOINT ["/usr/bin/python3"]', python_tar, "standin/python3:test")
    engine.docker("import", helper_tar, "standin/helper:test")
    return {"PYTHON_IMAGE": "standin/python3:test", "HELPER_IMAGE": "standin/helper:test"}


# Files of the machine, changed for one test and restored ######################

@contextlib.contextmanager
def hosts_entries(entries: dict, path="/etc/hosts"):
    """`entries` (name -> address) added to /etc/hosts, written in place (it may be a
    bind mount); the original text is put back after."""
    marker = "  # dockerproxy tests\n"
    with open(path) as file:
        original = file.read()
    kept = "".join(line for line in original.splitlines(keepends=True) if not line.endswith(marker))
    lines = "".join(f"{address} {name}{marker}" for name, address in entries.items())
    try:  # a killed run's lines are not kept as if they were the machine's
        with open(path, "w") as file:
            file.write(kept + ("" if kept.endswith("\n") or not kept else "\n") + lines)
        yield
    finally:
        with open(path, "w") as file:
            file.write(original)


@contextlib.contextmanager
def trusted_ca(host_port: str, ca_pem_path, root="/etc/docker/certs.d"):
    """/etc/docker/certs.d/<host:port>/ca.crt, as the Docker documentation says; removed after."""
    directory = os.path.join(root, host_port)
    created = [path for path in (os.path.dirname(root), root, directory) if not os.path.exists(path)]
    try:
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(ca_pem_path, os.path.join(directory, "ca.crt"))
        yield
    finally:
        if os.path.exists(os.path.join(directory, "ca.crt")):
            os.remove(os.path.join(directory, "ca.crt"))
        for path in reversed(created):
            if os.path.isdir(path):
                os.rmdir(path)


def saved_layers(engine, reference, workdir) -> tuple:
    """`docker save` of `reference`: (config digest, [sha256 of each layer tar]) as the engine stores them."""
    archive = os.path.join(workdir, "saved.tar")
    engine.docker("save", "-o", archive, reference)
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]
        layers = []
        for name in manifest["Layers"]:
            digest = hashlib.sha256()
            with tar.extractfile(name) as layer:
                for chunk in iter(lambda: layer.read(1 << 20), b""):
                    digest.update(chunk)
            layers.append("sha256:" + digest.hexdigest())
        config = "sha256:" + hashlib.sha256(tar.extractfile(manifest["Config"]).read()).hexdigest()
    os.remove(archive)
    return config, layers

