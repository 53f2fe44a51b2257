"""The gate of every test: a broker's internal error, panic or traceback fails the test."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import PYTHON, Proc, Spawner, broker_faults, check_broker_output

INTERNAL = (
    "2026-12-01 08:20:06.126 ERROR   broker: Client sub closed: internal error "
    "TypeError(\"'>=' not supported between instances of 'mqtt5.PubRecReasonCode' and 'int'\")."
)
PANIC = "thread '<unnamed>' (2907) panicked at pyo3-0.28.0/src/instance.rs:349:60:"


def test_a_normal_broker_log_passes() -> None:
    log = (
        "2026-12-01 08:20:06.119 INFO    broker: Listening on x.\n"
        "2026-12-01 08:20:06.200 WARNING broker: Client x closed: a protocol violation.\n"
    )
    check_broker_output("broker", log)  # returns: nothing in it is a bug


@pytest.mark.parametrize("line", [INTERNAL, PANIC, "Traceback (most recent call last):"])
def test_an_internal_error_a_panic_or_a_traceback_fails(line: str) -> None:
    assert broker_faults(f"ok\n{line}\nok") == [line]
    with pytest.raises(AssertionError, match="logged 1 internal error"):
        check_broker_output("broker", line)


def test_the_spawner_fails_a_test_whose_broker_logged_one(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A real process standing for a broker writes the line; cleanup then fails.

    Its files are kept outside this test's tmp_path, which the gate itself reads.
    """
    where = tmp_path_factory.mktemp("gate")
    spawner = Spawner(where)
    err = where / "broker-x.err"
    out = where / "broker-x.out"
    with out.open("wb") as o, err.open("wb") as e:
        popen = subprocess.Popen([PYTHON, "-c", f"import sys; sys.stderr.write({INTERNAL!r})"],
                                 stdout=o, stderr=e)  # fmt: skip
    popen.wait(10)
    spawner.procs.append(Proc("broker-x", popen, out, err, "broker"))
    with pytest.raises(AssertionError, match="internal error"):
        spawner.cleanup()
