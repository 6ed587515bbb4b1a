"""Real dockerproxy.py processes on one S3 bucket, with or without PEERS: helpers for the cluster tests.

    from cluster import Cluster, make_cluster          # make_cluster: a pytest fixture
    make_cluster = make_cluster                        # (import it into the test module like this)

    def test_x(make_cluster, registry):
        cluster = make_cluster(registry.url)           # on a new bucket (conftest's s3bucket)
        a, b, c = cluster.start(3)                     # PEERS names the three; /healthz answered
        status, headers, body = a.request("GET", "/v2/team/app/manifests/v1")
        a.status_json()["shared"]["peers"]; a.metric("dockerproxy_peer_requests_total", result="ok")
        a.kill()                                       # SIGKILL (a.stop(): SIGTERM, and wait)
        cluster.blob_objects()                         # {digest: key} of the bucket's blobs (boto3)
        cluster.bad_blob_objects()                     # [] when every blob object hashes to its key

Cluster(workdir, s3server, bucket, upstream, prefix="px") holds the settings
every instance shares: CACHE_S3=s3://<bucket>/<prefix>, S3_ENDPOINT, S3_REGION,
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (the S3Server's), UPSTREAM_DOCKER=<upstream>
(the docker route, so /v2/<name>/... goes there), PEER_SECRET (a random one,
`cluster.secret`) and ADMIN_ALLOW=127.0.0.1/32 (/status.json and /metrics open
to the tests).  start(count, peers=True, extra_peers=(), env=None, flags=())
starts `count` processes at once, each on its own free port (PORT) and its own
CACHE_DIR, HOST=127.0.0.1, and waits (with a deadline) until each answers
/healthz; PEERS is every instance of that call plus `extra_peers` (peers=False:
no PEERS at all).  `env` adds or overrides settings (an empty value for a
setting the cluster sets removes it); `flags` go on the command line.
Settings this machine's environment has (CACHE_S3, PEERS, UPSTREAM_*, AWS_*...)
never leak into the processes, nor a .env file (--env-file /dev/null).

ProxyInstance: one process.  name ("a", "b", ...), port, host, url (also its
entry of PEERS), cache_dir, log_path, env.  request() is conftest's
http_request on its address; log() its whole output (access lines are INFO
lines: `127.0.0.1 "GET host /v2/..." route=docker status=200 bytes=N 0.01s
cache=hit upstream=-`); access_lines() those parsed; kill() / stop(); running.

HoldingRelay(target_host): a TCP relay on a free loopback port in front of an
upstream that can hold one answer midway: relay.hold(b"/blobs/sha256:...",
after=N) makes the first request whose path contains that text get N bytes of
its answer, then nothing until hold.release() (or relay.close()).
hold.reached is an Event set once the N bytes went out.  relay.requests lists
(method, path) of every request that passed, in order.

Also: free_ports(n) (n distinct free loopback ports, e.g. to compute
rendezvous_order over PEERS before start(ports=...)), parse_metrics(text)
({(name, frozenset of (label, value)): float}), sha256_hex(bytes) ("sha256:..."),
wait_until (realregistry's).

Nothing here sleeps to wait for a process: wait_until polls with a deadline.
"""

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for _path in (ROOT, TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import dockerproxy  # noqa: E402
from conftest import http_request  # noqa: E402
from realregistry import wait_until  # noqa: E402

DOCKERPROXY = os.path.join(ROOT, "dockerproxy.py")
START_TIMEOUT = 30.0   # a process answers /healthz within this (bucket check and first sweep included)
STOP_TIMEOUT = 30.0

# What a process must not inherit from the machine running the tests.
_SETTING_NAMES = {setting.env for setting in dockerproxy.SETTINGS}
_INHERITED_PREFIXES = ("UPSTREAM_", "AWS_", "PEER", "CACHE_", "S3_")

# the proxy's access line (see ProxyInstance.access_lines)
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<host>\S+) (?P<path>\S+)" route=(?P<route>\S+) '
                         r'status=(?P<status>\S+) bytes=(?P<bytes>\d+) \S+ cache=(?P<cache>\S+) '
                         r'upstream=(?P<upstream>\S+)')
METRIC_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_ports(count):
    """`count` distinct ports nobody listens on now (all probes held open until all are chosen)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def clean_environ():
    """os.environ without any dockerproxy setting (nor UPSTREAM_*, AWS_*, PEER*, CACHE_*, S3_*)."""
    return {key: value for key, value in os.environ.items()
            if key not in _SETTING_NAMES and not key.startswith(_INHERITED_PREFIXES)}


def parse_metrics(text):
    """Prometheus text -> {(name, frozenset of (label, value)): float}."""
    found = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line.strip())
        if match and not line.startswith("#"):
            labels = frozenset(LABEL.findall(match.group("labels") or ""))
            found[(match.group("name"), labels)] = float(match.group("value"))
    return found


def sha256_hex(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ProxyInstance:
    """One dockerproxy.py process of a Cluster (see the module's docstring)."""

    def __init__(self, name, workdir, port, env, flags=()):
        self.name = name
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.cache_dir = env.get("CACHE_DIR", "")
        self.log_path = os.path.join(self.workdir, "proxy.log")
        self.env = dict(env)
        self.flags = list(flags)
        self.process = None

    def __repr__(self):
        return f"<ProxyInstance {self.name} {self.url}>"

    def launch(self):
        """Start the process (do not wait): see serving() / wait_serving()."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, DOCKERPROXY, "--env-file", os.devnull, *self.flags],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**clean_environ(), **self.env})
        return self

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def serving(self):
        """One /healthz probe: True if 200; AssertionError (with the log) if the process exited."""
        assert self.process is not None and self.process.poll() is None, (
            f"proxy {self.name} exited {self.process and self.process.returncode}:\n{self.log()[-4000:]}")
        try:
            return self.request("GET", "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def wait_serving(self, timeout=START_TIMEOUT):
        wait_until(self.serving, timeout=timeout, what=f"proxy {self.name} answering /healthz")
        return self

    def request(self, method, path, headers=None, body=None, timeout=60):
        """(status, headers, body bytes): one request on a new connection (conftest.http_request)."""
        return http_request(self.url + path, method, headers, body, None, timeout)

    def get_json(self, path):
        status, _, body = self.request("GET", path, timeout=10)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def status_json(self):
        """/status.json (ADMIN_ALLOW=127.0.0.1/32 opens it)."""
        return self.get_json("/status.json")

    def metrics_text(self):
        status, _, body = self.request("GET", "/metrics", timeout=10)
        assert status == 200, (status, body[:500])
        return body.decode()

    def metric(self, name, **labels):
        """The value of the series `name` with exactly these labels (0.0 if absent)."""
        wanted = frozenset((key, str(value)) for key, value in labels.items())
        return parse_metrics(self.metrics_text()).get((name, wanted), 0.0)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as file:
                return file.read()
        except OSError:
            return ""

    def access_lines(self):
        """Its access lines so far, parsed: [{"method", "host", "path", "route", "status", "bytes",
        "cache", "upstream"}] (all strings).  A line is written when its answer ended."""
        return [match.groupdict() for match in map(ACCESS_LINE.search, self.log().splitlines()) if match]

    def kill(self):
        """SIGKILL, and reap it."""
        if self.running:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(STOP_TIMEOUT)

    def stop(self):
        """SIGTERM and wait (SIGKILL past STOP_TIMEOUT): every access line is in the log after."""
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process is not None:
            self.process.wait(STOP_TIMEOUT)


class Cluster:
    """Instances of dockerproxy.py on one bucket (see the module's docstring)."""

    def __init__(self, workdir, s3server, bucket, upstream, prefix="px", secret=None):
        self.workdir = str(workdir)
        self.s3server = s3server
        self.bucket = bucket
        self.upstream = upstream
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.secret = secret or secrets.token_hex(16)
        self.instances = []

    def environ(self, port, cache_dir, peers=(), env=None):
        """The settings of one instance (see the module's docstring)."""
        settings = {
            "HOST": "127.0.0.1", "PORT": str(port), "CACHE_DIR": str(cache_dir),
            "CACHE_S3": f"s3://{self.bucket}/{self.prefix}".rstrip("/"),
            "S3_ENDPOINT": self.s3server.endpoint, "S3_REGION": self.s3server.region,
            "AWS_ACCESS_KEY_ID": self.s3server.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3server.secret_key,
            "UPSTREAM_DOCKER": self.upstream, "ADMIN_ALLOW": "127.0.0.1/32",
        }
        if peers:
            settings.update(PEERS=",".join(peers), PEER_SECRET=self.secret)
        settings.update(env or {})
        return {key: value for key, value in settings.items() if value != ""}

    def start(self, count=3, peers=True, extra_peers=(), env=None, flags=(), ports=None):
        """Start `count` instances at once, wait until each serves: the new ProxyInstances.

        peers: PEERS names these `count` instances and `extra_peers` (URLs);
        False: no PEERS.  ports: the ports to use (else free ones)."""
        ports = list(ports) if ports else free_ports(count)
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        peer_list = tuple(urls) + tuple(extra_peers) if peers else ()
        started = []
        for port in ports:
            name = chr(ord("a") + len(self.instances))
            workdir = os.path.join(self.workdir, f"proxy-{name}")
            cache_dir = os.path.join(workdir, "cache")
            instance = ProxyInstance(name, workdir, port, self.environ(port, cache_dir, peer_list, env), flags)
            self.instances.append(instance)
            started.append(instance.launch())
        for instance in started:
            instance.wait_serving()
        return started

    @property
    def peers(self):
        """The URLs of the instances, as PEERS names them."""
        return [instance.url for instance in self.instances]

    def stop(self):
        for instance in self.instances:
            with contextlib.suppress(Exception):
                instance.stop()

    # -- the bucket, read with boto3 (never through dockerproxy.py) ------------------

    def blob_key(self, digest):
        return dockerproxy.blob_key(self.prefix, digest)

    def blob_objects(self):
        """{digest: key} of every object under the bucket's blobs/ (distribution's layout)."""
        prefix = f"{self.prefix}docker/registry/v2/blobs/sha256/"
        found = {}
        for key in self.s3server.objects(self.bucket, prefix):
            match = re.fullmatch(re.escape(prefix) + r"[0-9a-f]{2}/([0-9a-f]{64})/data", key)
            assert match, f"an object of an unexpected name under blobs/: {key}"
            found["sha256:" + match.group(1)] = key
        return found

    def bad_blob_objects(self):
        """[(key, what its bytes hash to)] for every blob object whose bytes are not its digest."""
        bad = []
        for digest, key in self.blob_objects().items():
            actual = self.s3server.sha256_of(self.bucket, key)
            if actual != digest:
                bad.append((key, actual))
        return bad

    def wait_for_blobs(self, digests, timeout=120.0):
        """Poll the bucket until every digest of `digests` has its object there."""
        wanted = set(digests)
        wait_until(lambda: wanted <= set(self.blob_objects()), timeout=timeout, interval=0.1,
                   what=f"objects in the bucket for {sorted(wanted)}")


@pytest.fixture
def make_cluster(tmp_path, s3bucket):
    """make_cluster(upstream_url, **Cluster options) -> Cluster on this test's new bucket
    (conftest's s3bucket); every instance of it is stopped after the test."""
    made = []

    def make(upstream, **options):
        server, bucket = s3bucket
        cluster = Cluster(tmp_path / f"cluster-{len(made)}", server, bucket, upstream, **options)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


# A relay that can hold one answer midway ########################################

class Hold:
    """One answer to hold: see HoldingRelay.hold()."""

    def __init__(self, marker, after):
        self.marker = marker
        self.after = after
        self.claimed = False
        self.reached = threading.Event()
        self._released = threading.Event()

    def release(self):
        self._released.set()


class HoldingRelay:
    """A TCP relay on 127.0.0.1:<free port> to `target_host` ("127.0.0.1:5000"); see the module's docstring.

    It reads what the client sends for request lines (GET/HEAD of a proxy: no
    body), and relays the bytes unchanged both ways."""

    def __init__(self, target_host):
        host, _, port = target_host.rpartition(":")
        self.target = (host, int(port))
        self.requests = []
        self._holds = []
        self._lock = threading.Lock()
        self._sockets = []
        self._closed = False
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, marker, after=256 * 1024):
        """Hold the answer to the first next request whose path contains `marker` (bytes) after `after` bytes."""
        hold = Hold(marker, after)
        with self._lock:
            self._holds.append(hold)
        return hold

    def count(self, method, marker):
        """How many requests with this method and `marker` (str) in their path passed."""
        with self._lock:
            return sum(1 for m, path in self.requests if m == method and marker in path)

    def close(self):
        self._closed = True
        with self._lock:
            holds, sockets = list(self._holds), list(self._sockets)
        for hold in holds:
            hold.release()
        for sock in [self.listener] + sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            state = {"hold": None}
            threading.Thread(target=self._upward, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._downward, args=(server, client, state), daemon=True).start()

    def _upward(self, client, server, state):
        buffer = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    method, _, rest = head.partition(b" ")
                    path = rest.split(b" ", 1)[0]
                    with self._lock:
                        self.requests.append((method.decode(errors="replace"), path.decode(errors="replace")))
                        for hold in self._holds:
                            if not hold.claimed and hold.marker in path:
                                hold.claimed = True
                                state["hold"], state["sent"] = hold, 0
                                break
                buffer = buffer[-65536:]  # the start of a next request head, at most
                server.sendall(data)  # after the parsing: a hold is claimed before upstream answers
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_WR)

    def _downward(self, server, client, state):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                hold = state["hold"]
                if hold is not None and not hold._released.is_set():
                    room = hold.after - state["sent"]
                    if room > 0:
                        client.sendall(data[:room])
                        state["sent"] += min(room, len(data))
                        data = data[room:]
                    if state["sent"] >= hold.after:
                        hold.reached.set()
                        hold._released.wait()
                if data:
                    client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.close()
