"""S3_ADDRESSING=virtual: <bucket>.<endpoint host>/<key>, against SeaweedFS with -s3.domainName.

Only <bucket>.s3.dockerproxy.test is in /etc/hosts (for this test, restored
after), not s3.dockerproxy.test itself: a request addressed by path would not
even resolve, so every bucket request that works was addressed virtually.
What lands is read back with boto3 by path on 127.0.0.1 (an independent
client).  Checked: fills uploaded (one PUT), a second proxy's hit from the
bucket without asking upstream, and S3_REDIRECT's presigned URL on the
virtual host, fetched and hashed.
"""
import hashlib
import socket
import urllib.parse
import urllib.request

import pytest

from conftest import RegistryClient
from test_cache import pull
from dockerengine import hosts_entries
from fakeregistry import DOCKER_MANIFEST, OCI_MANIFEST
from s3server import S3Server, bucket_name, require_seaweedfs

DOMAIN = "s3.dockerproxy.test"
ACCEPT = {"Accept": ", ".join([DOCKER_MANIFEST, OCI_MANIFEST])}


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def virtual_bucket(tmp_path):
    """(server, bucket) with only the bucket's virtual host name resolving, to 127.0.0.1."""
    require_seaweedfs()
    server = S3Server(domain=DOMAIN)
    try:
        server.start(tmp_path / "s3data")
        bucket = server.create_bucket(bucket_name("virtual"))
        with hosts_entries({f"{bucket}.{DOMAIN}": "127.0.0.1"}):
            yield server, bucket
    finally:
        server.close()


def test_virtual_addressing_uploads_serves_a_second_proxy_and_presigns_on_the_bucket_host(
        virtual_bucket, start_proxy, fake, tmp_path):
    server, bucket = virtual_bucket
    with pytest.raises(OSError):  # the endpoint's own name does not resolve: path addressing cannot work
        socket.getaddrinfo(DOMAIN, server.port)
    settings = {"CACHE_S3": f"s3://{bucket}/px", "S3_ENDPOINT": f"http://{DOMAIN}:{server.port}",
                "S3_ADDRESSING": "virtual", "AWS_ACCESS_KEY_ID": server.access_key,
                "AWS_SECRET_ACCESS_KEY": server.secret_key}
    image = fake.add_image("library/virtual", "v1", [b"virtually hosted layer" * 5000])
    objects = [image["digest"], image["config"]] + image["layers"]

    a = start_proxy("--cache-dir", str(tmp_path / "a"), "--upstream", f"docker={fake.url}", **settings)
    headers, _ = pull(RegistryClient(a), "library/virtual", "v1")  # every blob hashed; the fills settled
    assert headers["Docker-Content-Digest"] == image["digest"]  # its bytes: hashed in the bucket below
    for digest in objects:  # what landed, read back by path on 127.0.0.1 with boto3
        key = f"px/docker/registry/v2/blobs/sha256/{digest[7:9]}/{digest[7:]}/data"
        assert server.sha256_of(bucket, key) == digest
    assert a.server.proxy.metrics.value("dockerproxy_s3_uploads_total", ("ok",)) == len(objects)

    fake.reset_counters()
    b = start_proxy("--cache-dir", str(tmp_path / "b"), "--upstream", f"docker={fake.url}", **settings)
    layer = image["layers"][0]
    status, headers, body = RegistryClient(b).request("GET", f"/v2/library/virtual/blobs/{layer}")
    assert (status, headers["X-Cache"], digest_of(body)) == (200, "HIT", layer)
    assert fake.count(method="GET", path_contains="/blobs/") == 0, fake.requests

    c = start_proxy("--cache-dir", str(tmp_path / "c"), "--upstream", f"docker={fake.url}",
                    S3_REDIRECT="true", **settings)
    client = RegistryClient(c)
    status, _, _ = client.request("GET", "/v2/library/virtual/manifests/v1", ACCEPT)  # opens it to anonymous
    assert status == 200
    status, headers, _ = client.request("GET", f"/v2/library/virtual/blobs/{layer}")
    assert status == 307, headers
    location = urllib.parse.urlsplit(headers["Location"])
    assert (location.hostname, location.port, location.path) == (
        f"{bucket}.{DOMAIN}", server.port, f"/px/docker/registry/v2/blobs/sha256/{layer[7:9]}/{layer[7:]}/data")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(headers["Location"], timeout=30) as answer:
        assert digest_of(answer.read()) == layer
