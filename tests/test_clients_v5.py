"""Our clients speak MQTT 5 by default: request/response, shared echo, and the 3.1.1 fallback."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.harness import BARE_AMQTT
from tests.hostile import Proxy, hostile_broker
from tests.support import (
    ECHO_READY,
    PYTHON,
    REPO,
    Spawner,
    base_env,
    free_port,
    port_accepts,
    reference_broker,
    tool,
    wait_until,
)


def test_the_clients_fall_back_to_311_once_against_a_311_only_broker(
    spawn: Spawner, port: int, tmp_path: Path
) -> None:
    """Bare amqtt 0.12.1 speaks only MQTT 3.1.1: it answers an MQTT 5 CONNECT with 3.1.1's
    CONNACK 0x01. The clients say so once and carry on in 3.1.1."""
    script = tmp_path / "bare_amqtt.py"
    script.write_text(BARE_AMQTT)  # the benchmark's bare amqtt broker
    bare = subprocess.Popen([PYTHON, str(script), str(port)], cwd=REPO)
    try:
        wait_until(lambda: port_accepts(port), 20, "bare amqtt listening")
        echo = spawn.start("echo_client", "--port", str(port), name="echo")
        echo.wait_for(ECHO_READY)
        result = spawn.run("ping_client", "--port", str(port), "--count", "3", "--interval", "0.1")
    finally:
        bare.terminate()
        bare.wait(10)
    assert result.returncode == 0, result.stderr
    fallback = (
        r"does not speak MQTT 5 \(.*Unsupported protocol version\): falling back to MQTT 3\.1\.1\."
    )
    assert echo.count(fallback) == 1
    assert len([line for line in result.stderr.splitlines() if "falling back" in line]) == 1


def test_a_ping_is_an_mqtt5_request(spawn: Spawner, port: int) -> None:
    """Section 4.10: response topic (the pong topic), correlation data (the payload: unique per
    ping), and a message expiry of --timeout, so that no echo comes after the ping is lost."""
    broker = spawn.broker(port)
    seen: list[paho.MQTTMessage] = []
    spy = paho.Client(CallbackAPIVersion.VERSION2, client_id="spy", protocol=paho.MQTTv5)
    spy.on_message = lambda _c, _u, message: seen.append(message)
    spy.connect("127.0.0.1", port)
    spy.loop_start()
    try:
        spy.subscribe("/ping")
        broker.wait_for(r"Client spy connected")
        spawn.start("echo_client", "--port", str(port), name="echo").wait_for(r"Subscribed to")
        result = spawn.run("ping_client", "--port", str(port), "--count", "2", "--interval",
                           "0.1", "--timeout", "3")  # fmt: skip
        wait_until(lambda: len(seen) >= 2, 5, "the pings")
    finally:
        spy.loop_stop()
        spy.disconnect()
    assert result.returncode == 0, result.stderr
    for message in seen[:2]:
        names = ("ResponseTopic", "CorrelationData", "MessageExpiryInterval")
        asked = {name: getattr(message.properties, name, None) for name in names}
        assert asked == {"ResponseTopic": "/pong", "CorrelationData": message.payload,
                         "MessageExpiryInterval": 3}  # fmt: skip


def assert_answered(port: int) -> None:
    """mosquitto_rr -V 5 asks on /ping with its own response topic and gets its answer there."""
    rr = subprocess.run(
        [tool("mosquitto_rr"), "-V", "5", "-p", str(port), "-t", "/ping", "-e", "/reply/me",
         "-m", "hello", "-W", "10"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert (rr.returncode, rr.stdout.strip()) == (0, "hello"), rr.stderr


def test_the_echo_answers_any_mqtt5_requester(spawn: Spawner, port: int) -> None:
    """mosquitto_rr -V 5 asks on /ping with its own response topic; the echo answers there."""
    spawn.broker(port)
    spawn.start("echo_client", "--port", str(port), name="echo").wait_for(r"Subscribed to /ping")
    assert_answered(port)


def test_a_response_topic_that_is_no_topic_name_is_not_fatal(
    spawn: Spawner, mosquitto: int
) -> None:
    """MQTT 5 forbids wildcards in a response topic; our broker refuses such a PUBLISH, but
    mosquitto 2.0 passes it on. The echo says so, answers on the pong topic, and goes on
    answering the next requester (it used to end with a traceback: one client took it down)."""
    echo = spawn.start("echo_client", "--port", str(mosquitto), name="echo")
    echo.wait_for(ECHO_READY)
    rude = subprocess.run(
        [tool("mosquitto_pub"), "-V", "5", "-p", str(mosquitto), "-t", "/ping", "-m", "rude",
         "-D", "publish", "response-topic", "/reply/#"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert rude.returncode == 0, rude.stderr
    echo.wait_for(r"Ignoring response topic '/reply/#': not a topic name\.")
    assert_answered(mosquitto)
    assert echo.popen.poll() is None
    assert "Traceback" not in echo.err()
    assert echo.count(r"Publishing b'rude' on /pong\.") == 1


def test_shared_echo_clients_split_the_pings_each_answered_once(spawn: Spawner, port: int) -> None:
    """--share GROUP: $share/GROUP/<ping topic> (MQTT 5 section 4.8.2)."""
    spawn.broker(port)
    echoes = [
        spawn.start("echo_client", "--port", str(port), "--share", "pool", name=f"echo{i}")
        for i in (1, 2)
    ]
    for echo in echoes:
        echo.wait_for(r"Subscribed to \$share/pool//ping, \$share/pool//ping/\+\.")
    result = spawn.run("ping_client", "--port", str(port), "--count", "20", "--interval", "0.02")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "20 sent, 20 received, 0 lost, 0 late, 0 duplicate" in result.stdout
    counts = [echo.count(r"echo_client: Got b'") for echo in echoes]
    assert sum(counts) == 20
    assert min(counts) > 0, counts


def test_the_clients_can_speak_311(spawn: Spawner, port: int) -> None:
    broker = spawn.broker(port)
    env = base_env(MQTT_PROTOCOL="3.1.1")
    spawn.start("echo_client", "--port", str(port), env=env, name="echo").wait_for("Subscribed")
    result = spawn.run("ping_client", "--port", str(port), "--count", "2", "--interval", "0.1",
                       env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert broker.count(r"connected from .* \(MQTT 3\.1\.1\)") == 3  # echo, ping, its watcher
    assert broker.count(r"\(MQTT 5\.0\)") == 0


def test_a_session_taken_over_says_so(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    first = spawn.start("echo_client", "--port", str(port), "--client-id", "twin", name="first")
    first.wait_for(ECHO_READY)
    spawn.start("echo_client", "--port", str(port), "--client-id", "twin", name="second")
    first.wait_for(r"session taken over: another client connected as 'twin'")


def test_our_clients_speak_mqtt5_with_mosquitto(spawn: Spawner, port: int, tmp_path: Path) -> None:
    """Our clients against the reference broker: MQTT 5, pings answered."""
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    assert Path(path).exists(), "mosquitto is not installed: apt-get install mosquitto"
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_type all\n")
    mosquitto = subprocess.Popen([path, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: port_accepts(port), 10, "mosquitto")
        echo = spawn.start("echo_client", "--port", str(port), name="echo")
        echo.wait_for(ECHO_READY)
        result = spawn.run("ping_client", "--port", str(port), "--count", "3", "--interval", "0.1")
    finally:
        mosquitto.terminate()
        _, log = mosquitto.communicate(timeout=10)
    assert result.returncode == 0, result.stderr
    assert "falling back" not in echo.err() + result.stderr
    assert log.count("p5") >= 3  # mosquitto logs each client's protocol: "p5" is MQTT 5


def test_our_clients_keep_to_the_maximum_qos_of_the_broker(
    spawn: Spawner, port: int, tmp_path: Path
) -> None:
    """--qos 2 through mosquitto with ``max_qos 1``: published at QoS 1, said once, answered.

    The clients published QoS 2 despite its CONNACK's Maximum QoS 1 [MQTT-3.2.2-11]; mosquitto
    disconnected them at every ping, paho sent the ping again on the next connection, and the
    probe lost every ping, saying only "Disconnected during message iteration".
    """
    with reference_broker(port, tmp_path, "max_qos 1\n"):
        echo = spawn.start("echo_client", "--port", str(port), "--qos", "2", name="echo")
        echo.wait_for(ECHO_READY)
        result = spawn.run("ping_client", "--port", str(port), "--qos", "2", "--count", "3",
                           "--interval", "0.1")  # fmt: skip
        wait_until(lambda: echo.count(r"Publishing b'[\d.]+' on /pong\.") == 3, 10, "3 echoes")
        echo_log = echo.err()  # before mosquitto stops: then the echo loses its connection
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 sent, 3 received, 0 lost" in result.stdout
    downgrade = (
        rf"127\.0\.0\.1:{port} takes at most QoS 1 \(its CONNACK's Maximum QoS\):"
        r" publishing at QoS 1, not 2\."
    )
    for log in (result.stderr, echo_log):
        assert len(re.findall(downgrade, log)) == 1, log
        assert "Lost connection" not in log
        assert " ERROR " not in log


def test_the_clients_fall_back_to_311_when_the_broker_hangs_up_on_mqtt5(
    spawn: Spawner, port: int
) -> None:
    """RabbitMQ 3.10 (MQTT 3.1.1 only) closes the connection on an MQTT 5 CONNECT without a
    CONNACK. The clients try 3.1.1 at once, say so once, and carry on in 3.1.1."""
    spawn.broker(port)
    proxy_port = free_port()
    proxy = Proxy(port, mqtt311_only=True)
    with hostile_broker(proxy_port, proxy):
        echo = spawn.start("echo_client", "--port", str(proxy_port), name="echo")
        echo.wait_for(ECHO_READY)
        result = spawn.run("ping_client", "--port", str(proxy_port), "--count", "3",
                           "--interval", "0.1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 received, 0 lost" in result.stdout
    fallback = (
        r"hung up on an MQTT 5 CONNECT without a CONNACK, and accepts MQTT 3\.1\.1: "
        r"falling back to MQTT 3\.1\.1\."
    )
    assert echo.count(fallback) == 1
    assert re.search(fallback, result.stderr), result.stderr
    for log in (echo.err(), result.stderr):
        assert "Cannot connect" not in log  # the trial is part of the first attempt
    assert proxy.hung_up == 3  # the echo client's link, the ping client's link and watcher


def test_a_broker_that_hangs_up_on_everyone_keeps_the_clients_on_mqtt5(
    spawn: Spawner, port: int
) -> None:
    """Hanging up on MQTT 5 says nothing if 3.1.1 fares no better: the clients report the MQTT
    5 attempt, try 3.1.1 once per outage, and speak 5 when the broker is back."""
    proxy = Proxy(0, mqtt311_only=True)  # hangs up on 5; on 3.1.1 it has no broker to reach
    with hostile_broker(port, proxy) as hostile:
        echo = spawn.start("echo_client", "--port", str(port), name="echo")
        echo.wait_for(r"Cannot connect to 127\.0\.0\.1:\d+: connection closed before CONNACK")
        wait_until(lambda: hostile.connections >= 6, 10, "more attempts")
    assert proxy.hung_up >= 3
    assert proxy.hung_up >= hostile.connections - 1  # one 3.1.1 trial, then MQTT 5 only
    broker = spawn.broker(port)
    echo.wait_for(ECHO_READY, 10)
    assert "falling back" not in echo.err()
    broker.wait_for(r"Client echo_client-\w+ connected from .* \(MQTT 5\.0\)\.")


def test_the_clients_log_the_reason_the_broker_gave(spawn: Spawner, port: int) -> None:
    """An MQTT 5 DISCONNECT's reason string (section 3.14.2.2.2) goes into the client's one
    line about the lost connection: here, the broker shutting down on SIGTERM."""
    broker = spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    echo.wait_for(ECHO_READY)
    broker.signal(signal.SIGTERM)
    assert broker.wait(10) == 0
    echo.wait_for(
        r"Lost connection to 127\.0\.0\.1:\d+: .*\(the broker said: server shutting down\)\. "
        r"Retrying every 100 ms\."
    )
