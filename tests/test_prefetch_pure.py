"""The prefetch command's pure parts (names, platforms, manifests, image lists,
the summary table), its three views over in-memory streams, and the command as
a person runs it: on a pseudo-terminal, into a pipe, with --json, TERM=dumb,
and with bad arguments (exit status 2)."""

import errno
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

import dockerproxy
from conftest import ROOT
from dockerproxy import Descriptor, ImageReference

SCRIPT = os.path.join(ROOT, "dockerproxy.py")

A, B, C, D, E, F = (f"sha256:{char * 64}" for char in "abcdef")
SHA512 = "sha512:" + "0" * 128
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


# parse_image_reference ######################################################

@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("alpine", "docker.io", "library/alpine", "latest", ""),
    ("alpine:3.20", "docker.io", "library/alpine", "3.20", ""),
    (f"library/alpine@{A}", "docker.io", "library/alpine", "", A),
    (f"alpine:3.20@{B}", "docker.io", "library/alpine", "3.20", B),
    (f"alpine@{SHA512}", "docker.io", "library/alpine", "", SHA512),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", ""),
    ("index.docker.io/library/alpine", "docker.io", "library/alpine", "latest", ""),
    ("index.docker.io/alpine", "docker.io", "library/alpine", "latest", ""),
    ("registry-1.docker.io/x/y", "docker.io", "x/y", "latest", ""),
    ("bitnami/redis:7", "docker.io", "bitnami/redis", "7", ""),
    ("ghcr.io/owner/app:1", "ghcr.io", "owner/app", "1", ""),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", ""),
    ("quay.io/org/img", "quay.io", "org/img", "latest", ""),
    ("localhost:5000/a/b:tag", "localhost:5000", "a/b", "tag", ""),
    ("localhost/a", "localhost", "a", "latest", ""),
    ("REGISTRY.EXAMPLE.COM:5000/a", "registry.example.com:5000", "a", "latest", ""),
    ("  alpine:3.20\n", "docker.io", "library/alpine", "3.20", ""),
])
def test_parse_image_reference_normalises_as_docker_does(text, registry, repository, tag, digest):
    reference = dockerproxy.parse_image_reference(text)
    assert reference == ImageReference(registry, repository, tag, digest)
    assert reference.reference == (digest or tag)


@pytest.mark.parametrize("text, shown", [
    ("alpine", "docker.io/library/alpine:latest"),
    (f"alpine:3.20@{B}", f"docker.io/library/alpine:3.20@{B}"),
    (f"ghcr.io/o/a@{A}", f"ghcr.io/o/a@{A}"),
    ("REGISTRY.EXAMPLE.COM:5000/a:v1", "registry.example.com:5000/a:v1"),
])
def test_image_reference_prints_its_full_normalised_name(text, shown):
    assert str(dockerproxy.parse_image_reference(text)) == shown


@pytest.mark.parametrize("text, complaint", [
    ("Alpine", "lowercase"),
    ("ghcr.io/Owner/app", "lowercase"),
    ("alpine:", "tag"),
    ("alpine@sha256:short", "digest"),
    ("alpine@md5:" + "a" * 32, "digest"),
    ("a//b", "not a valid image name"),
    ("a:tag!", "tag"),
    ("a/", "not a valid image name"),
    ("-alpine", "not a valid image name"),
    ("", "not a valid image name"),
    ("a/" + "b" * 300, "not a valid image name"),
])
def test_parse_image_reference_refuses_a_malformed_name(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        dockerproxy.parse_image_reference(text)


# parse_platform and platform_matches ########################################

@pytest.mark.parametrize("text, platform", [
    ("linux/amd64", ("linux", "amd64", "")),
    ("linux/arm/v7", ("linux", "arm", "v7")),
    ("LINUX/ARM64", ("linux", "arm64", "")),
    ("windows/amd64", ("windows", "amd64", "")),
    (" linux/arm64/v8 ", ("linux", "arm64", "v8")),
])
def test_parse_platform_gives_os_architecture_variant(text, platform):
    assert dockerproxy.parse_platform(text) == platform


@pytest.mark.parametrize("text", ["linux", "linux/amd64/v1/x", "linux amd64", "", "/amd64", "linux/", "linux//v7"])
def test_parse_platform_refuses_what_is_not_os_slash_architecture(text):
    with pytest.raises(ValueError, match="not a platform"):
        dockerproxy.parse_platform(text)


@pytest.mark.parametrize("wanted, platform, matches", [
    ("linux/arm64", ("linux", "arm64", "v8"), True),     # v8 is arm64's default variant
    ("linux/arm64/v8", ("linux", "arm64", ""), True),
    ("linux/arm64", ("linux", "arm64", ""), True),
    ("linux/arm", ("linux", "arm", "v6"), True),         # no variant: every arm
    ("linux/arm", ("linux", "arm", "v7"), True),
    ("linux/arm/v7", ("linux", "arm", "v7"), True),
    ("linux/arm/v7", ("linux", "arm", "v6"), False),
    ("linux/arm/v7", ("linux", "arm", ""), False),
    ("linux/amd64", ("linux", "arm64", ""), False),
    ("linux/amd64", ("linux", "amd64", ""), True),
    ("windows/amd64", ("linux", "amd64", ""), False),
    ("linux/amd64", ("unknown", "unknown", ""), False),  # an attestation's platform
])
def test_platform_matches_by_containerd_rules(wanted, platform, matches):
    assert dockerproxy.platform_matches(dockerproxy.parse_platform(wanted), platform) is matches


# manifest_references ########################################################

def attestation(target, digest, size=840):
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
            "platform": {"architecture": "unknown", "os": "unknown"},
            "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                            "vnd.docker.reference.digest": target}}


DOCKER_LIST_DOCUMENT = {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [
    {"mediaType": DOCKER_MANIFEST, "digest": A, "size": 528, "platform": {"architecture": "amd64", "os": "linux"}},
    {"mediaType": DOCKER_MANIFEST, "digest": B, "size": 529,
     "platform": {"architecture": "ARM", "os": "linux", "variant": "v7"}},
]}

OCI_INDEX_DOCUMENT = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
    {"mediaType": OCI_MANIFEST, "digest": A, "size": 1000, "platform": {"architecture": "amd64", "os": "linux"}},
    {"mediaType": OCI_MANIFEST, "digest": B, "size": 1001,
     "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
    attestation(A, C),
    attestation(B, D),
    # a reference type other than an attestation's, and an attestation whose target is no digest
    {"mediaType": OCI_MANIFEST, "digest": E, "size": 10, "platform": {"architecture": "unknown", "os": "unknown"},
     "annotations": {"vnd.docker.reference.type": "signature", "vnd.docker.reference.digest": A}},
    attestation("sha256:nothex", F),
]}

OCI_INDEX_ENTRIES = [
    Descriptor(A, 1000, OCI_MANIFEST, ("linux", "amd64", ""), True, ""),
    Descriptor(B, 1001, OCI_MANIFEST, ("linux", "arm64", "v8"), True, ""),
    Descriptor(C, 840, OCI_MANIFEST, ("unknown", "unknown", ""), True, A),
    Descriptor(D, 840, OCI_MANIFEST, ("unknown", "unknown", ""), True, B),
    Descriptor(E, 10, OCI_MANIFEST, ("unknown", "unknown", ""), True, ""),
    Descriptor(F, 840, OCI_MANIFEST, ("unknown", "unknown", ""), True, ""),
]


@pytest.mark.parametrize("document, expected", [
    pytest.param(DOCKER_LIST_DOCUMENT, [
        Descriptor(A, 528, DOCKER_MANIFEST, ("linux", "amd64", ""), True, ""),
        Descriptor(B, 529, DOCKER_MANIFEST, ("linux", "arm", "v7"), True, ""),
    ], id="docker-manifest-list"),
    pytest.param(OCI_INDEX_DOCUMENT, OCI_INDEX_ENTRIES, id="oci-index-with-attestations"),
    pytest.param({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"digest": A, "size": 7},                                    # no platform, no media type
        {"digest": B, "size": 8, "platform": "linux/amd64"},         # a platform that is no object
    ]}, [
        Descriptor(A, 7, "", ("", "", ""), True, ""),
        Descriptor(B, 8, "", ("", "", ""), True, ""),
    ], id="index-entries-without-platform"),
    pytest.param({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                  "config": {"mediaType": DOCKER_CONFIG, "digest": A, "size": 1469},
                  "layers": [
                      {"mediaType": DOCKER_LAYER, "digest": B, "size": 3000},
                      {"mediaType": FOREIGN_LAYER, "digest": C, "size": 9000,
                       "urls": ["https://mcr.microsoft.com/layer"]},
                      {"mediaType": DOCKER_LAYER, "digest": D, "size": 4000},
                      {"mediaType": DOCKER_LAYER, "digest": B, "size": 3000},  # the same layer twice
                  ]}, [
        Descriptor(A, 1469, DOCKER_CONFIG, (), False, ""),
        Descriptor(B, 3000, DOCKER_LAYER, (), False, ""),
        Descriptor(D, 4000, DOCKER_LAYER, (), False, ""),
    ], id="image-config-and-layers-foreign-layer-skipped"),
    pytest.param({"mediaType": "application/vnd.oci.artifact.manifest.v1+json", "artifactType": "x/sbom",
                  "blobs": [{"mediaType": "application/json", "digest": A, "size": 12},
                            {"mediaType": "text/plain", "digest": B, "size": 0}]}, [
        Descriptor(A, 12, "application/json", (), False, ""),
        Descriptor(B, 0, "text/plain", (), False, ""),
    ], id="artifact-blobs"),
    pytest.param({"schemaVersion": 1, "name": "library/alpine", "tag": "3",
                  "fsLayers": [{"blobSum": A}, {"blobSum": B}, {"blobSum": A}, {"blobSum": "sha256:bad"}, "x"]}, [
        Descriptor(A, 0, "application/octet-stream", (), False, ""),
        Descriptor(B, 0, "application/octet-stream", (), False, ""),
    ], id="schema1-fslayers-deduplicated"),
    pytest.param({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                  "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + "A" * 64, "size": 10},
                  "layers": [
                      {"mediaType": OCI_LAYER, "digest": "sha256:1234", "size": 10},
                      {"mediaType": OCI_LAYER, "digest": B, "size": -1},
                      {"mediaType": OCI_LAYER, "digest": C, "size": True},
                      {"mediaType": OCI_LAYER, "digest": D, "size": "10"},
                      {"mediaType": OCI_LAYER, "digest": D, "size": 2 ** 80},
                      {"mediaType": OCI_LAYER, "size": 10},
                      ["not", "a", "descriptor"],
                      {"mediaType": OCI_LAYER, "digest": E, "size": 5},
                  ]}, [
        Descriptor(E, 5, OCI_LAYER, (), False, ""),
    ], id="invalid-descriptors-dropped"),
    pytest.param({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": A, "size": -5},
        {"mediaType": OCI_MANIFEST, "digest": "sha256:zz", "size": 5},
        {"mediaType": OCI_MANIFEST, "digest": B, "size": False},
        {"mediaType": OCI_MANIFEST, "digest": C, "size": 5, "platform": {"architecture": "s390x", "os": "linux"}},
    ]}, [
        Descriptor(C, 5, OCI_MANIFEST, ("linux", "s390x", ""), True, ""),
    ], id="invalid-index-entries-dropped"),
    pytest.param(None, [], id="null"),
    pytest.param([{"digest": A, "size": 1}], [], id="list"),
    pytest.param("manifest", [], id="string"),
    pytest.param(42, [], id="number"),
    pytest.param({}, [], id="empty-object"),
])
def test_manifest_references_lists_what_a_manifest_names(document, expected):
    assert dockerproxy.manifest_references(document) == expected


# chosen_manifests ###########################################################

@pytest.mark.parametrize("wanted, expected", [
    ((), OCI_INDEX_ENTRIES),
    (("linux/arm64",), [OCI_INDEX_ENTRIES[1], OCI_INDEX_ENTRIES[3]]),
    (("linux/amd64",), [OCI_INDEX_ENTRIES[0], OCI_INDEX_ENTRIES[2]]),
    (("linux/amd64", "linux/arm64/v8"), [OCI_INDEX_ENTRIES[0], OCI_INDEX_ENTRIES[1],
                                         OCI_INDEX_ENTRIES[2], OCI_INDEX_ENTRIES[3]]),
    (("linux/s390x",), []),
    (("windows/amd64",), []),
])
def test_chosen_manifests_keeps_the_wanted_platforms_and_their_attestations(wanted, expected):
    platforms = tuple(dockerproxy.parse_platform(text) for text in wanted)
    assert dockerproxy.chosen_manifests(list(OCI_INDEX_ENTRIES), platforms) == expected


# parse_image_list ###########################################################

IMAGE_LIST = """\
# the fleet's base images
alpine:3.20

ghcr.io/owner/app:1 linux/amd64,linux/arm64   # both
   registry.k8s.io/pause:3.9\tlinux/arm/v7
# alpine:3.19 is commented out
\t
localhost:5000/a/b@""" + A + "\n"


def test_parse_image_list_skips_comments_and_blank_lines_and_reads_platforms():
    assert dockerproxy.parse_image_list(IMAGE_LIST) == [
        (ImageReference("docker.io", "library/alpine", "3.20", ""), ()),
        (ImageReference("ghcr.io", "owner/app", "1", ""), (("linux", "amd64", ""), ("linux", "arm64", ""))),
        (ImageReference("registry.k8s.io", "pause", "3.9", ""), (("linux", "arm", "v7"),)),
        (ImageReference("localhost:5000", "a/b", "", A), ()),
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_parse_image_list_of_no_image_is_empty(text):
    assert dockerproxy.parse_image_list(text) == []


@pytest.mark.parametrize("text, line", [
    ("Alpine\n", "line 1"),
    ("alpine\n\n# comment\nalpine:3.20 linux\n", "line 4"),
    ("alpine\nalpine linux/amd64 linux/arm64\n", "line 2"),
    ("alpine\nalpine:3.20\n\nalpine@sha256:short\n", "line 4"),
    ("alpine linux/amd64,\n", "line 1"),
])
def test_parse_image_list_names_the_bad_line(text, line):
    with pytest.raises(ValueError, match=f"^{line}: "):
        dockerproxy.parse_image_list(text)


# summary_table ##############################################################

OK_EVENT = {"event": "image", "image": "docker.io/library/alpine:3.20", "ok": True, "digest": A,
            "platforms": ["linux/amd64", "linux/arm64"], "fetched": 12, "cached": 3, "bytes": 3 * 1024 * 1024,
            "seconds": 4.26}
FAILED_EVENT = {"event": "image", "image": "ghcr.io/o/a:1", "ok": False, "digest": "", "platforms": [],
                "fetched": 0, "cached": 0, "bytes": 0, "seconds": 0.04,
                "error": {"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "status": 404}}


@pytest.mark.parametrize("event, cells", [
    (OK_EVENT, {"IMAGE": "docker.io/library/alpine:3.20", "PLATFORMS": "linux/amd64, linux/arm64",
                "FETCHED": "12", "CACHED": "3", "BYTES": "3.0 MiB", "TIME": "4.3 s", "RESULT": "ok"}),
    (FAILED_EVENT, {"IMAGE": "ghcr.io/o/a:1", "PLATFORMS": "-", "FETCHED": "0", "CACHED": "0", "BYTES": "0 B",
                    "TIME": "0.0 s", "RESULT": "MANIFEST_UNKNOWN: manifest unknown"}),
])
def test_summary_table_aligns_each_cell_under_its_column(event, cells):
    table = dockerproxy.summary_table([OK_EVENT, FAILED_EVENT])
    lines = table.split("\n")
    assert len(lines) == 3
    header = lines[0]
    assert header.split() == list(cells)
    row = lines[1 + [OK_EVENT, FAILED_EVENT].index(event)]
    for column, value in cells.items():
        start = header.index(column)
        assert row[start:start + len(value)] == value, (column, row)
        assert start == 0 or row[start - 1] == " ", (column, row)
    assert row.rstrip().endswith(cells["RESULT"])


def test_summary_table_of_many_platforms_counts_them():
    event = dict(OK_EVENT, platforms=["linux/amd64", "linux/arm64/v8", "linux/arm/v7", "linux/s390x"])
    row = dockerproxy.summary_table([event]).split("\n")[1]
    assert "linux/amd64 +3" in row


# Views, on in-memory streams ################################################

LAYER_1, LAYER_2, CONFIG = B, C, D
HOSTILE = "upstream says \x1b[31mred\x1b[0m\rover\x07"

EVENTS = [
    {"event": "start", "images": ["docker.io/library/alpine:3.20", "ghcr.io/o/a:1"], "parallel": 3},
    {"event": "resolved", "image": "docker.io/library/alpine:3.20", "digest": A, "platforms": ["linux/amd64"],
     "blobs": 3, "bytes": 3 * 1024 * 1024},
    {"event": "progress", "image": "docker.io/library/alpine:3.20", "bytes_done": 1024 * 1024,
     "bytes_total": 3 * 1024 * 1024, "rate_bytes_per_second": 512 * 1024},
    {"event": "blob", "image": "docker.io/library/alpine:3.20", "digest": CONFIG, "size": 1469, "result": "cached",
     "seconds": 0.002},
    {"event": "blob", "image": "docker.io/library/alpine:3.20", "digest": LAYER_1, "size": 2 * 1024 * 1024,
     "result": "fetched", "seconds": 1.5},
    {"event": "blob", "image": "docker.io/library/alpine:3.20", "digest": LAYER_2, "size": 1024 * 1024 - 1469,
     "result": "fetched", "seconds": 0.7},
    {"event": "image", "image": "docker.io/library/alpine:3.20", "ok": True, "digest": A,
     "platforms": ["linux/amd64"], "fetched": 2, "cached": 1, "bytes": 3 * 1024 * 1024 - 1469, "seconds": 2.3},
    {"event": "image", "image": "ghcr.io/o/a:1", "ok": False, "digest": "", "platforms": [], "fetched": 0,
     "cached": 0, "bytes": 0, "seconds": 0.1,
     "error": {"code": "UNAVAILABLE", "message": HOSTILE, "status": 502}},
    {"event": "end", "ok": False, "images": 2, "failed": 1, "fetched": 2, "cached": 1,
     "bytes": 3 * 1024 * 1024 - 1469, "seconds": 2.4},
]


def shown(view_class, *args):
    stream = io.StringIO()
    view = view_class(stream, *args)
    if isinstance(view, dockerproxy.TerminalView):
        view.REDRAW_INTERVAL = 0  # each event drawn: what is on screen does not depend on how fast they came
    for event in EVENTS:
        view.event(event)
    view.close()
    return view, stream.getvalue()


def test_json_view_writes_each_event_as_one_json_line():
    view, output = shown(dockerproxy.JsonView)
    assert output.endswith("\n")
    assert [json.loads(line) for line in output.splitlines()] == EVENTS
    assert view.ok is False


def test_log_view_writes_plain_lines_a_line_per_blob_and_ends_with_the_table():
    view, output = shown(dockerproxy.LogView)
    assert "\x1b" not in output and "\r" not in output and "\x07" not in output
    lines = output.splitlines()
    for event in EVENTS:
        if event["event"] == "blob":
            assert [line for line in lines if event["digest"] in line and line.endswith(event["result"])], event
    assert any(line.startswith("docker.io/library/alpine:3.20: done") for line in lines), output
    table = dockerproxy.summary_table([EVENTS[6], EVENTS[7]])
    assert output.rstrip("\n").endswith(table)
    assert lines[-3].startswith("IMAGE ")
    assert lines[-2].startswith("docker.io/library/alpine:3.20 ") and lines[-2].endswith("  ok")
    assert lines[-1].startswith("ghcr.io/o/a:1 ") and "UNAVAILABLE: " in lines[-1]
    assert view.ok is False


@pytest.mark.parametrize("view_class, args", [
    (dockerproxy.LogView, ()),
    (dockerproxy.TerminalView, (100,)),
])
def test_a_control_character_of_an_error_message_is_shown_escaped(view_class, args):
    """The message comes from an upstream: its ESC must not reach the terminal
    (a view's own escapes, the TerminalView's cursor moves, are fine)."""
    _, output = shown(view_class, *args)
    assert "\\x1b[31mred\\x1b[0m\\rover\\x07" in output          # shown, escaped
    own_escapes = re.sub(r"\x1b\[(?:2K|\d+F|J)", "", output)     # what TerminalView writes itself
    assert "\x1b" not in own_escapes, [line for line in output.splitlines() if "\x1b[31m" in line]
    assert "\x07" not in output
    assert "\x1b[31m" not in output and "\x1b[0m" not in output


def test_terminal_view_redraws_its_block_in_place_and_ends_with_the_table():
    _, output = shown(dockerproxy.TerminalView, 100)
    assert output.count("\r\x1b[2K") >= 2
    assert re.search(r"\x1b\[\d+F\x1b\[J", output)
    assert "ETA" in output and "1.0 MiB / 3.0 MiB" in output
    assert "ok docker.io/library/alpine:3.20: 2 fetched, 1 cached" in output
    assert "FAILED ghcr.io/o/a:1: UNAVAILABLE: " in output
    last = output.rstrip("\n").split("\n")[-3:]
    assert last[0].startswith("IMAGE ") and last[1].endswith("  ok") and last[2].startswith("ghcr.io/o/a:1 ")


def test_terminal_view_block_stays_a_few_lines_however_many_images_wait():
    """A list of 40 images is resolved long before its blobs download: one line each would make a
    block taller than the terminal, and moving up over it to redraw would fail.  Those downloading
    come first; the others are counted on one line."""
    stream = io.StringIO()
    view = dockerproxy.TerminalView(stream, 100)
    view.REDRAW_INTERVAL = 0
    names = [f"docker.io/library/image{number}:1" for number in range(40)]
    view.event({"event": "start", "images": names, "parallel": 3})
    for name in names:
        view.event({"event": "resolved", "image": name, "digest": "sha256:" + "a" * 64, "platforms": [],
                    "blobs": 1, "bytes": 1000})
    view.event({"event": "progress", "image": names[39], "bytes_done": 500, "bytes_total": 1000,
                "rate_bytes_per_second": 100})
    lines = view.lines()
    assert len(lines) == view.MAX_IMAGE_LINES + 2, lines
    assert names[39] in lines[0] and "500 B / 1000 B" in lines[0]
    assert lines[-2] == f"  ... and {40 - view.MAX_IMAGE_LINES} more images waiting"
    assert re.findall(r"\x1b\[(\d+)F", stream.getvalue())[-1] == str(len(lines))


# The command on a pseudo-terminal, a pipe, --json, TERM=dumb ###############

LAYER_SIZE = 1024 * 1024
STALL_AFTER = 512 * 1024
DEADLINE = 60


def add_slow_image(fake, stall=True):
    """alpine:3.20 on the fake Docker Hub: two 1 MiB layers whose CDN downloads
    each stop for a second half-way (a slow CDN).  The command fetches one blob
    at a time (--prefetch-parallel 1), so progress is drawn half-way through
    each layer, more than PROGRESS_INTERVAL apart."""
    layers = [bytes(range(256)) * (LAYER_SIZE // 256), bytes(reversed(range(256))) * (LAYER_SIZE // 256)]
    image = fake.add_image("library/alpine", "3.20", layers)
    faults = []
    if stall:
        faults = [fake.fault("cdn", digest, "stall", after_headers=True, after_bytes=STALL_AFTER, timeout=1.0)
                  for digest in image["layers"]]
    return image, faults


def command(fake, cache_dir, *extra):
    return [sys.executable, SCRIPT, "prefetch", "alpine:3.20", "--env-file", os.devnull,
            "--cache-dir", str(cache_dir), "--upstream", f"docker={fake.url}", "--prefetch-parallel", "1", *extra]


def clean_environment(tmp_path, term):
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TERM": term, "LANG": "C.UTF-8"}


def run_on_pty(argv, env, cwd):
    """Run argv with its stdout (and stdin) on a pseudo-terminal of 120 columns:
    (exit status, bytes the terminal got, stderr text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env, cwd=cwd)
    finally:
        os.close(slave)
    output = b""
    deadline = time.monotonic() + DEADLINE
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no EOF on the terminal within {DEADLINE} s: {output!r}"
            readable, _, _ = select.select([master], [], [], left)
            if not readable:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as err:
                if err.errno == errno.EIO:  # Linux: every slave end closed
                    break
                raise
            if not chunk:
                break
            output += chunk
        status = process.wait(timeout=DEADLINE)
        stderr = process.stderr.read().decode("utf-8", "replace")
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    return status, output, stderr


def table_lines(text):
    """The summary table at the end of the output: its header and rows."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").rstrip("\n").split("\n")]
    header = max(index for index, line in enumerate(lines) if line.startswith("IMAGE "))
    return lines[header:]


def test_prefetch_on_a_terminal_redraws_progress_in_place_and_ends_with_the_table(fake, tmp_path):
    image, stalls = add_slow_image(fake)
    status, output, stderr = run_on_pty(command(fake, tmp_path / "cache"), clean_environment(tmp_path, "xterm"),
                                        tmp_path)
    assert status == 0, (output, stderr)
    assert [stall.hits for stall in stalls] == [1, 1]  # the CDN was slow, half-way through each layer
    redraws = re.findall(rb"\x1b\[\d+F\x1b\[J", output)
    assert len(redraws) > 1, output
    progress = re.findall(rb"\r\x1b\[2K  docker\.io/library/alpine:3\.20  ([\d.]+ [KMG]?i?B) / ([\d.]+ [KMG]?i?B)  "
                          rb"[\d.]+ [KMG]?i?B/s  ETA [^\r\n]+\r?\n", output)
    assert len(progress) >= 2, output
    assert {total for _, total in progress} == {b"2.0 MiB"}, progress  # the config and both layers
    half_way = [done for done, _ in progress if done not in (b"0 B", b"2.0 MiB")]
    assert len(set(half_way)) >= 2, progress  # drawn again as bytes came, not once
    text = output.decode()
    assert "ok docker.io/library/alpine:3.20: 3 fetched, 0 cached" in text
    table = table_lines(text)
    assert len(table) == 2, text[-500:]
    assert table[0].split() == ["IMAGE", "PLATFORMS", "FETCHED", "CACHED", "BYTES", "TIME", "RESULT"]
    assert table[1].startswith("docker.io/library/alpine:3.20 ") and table[1].endswith("  ok"), table
    assert "\x1b" not in "\n".join(table)
    assert text.replace("\r\n", "\n").rstrip("\n").endswith(table[1])


def test_prefetch_into_a_pipe_writes_plain_lines_and_the_table(fake, tmp_path):
    image, stalls = add_slow_image(fake)
    result = subprocess.run(command(fake, tmp_path / "cache"), env=clean_environment(tmp_path, "xterm"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert [stall.hits for stall in stalls] == [1, 1]
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    lines = result.stdout.splitlines()
    for digest in [image["config"], *image["layers"]]:
        assert [line for line in lines if f": {digest} " in line and line.endswith(" fetched")], result.stdout
    table = table_lines(result.stdout)
    assert table[0].startswith("IMAGE ") and len(table) == 2
    assert table[1].startswith("docker.io/library/alpine:3.20 ") and table[1].endswith("  ok")


def test_prefetch_json_writes_one_json_event_a_line(fake, tmp_path):
    image, _ = add_slow_image(fake)
    result = subprocess.run(command(fake, tmp_path / "cache", "--json"), env=clean_environment(tmp_path, "xterm"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 0, (result.stdout, result.stderr)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and "resolved" in kinds and "progress" in kinds
    assert sorted(event["digest"] for event in events if event["event"] == "blob") == sorted(
        [image["config"], *image["layers"]])
    assert events[-1]["ok"] is True and events[-1]["fetched"] == 3


def test_prefetch_on_a_dumb_terminal_writes_no_escape(fake, tmp_path):
    image, _ = add_slow_image(fake, stall=False)
    status, output, stderr = run_on_pty(command(fake, tmp_path / "cache"), clean_environment(tmp_path, "dumb"),
                                        tmp_path)
    assert status == 0, (output, stderr)
    assert b"\x1b" not in output
    text = output.decode()
    assert f": {image['layers'][0]} 1.0 MiB fetched" in text
    table = table_lines(text)
    assert table[1].startswith("docker.io/library/alpine:3.20 ") and table[1].endswith("  ok")


# Exit status 2: what the command cannot start with ##########################

@pytest.mark.parametrize("arguments, complaint", [
    pytest.param([], "name at least one image, or --file", id="no-image"),
    pytest.param(["Alpine"], "'Alpine': repository names must be lowercase", id="uppercase-name"),
    pytest.param(["alpine:bad!"], "'bad!' is not a valid tag", id="bad-tag"),
    pytest.param(["alpine", "--platform", "linux"], "'linux' is not a platform", id="bad-platform"),
    pytest.param(["--file", "{tmp}/missing.list"], "{tmp}/missing.list: No such file or directory",
                 id="missing-file"),
    pytest.param(["--file", "{tmp}"], "{tmp}: Is a directory", id="directory-as-file"),
    pytest.param(["--file", "{tmp}/bad.list"], "{tmp}/bad.list: line 2: ", id="bad-line-in-file"),
    pytest.param(["alpine", "--cache-dir", ""], "CACHE_DIR is empty", id="no-cache"),
])
def test_prefetch_exits_2_naming_what_is_wrong(tmp_path, arguments, complaint):
    (tmp_path / "bad.list").write_text("alpine:3.20\nghcr.io/o/a:1 linux\n")
    cache = tmp_path / "cache"
    argv = [sys.executable, SCRIPT, "prefetch", "--env-file", os.devnull, "--cache-dir", str(cache),
            "--upstream", "docker=http://127.0.0.1:9"]
    argv += [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    result = subprocess.run(argv, env=clean_environment(tmp_path, "dumb"), cwd=tmp_path, capture_output=True,
                            text=True, timeout=DEADLINE)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert complaint.replace("{tmp}", str(tmp_path)) in result.stderr
    assert result.stderr.startswith("dockerproxy.py prefetch: error: ")
    assert result.stdout == ""
    assert not cache.exists() or not any(cache.iterdir())
