"""The probe's bookkeeping, driven with explicit times (no processes, no clock)."""

from __future__ import annotations

import pytest

from ping_client.probe import Tracker, Verdict, decimals_for, percentile, rtt_stats, stamp


def test_echo_matches_its_ping_and_times_it() -> None:
    t = Tracker(timeout=2.0)
    t.on_sent(b"100", now=10.0)
    t.on_sent(b"101", now=11.0)
    second = t.on_echo(b"101", now=11.002)
    first = t.on_echo(b"100", now=11.5)
    assert second.verdict is Verdict.MATCHED
    assert second.ping is not None
    assert second.ping.seq == 2
    assert second.rtt == pytest.approx(0.002)
    assert first.rtt == pytest.approx(1.5)
    assert (t.sent, t.received, t.lost) == (2, 2, 0)


def test_timeout_loses_a_ping_once_and_a_late_echo_is_not_double_counted() -> None:
    t = Tracker(timeout=0.5)
    t.on_sent(b"1", now=0.0)
    assert t.expire(now=0.49) == []
    lost = t.expire(now=0.5)
    assert [p.payload for p in lost] == [b"1"]
    assert t.expire(now=5.0) == []
    assert t.on_echo(b"1", now=0.7).verdict is Verdict.LATE
    assert t.on_echo(b"1", now=0.8).verdict is Verdict.DUPLICATE
    assert (t.sent, t.received, t.lost, t.late, t.duplicates) == (1, 0, 1, 1, 1)


def test_second_echo_is_a_duplicate() -> None:
    t = Tracker(timeout=2.0)
    t.on_sent(b"1", now=0.0)
    t.on_echo(b"1", now=0.1)
    assert t.on_echo(b"1", now=0.2).verdict is Verdict.DUPLICATE
    assert (t.received, t.duplicates) == (1, 1)


def test_echo_of_nothing_we_sent_is_unexpected_and_not_counted() -> None:
    t = Tracker(timeout=2.0)
    t.on_sent(b"1", now=0.0)
    assert t.on_echo(b"junk", now=0.1).verdict is Verdict.UNEXPECTED
    assert (t.received, t.duplicates, t.late, t.unexpected) == (0, 0, 0, 1)
    assert b"1" in t.outstanding


def test_another_clients_ping_with_our_payload_does_not_make_duplicates() -> None:
    t = Tracker(timeout=2.0)
    # Their ping goes first (we see it on /ping), then ours, with the same timestamp.
    t.on_ping_copy(b"7", now=0.0)
    assert t.on_echo(b"7", now=0.001).verdict is Verdict.FOREIGN
    t.on_sent(b"7", now=0.5)
    t.on_ping_copy(b"7", now=0.5001)  # our own copy
    assert t.on_echo(b"7", now=0.501).verdict is Verdict.MATCHED
    # Ours first, theirs after: their echo is theirs, not our duplicate.
    t.on_sent(b"8", now=1.0)
    t.on_ping_copy(b"8", now=1.0001)  # our own copy
    t.on_ping_copy(b"8", now=1.2)  # theirs
    assert t.on_echo(b"8", now=1.001).verdict is Verdict.MATCHED
    assert t.on_echo(b"8", now=1.201).verdict is Verdict.FOREIGN
    assert (t.sent, t.received, t.duplicates, t.unexpected) == (2, 2, 0, 0)


def test_a_strangers_echo_before_the_watcher_saw_its_ping_is_not_a_duplicate() -> None:
    """The watcher's connection can report another client's ping after its echo arrived."""
    t = Tracker(timeout=2.0, grace=0.5)
    t.on_sent(b"1.5", 0.0)
    t.on_ping_copy(b"1.5", 0.001)  # our own copy
    assert t.on_echo(b"1.5", 0.002).verdict is Verdict.MATCHED
    assert t.on_echo(b"1.5", 0.003).verdict is Verdict.UNSETTLED  # the stranger's echo, first
    t.on_ping_copy(b"1.5", 0.010)  # then the watcher sees the stranger's ping
    assert t.settle(1.0) == []
    assert (t.received, t.duplicates) == (1, 0)


def test_an_extra_echo_nothing_explains_is_a_duplicate_after_the_grace() -> None:
    t = Tracker(timeout=2.0, grace=0.5)
    t.on_sent(b"2.5", 0.0)
    t.on_ping_copy(b"2.5", 0.001)
    t.on_echo(b"2.5", 0.002)
    assert t.on_echo(b"2.5", 0.003).verdict is Verdict.UNSETTLED
    assert t.next_deadline() == pytest.approx(0.503)
    assert t.settle(0.4) == []  # not yet
    (ping,) = t.settle(0.6)
    assert ping.seq == 1
    assert t.duplicates == 1


def test_payloads_are_timestamps_unique_in_flight() -> None:
    t = Tracker(timeout=2.0)
    first = t.next_payload(1744796556.25, 0)
    assert first == b"1744796556"
    t.on_sent(first, now=0.0)
    assert t.next_payload(1744796556.75, 0) == b"1744796556.8"


def test_a_payload_another_publisher_just_used_is_not_used_again() -> None:
    """Two probes on one schedule send the same timestamps; the one that sees the other's ping
    first takes more digits, so no echo can be taken for the wrong probe's."""
    t = Tracker(timeout=2.0)
    t.on_ping_copy(b"1744796556.3", now=0.0)  # the other probe's ping, seen by our watcher
    assert t.next_payload(1744796556.31, 1) == b"1744796556.31"


@pytest.mark.parametrize(
    ("interval", "decimals"), [(1.0, 0), (2.5, 0), (0.5, 1), (0.1, 1), (0.05, 2), (0.01, 2)]
)
def test_sub_second_intervals_get_sub_second_digits(interval: float, decimals: int) -> None:
    assert decimals_for(interval) == decimals


def test_stamp_is_ascii_digits() -> None:
    assert stamp(1744796556.999, 0) == b"1744796556"
    assert stamp(1744796556.123456, 2) == b"1744796556.12"


def test_rtt_stats_like_ping() -> None:
    stats = rtt_stats([0.001, 0.002, 0.003, 0.004])
    assert stats is not None
    assert stats.minimum == 0.001
    assert stats.maximum == 0.004
    assert stats.average == pytest.approx(0.0025)
    assert stats.mdev == pytest.approx(0.001118, rel=1e-3)
    assert stats.p50 == 0.002
    assert rtt_stats([]) is None


def test_percentile_nearest_rank() -> None:
    data = [float(i) for i in range(1, 101)]
    assert percentile(data, 50) == 50.0
    assert percentile(data, 90) == 90.0
    assert percentile(data, 99) == 99.0
    assert percentile([5.0], 99) == 5.0


def test_forgotten_pings_free_memory() -> None:
    t = Tracker(timeout=0.1, memory=1.0)
    for i in range(100):
        t.on_sent(str(i).encode(), now=i * 0.01)
        t.on_echo(str(i).encode(), now=i * 0.01 + 0.001)
    t.expire(now=10.0)
    assert not t.known(b"5")
    assert t.on_echo(b"5", now=10.0).verdict is Verdict.UNEXPECTED
