"""Graceful shutdown, with real signals on a real process (issue 12, item 3):
/readyz turns 503 at once, connections are accepted for SHUTDOWN_DELAY, then
refused; transfers in flight finish within SHUTDOWN_GRACE; the cache keeps a
verified object or nothing; the process exits 0.  A second signal exits at once."""

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

import pytest

import dockerproxy
from conftest import ROOT, RegistryClient, RunningProxy, start_proxy_process
from realregistry import free_port, wait_until

BLOB_SIZE = 256 * 1024 * 1024


def start(fake, cache_dir, *flags):
    """dockerproxy.py as a process: (Popen, RunningProxy) once it answers."""
    return start_proxy_process(fake.url, cache_dir, free_port(), flags=flags)


def connect_refused(running):
    """A new connection is not served: refused, or reset while connecting (Linux
    resets a connection that was in the backlog when the listening socket closed)."""
    try:
        socket.create_connection(("127.0.0.1", running.port), timeout=5).close()
        return False
    except (ConnectionRefusedError, ConnectionResetError):
        return True


def ready_status(running):
    try:
        return running.request("GET", "/readyz", timeout=5)[0]
    except OSError:
        return None


class Puller(threading.Thread):
    """A client reading one blob whole, hashing it, after telling when its first bytes came."""

    def __init__(self, running, path, token):
        super().__init__(daemon=True)
        self.running, self.path, self.token = running, path, token
        self.started_reading = threading.Event()
        self.digest, self.size, self.error = None, 0, None

    def run(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.running.port, timeout=60)
        try:
            connection.request("GET", self.path, headers={"Authorization": f"Bearer {self.token}"})
            response = connection.getresponse()
            hasher = hashlib.sha256()
            first = response.read(65536)
            hasher.update(first)
            self.size = len(first)
            self.started_reading.set()
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                hasher.update(chunk)
                self.size += len(chunk)
            self.digest = "sha256:" + hasher.hexdigest()
        except Exception as err:  # noqa: BLE001 (the test reports it)
            self.error = err
            self.started_reading.set()
        finally:
            connection.close()


def files_under(root):
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


def test_sigterm_during_a_cold_pull_lets_three_clients_finish(fake, tmp_path):
    digest = fake.add_pattern_blob("library/big", BLOB_SIZE, seed=7)
    cache = tmp_path / "cache"
    process, running = start(fake, cache, "--shutdown-delay", "2", "--shutdown-grace", "60")
    try:
        client = RegistryClient(running)
        client.request("HEAD", f"/v2/library/big/blobs/{digest}")  # the token first
        fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=4 * 1024 * 1024)
        pullers = [Puller(running, f"/v2/library/big/blobs/{digest}", client.token) for _ in range(3)]
        for puller in pullers:
            puller.start()
        for puller in pullers:
            assert puller.started_reading.wait(30) and puller.error is None, puller.error
        idle = socket.create_connection(("127.0.0.1", running.port))  # a keep-alive connection, idle
        process.send_signal(signal.SIGTERM)
        # not ready at once, while still accepting for SHUTDOWN_DELAY
        wait_until(lambda: ready_status(running) == 503, what="/readyz 503 after SIGTERM")
        status, headers, body = running.request("GET", "/readyz")
        assert json.loads(body)["problems"] == ["shutting down"] and headers["Connection"] == "close"
        # then refused, and the idle connection closed, while the transfers go on
        wait_until(lambda: connect_refused(running), timeout=30, what="new connections refused")
        idle.settimeout(10)
        assert idle.recv(1) == b""
        idle.close()
        assert process.poll() is None and all(puller.is_alive() for puller in pullers)
        fake.release.set()
        for puller in pullers:
            puller.join(60)
        assert [(p.error, p.size, p.digest) for p in pullers] == [(None, BLOB_SIZE, digest)] * 3
        assert process.wait(60) == 0
        assert fake.count(server="cdn", method="GET", path_contains=digest) == 1
    finally:
        fake.release.set()
        if process.poll() is None:
            process.kill()
        log = process.communicate(timeout=10)[1]
    assert "Traceback" not in log, log
    assert "shutting down" in log and "shutdown: done" in log
    # the verified blob, or nothing; no partial file
    stored = [path for path in [dockerproxy.object_path(str(cache), digest)] if os.path.exists(path)]
    assert not [path for path in files_under(cache) if os.path.basename(path).startswith(dockerproxy.TEMP_PREFIX)]
    for path in stored:
        hasher = hashlib.sha256()
        with open(path, "rb") as blob:
            for chunk in iter(lambda: blob.read(1 << 20), b""):
                hasher.update(chunk)
        assert "sha256:" + hasher.hexdigest() == digest


def test_a_transfer_past_the_grace_is_cut_and_leaves_nothing_behind(fake, tmp_path):
    digest = fake.add_pattern_blob("library/big", 64 * 1024 * 1024, seed=8)
    cache = tmp_path / "cache"
    process, running = start(fake, cache, "--shutdown-grace", "1")
    try:
        client = RegistryClient(running)
        client.request("HEAD", f"/v2/library/big/blobs/{digest}")
        fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=1024 * 1024)
        puller = Puller(running, f"/v2/library/big/blobs/{digest}", client.token)
        puller.start()
        assert puller.started_reading.wait(30) and puller.error is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0  # the upstream still holds the body: the grace runs out
        puller.join(30)
        assert puller.size < 64 * 1024 * 1024  # cut short: the client sees it, as it would a reset
    finally:
        fake.release.set()
        if process.poll() is None:
            process.kill()
        log = process.communicate(timeout=10)[1]
    assert "1 downloads into the cache abandoned" in log, log
    assert not [path for path in files_under(cache) if os.path.basename(path).startswith(dockerproxy.TEMP_PREFIX)]
    assert not os.path.exists(dockerproxy.object_path(str(cache), digest))


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM)])
def test_a_second_signal_exits_at_once(fake, tmp_path, first, second):
    process, running = start(fake, tmp_path / "cache", "--shutdown-delay", "600")
    try:
        process.send_signal(first)
        wait_until(lambda: ready_status(running) == 503, what="/readyz 503 after the first signal")
        assert process.poll() is None  # still accepting: SHUTDOWN_DELAY is 600 s
        process.send_signal(second)
        assert process.wait(10) == 1
    finally:
        if process.poll() is None:
            process.kill()
        log = process.communicate(timeout=10)[1]
    assert "exiting now" in log and "Traceback" not in log


def test_an_idle_proxy_exits_at_once_on_sigterm(fake, tmp_path):
    process, running = start(fake, tmp_path / "cache")
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    log = process.communicate(timeout=10)[1]
    assert "shutdown: done" in log and "Traceback" not in log


def test_at_the_task_limit_connections_get_503_and_sigterm_still_drains(fake):
    """A process at its thread limit (systemd TasksMax, ulimit -u) could not start
    the shutdown's thread in the signal handler: a traceback and exit 1, every
    transfer cut (the shutdown review).  A connection it cannot give a thread
    gets 503, as over MAX_CONNECTIONS, not a logged traceback."""
    for tool in ("setpriv", "prlimit"):
        assert shutil.which(tool), f"{tool} (util-linux) is needed"
    python = "/usr/bin/python3"  # the system's: nobody cannot enter root's pyenv
    assert os.access(python, os.X_OK), "Debian's python3 is needed"
    # RLIMIT_NPROC binds only a user without CAP_SYS_RESOURCE: nobody, who needs a
    # copy of the module and a cache it can reach (pytest's tmp_path is root's, 0700)
    home = tempfile.mkdtemp(prefix="dockerproxy-tasks-")
    os.chmod(home, 0o755)
    shutil.copy(os.path.join(ROOT, "dockerproxy.py"), home)
    cache = os.path.join(home, "cache")
    os.mkdir(cache)
    os.chmod(cache, 0o777)
    port = free_port()
    process = subprocess.Popen(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "prlimit", "--nproc=30", "--",
         python, os.path.join(home, "dockerproxy.py"), "--host", "127.0.0.1", "--port", str(port),
         "--env-file", os.devnull, "--upstream", f"docker={fake.url}", "--cache-dir", cache,
         "--shutdown-grace", "2"], stderr=subprocess.PIPE, text=True, cwd=home)
    running = RunningProxy(port=port)
    held = []

    def started():
        assert process.poll() is None, process.stderr.read()
        return ready_status(running) == 200
    try:
        wait_until(started, what="proxy process start")
        for _ in range(40):  # each holds a thread, waiting for the rest of its head
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Wait: ")
            held.append(sock)
        for sock in held:
            sock.setblocking(False)
        answers = {}

        def some_refused():
            for sock in held:
                try:
                    answers[sock] = answers.get(sock, b"") + sock.recv(100)
                except BlockingIOError:
                    pass
            return any(answer.startswith(b"HTTP/1.1 503 ") for answer in answers.values())
        wait_until(some_refused, what="a connection refused for want of a thread")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        for sock in held:
            sock.close()
        if process.poll() is None:
            process.kill()
        log = process.communicate(timeout=10)[1]
        shutil.rmtree(home, ignore_errors=True)
    assert "Traceback" not in log, log
    assert "shutdown: done" in log and "task limit" in log
