"""Table tests of the protection code's in-memory parts, called directly (no HTTP).

What this file proves, with conftest.MovableClock standing in for time:

  * ClientLimits lets exactly RATE_LIMIT_REQUESTS through at once, then
    refuses with 429 TOOMANYREQUESTS and a Retry-After that is exactly long
    enough; it never cuts a transfer that goes over RATE_LIMIT_BYTES but
    refuses the next request until the hour's bytes are paid back; it counts
    RATE_LIMIT_TRANSFERS in flight; it keys a client by IPv4 address or IPv6
    /64 (IPv4-mapped IPv6 as IPv4), exempts RATE_LIMIT_EXEMPT, and a spray of
    100,000 addresses leaves it bounded in count and memory without dropping
    a client whose download is in flight;
  * client_address believes X-Forwarded-For only from TRUSTED_PROXIES, and
    then only up to the rightmost address not in it;
  * ImagePolicy's globs (DENY wins, * crosses /), its @files with comments,
    reload() keeping the old patterns when a file is gone or bad; load_config
    refuses a pattern naming no registry of the route table, and Docker Hub
    routes are docker.io whatever their upstream;
  * parse_retry_after reads delay-seconds and HTTP dates, in every zone;
  * UpstreamBackoff, CircuitBreakers and UpstreamSlots hold back, cap,
    double, reset and refuse as their docstrings say, bounded in memory.
"""

import contextlib
import email.utils
import http.client
import io
import os
import threading
import time
import tracemalloc

import pytest

import dockerproxy
from conftest import MovableClock, proxy_config
from dockerproxy import ConfigError, RegistryError, UpstreamHeldBack, UpstreamUnavailable
from realregistry import wait_until


def retry_after(err):
    """The Retry-After of an error, in seconds."""
    return int(dict(err.headers)["Retry-After"])


# ClientLimits #################################################################

def limiter(requests=0, bytes_per_hour=0, transfers=0, exempt=""):
    return dockerproxy.ClientLimits(requests, bytes_per_hour, transfers,
                                    dockerproxy.parse_networks(exempt), MovableClock())


def refused(limits, key, transfer=False):
    """admit() must raise 429 TOOMANYREQUESTS: (the limit it names, its Retry-After)."""
    with pytest.raises(RegistryError) as caught:
        limits.admit(key, transfer)
    err = caught.value
    assert (err.status, err.code) == (429, "TOOMANYREQUESTS")
    return err.detail["limit"], retry_after(err)


# (RATE_LIMIT_REQUESTS, the Retry-After once the burst is spent): the bucket
# refills one request every 60/N seconds, rounded up to whole seconds.
REQUEST_LIMITS = [(1, 60), (7, 9), (20, 3), (60, 1)]


@pytest.mark.parametrize("per_minute, wait", REQUEST_LIMITS)
def test_requests_burst_then_retry_after_is_exactly_enough(per_minute, wait):
    limits = limiter(requests=per_minute)
    key = limits.key("192.0.2.1")
    for _ in range(per_minute):
        limits.admit(key, False)
    assert refused(limits, key) == ("RATE_LIMIT_REQUESTS", wait)
    limits.admit(limits.key("192.0.2.2"), False)  # another client has its own bucket
    limits.clock.advance(wait - 1)  # a second short of it: not yet a whole request refilled
    assert refused(limits, key)[0] == "RATE_LIMIT_REQUESTS"
    limits.clock.advance(1)
    limits.admit(key, False)
    assert refused(limits, key)[0] == "RATE_LIMIT_REQUESTS"  # that was one request, not a burst


def test_a_full_minute_refills_the_whole_burst_and_no_more():
    limits = limiter(requests=20)
    key = limits.key("192.0.2.1")
    for _ in range(20):
        limits.admit(key, False)
    limits.clock.advance(3600)  # an idle hour still holds one minute's allowance at most
    for _ in range(20):
        limits.admit(key, False)
    assert refused(limits, key) == ("RATE_LIMIT_REQUESTS", 3)


def test_bytes_over_the_hour_are_never_cut_but_refuse_the_next_request():
    # 7,200 bytes an hour is 2 a second: a 72,001-byte answer leaves the
    # balance at 7,200 - 72,001 = -64,801, paid back (to 1 byte) in 32,401 s.
    limits = limiter(bytes_per_hour=7200)
    key = limits.key("192.0.2.1")
    limits.admit(key, True)
    limits.done(key, 10 * 7200 + 1, True)  # ten hours' bytes in one answer: counted, not refused
    assert refused(limits, key) == ("RATE_LIMIT_BYTES", 32401)
    limits.clock.advance(32400)  # still one byte short
    assert refused(limits, key) == ("RATE_LIMIT_BYTES", 1)
    limits.clock.advance(1)
    limits.admit(key, False)


def test_transfers_in_flight_are_limited_and_freed_by_done():
    limits = limiter(transfers=2)
    key = limits.key("192.0.2.1")
    limits.admit(key, True)
    limits.admit(key, True)
    assert refused(limits, key, transfer=True) == ("RATE_LIMIT_TRANSFERS", 1)
    limits.admit(key, False)  # a manifest is no transfer
    limits.admit(limits.key("192.0.2.2"), True)  # nor is another client's download
    limits.done(key, 1000, True)
    limits.admit(key, True)
    assert refused(limits, key, transfer=True)[0] == "RATE_LIMIT_TRANSFERS"


# (RATE_LIMIT_EXEMPT, client address, the limits' key: None when exempt).
KEYS = [
    ("", "192.0.2.1", "192.0.2.1"),
    ("", "::ffff:10.0.0.1", "10.0.0.1"),                       # IPv4-mapped IPv6 is the IPv4 client
    ("", "2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # same /64, same key
    ("", "2001:db8:1:3::1", "2001:db8:1:3::/64"),              # the next /64: another key
    ("", "fe80::1%eth0", "fe80::/64"),                         # a zone is not part of it
    ("10.0.0.0/8", "10.1.2.3", None),
    ("10.0.0.0/8", "::ffff:10.1.2.3", None),
    ("10.0.0.0/8", "11.1.2.3", "11.1.2.3"),
    ("::ffff:10.0.0.0/104", "10.9.9.9", None),                 # a mapped CIDR is the IPv4 one
    ("2001:db8:1::/48", "2001:db8:1:7::9", None),
    ("2001:db8:1::/48", "2001:db8:2::9", "2001:db8:2::/64"),
]


@pytest.mark.parametrize("exempt, address, key", KEYS)
def test_limit_keys(exempt, address, key):
    assert limiter(requests=20, exempt=exempt).key(address) == key


def test_no_limit_set_means_no_key():
    assert limiter().key("192.0.2.1") is None


def test_one_ipv6_slash_64_shares_one_bucket():
    limits = limiter(requests=1)
    limits.admit(limits.key("2001:db8:1:2::1"), False)
    assert refused(limits, limits.key("2001:db8:1:2::abcd"))[0] == "RATE_LIMIT_REQUESTS"
    limits.admit(limits.key("2001:db8:1:3::1"), False)


# The limiter's memory for MAX_LIMITED_CLIENTS clients.  Its own comment says
# about 300 bytes a client (a ClientBudget of four slots and three floats, the
# key string, an OrderedDict entry); tracemalloc measures 280 to 330 on
# CPython 3.8 to 3.13, 14 to 16 MiB in all.  400 bytes a client (19 MiB)
# leaves room for other interpreters' layouts, yet is below the ~24 MiB that
# keeping all 100,000 sprayed clients costs: a limiter that forgot to forget
# fails this bound as well as the count.
MAX_LIMITER_BYTES = dockerproxy.MAX_LIMITED_CLIENTS * 400
SPRAYED_CLIENTS = 100_000


class StillClock(MovableClock):
    """A clock that moves only when the test moves it: a spray taking seconds refills nothing."""

    def __init__(self):
        super().__init__()
        self.start = time.monotonic()

    def time(self):
        return 1_700_000_000.0 + self.offset

    def monotonic(self):
        return self.start + self.offset


def still_limiter(**limits):
    limiter_ = limiter(**limits)
    limiter_.clock = StillClock()
    return limiter_


def sprayed(number):
    """The number-th address of a spray (IPv4: keys as long as a /64's, parsed faster)."""
    return f"10.{number >> 16}.{number >> 8 & 255}.{number & 255}"


def spray(limits, count):
    """One request from each of `count` new addresses: how many were admitted."""
    admitted = 0
    for number in range(count):
        try:
            limits.admit(limits.key(sprayed(number)), False)
            admitted += 1
        except RegistryError:
            pass
    return admitted


def test_a_spray_of_addresses_stays_bounded_and_keeps_downloads_in_flight():
    limits = still_limiter(requests=20, transfers=1)
    downloading = limits.key("192.0.2.1")
    limits.admit(downloading, True)  # the least recently used of all, its download in flight
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        admitted = spray(limits, SPRAYED_CLIENTS)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(limits) <= dockerproxy.MAX_LIMITED_CLIENTS
    assert used < MAX_LIMITER_BYTES, f"{used / 2 ** 20:.1f} MiB for {len(limits)} clients"
    # every remembered budget is still limiting its client: the newcomers beyond
    # the bound share one budget of 20 requests
    assert admitted == dockerproxy.MAX_LIMITED_CLIENTS - 2 + 20
    # still remembered: its transfer counts, a second one is refused
    assert refused(limits, downloading, transfer=True)[0] == "RATE_LIMIT_TRANSFERS"
    limits.done(downloading, 0, True)
    limits.admit(downloading, True)


def test_a_spray_of_addresses_never_hands_a_limited_client_a_fresh_allowance():
    limits = still_limiter(requests=5)
    limited = limits.key("192.0.2.1")
    for _ in range(5):
        limits.admit(limited, False)
    assert refused(limits, limited)[0] == "RATE_LIMIT_REQUESTS"
    spray(limits, dockerproxy.MAX_LIMITED_CLIENTS + 10)
    assert refused(limits, limited)[0] == "RATE_LIMIT_REQUESTS"  # not forgotten, not refilled


def test_budgets_full_again_make_room_for_new_clients():
    limits = still_limiter(requests=5)
    spray(limits, dockerproxy.MAX_LIMITED_CLIENTS)
    limits.clock.advance(dockerproxy.REQUEST_WINDOW)  # every budget has refilled: forgetting loses nothing
    newcomer = limits.key("192.0.2.1")
    for _ in range(5):
        assert limits.admit(newcomer, False) == newcomer  # its own budget, not the shared one
    assert len(limits) <= dockerproxy.MAX_LIMITED_CLIENTS


# client_address ###############################################################

PROXIES = "10.0.0.0/8, 2001:db8:f::/48"

# (socket peer, X-Forwarded-For lines (None: no headers at all), TRUST_PROXY_HEADERS,
#  TRUSTED_PROXIES, the client).
CLIENTS = [
    ("203.0.113.9", ["198.51.100.7"], False, PROXIES, "203.0.113.9"),        # peer not trusted
    ("203.0.113.9", ["198.51.100.7"], True, PROXIES, "203.0.113.9"),         # ... whatever else says so
    ("10.0.0.1", ["198.51.100.7"], False, PROXIES, "198.51.100.7"),
    ("10.0.0.1", ["6.6.6.6, 198.51.100.7"], False, PROXIES, "198.51.100.7"),  # the left is the client's
    ("10.0.0.1", ["6.6.6.6, 198.51.100.7, 10.0.0.3, 10.0.0.2"], False, PROXIES, "198.51.100.7"),
    ("10.0.0.1", ["6.6.6.6", "198.51.100.7, 10.0.0.2"], False, PROXIES, "198.51.100.7"),  # two lines
    ("10.0.0.1", [" 198.51.100.7 ,10.0.0.2 "], False, PROXIES, "198.51.100.7"),
    ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], False, PROXIES, "10.0.0.3"),       # all trusted: the farthest
    ("10.0.0.1", ["198.51.100.7, bogus, 10.0.0.2"], False, PROXIES, "10.0.0.2"),  # stops at garbage
    ("10.0.0.1", ["bogus"], False, PROXIES, "10.0.0.1"),
    ("10.0.0.1", [""], False, PROXIES, "10.0.0.1"),
    ("10.0.0.1", [], False, PROXIES, "10.0.0.1"),                           # no X-Forwarded-For
    ("10.0.0.1", None, False, PROXIES, "10.0.0.1"),
    ("10.0.0.1", ["::ffff:198.51.100.7"], False, PROXIES, "198.51.100.7"),
    ("10.0.0.1", ["2001:db8:1::7, 2001:db8:f::2"], False, PROXIES, "2001:db8:1::7"),
    ("::ffff:10.0.0.1", ["198.51.100.7"], False, PROXIES, "198.51.100.7"),    # IPv4-mapped trusted peer
    ("::ffff:203.0.113.9", ["198.51.100.7"], False, PROXIES, "203.0.113.9"),
    ("203.0.113.9", ["1.1.1.1, 198.51.100.7"], True, "", "198.51.100.7"),    # TRUST_PROXY_HEADERS alone
    ("203.0.113.9", ["198.51.100.7, bogus"], True, "", "203.0.113.9"),
    ("203.0.113.9", ["::ffff:198.51.100.7"], True, "", "198.51.100.7"),
    ("203.0.113.9", [], True, "", "203.0.113.9"),
    ("203.0.113.9", ["198.51.100.7"], False, "", "203.0.113.9"),            # nothing trusted
]


def forwarded_for(lines):
    """Request headers with these X-Forwarded-For lines, parsed as the server parses a request head."""
    if lines is None:
        return None
    head = "".join(f"X-Forwarded-For: {line}\r\n" for line in lines) + "Host: x\r\n\r\n"
    return http.client.parse_headers(io.BytesIO(head.encode("latin-1")))


@pytest.mark.parametrize("peer, lines, trust_headers, trusted, client", CLIENTS)
def test_client_address(peer, lines, trust_headers, trusted, client):
    trusted_proxies = dockerproxy.parse_networks(trusted)
    assert dockerproxy.client_address(peer, forwarded_for(lines), trust_headers, trusted_proxies) == client


# ImagePolicy, patterns, configuration #########################################

REGISTRIES = {"docker.io", "ghcr.io", "quay.io"}


def policy(allow=(), deny=()):
    return dockerproxy.ImagePolicy(tuple(allow), tuple(deny), REGISTRIES)


LIBRARY = ["docker.io/library/*"]
MYORG = ["ghcr.io/myorg/*"]

# (ALLOW_IMAGES, DENY_IMAGES, image, allowed?)
IMAGES = [
    ([], [], "docker.io/library/nginx", True),                     # no lists: everything
    ([], [], "quay.io/anyone/anything", True),
    (LIBRARY, [], "docker.io/library/nginx", True),
    (LIBRARY, [], "docker.io/bitnami/nginx", False),
    (LIBRARY, [], "ghcr.io/library/nginx", False),
    (LIBRARY, [], "Docker.io/Library/Nginx", True),                 # compared in lower case
    (MYORG, [], "ghcr.io/myorg/app", True),
    (MYORG, [], "ghcr.io/myorg/team/sub/app", True),                # * crosses /
    (MYORG, [], "ghcr.io/myorgx/app", False),
    (MYORG, [], "ghcr.io/other/myorg/app", False),                  # anchored at the start
    (LIBRARY + MYORG, [], "ghcr.io/myorg/app", True),
    (LIBRARY + MYORG, [], "quay.io/myorg/app", False),
    (["docker.io/library/nginx"], [], "docker.io/library/nginx-extra", False),  # and at the end
    (["docker.io/library"], [], "docker.io/library/nginx", False),
    (["docker.io/*"], [], "docker.io/library/nginx", True),
    (["*/library/nginx"], [], "quay.io/library/nginx", True),
    (LIBRARY, ["docker.io/library/nginx"], "docker.io/library/nginx", False),  # DENY wins
    (LIBRARY, ["docker.io/library/nginx"], "docker.io/library/alpine", True),
    ([], ["docker.io/evil/*"], "docker.io/evil/x", False),
    ([], ["docker.io/evil/*"], "docker.io/good/x", True),
    ([], ["*"], "ghcr.io/myorg/app", False),
    (["docker.io/library/alpin?"], [], "docker.io/library/alpine", True),
    (["docker.io/library/alpin?"], [], "docker.io/library/alpin", False),  # ? is exactly one
    (["docker.io/library/alpin?"], [], "docker.io/library/alpines", False),
    (["quay.io/[ab]*/app"], [], "quay.io/acme/app", True),
    (["quay.io/[ab]*/app"], [], "quay.io/zeta/app", False),
    (["quay.io/[!ab]*/app"], [], "quay.io/zeta/app", True),
    (["quay.io/[!ab]*/app"], [], "quay.io/acme/app", False),
    (["quay.io/[a-c]*"], [], "quay.io/bob/app", True),
]


@pytest.mark.parametrize("allow, deny, image, allowed", IMAGES)
def test_image_policy(allow, deny, image, allowed):
    assert policy(allow, deny).allows(image) is allowed


# (pattern, accepted?) as the settings parser and the pattern files check them.
PATTERNS = [
    ("docker.io/library/*", True),
    ("*/library/nginx", True),
    ("127.0.0.1:5000/team/*", True),
    ("quay.io/[a-c]?x", True),
    ("nginx", False),                    # no registry/
    ("docker.io/Library/*", False),      # upper case (the parser lowers what users write)
    ("docker.io/a b", False),
    ("docker.io/{a,b}", False),
    ("docker.io/x\n", False),
    ("", False),
    ("docker.io/" + "a" * 300, False),
]


@pytest.mark.parametrize("pattern, accepted", PATTERNS)
def test_check_pattern(pattern, accepted):
    if accepted:
        assert dockerproxy.check_pattern(pattern) == pattern
    else:
        with pytest.raises(ValueError):
            dockerproxy.check_pattern(pattern)


# Brackets fnmatch may turn into a regular expression re cannot compile
# (Python 3.8 and 3.9 do for a reversed range such as [z-a]).
ODD_BRACKETS = ["docker.io/[z-a]", "docker.io/[", "docker.io/[]", "docker.io/[!]", "docker.io/a]",
                "docker.io/[]]", "docker.io/[--a]"]


@pytest.mark.parametrize("pattern", ODD_BRACKETS)
def test_a_pattern_check_pattern_accepts_compiles(pattern):
    """Either the check refuses it (a ConfigError at start, a failed reload
    later), or it compiles: never an exception nobody expects."""
    try:
        dockerproxy.check_pattern(pattern)
    except ValueError:
        return
    policy(allow=[pattern])  # compiles its patterns now, as at start-up


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return "@" + str(path)


def test_pattern_files_have_comments_and_reload_takes_effect(tmp_path):
    allow_file = write(tmp_path / "allow.txt", "# our images\n"
                       "docker.io/library/*   # the official ones\n\n"
                       "GHCR.IO/MyOrg/*, quay.io/a/b\n")
    deny_file = write(tmp_path / "deny.txt", "docker.io/library/nginx\n")
    images = policy(allow=[allow_file, "docker.io/extra/*"], deny=[deny_file])
    assert [images.allows(image) for image in (
        "docker.io/library/alpine", "ghcr.io/myorg/app", "quay.io/a/b", "docker.io/extra/x",
        "docker.io/library/nginx", "docker.io/our")] == [True, True, True, True, False, False]
    write(tmp_path / "allow.txt", "docker.io/library/*\n")
    write(tmp_path / "deny.txt", "")
    assert images.reload() is True
    assert [images.allows(image) for image in (
        "docker.io/library/nginx", "ghcr.io/myorg/app", "docker.io/extra/x")] == [True, False, True]


@pytest.mark.parametrize("breakage", ["deleted", "bad pattern", "odd bracket"])
def test_a_failed_reload_keeps_the_old_patterns(tmp_path, breakage):
    allow_file = write(tmp_path / "allow.txt", "docker.io/library/*\n")
    images = policy(allow=[allow_file])
    if breakage == "deleted":
        (tmp_path / "allow.txt").unlink()
    elif breakage == "bad pattern":
        write(tmp_path / "allow.txt", "docker.io/library/*\nnginx\n")
    else:  # what re cannot compile on 3.8 and 3.9; on later ones a pattern matching nothing
        write(tmp_path / "allow.txt", "docker.io/[z-a]\n")
    reloaded = images.reload()  # must not raise, whatever the file holds
    if breakage != "odd bracket" or not reloaded:
        assert reloaded is False
        assert images.allows("docker.io/library/nginx")
        assert not images.allows("ghcr.io/myorg/app")


def test_an_allow_file_made_empty_allows_nothing(tmp_path):
    allow_file = write(tmp_path / "allow.txt", "docker.io/library/*\n")
    images = policy(allow=[allow_file])
    write(tmp_path / "allow.txt", "# nothing for now\n")
    assert images.reload() is True
    assert not images.allows("docker.io/library/nginx")
    assert not images.allows("ghcr.io/myorg/app")


@pytest.mark.parametrize("content", [None, "nginx\n"])
def test_a_bad_pattern_file_at_start_is_a_config_error(tmp_path, content):
    path = tmp_path / "allow.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match="ALLOW_IMAGES/DENY_IMAGES"):
        policy(allow=["@" + str(path)])


# (setting, value): patterns whose registry no route serves, or no pattern at all.
BAD_SETTINGS = [
    ("ALLOW_IMAGES", "library/nginx"),
    ("ALLOW_IMAGES", "docker.io/library/*,library/nginx"),
    ("DENY_IMAGES", "dockerhub.io/x/*"),
    ("DENY_IMAGES", "registry-1.docker.io/library/*"),  # Docker Hub's images are docker.io/...
    ("ALLOW_IMAGES", "nginx"),
]


@pytest.mark.parametrize("setting, value", BAD_SETTINGS)
def test_load_config_refuses_patterns_of_no_route(tmp_path, setting, value):
    with pytest.raises(ConfigError, match=setting):
        proxy_config(tmp_path, **{setting: value})


def test_load_config_refuses_a_bad_pattern_given_as_a_flag(tmp_path):
    with pytest.raises(ConfigError, match="DENY_IMAGES"):
        proxy_config(tmp_path, "--deny-images", "quay.io/ok/*, dockerhub.io/x/*")


def test_load_config_accepts_extra_routes_and_a_moved_docker_hub(tmp_path):
    config = proxy_config(tmp_path, "--upstream", "docker=http://127.0.0.1:5000",
                          EXTRA_ROUTES="mine=http://127.0.0.1:5001 corp=https://registry.example:5443",
                          ALLOW_IMAGES="docker.io/library/*, 127.0.0.1:5001/team/*, registry.example:5443/*",
                          DENY_IMAGES="*/library/evil")
    assert config.allow_images == ("docker.io/library/*", "127.0.0.1:5001/team/*", "registry.example:5443/*")
    routes = {route.name: route for route in config.routes}
    assert routes["docker"].upstream == "http://127.0.0.1:5000"
    names = {name: dockerproxy.registry_name(routes[name]) for name in ("docker", "docker-staging", "ghcr", "mine")}
    assert names == {"docker": "docker.io", "docker-staging": "docker.io", "ghcr": "ghcr.io",
                     "mine": "127.0.0.1:5001"}
    assert dockerproxy.image_name(routes["docker-staging"], "library/nginx") == "docker.io/library/nginx"


# parse_retry_after ############################################################

NOW = 1_700_000_000.0

# (Retry-After, seconds from NOW, 0 for now or past; None: not a delay or a date).
RETRY_AFTERS = [
    ("120", 120.0),
    (" 30 ", 30.0),
    ("1", 1.0),
    ("0", 0.0),                                               # now (note() still waits a second)
    ("9999999999", 9999999999.0),                             # huge: the callers cap it
    (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),    # an HTTP date ahead
    (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),     # and one gone by: now
    (email.utils.formatdate(NOW, usegmt=True), 0.0),
    ("1" * 40, float("1" * 40)),                              # longer still: the callers cap it
    ("soon", None),
    ("-5", None),
    ("1.5", None),
    ("", None),
    (None, None),
    ("Mon, 32 Foo 2023 99:99:99 GMT", None),
]


@pytest.mark.parametrize("value, seconds", RETRY_AFTERS)
def test_parse_retry_after(value, seconds):
    assert dockerproxy.parse_retry_after(value, NOW) == seconds


# The three HTTP-date formats RFC 9110 5.6.7 says a recipient MUST accept,
# all in GMT, NOW + 90 s.
AHEAD = time.gmtime(NOW + 90)
HTTP_DATES = {
    "IMF-fixdate": time.strftime("%a, %d %b %Y %H:%M:%S GMT", AHEAD),
    "RFC 850": time.strftime("%A, %d-%b-%y %H:%M:%S GMT", AHEAD),
    "asctime": time.asctime(AHEAD),  # C's asctime() format: "Sun Nov  6 08:49:37 1994"
}


@contextlib.contextmanager
def local_zone(zone):
    """The process's local time zone set to `zone` (a POSIX TZ string), then put back."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.parametrize("zone", ["UTC0", "EST5", "JST-9"])
@pytest.mark.parametrize("form", sorted(HTTP_DATES))
def test_retry_after_dates_are_gmt_whatever_the_local_zone(form, zone):
    with local_zone(zone):
        assert dockerproxy.parse_retry_after(HTTP_DATES[form], NOW) == 90.0


# UpstreamBackoff ##############################################################

HUB = "https://registry-1.docker.io"
GHCR = "https://ghcr.io"


def test_backoff_lasts_its_retry_after_per_upstream_and_identity():
    backoff = dockerproxy.UpstreamBackoff(MovableClock())
    assert backoff.note(HUB, None, "30") == 30
    assert 29 < backoff.remaining(HUB, None) <= 30
    assert backoff.remaining(HUB, "alice") == 0      # another identity: its own quota
    assert backoff.remaining(GHCR, None) == 0        # another upstream
    backoff.note(HUB, "alice", "100")
    backoff.clock.advance(29)
    assert 0 < backoff.remaining(HUB, None) <= 1
    backoff.clock.advance(1)
    assert backoff.remaining(HUB, None) == 0
    assert 69 < backoff.remaining(HUB, "alice") <= 70
    assert 69 < backoff.for_upstream(HUB) <= 70
    assert backoff.for_upstream(GHCR) == 0


# (Retry-After, the seconds note() keeps the upstream alone).
BACKOFFS = [
    (None, dockerproxy.DEFAULT_UPSTREAM_BACKOFF),
    ("", dockerproxy.DEFAULT_UPSTREAM_BACKOFF),
    ("later", dockerproxy.DEFAULT_UPSTREAM_BACKOFF),
    ("0", 1.0),                                               # "now": one second, not a loop of 429s
    ("1" * 40, dockerproxy.MAX_UPSTREAM_BACKOFF),
    ("120", 120),
    ("3600", dockerproxy.MAX_UPSTREAM_BACKOFF),
    ("9999999999", dockerproxy.MAX_UPSTREAM_BACKOFF),
    ("two hours ahead", dockerproxy.MAX_UPSTREAM_BACKOFF),
]


@pytest.mark.parametrize("header, seconds", BACKOFFS)
def test_backoff_default_and_cap(header, seconds):
    backoff = dockerproxy.UpstreamBackoff(MovableClock())
    if header == "two hours ahead":
        header = email.utils.formatdate(backoff.clock.time() + 7200, usegmt=True)
    assert backoff.note(HUB, "alice", header) == seconds
    assert seconds - 1 < backoff.remaining(HUB, "alice") <= seconds


def test_backoff_memory_is_bounded_dropping_expired_then_soonest():
    backoff = dockerproxy.UpstreamBackoff(MovableClock(), limit=3)
    for identity, seconds in (("a", "10"), ("b", "100"), ("c", "1000")):
        backoff.note(HUB, identity, seconds)
    backoff.clock.advance(20)
    backoff.note(HUB, "d", "50")  # "a" has expired: it goes
    backoff.note(HUB, "e", "500")  # none has: the soonest to end goes, "d"
    remembered = sorted(key[1] for key in backoff._until)  # (private: no public count)
    assert remembered == ["b", "c", "e"]
    for number in range(1000):
        backoff.note(GHCR, f"user{number}", "60")
    assert len(backoff._until) == 3
    assert backoff.remaining(GHCR, "user999") > 0  # the newest is always kept


# CircuitBreakers ##############################################################

BACKOFF = dockerproxy.BREAKER_BACKOFF


def breakers():
    return dockerproxy.CircuitBreakers([HUB], MovableClock())


def fail(circuits, times, origin=HUB):
    for _ in range(times):
        circuits.failed(origin)


def open_for_about(circuits, seconds):
    """Open for `seconds`, less what the test's own run has taken."""
    return seconds - 1 < circuits.open_for(HUB) <= seconds


def test_the_fifth_failure_in_a_row_opens_the_circuit():
    circuits = breakers()
    fail(circuits, dockerproxy.BREAKER_FAILURES - 1)
    assert circuits.open_for(HUB) == 0
    assert circuits.state(HUB) == {"open_seconds": 0.0, "failures_in_a_row": 4}
    fail(circuits, 1)
    assert open_for_about(circuits, BACKOFF)
    assert circuits.state(HUB)["failures_in_a_row"] == 5


def test_failures_while_open_do_not_extend_it():
    circuits = breakers()
    fail(circuits, 5)
    circuits.clock.advance(BACKOFF - 2)
    fail(circuits, 10)  # requests begun before it opened
    assert open_for_about(circuits, 2)
    circuits.clock.advance(2)
    assert circuits.open_for(HUB) == 0


def test_each_failed_retry_doubles_the_backoff_up_to_the_cap():
    circuits = breakers()
    fail(circuits, 5)
    previous = BACKOFF
    for expected in (10, 20, 40, 80, 120, 120):
        circuits.clock.advance(previous)
        assert circuits.open_for(HUB) == 0
        fail(circuits, 1)  # one try after the back-off, and it failed too
        assert open_for_about(circuits, expected)
        previous = expected
    assert expected == dockerproxy.MAX_BREAKER_BACKOFF


def test_a_success_closes_and_resets():
    circuits = breakers()
    fail(circuits, 5)
    circuits.clock.advance(BACKOFF)
    fail(circuits, 1)  # open again, for twice as long
    circuits.succeeded(HUB)
    assert circuits.state(HUB) == {"open_seconds": 0.0, "failures_in_a_row": 0}
    fail(circuits, 4)
    circuits.succeeded(HUB)
    fail(circuits, 4)  # the count started again at the success
    assert circuits.open_for(HUB) == 0
    fail(circuits, 1)
    assert open_for_about(circuits, BACKOFF)  # back to the first back-off


def test_unknown_origins_are_ignored():
    circuits = breakers()
    fail(circuits, 20, origin="https://cdn.example")
    circuits.succeeded("https://cdn.example")
    assert circuits.open_for("https://cdn.example") == 0
    assert circuits.state("https://cdn.example") == {"open_seconds": 0.0, "failures_in_a_row": 0}
    assert circuits.state(HUB)["failures_in_a_row"] == 0


# UpstreamSlots ################################################################

HOST = "registry-1.docker.io:443"


class Taker(threading.Thread):
    """slots.take(host) in a thread: .slot or .error once .finished is set."""

    def __init__(self, slots, host=HOST):
        super().__init__(daemon=True)
        self.slots, self.host = slots, host
        self.slot = self.error = None
        self.finished = threading.Event()

    def run(self):
        try:
            self.slot = self.slots.take(self.host)
        except UpstreamHeldBack as err:
            self.error = err
        finally:
            self.finished.set()


def waiting(slots, count):
    """Wait until `count` requests wait for a slot (private: no public count)."""
    wait_until(lambda: slots._waiting.get(HOST, 0) == count, what=f"{count} waiting for a slot")


def assert_busy_503(err):
    assert isinstance(err, UpstreamUnavailable)  # so the cache answers what it can
    assert (err.status, err.code, retry_after(err)) == (503, "UNAVAILABLE", dockerproxy.BUSY_RETRY_AFTER)


def test_a_request_beyond_the_limit_waits_for_a_slot():
    slots = dockerproxy.UpstreamSlots(2, patience=60)
    first, second = slots.take(HOST), slots.take(HOST)
    third = Taker(slots)
    third.start()
    waiting(slots, 1)
    assert not third.finished.is_set()
    slots.take("ghcr.io:443").release()  # another host has its own slots
    first.release()
    assert third.finished.wait(20) and third.error is None
    assert slots.in_flight(HOST) == 2 and slots._waiting == {}
    second.release()
    third.slot.release()
    assert slots.in_flight(HOST) == 0


def test_with_the_queue_full_a_request_is_refused_at_once():
    slots = dockerproxy.UpstreamSlots(2, patience=600)
    held = [slots.take(HOST), slots.take(HOST)]
    waiters = [Taker(slots), Taker(slots)]
    for waiter in waiters:
        waiter.start()
    waiting(slots, 2)
    extra = Taker(slots)
    extra.start()
    # refused without waiting: with a patience of 600 s a wait would not end in time
    assert extra.finished.wait(20), "the request beyond the queue waited"
    assert_busy_503(extra.error)
    for slot in held:
        slot.release()
    for waiter in waiters:
        assert waiter.finished.wait(20) and waiter.error is None
        waiter.slot.release()
    assert slots.in_flight(HOST) == 0 and slots._waiting == {}


def test_a_waiter_out_of_patience_gets_503():
    slots = dockerproxy.UpstreamSlots(1, patience=0.2)  # the code's own timeout
    held = slots.take(HOST)
    with pytest.raises(UpstreamHeldBack) as caught:
        slots.take(HOST)
    assert_busy_503(caught.value)
    assert slots._waiting == {}  # it left the queue
    held.release()
    slots.take(HOST).release()
    assert slots.in_flight(HOST) == 0


def test_a_slot_released_twice_is_given_back_once():
    slots = dockerproxy.UpstreamSlots(2, patience=60)
    first, second = slots.take(HOST), slots.take(HOST)
    first.release()
    first.release()
    assert slots.in_flight(HOST) == 1
    second.release()
    first.release()
    assert slots.in_flight(HOST) == 0
