"""Each program as a process: clean stop on signals, clear errors on bad input, no files."""

from __future__ import annotations

import configparser
import re
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from broker.settings import BrokerSettings
from common import cli
from common.constants import EXIT_FORCED
from common.lifecycle import CLIENT_SHUTDOWN_LIMIT
from tests.support import PYTHON, REPO, MqttProbe, Spawner, base_env, wait_until

PROGRAMS = ["broker", "ping_client", "echo_client"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_each_program_exits_0_on_signal(spawn: Spawner, port: int, signum: int) -> None:
    broker = spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    ping = spawn.start("ping_client", "--port", str(port), "--interval", "0.1", name="ping")
    ping.wait_for(r"client: Got b'\d+\.\d' on /pong")
    for proc in (ping, echo, broker):
        proc.signal(signum)
        assert proc.wait(5) == 0, proc.err()
    assert "Traceback" not in ping.err() + echo.err() + broker.err()
    assert "ping statistics" in ping.out()
    assert "Echoed" in echo.err()
    assert "Stopped." in broker.err()


def test_broker_reports_port_in_use(spawn: Spawner, port: int) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = spawn.run("broker", "--port", str(port), timeout=10)
    assert result.returncode == 69
    assert result.stderr == f"broker: error: port {port} on 127.0.0.1 is already in use\n"
    assert result.stdout == ""


def test_broker_reports_an_address_it_cannot_bind(spawn: Spawner) -> None:
    result = spawn.run("broker", "--host", "192.0.2.1", "--port", "0", timeout=10)
    assert result.returncode == 69
    assert result.stderr == "broker: error: address 192.0.2.1 is not an address of this machine\n"


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--port", "http"], {}, "argument --port: not a port number: 'http'"),
        ([], {"MQTT_PORT": "70000"}, "MQTT_PORT='70000': port must be 0..65535, got 70000"),
        (["--log-level", "loud"], {}, "log level must be one of"),
        ([], {"MQTT_LOG_LEVEL": "x"}, "MQTT_LOG_LEVEL='x'"),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ],
    ids=["bad-port-flag", "bad-port-env", "bad-level-flag", "bad-level-env", "unknown-flag"],
)
def test_malformed_settings_get_one_line_and_exit_64(
    spawn: Spawner, program: str, args: list[str], env: dict[str, str], needle: str
) -> None:
    result = spawn.run(program, *args, env=base_env(**env), timeout=10)
    assert result.returncode == 64
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{program}: error: ")
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--qos", "3"], "QoS must be 0, 1 or 2, got '3'"),
        (["--interval", "0"], "seconds must be a finite number > 0 and <= 4,294,967,295"),
        (["--interval", "nan"], "must be a finite number > 0 and <= 4,294,967,295, got 'nan'"),
        # Not "a finite number >= 0": the reason names what would have been accepted.
        (["--interval", "-1"], "must be a finite number > 0 and <= 4,294,967,295, got '-1'"),
        # The timeout is the ping's message expiry, a four-byte integer: it made a traceback.
        (["--timeout", "1e20"], "must be a finite number > 0 and <= 4,294,967,295, got '1e20'"),
        (["--stats-interval", "-1"], "must be a finite number >= 0 and <= 4,294,967,295"),
        (["--interval", "soon"], "not a number of seconds: 'soon'"),
        # Devices per second, not seconds.
        (["--devices", "2", "--connect-rate", "0"], "a rate per second must be a finite number"),
        (["--devices", "2", "--connect-rate", "fast"], "not a rate per second: 'fast'"),
        (["--ping-topic", "/a/+"], "must not contain '+' or '#'"),
        # Brokers drop a client's PUBLISH to $SYS/...: every ping was lost, silently.
        (["--ping-topic", "$SYS/ping"], "a topic starting with '$' is the broker's"),
        (["--ping-topic", "/same", "--pong-topic", "/same"], "/same"),
        (["--count", "-1"], "must be >= 1, got -1"),
        # Over four bytes, the CONNECT did not encode: a traceback at every connection attempt.
        (["--session-expiry", "5000000000"], "must be <= 4,294,967,295 (a four-byte field"),
        (["--size", "300000000"], "must be <= 268,304,334 bytes (the largest MQTT packet)"),
        (["--keepalive", "70000"], "must be <= 65535 (a two-byte field), got 70000"),
        # Not OpenSSL's "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found".
        (["--tls-ca", str(REPO / "README.md")], "README.md: holds no PEM certificate"),
        # MQTT strings have a two-byte length: these were tracebacks at the first CONNECT.
        (["--client-id", "x" * 70000], "must be at most 65,535 bytes of UTF-8"),
        (["--username", "é" * 40000], "(a two-byte length), got 80,000"),
        (["--devices", "200", "--client-id", "x" * 65530], "a device's topic would be over 65,535"),
    ],
)
def test_ping_client_rejects_bad_values(spawn: Spawner, args: list[str], needle: str) -> None:
    result = spawn.run("ping_client", *args, timeout=10)
    assert result.returncode == 64, result
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("ping_client: error: ")
    assert needle in result.stderr, result.stderr


def test_a_password_is_never_shown(spawn: Spawner) -> None:
    """Not in --help, where it was the default from MQTT_PASSWORD, nor in a refusal of it."""
    shown = spawn.run("ping_client", "--help", env=base_env(MQTT_PASSWORD="hunter2"), timeout=10)
    assert shown.returncode == 0
    assert "hunter2" not in shown.stdout
    assert "[env: MQTT_PASSWORD; default: set (not shown)]" in " ".join(shown.stdout.split())
    long = "hunter2" * 10000
    refused = spawn.run("echo_client", env=base_env(MQTT_PASSWORD=long), timeout=10)
    assert refused.returncode == 64
    assert "hunter2" not in refused.stderr
    assert "MQTT_PASSWORD=(not shown): must be at most 65,535 bytes" in refused.stderr


def test_echo_client_refuses_to_echo_onto_its_own_topic(spawn: Spawner) -> None:
    result = spawn.run("echo_client", "--pong-topic", "/ping", timeout=10)
    assert result.returncode == 64
    assert "the echo would feed itself" in result.stderr
    # Under the ping topic, the pong topic would be a device's ping topic, echoed again.
    result = spawn.run("echo_client", "--pong-topic", "/ping/pong", timeout=10)
    assert result.returncode == 64
    assert "is a device's ping topic under '/ping'" in result.stderr


def test_every_program_has_help(spawn: Spawner) -> None:
    for program in PROGRAMS:
        result = spawn.run(program, "--help", timeout=10)
        assert result.returncode == 0
        assert "MQTT_PORT" in result.stdout
        assert "--log-level" in result.stdout


def test_help_lists_the_exit_codes_and_says_each_default_once(spawn: Spawner) -> None:
    expected = {
        "broker": (0, 64, 69, 70, 78, 124),
        "ping_client": (0, 1, 2, 64, 69, 70, 124),
        "echo_client": (0, 64, 70, 124),
    }
    for program, codes in expected.items():
        text = spawn.run(program, "--help", timeout=10).stdout
        listed = [int(c) for c in re.findall(r"^  (\d+) ", text.split("exit status:")[1], re.M)]
        assert listed == list(codes), program
        flat = " ".join(text.split())
        assert not re.search(r"\(default: [^)]*\) \[env: \w+; default:", flat), program
        assert "default: ()" not in flat


def test_the_brokers_help_names_both_mqtt_versions(spawn: Spawner) -> None:
    result = spawn.run("broker", "--help", timeout=10)
    assert "MQTT 5.0 and 3.1.1 broker" in " ".join(result.stdout.split())


def test_broker_writes_no_file(spawn: Spawner, port: int, tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    env = base_env(HOME=str(sandbox), TMPDIR=str(sandbox), PYTHONDONTWRITEBYTECODE="1")
    broker = spawn.broker(port, env=env, cwd=sandbox)
    # Exercise what could persist: sessions, subscriptions, retained and QoS 1/2 messages.
    subscriber = MqttProbe(port, "keeper", clean_session=False)
    subscriber.subscribe("/keep/#", qos=2)
    publisher = MqttProbe(port)
    for qos in (0, 1, 2):
        publisher.publish(f"/keep/{qos}", b"payload", qos=qos)
    publisher.client.publish("/retained", b"kept", qos=1, retain=True).wait_for_publish(5)
    assert {subscriber.expect()[0] for _ in range(3)} == {"/keep/0", "/keep/1", "/keep/2"}
    subscriber.close()
    publisher.close()
    wait_until(lambda: broker.count("disconnected") >= 2, 5, "both disconnects logged")
    assert broker.stop() == 0
    assert list(sandbox.rglob("*")) == []


def test_qos1_echo_stops_cleanly_mid_traffic(spawn: Spawner, port: int) -> None:
    """Stopping while QoS 1 echoes are in flight leaves no traceback in the log."""
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), "--qos", "1", name="echo")
    ping = spawn.start("ping_client", "--port", str(port), "--qos", "1", "--interval", "0.01",
                       name="ping")  # fmt: skip
    wait_until(lambda: ping.count(r"client: Got b'") >= 20, 10, "QoS 1 pongs")
    echo.signal(signal.SIGTERM)
    assert echo.wait(5) == 0
    ping.signal(signal.SIGTERM)
    assert ping.wait(5) in (0, 1)  # pings in flight when the echo stopped may be lost
    assert "Traceback" not in echo.err() + ping.err()


def test_a_shutdown_the_watchdog_has_to_end_exits_124(tmp_path: Path) -> None:
    """A forced stop must not look like a clean one: exit 124 and one ERROR line."""
    # Fault injected: a program whose shutdown never finishes after SIGTERM.
    code = textwrap.dedent("""
        import asyncio, logging, sys
        from common.lifecycle import install_stop_handlers

        async def main():
            stop = asyncio.Event()
            install_stop_handlers(stop, hard_limit=0.5)
            print("ready", flush=True)
            await stop.wait()
            await asyncio.Event().wait()  # a shutdown that hangs

        logging.basicConfig(level=logging.INFO)
        asyncio.run(main())
    """)
    with (tmp_path / "err").open("w") as stderr, subprocess.Popen(
        [PYTHON, "-c", code], cwd=REPO, env=base_env(), text=True,
        stdout=subprocess.PIPE, stderr=stderr,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == EXIT_FORCED
    err = (tmp_path / "err").read_text()
    assert "Shutdown did not finish within 0.5 s: exiting anyway." in err
    assert "Traceback" not in err


def test_our_shutdown_bounds_act_before_supervisords() -> None:
    """Each program's own bound is at least a second under supervisord's stopwaitsecs."""
    conf = configparser.RawConfigParser()
    conf.read(REPO / "supervisord.conf")
    bounds = {
        "broker": BrokerSettings().shutdown_timeout + 1.0,  # broker/main.py's watchdog
        "ping_client": CLIENT_SHUTDOWN_LIMIT,
        "echo_client": CLIENT_SHUTDOWN_LIMIT,
    }
    for program, bound in bounds.items():
        assert conf.getfloat(f"program:{program}", "stopwaitsecs") >= bound + 1.0, program


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--max-keepalive", "70000"], {}, "must be <= 65535 (a two-byte field), got 70000"),
        ([], {"MQTT_MAX_KEEPALIVE": "0"}, "MQTT_MAX_KEEPALIVE='0': must be >= 1, got 0"),
        # No CONNECT fits in 10 bytes: every client would be closed (mosquitto refuses it too).
        (["--max-packet-size", "10"], {}, "must be >= 20 bytes (a CONNECT must fit), got 10"),
        # Over four bytes, it broke every MQTT 5 CONNACK with an internal error.
        ([], {"MQTT_MAX_PACKET_SIZE": "5000000000"}, "must be <= 268,435,460 bytes"),
        # Its watchdog's timer could not wait that long: a traceback at every shutdown.
        (["--shutdown-timeout", "1e20"], {}, "must be a finite number > 0 and <= 4,294,967,295"),
    ],
    ids=[
        "keepalive-flag",
        "keepalive-env",
        "packet-size-small",
        "packet-size-large",
        "shutdown-timeout",
    ],
)
def test_broker_rejects_a_limit_out_of_range(
    spawn: Spawner, args: list[str], env: dict[str, str], needle: str
) -> None:
    result = spawn.run("broker", *args, env=base_env(**env), timeout=10)
    assert result.returncode == 64
    assert result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("broker.example", ("broker.example", 10008)),
        ("127.0.0.1:1884", ("127.0.0.1", 1884)),
        ("::1", ("::1", 10008)),  # an IPv6 address alone keeps the --port
        ("[::1]:1884", ("::1", 1884)),
        ("[::1]", ("::1", 10008)),
    ],
)
def test_a_host_may_carry_its_port(given: str, expected: tuple[str, int]) -> None:
    assert cli.split_address(cli.broker_address(given), 10008) == expected


def test_an_ipv6_target_is_written_as_it_is_typed(spawn: Spawner) -> None:
    """[::1]:1, not "::1:1" (which reads as an address of its own), in the log and summary."""
    result = spawn.run("ping_client", "--host", "::1", "--port", "1", "-c", "1",
                       "--connect-timeout", "0.3", timeout=20)  # fmt: skip
    assert result.returncode == 2, result
    assert "--- [::1]:1 ping statistics ---" in result.stdout
    assert "Cannot connect to [::1]:1:" in result.stderr


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("host:", "not a port number"),
        ("host:99999", "must be 0..65535"),
        ("[::1]:x", "not a port number"),
        (" ", "not a host name or address"),
        # These went on to a DNS lookup, or said "not a host name or address: ' '".
        (":1883", "no host before the port"),
        ("host:1883:x", "not a host name or address"),
        ("[::1", "not a host name or address"),
        ("::1]:1883", "not a host name or address"),
        ("mqtt://host:1883", "not a URL"),
    ],
)
def test_a_malformed_host_and_port_is_refused(given: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        cli.broker_address(given)


def test_log_lines_read_as_the_standard_formatter_writes_them() -> None:
    """The formatter that formats the date once a second writes what logging's own would,
    within a second and across its boundary."""
    import logging  # noqa: PLC0415 - only this test needs it

    from common import logs  # noqa: PLC0415

    form = logs.FORMAT.format(label="broker")
    ours, standard = logs.Formatter(form, logs.DATEFMT), logging.Formatter(form, logs.DATEFMT)
    for created in (1796150000.001, 1796150000.999, 1796150001.0, 1796150000.5, 0.25):
        record = logging.LogRecord("broker", logging.INFO, __file__, 1, "Got %r.", (b"1",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)
