"""Tests of the fake upstream itself, over real sockets with http.client."""

import base64
import hashlib
import http.client
import json
import socket
from urllib.parse import urlencode, urljoin, urlsplit

import pytest

from conftest import http_request
from fakeregistry import BLOCK_SIZE, DOCKER_MANIFEST, OCI_MANIFEST, FakeRegistry


def open_request(url, method="GET", headers=None, body=None):
    """Send a request; return the connection, for the tests that read the answer slowly
    (conftest.http_request sends one and reads all of the answer)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=10)
    target = parts.path + ("?" + parts.query if parts.query else "")
    connection.request(method, target, body=body, headers=headers or {})
    return connection


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()}


def get_token(fake, *scopes, headers=None):
    query = urlencode([("service", fake.service)] + [("scope", scope) for scope in scopes])
    status, _, body = http_request(fake.realm + "?" + query, headers=headers)
    assert status == 200, body
    return json.loads(body)["token"]


def bearer(token):
    return {"Authorization": "Bearer " + token}


def pull_headers(fake, repo):
    return bearer(get_token(fake, "repository:%s:pull" % repo))


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- auth ------------------------------------------------------------------


def test_v2_challenge_then_token(fake):
    status, headers, body = http_request(fake.url + "/v2/")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="%s",service="fake.registry.test"' % fake.realm
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    status, headers, body = http_request(fake.url + "/v2/", headers=bearer(get_token(fake)))
    assert (status, body) == (200, b"{}")
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_token_with_two_scopes_grants_both(fake):
    first = fake.add_image("library/alpine", "3", [b"a"])
    second = fake.add_image("owner/team/app", "v1", [b"b"])
    token = get_token(fake, "repository:library/alpine:pull", "repository:owner/team/app:pull,push")
    assert fake.token_requests[-1]["scopes"] == ["repository:library/alpine:pull", "repository:owner/team/app:pull,push"]
    assert fake.granted_scopes(token) == {"repository:library/alpine:pull", "repository:owner/team/app:pull"}
    assert http_request(fake.url + "/v2/library/alpine/manifests/3", headers=bearer(token))[2] == first["manifest"]
    assert http_request(fake.url + "/v2/owner/team/app/manifests/v1", headers=bearer(token))[2] == second["manifest"]
    assert http_request(fake.url + "/v2/other/manifests/v1", headers=bearer(token))[0] == 401


def test_challenge_order_and_extra(fake):
    fake.challenge_order = ["scope", "realm", "service"]
    fake.challenge_extra = {"error": "insufficient_scope"}
    status, headers, _ = http_request(fake.url + "/v2/library/alpine/manifests/latest")
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        'Bearer scope="repository:library/alpine:pull",realm="%s",service="fake.registry.test",'
        'error="insufficient_scope"' % fake.realm
    )


def test_wrong_service_is_rejected(fake):
    status, _, _ = http_request(fake.realm + "?service=other&scope=repository:x:pull")
    assert status == 400


def test_private_repo_needs_credentials(fake):
    fake.add_user("alice", "secret")
    fake.add_private_repo("alice/private")
    image = fake.add_image("alice/private", "latest", [b"p"])
    url = fake.url + "/v2/alice/private/manifests/latest"
    assert http_request(url, headers=pull_headers(fake, "alice/private"))[0] == 401

    status, _, body = http_request(fake.realm + "?service=fake.registry.test", headers=basic("alice", "wrong"))
    assert (status, json.loads(body)) == (401, {"details": "incorrect username or password"})

    token = get_token(fake, "repository:alice/private:pull", headers=basic("alice", "secret"))
    assert http_request(url, headers=bearer(token))[2] == image["manifest"]
    assert fake.token_requests[-1]["username"] == "alice"


def test_post_password_and_refresh_grants(fake):
    fake.add_user("bob", "pw")
    fake.add_private_repo("bob/app")
    fake.add_image("bob/app", "1", [b"x"])
    form = {"grant_type": "password", "username": "bob", "password": "pw", "service": fake.service,
            "scope": "repository:bob/app:pull repository:library/busybox:pull", "client_id": "dockerproxy"}
    content_type = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = http_request(fake.realm, "POST", content_type, urlencode(form))
    answer = json.loads(body)
    assert status == 200 and answer["refresh_token"] and answer["expires_in"] == 300
    assert fake.granted_scopes(answer["access_token"]) == {"repository:bob/app:pull", "repository:library/busybox:pull"}
    assert fake.token_requests[-1]["grant_type"] == "password"

    refresh = {"grant_type": "refresh_token", "refresh_token": answer["refresh_token"], "service": fake.service,
               "scope": "repository:bob/app:pull"}
    status, _, body = http_request(fake.realm, "POST", content_type, urlencode(refresh))
    token = json.loads(body)["token"]
    assert http_request(fake.url + "/v2/bob/app/manifests/1", headers=bearer(token))[0] == 200

    fake.expire_tokens()
    assert http_request(fake.url + "/v2/bob/app/manifests/1", headers=bearer(token))[0] == 401


def test_anonymous_registry():
    with FakeRegistry(auth_required=False) as fake:
        image = fake.add_image("library/alpine", "latest", [b"layer"])
        assert http_request(fake.url + "/v2/")[0] == 200
        assert http_request(fake.url + "/v2/library/alpine/manifests/latest")[2] == image["manifest"]


# --- manifests and tags ----------------------------------------------------


def test_accept_selects_media_type(fake):
    docker = fake.add_image("library/alpine", "latest", [b"l"])
    oci = fake.add_image("library/alpine", "latest", [b"l"], media_type=OCI_MANIFEST)
    headers = pull_headers(fake, "library/alpine")
    url = fake.url + "/v2/library/alpine/manifests/latest"

    def fetch(accept, method="GET"):
        extra = {"Accept": accept} if accept else {}
        return http_request(url, method, dict(headers, **extra))

    assert fetch(None)[2] == docker["manifest"]
    assert fetch("*/*")[2] == docker["manifest"]
    assert fetch("application/json, %s;q=0.9" % OCI_MANIFEST)[2] == oci["manifest"]
    status, response_headers, body = fetch(DOCKER_MANIFEST, "HEAD")
    assert (status, body) == (200, b"")
    assert response_headers["Docker-Content-Digest"] == docker["digest"]
    assert response_headers["ETag"] == '"%s"' % docker["digest"]
    assert response_headers["Content-Length"] == str(len(docker["manifest"]))
    assert response_headers["Content-Type"] == DOCKER_MANIFEST
    status, _, body = fetch("application/vnd.docker.distribution.manifest.v1+json")
    assert (status, json.loads(body)["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")
    by_digest = http_request(fake.url + "/v2/library/alpine/manifests/" + oci["digest"], headers=headers)
    assert by_digest[2] == oci["manifest"]

    moved = fake.add_image("library/alpine", "latest", [b"new"])
    assert fetch(DOCKER_MANIFEST)[2] == moved["manifest"]
    fake.delete_tag("library/alpine", "latest")
    assert fetch(None)[0] == 404


def test_index(fake):
    image = fake.add_image("library/alpine", None, [b"l"])
    digest = fake.add_index("library/alpine", "multi", [image])
    status, headers, body = http_request(fake.url + "/v2/library/alpine/manifests/multi",
                                         headers=pull_headers(fake, "library/alpine"))
    assert status == 200 and headers["Docker-Content-Digest"] == digest == sha256(body)
    assert json.loads(body)["manifests"][0]["digest"] == image["digest"]


def test_tags_list_pagination(fake):
    for tag in ["c", "a", "d", "b"]:
        fake.add_image("owner/team/app", tag, [b"x"])
    headers = pull_headers(fake, "owner/team/app")
    status, response_headers, body = http_request(fake.url + "/v2/owner/team/app/tags/list?n=2", headers=headers)
    assert json.loads(body) == {"name": "owner/team/app", "tags": ["a", "b"]}
    assert response_headers["Link"] == '</v2/owner/team/app/tags/list?last=b&n=2>; rel="next"'
    status, response_headers, body = http_request(fake.url + "/v2/owner/team/app/tags/list?last=b&n=2", headers=headers)
    assert json.loads(body)["tags"] == ["c", "d"] and "Link" not in response_headers


def test_other_methods_are_405_and_counted(fake):
    status, _, _ = http_request(fake.url + "/v2/library/alpine/blobs/uploads/", "POST", body=b"")
    assert status == 405
    assert http_request(fake.url + "/v2/library/alpine/manifests/latest", "PUT", body=b"{}")[0] == 405
    assert len(fake.disallowed_requests) == 2
    assert fake.count(server="registry", method="PUT") == 1


# --- blobs and the CDN -----------------------------------------------------


def test_blob_redirects_to_cdn_which_rejects_authorization(fake):
    digest = fake.add_blob("library/alpine", b"hello blob")
    headers = pull_headers(fake, "library/alpine")
    status, response_headers, body = http_request(fake.url + "/v2/library/alpine/blobs/" + digest, headers=headers)
    location = response_headers["Location"]
    assert (status, body) == (307, b"")
    assert location.startswith(fake.cdn_url + "/blobs/" + digest + "?X-Amz-Signature=secret-signature-")

    status, _, body = http_request(location, headers=headers)
    assert status == 400 and b"<Code>InvalidArgument</Code>" in body
    status, response_headers, body = http_request(location)
    assert (status, body) == (200, b"hello blob")
    assert response_headers["Accept-Ranges"] == "bytes"

    status, response_headers, body = http_request(fake.url + "/v2/library/alpine/blobs/" + digest, "HEAD", headers)
    assert (status, body) == (200, b"")
    assert response_headers["Content-Length"] == "10"
    assert response_headers["Docker-Content-Digest"] == digest

    other = http_request(fake.url + "/v2/library/busybox/blobs/" + digest,
                         headers=pull_headers(fake, "library/busybox"))
    assert other[0] == 404 and json.loads(other[2])["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_cdn_ranges(fake):
    digest = fake.add_blob("r", b"0123456789")
    url = fake.cdn_url + "/blobs/" + digest + "?X-Amz-Signature=secret-signature-x"
    status, headers, body = http_request(url, headers={"Range": "bytes=2-4"})
    assert (status, body, headers["Content-Range"]) == (206, b"234", "bytes 2-4/10")
    status, headers, body = http_request(url, headers={"Range": "bytes=7-"})
    assert (status, body, headers["Content-Range"]) == (206, b"789", "bytes 7-9/10")
    status, headers, _ = http_request(url, headers={"Range": "bytes=10-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */10")


def test_pattern_blob(fake):
    size = 2 * BLOCK_SIZE + 12345
    digest = fake.add_pattern_blob("big", size, seed=7)
    content = b"".join(fake.iter_blob(digest))
    assert len(content) == size and sha256(content) == digest
    assert fake.add_pattern_blob("big", size, seed=8) != digest

    location = http_request(fake.url + "/v2/big/blobs/" + digest, headers=pull_headers(fake, "big"))[1]["Location"]
    assert http_request(location)[2] == content
    start = BLOCK_SIZE - 10
    status, _, body = http_request(location, headers={"Range": "bytes=%d-%d" % (start, start + 19)})
    assert (status, body) == (206, content[start:start + 20])


@pytest.mark.parametrize("style", ["dotdot", "root"])
def test_relative_redirect(style):
    with FakeRegistry(redirect_mode="relative", relative_style=style) as fake:
        digest = fake.add_blob("owner/app", b"rel")
        blob_url = fake.url + "/v2/owner/app/blobs/" + digest
        status, headers, _ = http_request(blob_url, headers=pull_headers(fake, "owner/app"))
        target = urljoin(blob_url, headers["Location"])
        assert status == 307 and target.startswith(fake.url + "/cdn-local/blobs/")
        assert http_request(target)[2] == b"rel"


def test_chain_redirect_counts_hops():
    with FakeRegistry(redirect_mode="chain", redirect_hops=3) as fake:
        digest = fake.add_blob("a", b"chained")
        url, hops = fake.url + "/v2/a/blobs/" + digest, 0
        headers = pull_headers(fake, "a")
        while True:
            status, response_headers, body = http_request(url, headers=headers)
            if status != 307:
                break
            url, headers, hops = response_headers["Location"], {}, hops + 1
        assert (status, body, hops) == (200, b"chained", 3)


def test_no_redirect_and_custom_location():
    with FakeRegistry(redirect_mode="none") as fake:
        digest = fake.add_blob("a", b"direct")
        headers = pull_headers(fake, "a")
        status, response_headers, body = http_request(fake.url + "/v2/a/blobs/" + digest, headers=headers)
        assert (status, body, response_headers["Docker-Content-Digest"]) == (200, b"direct", digest)
        fake.redirect_location = "https://127.0.0.1:1/{repo}/{digest}"
        location = http_request(fake.url + "/v2/a/blobs/" + digest, headers=headers)[1]["Location"]
        assert location == "https://127.0.0.1:1/a/" + digest


# --- faults ----------------------------------------------------------------


def cdn_blob(fake, data):
    digest = fake.add_blob("f", data)
    return fake.cdn_url + "/blobs/" + digest + "?X-Amz-Signature=secret-signature-x"


def test_fault_status_429(fake):
    fault = fake.fault("registry", "/v2/", "status", status=429)
    status, headers, body = http_request(fake.url + "/v2/")
    assert (status, headers["Retry-After"]) == (429, "1")
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert fault.remaining == 0 and http_request(fake.url + "/v2/")[0] == 401


def test_fault_close(fake):
    fake.fault("auth", "/token", "close")
    with pytest.raises(http.client.RemoteDisconnected):
        http_request(fake.realm + "?service=fake.registry.test")


def test_fault_truncate_and_corrupt(fake):
    data = bytes(range(256)) * 1000
    url = cdn_blob(fake, data)
    fake.fault("cdn", "/blobs/", "truncate", nbytes=1000)
    with pytest.raises(http.client.IncompleteRead) as caught:
        http_request(url)
    assert len(caught.value.partial) == 1000
    fake.fault("cdn", "/blobs/", "corrupt", method="GET")
    status, _, body = http_request(url)
    assert status == 200 and len(body) == len(data) and body != data
    assert http_request(url)[2] == data


def test_fault_no_length(fake):
    url = cdn_blob(fake, b"x" * 200000)
    fake.fault("cdn", "/blobs/", "no_length")
    status, headers, body = http_request(url)
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    assert body == b"x" * 200000


def raw_get(url, headers=None):
    """GET on a raw socket, read to EOF: (status line and headers, every byte after them).
    Shows what http.client hides: bytes beyond Content-Length, a missing last chunk."""
    parts = urlsplit(url)
    lines = ["GET %s HTTP/1.1" % (parts.path + ("?" + parts.query if parts.query else "")), "Host: " + parts.netloc]
    lines += ["%s: %s" % item for item in (headers or {}).items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b"".join(iter(lambda: connection.recv(65536), b""))
    head, _, rest = received.partition(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n"), rest


def test_fault_reset_sends_part_of_the_body_then_a_reset_not_an_end(fake):
    url = cdn_blob(fake, b"r" * 300000)
    fault = fake.fault("cdn", "/blobs/", "reset", nbytes=1000)
    with pytest.raises(ConnectionResetError):
        http_request(url)
    assert fault.hits == 1 and http_request(url)[2] == b"r" * 300000


def test_fault_framing_announces_less_than_it_sends(fake):
    data = bytes(range(256)) * 100
    fake.fault("cdn", "/blobs/", "framing", content_length=len(data) - 100)
    head, rest = raw_get(cdn_blob(fake, data))
    assert head[0] == "HTTP/1.1 200 OK" and "Content-Length: %d" % (len(data) - 100) in head
    assert rest == data  # all of it, then the connection closed


def test_fault_framing_chunked_with_two_content_lengths(fake):
    data = b"c" * 100000
    fake.fault("cdn", "/blobs/", "framing", chunked=True, content_length=[10, 20])
    head, rest = raw_get(cdn_blob(fake, data))
    assert "Transfer-Encoding: chunked" in head
    lengths = [line for line in head if line.startswith("Content-Length")]
    assert lengths == ["Content-Length: 10", "Content-Length: 20"]
    assert rest.endswith(b"\r\n0\r\n\r\n") and rest.count(b"c") == len(data)


def test_fault_framing_holds_the_rest_of_the_body_after_stall_after_bytes(fake):
    data = bytes(range(256)) * 1000
    fake.fault("cdn", "/blobs/", "framing", stall_after=70000)
    connection = open_request(cdn_blob(fake, data))
    response = connection.getresponse()
    assert fake.wait_stalled(1) and response.read(70000) == data[:70000]
    fake.release.set()
    assert response.read() == data[70000:]
    connection.close()


def test_fault_framing_close_delimited_cut_without_a_header(fake):
    image = fake.add_image("library/alpine", "3", [b"l"])
    token = get_token(fake, "repository:library/alpine:pull")
    fake.fault("registry", "/manifests/3", "framing", content_length=None, nbytes=50,
               headers={"Docker-Content-Digest": None, "X-Extra": "yes"})
    head, rest = raw_get(fake.url + "/v2/library/alpine/manifests/3", bearer(token))
    names = [line.split(":")[0].lower() for line in head[1:]]
    assert "content-length" not in names and "transfer-encoding" not in names
    assert "docker-content-digest" not in names and "x-extra" in names
    assert rest == image["manifest"][:50]


def test_fault_redirect_to_its_own_target_loops(fake):
    url = cdn_blob(fake, b"loop")
    fake.fault("cdn", "/blobs/", "redirect", count=2, location="{target}")
    status, headers, _ = http_request(url)
    assert status == 307 and url.endswith(headers["Location"]) and headers["Location"].startswith("/blobs/")
    fake.fault("cdn", "/blobs/", "redirect", status=302, location="ftp://127.0.0.1/x")
    assert http_request(url)[0] == 307  # the first fault's second count
    status, headers, _ = http_request(url)
    assert (status, headers["Location"]) == (302, "ftp://127.0.0.1/x")
    assert http_request(url)[2] == b"loop"


def test_known_digests_names_every_blob_and_manifest(fake):
    image = fake.add_image("library/alpine", "3", [b"a", b"b"])
    index = fake.add_index("library/alpine", "multi", [image])
    assert fake.known_digests() == {image["digest"], image["config"], index, *image["layers"]}


def test_fault_stall_before_headers(fake):
    fake.fault("registry", "/v2/", "stall")
    connection = open_request(fake.url + "/v2/")
    assert fake.wait_stalled(1)
    fake.release.set()
    assert connection.getresponse().status == 401
    connection.close()


def test_fault_stall_after_headers(fake):
    url = cdn_blob(fake, b"abcdef" * 1000)
    fake.fault("cdn", "/blobs/", "stall", after_headers=True, after_bytes=4)
    connection = open_request(url)
    response = connection.getresponse()
    assert response.status == 200 and fake.wait_stalled(1)
    assert response.read(4) == b"abcd"
    fake.release.set()
    assert response.read() == (b"abcdef" * 1000)[4:]
    connection.close()


def test_request_log(fake):
    http_request(fake.url + "/v2/?x=1", headers={"X-Test": "yes"})
    record = fake.requests[-1]
    assert (record["server"], record["method"], record["path"]) == ("registry", "GET", "/v2/")
    assert record["query"] == {"x": ["1"]} and record["headers"]["x-test"] == "yes"
    assert fake.count(server="registry", path="/v2/") == 1
    fake.reset_counters()
    assert fake.count() == 0
