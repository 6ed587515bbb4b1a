"""/metrics against the real Prometheus (Debian package prometheus): its parser,
its linter, its query API and its rule engine, not a parser of our own.

* `promtool check metrics` accepts the exposition after traffic (cold and warm
  pulls, an error answer, Docker Hub's rate-limit headers), lint included.
* README.md's two ```yaml blocks, the scrape config and the alert rules, are
  cut out of README.md itself, so what users copy is what is tested: `promtool
  check rules` passes on the rules, `promtool check config` on the scrape
  config with only its target and token file replaced.
* A prometheus server on a 127.0.0.1 port scrapes a proxy with that config
  (the ADMIN_TOKEN in its credentials_file) every second while a client pulls
  an image; its query API must give the exact counter deltas the pull implies,
  the same values the proxy's /metrics gives, the families' types and help.
  The README's rules, loaded into it, evaluate without error, and each alert
  goes pending on the data that should raise it: the fake upstream sends
  Docker Hub's `ratelimit-*` headers (5 of 100 left), and the proxy's reading
  of the disk is replaced by one of a disk 5 % free.

Skipped loudly when promtool or prometheus is missing, except under CI
(REQUIRE_INTEROP=1), where that fails, as the other interop tests do.
"""

import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import time
import urllib.parse

import pytest

import dockerproxy
from conftest import ROOT, RegistryClient, http_request
from realregistry import free_port, wait_until
from test_cache import ACCEPT_ALL, settled

REQUIRED = bool(os.environ.get("REQUIRE_INTEROP"))

TOKEN = "prometheus-scrape-token-0123456789"
JOB = "dockerproxy"                                       # the README's job_name
README_TARGET = "proxy.example:8080"                      # replaced by the test proxy's address
README_TOKEN_FILE = "/etc/prometheus/dockerproxy-token"   # replaced by a file holding TOKEN
QUOTA_ALERT = "DockerproxyDockerHubQuotaNearlySpent"
DISK_ALERT = "DockerproxyCacheDiskNearlyFull"
RATELIMIT = ("100;w=21600", "5;w=21600")                  # Docker Hub's form: 5 pulls of 100 left
GIB = 1 << 30

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def need(*tools):
    """Skip this test loudly when a tool is missing; fail instead under REQUIRE_INTEROP."""
    missing = [tool for tool in tools if not shutil.which(tool)]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not installed (Debian package prometheus)"
    if REQUIRED:
        pytest.fail(f"REQUIRE_INTEROP is set but {reason}", pytrace=False)
    pytest.skip(f"PROMETHEUS TEST SKIPPED: {reason}")


def run(command, input=None):
    result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


# README.md's snippets ######################################################

def readme_yaml(first_key):
    """The one ```yaml block of README.md whose first line is `<first_key>:`."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        text = file.read()
    blocks = [textwrap.dedent(match.group(2))
              for match in re.finditer(r"^( *)```yaml\n(.*?)^\1```", text, re.S | re.M)]
    found = [block for block in blocks if block.startswith(first_key + ":")]
    assert len(found) == 1, f"README.md has {len(found)} ```yaml blocks starting with {first_key}:, wants one"
    return found[0]


def prometheus_config(target, token_file, rules_file):
    """README's scrape config with only its target and token file replaced, after
    a global section of 1 s intervals and the README's rules as rule_files."""
    scrape = readme_yaml("scrape_configs")
    for placeholder, value in ((README_TARGET, target), (README_TOKEN_FILE, json.dumps(str(token_file)))):
        assert scrape.count(placeholder) == 1, f"README's scrape config names {placeholder!r} no longer once"
        scrape = scrape.replace(placeholder, value)
    assert re.search(rf"^\s*- job_name: {JOB}$", scrape, re.M), scrape
    return ("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(rules_file))}\n" + scrape)


# The proxy's side ###########################################################

def scrape(proxy):
    """The proxy's /metrics, as the text and as {(("__name__", name), (label, value), ...): value}."""
    status, headers, body = proxy.request("GET", "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4"), body
    text = body.decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        key = series_key(dict(LABEL.findall(labels or ""), __name__=name))
        assert key not in samples, f"series twice: {line!r}"  # neither promtool nor prometheus does
        samples[key] = float(value)
    return text, samples


def series_key(labels):
    """A series as a sorted tuple of its labels, without the ones the scrape adds."""
    return tuple(sorted((name, value) for name, value in labels.items() if name not in ("job", "instance")))


def docker_pull(proxy, repository, tag):
    """What docker does: GET /v2/ (a challenge without scope), a token for the
    repository's pull scope, the manifest by tag, then each blob it names.
    Six requests or more: (manifest bytes, blob bytes, number of blobs)."""
    status, headers, _ = proxy.request("GET", "/v2/")
    assert status == 401
    _, challenge = dockerproxy.parse_challenge(headers["WWW-Authenticate"])
    client = RegistryClient(proxy)
    client.token = client.fetch_token(dict(challenge, scope=f"repository:{repository}:pull"))
    assert client.token
    status, headers, manifest = client.request("GET", f"/v2/{repository}/manifests/{tag}", ACCEPT_ALL)
    assert status == 200, manifest
    listed = json.loads(manifest)
    digests = [listed["config"]["digest"]] + [layer["digest"] for layer in listed["layers"]]
    blob_bytes = 0
    for digest in digests:
        status, _, blob = client.request("GET", f"/v2/{repository}/blobs/{digest}")
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == digest
        blob_bytes += len(blob)
    settled(proxy)
    return len(manifest), blob_bytes, len(digests)


def client_requests_counted(proxy):
    """Requests of the pull's endpoints that the proxy has counted: a client has
    its answer a moment before the proxy's handler counts it."""
    metrics = proxy.server.proxy.metrics
    return sum(metrics.total("dockerproxy_http_requests_total", endpoint=endpoint)
               for endpoint in ("base", "auth", "manifest", "blob"))


# The Prometheus server ######################################################

class Prometheus:
    """A prometheus process on a free 127.0.0.1 port scraping `target` with the
    README's config; its config, rules, token file, TSDB and log in a temporary
    directory that stop() removes."""

    def __init__(self, target):
        self.directory = tempfile.mkdtemp(prefix="dockerproxy-prometheus-")
        self.rules_file = os.path.join(self.directory, "rules.yml")
        with open(self.rules_file, "w", encoding="utf-8") as file:
            file.write(readme_yaml("groups"))
        token_file = os.path.join(self.directory, "dockerproxy-token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
            file.write(TOKEN + "\n")
        self.config_file = os.path.join(self.directory, "prometheus.yml")
        with open(self.config_file, "w", encoding="utf-8") as file:
            file.write(prometheus_config(target, token_file, self.rules_file))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = os.path.join(self.directory, "prometheus.log")
        self.process = None

    def start(self):
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [shutil.which("prometheus"), f"--config.file={self.config_file}",
                 f"--storage.tsdb.path={os.path.join(self.directory, 'data')}",
                 f"--web.listen-address={self.url[len('http://'):]}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def ready():
            try:
                return http_request(self.url + "/-/ready", timeout=5)[0] == 200
            except OSError:
                return False
        self.wait(ready, "prometheus ready")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as file:
                return file.read()[-4000:]
        except OSError:
            return "(no log)"

    def wait(self, predicate, what, timeout=30, detail=None):
        """wait_until, failing at once with the log if prometheus exits; on a
        timeout the message has detail() (what prometheus says) and the log."""
        def check():
            assert self.process.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            return predicate()
        try:
            wait_until(check, timeout, 0.1, what)
        except TimeoutError as err:
            said = f"\n{detail()}" if detail else ""
            raise AssertionError(f"{err}{said}\nprometheus log:\n{self.log_tail()}") from None

    def api(self, path, **params):
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        status, _, body = http_request(url, timeout=10)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (url, status, body)
        return answer["data"]

    def query(self, expression):
        """An instant query now: {series_key: value}."""
        data = self.api("query", query=expression)
        assert data["resultType"] == "vector", data
        return {series_key(item["metric"]): float(item["value"][1]) for item in data["result"]}

    def target(self):
        """The one active target, or None before discovery."""
        targets = self.api("targets", state="active")["activeTargets"]
        assert len(targets) <= 1, targets
        return targets[0] if targets else None

    def alerts(self):
        """{alert name: alert} of the pending and firing alerts."""
        alerts = self.api("alerts")["alerts"]
        by_name = {alert["labels"]["alertname"]: alert for alert in alerts}
        assert len(by_name) == len(alerts), alerts
        return by_name

    def rules(self):
        """{rule name: rule} of every group, the group's name and file checked."""
        groups = self.api("rules")["groups"]
        assert [(group["name"], group["file"]) for group in groups] == [(JOB, self.rules_file)], groups
        return {rule["name"]: rule for rule in groups[0]["rules"]}


@pytest.fixture
def prometheus():
    """prometheus(target) -> a started Prometheus; each is stopped and its directory removed."""
    servers = []

    def start(target):
        server = Prometheus(target)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


# promtool ###################################################################

def test_promtool_check_metrics_accepts_the_exposition_after_traffic(start_proxy, fake):
    need("promtool")
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    fake.ratelimit = RATELIMIT
    fake.add_image("library/app", "1", [b"layer one" * 100, b"layer two" * 300])
    docker_pull(proxy, "library/app", "1")   # misses
    docker_pull(proxy, "library/app", "1")   # hits
    status, _, _ = RegistryClient(proxy).request("GET", "/v2/library/app/manifests/missing", ACCEPT_ALL)
    assert status == 404
    # each pull 6 requests (base, auth, manifest, 3 blobs), the 404 3 (a 401, auth, the 404)
    wait_until(lambda: client_requests_counted(proxy) >= 2 * 6 + 3, what="every request counted")
    text, samples = scrape(proxy)
    # what the text holds, so that promtool's verdict covers it: labelled counters
    # with values, a histogram with observations, the rate-limit gauges
    for key in [(("__name__", "dockerproxy_cache_requests_total"), ("result", result), ("type", "blob"))
                for result in ("hit", "miss")] + [
            (("__name__", "dockerproxy_http_request_duration_seconds_count"), ("endpoint", "blob")),
            (("__name__", "dockerproxy_http_requests_total"), ("code", "404"), ("endpoint", "manifest"),
             ("method", "GET"), ("route", "docker")),
            (("__name__", "dockerproxy_upstream_ratelimit_remaining"), ("route", "docker"))]:
        assert samples.get(key, 0) > 0, key

    status, output = run(["promtool", "check", "metrics"], input=text)
    # Exit status 0 and not a line printed: a lint finding (status 3) fails too.
    assert (status, output) == (0, ""), output


def test_promtool_check_rules_accepts_the_readme_rules(tmp_path):
    need("promtool")
    rules = readme_yaml("groups")
    assert set(re.findall(r"^\s*- alert: (\S+)$", rules, re.M)) == {DISK_ALERT, QUOTA_ALERT}
    # the expressions name metrics the proxy exports, by their exact names
    named = set(re.findall(r"\b(?:dockerproxy|registry_proxy|process)_[a-z_]+", rules))
    assert named and named <= set(dockerproxy.METRIC_FAMILIES), named - set(dockerproxy.METRIC_FAMILIES)
    path = tmp_path / "rules.yml"
    path.write_text(rules, encoding="utf-8")
    status, output = run(["promtool", "check", "rules", str(path)])
    assert status == 0 and "SUCCESS: 2 rules found" in output, output
    assert not re.search(r"warning|failed|error", output, re.I), output


def test_promtool_check_config_accepts_the_readme_scrape_config(tmp_path):
    need("promtool")
    token_file = tmp_path / "dockerproxy-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(readme_yaml("groups"), encoding="utf-8")
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config("127.0.0.1:8080", token_file, rules_file), encoding="utf-8")
    status, output = run(["promtool", "check", "config", str(config)])
    assert status == 0 and "SUCCESS: 2 rules found" in output, output
    assert not re.search(r"warning|failed|error", output, re.I), output


# A real Prometheus ##########################################################

# The series that only a pull changes (scrapes of /metrics count as endpoint
# "other"): a scrape by Prometheus and one by the test must agree on them.
STABLE = ("registry_proxy_.+|dockerproxy_cache_(requests|bytes_served|evictions|fill_waiters|verify_failures)_total"
          "|dockerproxy_cache_(size_bytes|limit_bytes|objects|disk_free_bytes|disk_size_bytes)|dockerproxy_upstream_.+"
          "|dockerproxy_http_requests_total|dockerproxy_http_request_duration_seconds_(bucket|count)"
          "|dockerproxy_start_time_seconds|dockerproxy_build_info")


def stable(samples):
    pattern = re.compile(STABLE)
    return {key: value for key, value in samples.items()
            if pattern.fullmatch(dict(key)["__name__"]) and dict(key).get("endpoint") != "other"}


def test_prometheus_scrapes_a_pull_and_raises_the_readme_alerts(start_proxy, fake, prometheus, monkeypatch):
    need("prometheus")
    disk = {"free": 50 * GIB, "size": 100 * GIB}
    monkeypatch.setattr(dockerproxy, "disk_space", lambda path: (disk["free"], disk["size"]))
    proxy = start_proxy("--upstream", f"docker={fake.url}", ADMIN_TOKEN=TOKEN)
    assert proxy.request("GET", "/metrics")[0] == 401  # so an "up" target used the token file
    fake.ratelimit = RATELIMIT
    image = fake.add_image("library/app", "1", [b"layer one" * 100, b"layer two" * 300])
    server = prometheus(proxy.host)
    selector = f'{{job="{JOB}",__name__=~"{STABLE}",endpoint!="other"}}'

    # Scraped with the README's config and the token in its credentials_file.
    server.wait(lambda: (server.target() or {}).get("health") == "up", "target up", detail=server.target)
    target = server.target()
    assert target["scrapeUrl"] == f"{proxy.url}/metrics" and target["lastError"] == "", target
    assert (target["labels"]["job"], target["labels"]["instance"]) == (JOB, proxy.host), target
    server.wait(lambda: server.query(selector), "the first samples")
    before = server.query(selector)
    assert not any(dict(key)["__name__"].startswith("dockerproxy_upstream_ratelimit") for key in before)

    # A pull; then a scrape that began after the proxy had counted all of it.
    manifest_bytes, blob_bytes, blobs = docker_pull(proxy, "library/app", "1")
    assert blobs == len(image["layers"]) + 1 == 3
    wait_until(lambda: client_requests_counted(proxy) == 3 + blobs, what="every request counted")
    pulled = time.time() + 0.05  # prometheus may move a scrape's timestamp a few ms to its schedule
    server.wait(lambda: server.query(f'timestamp(up{{job="{JOB}"}})')[()] > pulled, "a scrape after the pull")
    after = server.query(selector)

    def delta(name, **labels):
        key = series_key(dict(labels, __name__=name))
        assert key in after, f"Prometheus has no {key}"
        return after[key] - before.get(key, 0)

    for type_, misses in (("blob", blobs), ("manifest", 1)):
        assert {result: delta("dockerproxy_cache_requests_total", type=type_, result=result)
                for result in dockerproxy.CACHE_RESULTS} == {"hit": 0, "miss": misses, "stale": 0, "bypass": 0}
        assert delta("registry_proxy_requests_total", type=type_) == misses
        assert delta("registry_proxy_misses_total", type=type_) == misses
        assert delta("registry_proxy_hits_total", type=type_) == 0
    for type_, size in (("blob", blob_bytes), ("manifest", manifest_bytes)):
        assert delta("registry_proxy_pulled_bytes_total", type=type_) == size
        assert delta("registry_proxy_pushed_bytes_total", type=type_) == size
    assert delta("dockerproxy_cache_bytes_served_total", source="upstream") == blob_bytes + manifest_bytes
    assert delta("dockerproxy_cache_bytes_served_total", source="cache") == 0
    assert delta("dockerproxy_upstream_bytes_total", route="docker") >= blob_bytes + manifest_bytes
    http = {(endpoint, code): delta("dockerproxy_http_requests_total", route="docker", method="GET",
                                    endpoint=endpoint, code=code)
            for endpoint, code in (("base", "401"), ("auth", "200"), ("manifest", "200"), ("blob", "200"))}
    assert http == {("base", "401"): 1, ("auth", "200"): 1, ("manifest", "200"): 1, ("blob", "200"): blobs}
    assert delta("dockerproxy_http_request_duration_seconds_count", endpoint="blob") == blobs
    assert delta("dockerproxy_http_request_duration_seconds_bucket", endpoint="blob", le="+Inf") == blobs
    # what reached the fake upstream, answer by answer, is what the proxy counted
    answers = collections.Counter((record["method"], str(record["status"])) for record in fake.requests)
    assert {key: delta("dockerproxy_upstream_requests_total", route="docker", method=key[0], code=key[1])
            for key in answers} == dict(answers)
    assert after[series_key({"__name__": "dockerproxy_cache_objects"})] == blobs + 1
    assert after[series_key({"__name__": "dockerproxy_cache_size_bytes"})] == blob_bytes + manifest_bytes
    assert after[series_key({"__name__": "dockerproxy_upstream_ratelimit_remaining", "route": "docker"})] == 5
    assert after[series_key({"__name__": "dockerproxy_upstream_ratelimit_limit", "route": "docker"})] == 100
    quantile = server.query('histogram_quantile(0.5, dockerproxy_http_request_duration_seconds_bucket'
                            f'{{job="{JOB}",endpoint="blob"}})')
    assert list(quantile) == [(("endpoint", "blob"),)] and 0 < quantile[(("endpoint", "blob"),)] <= 300, quantile

    # The proxy's own /metrics says the same now, series for series.
    _, samples = scrape(proxy)
    assert stable(samples) == after
    # and Prometheus read every family's type and help (but those of a bucket and
    # peers, which this single-instance proxy does not have: tests/test_s3_*.py)
    metadata = server.api("metadata")
    for name, (kind, help_text, _) in dockerproxy.METRIC_FAMILIES.items():
        if name.startswith(("dockerproxy_s3_", "dockerproxy_peer_")):
            assert name not in metadata, name
            continue
        assert {"type": kind, "help": help_text, "unit": ""} in metadata.get(name, []), (name, metadata.get(name))

    # The README's rules: both evaluate without error; the quota one goes
    # pending on Docker Hub's headers, while the disk, half free, raises nothing.
    server.wait(lambda: QUOTA_ALERT in server.alerts(), f"{QUOTA_ALERT} pending", detail=server.rules)
    alerts = server.alerts()
    assert set(alerts) == {QUOTA_ALERT}, alerts
    quota = alerts[QUOTA_ALERT]
    assert quota["state"] in ("pending", "firing") and quota["labels"] == {
        "alertname": QUOTA_ALERT, "severity": "warning", "route": "docker", "job": JOB, "instance": proxy.host}
    assert quota["annotations"]["summary"] == f"dockerproxy {proxy.host}: 5 Docker Hub pulls left in this window"
    rules = server.rules()
    assert set(rules) == {DISK_ALERT, QUOTA_ALERT}
    for rule in rules.values():
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    assert rules[DISK_ALERT]["state"] == "inactive", rules[DISK_ALERT]

    # The disk 5 % free: the disk alert goes pending too.
    disk["free"] = 5 * GIB
    server.wait(lambda: DISK_ALERT in server.alerts(), f"{DISK_ALERT} pending", detail=server.rules)
    full = server.alerts()[DISK_ALERT]
    assert full["state"] in ("pending", "firing") and full["labels"] == {
        "alertname": DISK_ALERT, "severity": "warning", "job": JOB, "instance": proxy.host}
    assert full["annotations"]["summary"] == f"dockerproxy {proxy.host}: the cache's disk has 5% free"
    for rule in server.rules().values():
        assert rule["health"] == "ok" and not rule.get("lastError") and rule["state"] in ("pending", "firing"), rule
    # and Prometheus logged no warning or error (a rule that fails to evaluate is one)
    assert server.log_tail() == "", server.log_tail()
