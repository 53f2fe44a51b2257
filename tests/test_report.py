"""`python -m ping_client.report`: a picture of a real run, and what it is drawn from."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from ping_client import plot
from tests.support import Spawner, fleet_through_a_broker_kill, free_port

DRAWS = importlib.util.find_spec("matplotlib") is not None
REQUIRED = "report" in os.environ.get("EXTRAS", "")
"""CI installs the extra (EXTRAS=dev,report): there the picture must be drawn."""


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def outage_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real run with the broker SIGKILLed in the middle: its JSON events and its log."""
    tmp = tmp_path_factory.mktemp("run")
    spawn = Spawner(tmp)
    try:
        port = free_port()
        broker = spawn.broker(port)
        spawn.start("echo_client", "--port", str(port), name="echo").wait_for(r"Subscribed to")
        ping = spawn.start("ping_client", "--port", str(port), "--count", "60", "--interval",
                           "0.05", "--timeout", "0.5", "--json", "--stats-interval", "0",
                           name="ping")  # fmt: skip
        ping.wait_for(r"seq 15, rtt", 10)
        broker.kill()
        ping.wait_for(r"Lost connection to", 5)
        spawn.broker(port)
        assert ping.wait(30) in (0, 1), ping.err()  # 1: some pings were lost to the outage
    finally:
        spawn.cleanup()
    events, log = tmp / "run.jsonl", tmp / "ping_client.log"
    events.write_text(ping.out())
    log.write_text(ping.err())
    return events, log


def test_a_run_is_read_from_its_events_and_from_its_log(outage_run: tuple[Path, Path]) -> None:
    events, log = outage_run
    from_events, from_log = plot.load(events), plot.load(log)
    for run in (from_events, from_log):
        assert len(run.rtts) >= 15
        assert len(run.rtts) + len(run.late) + len(run.lost) == 60
        assert len(run.outages) == 1
        start, end = run.outages[0]
        assert 0 < start < end
        # The pings lost were sent around the outage; answered ones before and after it.
        assert all(start - 1 < t < end + 1 for t in run.lost)
        assert min(t for t, _ in run.rtts) < start < max(t for t, _ in run.rtts)
        assert set(run.percentiles()) == {"p50", "p90", "p99"}
    assert len(from_events.rtts) == len(from_log.rtts)
    assert len(from_events.lost) == len(from_log.lost)


def test_the_title_says_what_was_pinged_how_when_and_the_figures(
    outage_run: tuple[Path, Path],
) -> None:
    events, log = outage_run
    titles = [plot.title(plot.load(source), source.name) for source in (events, log)]
    # The same facts from the events as from the log (the outage's length to the millisecond
    # may differ: the log's clock is its lines').
    assert [re.sub(r"\d\.\d{3} s without", "", t) for t in titles[:1]] == [
        re.sub(r"\d\.\d{3} s without", "", t) for t in titles[1:]
    ]
    head, figures = titles[0].split("\n")
    assert re.match(r"ping_client to 127\.0\.0\.1:\d+, MQTT 5, QoS 0, every 0\.05 s; "
                    r"\d{4}-\d\d-\d\d \d\d:\d\d$", head), head  # fmt: skip
    assert re.match(r"60 sent, \d+ received, \d+ lost.*; rtt min/avg/max [\d.]+/[\d.]+/[\d.]+ ms; "
                    r"1 outage, \d\.\d{3} s without a connection$", figures), figures  # fmt: skip


def test_a_log_of_several_runs_is_drawn_from_its_last(outage_run: tuple[Path, Path]) -> None:
    _, log = outage_run
    lines = log.read_text().splitlines()
    assert not plot.TIMESTAMP.match(lines[-1])  # the summary ends the log
    assert any(line.startswith("--- 127.0.0.1:") for line in lines)
    twice = [*lines, *lines[: len(lines) // 2]]  # a second run, under way
    assert plot.last_run(twice) == lines[: len(lines) // 2]
    assert plot.last_run([*lines, *lines]) == lines  # the second run ended: it is the last


@pytest.mark.skipif(not DRAWS and not REQUIRED, reason="the report extra is not installed")
def test_the_report_draws_a_png_of_the_run(
    outage_run: tuple[Path, Path], spawn: Spawner, tmp_path: Path
) -> None:
    events, _ = outage_run
    out = tmp_path / "run.png"
    result = spawn.run("ping_client.report", str(events), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert png_size(out) == (1000, 700)
    assert out.stat().st_size > 20_000  # drawn, not a blank canvas


@pytest.mark.skipif(not DRAWS, reason="the report extra is not installed")
def test_an_output_that_cannot_be_written_is_said_so(
    outage_run: tuple[Path, Path], spawn: Spawner, tmp_path: Path
) -> None:
    """sysexits' 73 (cannot create), not 66 (no input), and which file it could not write."""
    events, _ = outage_run
    out = tmp_path / "no such dir" / "run.png"
    result = spawn.run("ping_client.report", str(events), "-o", str(out))
    assert result.returncode == 73
    assert (
        result.stderr == f"ping_client.report: error: cannot write {out}: No such file or "
        "directory\n"
    )


@pytest.mark.skipif(DRAWS, reason="the report extra is installed")
def test_without_the_extra_the_report_says_how_to_get_it(
    outage_run: tuple[Path, Path], spawn: Spawner, tmp_path: Path
) -> None:
    events, _ = outage_run
    result = spawn.run("ping_client.report", str(events), "-o", str(tmp_path / "run.png"))
    assert result.returncode == 69
    assert result.stderr == (
        "ping_client.report: error: matplotlib is not installed: "
        "pip install -e '.[report]' (make report does)\n"
    )


def test_bad_input_is_one_line(spawn: Spawner, tmp_path: Path) -> None:
    missing = spawn.run("ping_client.report", str(tmp_path / "nothing.log"))
    assert missing.returncode == 66
    assert (
        missing.stderr
        == f"ping_client.report: error: {tmp_path / 'nothing.log'}: No such file or directory\n"
    )
    empty = tmp_path / "empty.log"
    empty.write_text("hello\n")
    result = spawn.run("ping_client.report", str(empty))
    assert result.returncode == 65
    assert result.stderr == f"ping_client.report: error: {empty}: no pings in it\n"


def test_the_benchmarks_scale_cells_become_rows() -> None:
    from bench import picture  # noqa: PLC0415 - bench is not an installed package

    cells = [("memory per idle subscribed connection (10,000)", "3.4 KiB", "1.7 KiB", "2.00x"),
             ("200 pings/s through our clients, p50", "0.859 ms (0 lost)", "0.877 ms (0 lost)",
              "0.98x"),
             ("CONNECT + SUBSCRIBE per second, sequential, median of 5 rounds", "8000.0 /s",
              "11000.0 /s", "0.71x (0.66-0.74)")]  # fmt: skip
    assert picture.scale_rows(cells) == [
        ("memory per idle subscribed connection (10,000)", 3.4, 1.7, "KiB", 2.0),
        ("200 pings/s through our clients, p50", 0.859, 0.877, "ms", 0.98),
        ("CONNECT + SUBSCRIBE per second, sequential, median of 5 rounds", 8000.0, 11000.0, "/s",
         0.71),
    ]  # fmt: skip


@pytest.mark.skipif(not DRAWS and not REQUIRED, reason="the report extra is not installed")
def test_the_benchmarks_picture_has_a_bar_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import picture  # noqa: PLC0415

    monkeypatch.setattr(picture, "PICTURE", tmp_path / "results.png")
    rows = [(f"metric {i}", 1.0, 1.0, "ms", 0.5 + i / 10) for i in range(12)]
    samples = {q: {"ours": [1.0, 1.1, 1.2], "mosquitto": [0.9, 1.0, 1.1]} for q in (0, 1)}
    assert picture.draw(rows, samples) == f"Picture: {tmp_path / 'results.png'}"
    width, height = png_size(tmp_path / "results.png")
    assert (width, height) == (1300, int((5.5 + 0.3 * 12) * 100))


def test_a_fleet_run_is_drawn_with_its_percentiles_and_its_devices_up(
    spawn: Spawner, tmp_path: Path
) -> None:
    """make report on a fleet's --json: the devices' pings keyed each by device and seq."""
    fleet, _ = fleet_through_a_broker_kill(spawn, free_port(), 10, "--interval", "0.1",
                                           "--deadline", "4")  # fmt: skip
    assert fleet.wait(15) in (0, 1)  # pings in the killed broker's hands may be lost
    events = tmp_path / "fleet.jsonl"
    events.write_text(fleet.out())
    run = plot.load(events)
    assert run.devices == 10
    assert run.facts["pace"] == "10 devices, each every 0.1 s"
    counts = [n for _, n in run.up]
    assert max(counts) == 10  # all up,
    assert 0 in counts  # all down at the kill,
    assert counts[-1] == 10  # and all back
    summary = [line for line in fleet.out().splitlines() if '"event":"summary"' in line]
    assert len(run.rtts) == json.loads(summary[0])["received"]  # no device's seq hid another's
    assert set(plot.per_second(run.rtts)) == {"p50", "p90", "p99"}
    if DRAWS:
        out = tmp_path / "fleet.png"
        result = spawn.run("ping_client.report", str(events), "-o", str(out))
        assert result.returncode == 0, result.stderr
        assert png_size(out) == (1000, 900)


def test_the_fleet_benchmark_places_each_lost_ping_by_when_it_was_sent() -> None:
    """Before the kill, while the broker died (before its device saw the loss), before the
    echo was back (the earliest ping sent after the kill that was answered), or later."""
    from bench.fleet import losses  # noqa: PLC0415 - bench is not an installed package

    kill = 100.0
    events = [
        {"event": "ping", "device": 0, "seq": 1, "time": 99.9},  # in flight at the kill
        {"event": "ping", "device": 1, "seq": 1, "time": 100.01},  # before device 1 saw it
        {"event": "disconnected", "device": 0, "time": 100.02},
        {"event": "disconnected", "device": 1, "time": 100.05},
        {"event": "ping", "device": 0, "seq": 2, "time": 100.3},  # back, the echo not yet
        {"event": "ping", "device": 1, "seq": 2, "time": 100.4},  # the first answered
        {"event": "pong", "device": 1, "seq": 2, "time": 100.401},
        {"event": "ping", "device": 0, "seq": 3, "time": 101.0},  # after the echo was back
        {"event": "disconnected", "device": 0, "time": 99.0},  # an outage before: not this one
        *({"event": "lost", "device": d, "seq": s} for d, s in ((0, 1), (1, 1), (0, 2), (0, 3))),
    ]
    assert losses(events, kill) == {"before the kill": 1, "while the broker died": 1,
                                    "before the echo was back": 1, "later": 1}  # fmt: skip


def test_the_fleet_benchmark_says_when_the_fleet_itself_was_the_bound() -> None:
    """A steady run whose fleet process used FLEET_BOUND CPU seconds a second or more measured
    its own queue: its RTT rows say so, for each broker's run on its own."""
    from bench.fleet import FLEET_BOUND, bound  # noqa: PLC0415 - bench is not installed

    def run(cpu: float) -> dict[str, Any]:
        return {"fleet_cpu_s": cpu, "summary": {"elapsed_s": 10.0}}

    assert bound(run(5.0)) == ""
    assert bound(run(10 * FLEET_BOUND)) == f"fleet-bound, {FLEET_BOUND:.2f} CPU s/s"
    assert bound(run(8.3)) == "fleet-bound, 0.83 CPU s/s"
