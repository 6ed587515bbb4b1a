"""SigV4, the S3 store's request signing, against the worked examples AWS publishes.

Every expected value here is copied from an AWS document (named above its data),
never computed by this file or by the code under test.
"""

import re
from urllib.parse import parse_qsl, urlsplit

import pytest

import dockerproxy  # its names are looked up in each test: one missing fails that test, not collection

EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # SHA-256 of ""

# Amazon S3 API Reference, "Signature Calculations for the Authorization Header:
# Transferring Payload in a Single Chunk (AWS Signature Version 4)", section
# "Examples: Signature Calculations" (a subpage of "Authenticating Requests: Using
# the Authorization Header (AWS Signature Version 4)"):
# https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
S3_CREDENTIALS = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3 = dict(credentials=S3_CREDENTIALS, region="us-east-1", service="s3", amz_date="20130524T000000Z",
          scope="20130524/us-east-1/s3/aws4_request",
          credential="AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request")
HOST = "examplebucket.s3.amazonaws.com"
PUT_HASH = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"  # "Welcome to Amazon S3."

# AWS Signature Version 4 test suite (aws-sig-v4-test-suite, "Copyright 2019 Amazon.com";
# https://docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html), files
# <name>/<name>.req, .creq, .sts and .authz, as vendored unchanged in
# github.com/dacut/scratchstack-aws-signature src/aws-sig-v4-test-suite/.
SUITE_CREDENTIALS = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE = dict(credentials=SUITE_CREDENTIALS, region="us-east-1", service="service",
             amz_date="20150830T123600Z", scope="20150830/us-east-1/service/aws4_request",
             credential="AKIDEXAMPLE/20150830/us-east-1/service/aws4_request")


def lines(*text):
    return "\n".join(text)


EXAMPLES = [
    dict(S3, id="s3-get-object-range",
         method="GET", path="/test.txt", query=[], payload_hash=EMPTY,
         headers={"host": HOST, "range": "bytes=0-9", "x-amz-content-sha256": EMPTY,
                  "x-amz-date": "20130524T000000Z"},
         canonical_request=lines(
             "GET", "/test.txt", "",
             "host:examplebucket.s3.amazonaws.com", "range:bytes=0-9",
             "x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
             "x-amz-date:20130524T000000Z", "",
             "host;range;x-amz-content-sha256;x-amz-date",
             "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
         string_to_sign=lines(
             "AWS4-HMAC-SHA256", "20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
             "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"),
         signed_headers="host;range;x-amz-content-sha256;x-amz-date",
         signature="f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
    # The key test$file.text: the request line shows it raw, the canonical URI as
    # /test%24file.text. The path goes in as sent (encoded) and must not be encoded again.
    dict(S3, id="s3-put-object",
         method="PUT", path="/test%24file.text", query=[], payload_hash=PUT_HASH,
         headers={"date": "Fri, 24 May 2013 00:00:00 GMT", "host": HOST,
                  "x-amz-content-sha256": PUT_HASH, "x-amz-date": "20130524T000000Z",
                  "x-amz-storage-class": "REDUCED_REDUNDANCY"},
         canonical_request=lines(
             "PUT", "/test%24file.text", "",
             "date:Fri, 24 May 2013 00:00:00 GMT", "host:examplebucket.s3.amazonaws.com",
             "x-amz-content-sha256:44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
             "x-amz-date:20130524T000000Z", "x-amz-storage-class:REDUCED_REDUNDANCY", "",
             "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
             "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"),
         string_to_sign=lines(
             "AWS4-HMAC-SHA256", "20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
             "9e0e90d9c76de8fa5b200d8c849cd5b8dc7a3be3951ddb7f6a76b4158342019d"),
         signed_headers="date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
         signature="98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"),
    # GET ?lifecycle: a subresource without a value is signed as "lifecycle=".
    dict(S3, id="s3-get-bucket-lifecycle",
         method="GET", path="/", query=[("lifecycle", "")], payload_hash=EMPTY,
         headers={"host": HOST, "x-amz-content-sha256": EMPTY, "x-amz-date": "20130524T000000Z"},
         canonical_request=lines(
             "GET", "/", "lifecycle=",
             "host:examplebucket.s3.amazonaws.com",
             "x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
             "x-amz-date:20130524T000000Z", "",
             "host;x-amz-content-sha256;x-amz-date",
             "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
         string_to_sign=lines(
             "AWS4-HMAC-SHA256", "20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
             "9766c798316ff2757b517bc739a67f6213b4ab36dd5da2f94eaebf79c77395ca"),
         signed_headers="host;x-amz-content-sha256;x-amz-date",
         signature="fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
    dict(S3, id="s3-get-bucket-list-objects",
         method="GET", path="/", query=[("max-keys", "2"), ("prefix", "J")], payload_hash=EMPTY,
         headers={"host": HOST, "x-amz-content-sha256": EMPTY, "x-amz-date": "20130524T000000Z"},
         canonical_request=lines(
             "GET", "/", "max-keys=2&prefix=J",
             "host:examplebucket.s3.amazonaws.com",
             "x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
             "x-amz-date:20130524T000000Z", "",
             "host;x-amz-content-sha256;x-amz-date",
             "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
         string_to_sign=lines(
             "AWS4-HMAC-SHA256", "20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
             "df57d21db20da04d7fa30298dd4488ba3a2b47ca3a489c74750e0f1e7df1b9b7"),
         signed_headers="host;x-amz-content-sha256;x-amz-date",
         signature="34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
    dict(SUITE, id="suite-get-vanilla",
         method="GET", path="/", query=[], payload_hash=EMPTY,
         headers={"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"},
         canonical_request=lines(
             "GET", "/", "",
             "host:example.amazonaws.com", "x-amz-date:20150830T123600Z", "",
             "host;x-amz-date",
             "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
         string_to_sign=lines(
             "AWS4-HMAC-SHA256", "20150830T123600Z", "20150830/us-east-1/service/aws4_request",
             "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"),
         signed_headers="host;x-amz-date",
         signature="5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    # GET /?Param2=value2&Param1=value1: the query is sorted by name.
    dict(SUITE, id="suite-get-vanilla-query-order-key-case",
         method="GET", path="/", query=[("Param2", "value2"), ("Param1", "value1")], payload_hash=EMPTY,
         headers={"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"},
         canonical_request=lines(
             "GET", "/", "Param1=value1&Param2=value2",
             "host:example.amazonaws.com", "x-amz-date:20150830T123600Z", "",
             "host;x-amz-date",
             "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
         string_to_sign=lines(
             "AWS4-HMAC-SHA256", "20150830T123600Z", "20150830/us-east-1/service/aws4_request",
             "816cd5b414d056048ba4f7c5386d6e0533120fb1fcfa93762cf0fc39e2cf19e0"),
         signed_headers="host;x-amz-date",
         signature="b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
    # The suite's post-x-www-form-urlencoded.creq is not used: its SignedHeaders line
    # reads "host;x-amz-date" though it lists content-type, while its .sts (the hash of
    # the canonical request) and .authz were made with content-type signed, as here.
    dict(SUITE, id="suite-post-x-www-form-urlencoded",
         method="POST", path="/", query=[], payload_hash=EMPTY,
         headers={"content-type": "application/x-www-form-urlencoded; charset=utf-8",
                  "host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"},
         canonical_request=None,
         string_to_sign=lines(
             "AWS4-HMAC-SHA256", "20150830T123600Z", "20150830/us-east-1/service/aws4_request",
             "6a42edc18395dd67cc71407d4307ff29ab1646b08c1a0107edb319e08e2bc584"),
         signed_headers="content-type;host;x-amz-date",
         signature="0c3bc22986c53164a4755b4466c2e17db853888c5ddb98567e700a3ecdb262f6"),
]


def by_id(examples):
    return pytest.mark.parametrize("example", examples, ids=[e["id"] for e in examples])


def canonical(example):
    return dockerproxy.sigv4_canonical_request(example["method"], example["path"], example["query"],
                                               example["headers"], example["payload_hash"])


@by_id([e for e in EXAMPLES if e["canonical_request"]])
def test_canonical_request(example):
    assert canonical(example) == example["canonical_request"]


@by_id(EXAMPLES)
def test_string_to_sign(example):
    assert dockerproxy.sigv4_string_to_sign(example["amz_date"], example["scope"], canonical(example)) \
        == example["string_to_sign"]


@by_id(EXAMPLES)
def test_authorization(example):
    value = dockerproxy.sigv4_authorization(
        example["method"], example["path"], example["query"], example["headers"],
        example["payload_hash"], dockerproxy.S3Credentials(*example["credentials"]),
        example["region"], example["amz_date"], service=example["service"])
    algorithm, _, rest = value.partition(" ")
    assert algorithm == "AWS4-HMAC-SHA256"
    # AWS prints these parts with "," (S3 pages) or ", " (test suite) between them.
    assert dict(part.split("=", 1) for part in re.split(r",\s*", rest.strip())) == {
        "Credential": example["credential"],
        "SignedHeaders": example["signed_headers"],
        "Signature": example["signature"],
    }


# Amazon S3 API Reference, "Authenticating Requests: Using Query Parameters (AWS
# Signature Version 4)", section "An Example" (test.txt shared for 86400 seconds):
# https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html
PRESIGNED_URL = (
    "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
PRESIGNED_CANONICAL_REQUEST = lines(
    "GET", "/test.txt",
    "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1"
    "%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host",
    "host:examplebucket.s3.amazonaws.com", "",
    "host",
    "UNSIGNED-PAYLOAD")
PRESIGNED_STRING_TO_SIGN = lines(
    "AWS4-HMAC-SHA256", "20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
    "3bfa292879f6447bbcda7001decf97f4a54dc650c8942174ae0a9121cf58ad04")


def test_presigned_url():
    published = parse_qsl(urlsplit(PRESIGNED_URL).query)  # decoded (name, value) pairs, in order
    unsigned = [pair for pair in published if pair[0] != "X-Amz-Signature"]
    creq = dockerproxy.sigv4_canonical_request("GET", "/test.txt", unsigned, {"host": HOST}, "UNSIGNED-PAYLOAD")
    assert creq == PRESIGNED_CANONICAL_REQUEST
    assert dockerproxy.sigv4_string_to_sign("20130524T000000Z", "20130524/us-east-1/s3/aws4_request", creq) \
        == PRESIGNED_STRING_TO_SIGN
    query = dockerproxy.sigv4_presigned_query("GET", HOST, "/test.txt", dockerproxy.S3Credentials(*S3_CREDENTIALS),
                                              "us-east-1", "20130524T000000Z", 86400)
    # Raw or percent-encoded values both decode to the published ones.
    assert parse_qsl("&".join("%s=%s" % pair for pair in query)) == published
    assert query[-1] == ("X-Amz-Signature",
                         "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


# The HMAC chain kSecret -> kDate -> kRegion -> kService -> kSigning, same example secret:
# 20120215: AWS General Reference, "Examples of how to derive a signing key for Signature
#   Version 4", https://docs.aws.amazon.com/general/latest/gr/signature-v4-examples.html
# 20150830: AWS General Reference, "Task 3: Calculate the signature for AWS Signature
#   Version 4", https://docs.aws.amazon.com/general/latest/gr/sigv4-calculate-signature.html
# (values as those pages are quoted, with their URLs, by many independent signers' tests)
@pytest.mark.parametrize("date, expected", [
    ("20120215", "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"),
    ("20150830", "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"),
], ids=["20120215", "20150830"])
def test_signing_key(date, expected):
    key = dockerproxy.sigv4_signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", date, "us-east-1", "iam")
    assert isinstance(key, bytes) and key.hex() == expected


def test_credentials_repr_hides_the_secret():
    credentials = dockerproxy.S3Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "token")
    assert credentials.secret_key == "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    for text in (repr(credentials), str(credentials), repr([credentials])):
        assert "wJalrXUtnFEMI" not in text and "EXAMPLEKEY" not in text
