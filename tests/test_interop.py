"""Real parts: Debian's docker-registry as the upstream, skopeo as the client.

Skipped with a loud reason when the tools are missing, except under CI
(REQUIRE_INTEROP=1), where a missing tool fails the run: a green CI always
means the real clients ran.
"""

import json
import os
import subprocess

import pytest

from realregistry import REGISTRY_BINARY, SKOPEO, RealRegistry, write_oci_image, write_oci_index

MISSING = [name for name, path in (("docker-registry", REGISTRY_BINARY), ("skopeo", SKOPEO)) if not path]
if MISSING:
    if os.environ.get("REQUIRE_INTEROP"):
        raise RuntimeError(f"REQUIRE_INTEROP is set but {', '.join(MISSING)} missing")
    pytest.skip(f"INTEROP TESTS SKIPPED: {', '.join(MISSING)} not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("registry")
    real = RealRegistry(workdir / "server")
    images = {"hello": write_oci_image(workdir / "hello", "latest")}
    real.push(workdir / "hello", "latest", "library/hello", "latest")
    images["multi"] = write_oci_index(workdir / "multi", "multi")
    real.push(workdir / "multi", "multi", "library/multi", "1", all_images=True)
    real.images = images
    yield real
    real.stop()


def skopeo(*args):
    result = subprocess.run([SKOPEO, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", ["library/hello", "hello"])
def test_skopeo_inspect_through_the_proxy_with_docker_route_on_a_real_registry(start_proxy, registry, name):
    proxy = start_proxy("--upstream", f"docker={registry.url}")
    answer = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{proxy.host}/{name}"))
    image = registry.images["hello"]
    assert answer["Digest"] == image["digest"]
    assert answer["Layers"] == image["layers"]


def test_skopeo_copies_every_platform_of_an_index_by_path_prefix(start_proxy, registry, tmp_path):
    proxy = start_proxy("--upstream", f"ghcr={registry.url}", "--upstream", f"docker={registry.url}")
    skopeo("copy", "--all", "--src-tls-verify=false",
           f"docker://{proxy.host}/ghcr.io/library/multi:1", f"dir:{tmp_path / 'out'}")
    for image in registry.images["multi"]["images"]:
        for digest in image["layers"] + [image["config"]]:
            assert (tmp_path / "out" / digest.split(":")[1]).exists()
