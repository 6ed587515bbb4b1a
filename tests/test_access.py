"""The Access rule, table-tested without sockets: who may have cached bytes without asking upstream."""

import pytest

import dockerproxy
from conftest import MovableClock
from dockerproxy import ACCESS_TTL, ANONYMOUS_TOKEN, ANONYMOUS_TOKEN_TTL

UPSTREAM = "https://registry-1.docker.io"
OTHER_UPSTREAM = "https://ghcr.io"
REPOSITORY = "team/app"
DIGEST = "sha256:" + "a" * 64
ALICE, BOB = "Bearer alice-token", "Bearer bob-token"
PLACEHOLDER = f"Bearer {ANONYMOUS_TOKEN}"
OLD = ACCESS_TTL + 1


@pytest.fixture
def clock():
    return MovableClock()


@pytest.fixture
def access(tmp_path, clock):
    records = dockerproxy.AccessRecords(str(tmp_path), clock, dockerproxy.DiskTrouble())
    return dockerproxy.Access(records, clock)


def happened(clock, events):
    """Run (seconds ago, action) events oldest first, then bring the clock to the present."""
    start = max((ago for ago, _ in events), default=0)
    now = 0  # seconds since the oldest event
    for ago, action in sorted(events, key=lambda event: -event[0]):
        clock.advance(start - ago - now)
        now = start - ago
        action()
    clock.advance(start - now)


# linked, anonymous pull, grant (authorization, when): each in seconds ago; client, stale, allowed
LONG_AGO = OLD * 2
MAY_SERVE = [
    # rule 1: an object not linked to the repository is never served from the cache alone
    (None, 0, None, None, False, False),
    (None, 0, (ALICE, 0), ALICE, False, False),
    (None, 0, None, None, True, False),
    # rule 2, anonymous pulls: anyone, within ACCESS_TTL, at any age while upstream is down
    (LONG_AGO, 0, None, None, False, True),
    (LONG_AGO, 0, None, ALICE, False, True),
    (LONG_AGO, 0, None, PLACEHOLDER, False, True),
    (LONG_AGO, OLD, None, None, False, False),
    (LONG_AGO, OLD, None, ALICE, False, False),
    (LONG_AGO, OLD, None, None, True, True),
    (LONG_AGO, None, None, None, True, False),
    # ... but only for what was in the repository then: linked after the last anonymous pull, never
    (0, 5, None, None, False, False),
    (0, 5, None, None, True, False),
    (OLD, LONG_AGO, None, None, True, False),
    # rule 2, grants: only the credentials upstream accepted, only within ACCESS_TTL
    (LONG_AGO, None, (ALICE, 0), ALICE, False, True),
    (0, 5, (ALICE, 0), ALICE, False, True),
    (LONG_AGO, None, (ALICE, 0), BOB, False, False),
    (LONG_AGO, None, (ALICE, 0), None, False, False),
    (LONG_AGO, None, (ALICE, 0), PLACEHOLDER, False, False),
    (LONG_AGO, None, (ALICE, OLD), ALICE, False, False),
    (LONG_AGO, None, (ALICE, OLD), ALICE, True, False),
]


@pytest.mark.parametrize("linked_ago, anonymous_ago, grant, client, stale, allowed", MAY_SERVE)
def test_may_serve(access, clock, linked_ago, anonymous_ago, grant, client, stale, allowed):
    events = []
    if linked_ago is not None:
        events.append((linked_ago, lambda: access.records.link(UPSTREAM, REPOSITORY, [DIGEST])))
    if anonymous_ago is not None:
        events.append((anonymous_ago, lambda: access.record(None, UPSTREAM, REPOSITORY, [])))
    if grant is not None:
        authorization, ago = grant
        events.append((ago, lambda: access.record(access.identity(authorization), UPSTREAM, REPOSITORY, [])))
    happened(clock, events)
    identity = access.identity(client or "")
    assert access.may_serve(identity, UPSTREAM, REPOSITORY, DIGEST, stale) is allowed


def test_records_are_per_upstream_and_per_repository(access):
    alice = access.identity(ALICE)
    access.record(alice, UPSTREAM, REPOSITORY, [DIGEST])
    access.record(None, UPSTREAM, "library/alpine", [DIGEST])
    assert access.may_serve(alice, UPSTREAM, REPOSITORY, DIGEST)
    assert not access.may_serve(alice, OTHER_UPSTREAM, REPOSITORY, DIGEST)
    assert not access.may_serve(None, UPSTREAM, REPOSITORY, DIGEST)        # public elsewhere proves nothing here
    assert access.may_serve(None, UPSTREAM, "library/alpine", DIGEST)
    assert not access.may_serve(None, OTHER_UPSTREAM, "library/alpine", DIGEST)


def test_a_token_fetched_without_credentials_counts_as_anonymous_for_its_lifetime(access, clock):
    assert access.identity("Bearer t0ken") is not None
    access.note_anonymous_token("t0ken")
    assert access.identity("Bearer t0ken") is None
    assert access.identity("Bearer other") is not None
    clock.advance(ANONYMOUS_TOKEN_TTL + 1)
    assert access.identity("Bearer t0ken") is not None


def test_identities_are_hashes_never_the_credential(access):
    identity = access.identity(ALICE)
    assert "alice-token" not in identity and identity == access.identity(ALICE) != access.identity(BOB)


# started by, client, repository state, may join
MAY_JOIN = [
    (ALICE, ALICE, None, True),         # the same credentials follow their own fill
    (None, None, None, True),           # anonymous follows anonymous
    (ALICE, BOB, None, False),          # never another's private fill
    (ALICE, None, None, False),
    (None, ALICE, None, False),         # an anonymous fill of a repository not known public
    (ALICE, BOB, "public", True),       # a public repository: anyone
    (ALICE, BOB, "granted to client", True),
    (ALICE, BOB, "public long ago", False),
    (ALICE, None, "public, then the fill started", False),  # maybe private by then
]


@pytest.mark.parametrize("started_by, client, state, allowed", MAY_JOIN)
def test_may_join_a_fill(access, clock, started_by, client, state, allowed):
    started_at = clock.time()
    if state in ("public", "public long ago"):
        access.record(None, UPSTREAM, REPOSITORY, [])
    elif state == "granted to client":
        access.record(access.identity(client), UPSTREAM, REPOSITORY, [])
    elif state == "public, then the fill started":
        clock.advance(-5)
        access.record(None, UPSTREAM, REPOSITORY, [])
        clock.advance(5)
    if state == "public long ago":
        clock.advance(OLD)
    starter = access.identity(started_by) if started_by else None
    identity = access.identity(client) if client else None
    assert access.may_join(identity, starter, UPSTREAM, REPOSITORY, started_at) is allowed


def test_without_a_cache_nothing_is_served_from_one(clock):
    access = dockerproxy.Access(None, clock)
    access.record(None, UPSTREAM, REPOSITORY, [DIGEST])
    assert not access.may_serve(None, UPSTREAM, REPOSITORY, DIGEST, stale=True)


def test_the_rule_is_stated_where_it_is_implemented():
    rule = dockerproxy.Access.__doc__
    for words in ("linked", "ACCESS_TTL", "anonymous", "credentials", "HEAD", "fill"):
        assert words in rule


class StaleClock(dockerproxy.Clock):
    """A clock a thread read a moment ago: what record() saw before another thread marked."""

    def __init__(self, now):
        self.now = now

    def time(self):
        return self.now


def test_an_anonymous_pull_mark_is_never_moved_back_so_every_earlier_link_stays_servable(tmp_path):
    """Parallel downloads of one pull record their blobs at once: each links, then marks the
    repository public.  A mark written late with the time read early must not move the marker
    back before a link another thread made meanwhile (prefetch saw this with 3 downloads at once:
    a blob linked after that time was refused offline with 502)."""
    clock = StaleClock(1000.0)
    records = dockerproxy.AccessRecords(str(tmp_path), clock, dockerproxy.DiskTrouble())
    access = dockerproxy.Access(records, clock)
    access.record(None, UPSTREAM, REPOSITORY, [DIGEST])          # thread B: link at 1000, mark at 1000
    clock.now = 999.5                                             # thread A's time, read before B ran
    records.mark_public(UPSTREAM, REPOSITORY)                     # ... written after
    clock.now = 1001.0
    assert records.public_since(UPSTREAM, REPOSITORY) == 1000.0
    assert access.may_serve(None, UPSTREAM, REPOSITORY, DIGEST, stale=True)


def test_an_anonymous_pull_mark_far_ahead_of_the_clock_is_moved_back_to_now(tmp_path):
    """A marker more than MARK_SKEW ahead (the clock was stepped back, or another process's clock
    is skewed) is not kept: kept, it would hold the repository open long after ACCESS_TTL, and what
    was linked after it turned private would pass `linked <= since` (second attacker pass)."""
    clock = StaleClock(1000.0 + 86400)
    records = dockerproxy.AccessRecords(str(tmp_path), clock, dockerproxy.DiskTrouble())
    records.mark_public(UPSTREAM, REPOSITORY)                     # a day ahead
    clock.now = 1000.0                                            # stepped back
    records.mark_public(UPSTREAM, REPOSITORY)
    assert records.public_since(UPSTREAM, REPOSITORY) == 1000.0
