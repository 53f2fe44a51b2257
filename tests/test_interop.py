"""Independent MQTT clients (mosquitto's command-line tools) against our broker and echo."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import mqttools
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import MqttProbe, Spawner, wait_until


def tool(name: str) -> str:
    """Return the path of a mosquitto command-line tool, or fail with how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install mosquitto-clients (.ci/run does)")
    return path


def test_mosquitto_clients_round_trip_through_broker_and_echo(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    echo.wait_for(r"Subscribed to /ping\.")
    sub = subprocess.Popen(
        [tool("mosquitto_sub"), "-p", str(port), "-t", "/pong", "-C", "1", "-W", "10", "-V", "311"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # mosquitto_sub prints nothing until subscribed; the broker logs its connect first.
        spawn.procs[0].wait_for(r"Client \S+ connected from .*\n(.|\n)*Client \S+ connected")
        # Publish until the subscription is certainly in place (-C 1 exits on the first echo).
        for _ in range(50):
            subprocess.run(
                [
                    tool("mosquitto_pub"),
                    "-p",
                    str(port),
                    "-t",
                    "/ping",
                    "-m",
                    "1744796556",
                    "-V",
                    "311",
                ],
                check=True,
                timeout=10,
            )
            try:
                out, _ = sub.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            pytest.fail("mosquitto_sub never received the echo")
    finally:
        sub.kill()
    assert out == "1744796556\n"
    assert sub.returncode == 0


# amqtt 0.12.1's MQTTClient leaves one socket unclosed after disconnect(): its leak, not ours.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_amqtt_client_qos_levels_and_retained(spawn: Spawner, port: int) -> None:
    """amqtt's own MQTTClient, an independent implementation of the client side."""
    import asyncio  # noqa: PLC0415 - only this test runs an event loop

    from amqtt.client import MQTTClient  # noqa: PLC0415
    from amqtt.mqtt.constants import QOS_1, QOS_2  # noqa: PLC0415

    spawn.broker(port)

    async def scenario() -> list[tuple[str, bytes, int, bool]]:
        uri = f"mqtt://127.0.0.1:{port}/"
        publisher = MQTTClient(client_id="amqtt-pub")
        subscriber = MQTTClient(client_id="amqtt-sub")
        await publisher.connect(uri)
        await publisher.publish("interop/retained", b"kept", qos=QOS_1, retain=True)
        await subscriber.connect(uri)
        await subscriber.subscribe([("interop/#", QOS_2)])
        await publisher.publish("interop/q1", b"one", qos=QOS_1)
        await publisher.publish("interop/q2", b"two", qos=QOS_2)
        got = []
        for _ in range(3):
            message = await subscriber.deliver_message(timeout_duration=5)
            assert message is not None
            got.append((message.topic, bytes(message.data), message.qos, message.retain))
        await publisher.publish("interop/retained", b"", qos=QOS_1, retain=True)
        await subscriber.disconnect()
        await publisher.disconnect()
        return got

    got = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert got == [
        ("interop/retained", b"kept", 1, True),
        ("interop/q1", b"one", 1, False),
        ("interop/q2", b"two", 2, False),
    ]


def test_paho_persistent_session_and_will(spawn: Spawner, port: int) -> None:
    """paho-mqtt used directly: clean_session=False resumes; an abrupt end publishes the will."""
    spawn.broker(port)
    watcher = MqttProbe(port, "paho-watcher")
    watcher.subscribe("interop/will")
    durable = MqttProbe(port, "paho-durable", clean_session=False)
    durable.subscribe("interop/durable", qos=1)
    durable.close()
    publisher = MqttProbe(port, "paho-pub")
    publisher.publish("interop/durable", b"while away", qos=1)
    back = MqttProbe(port, "paho-durable", clean_session=False)
    assert back.expect() == ("interop/durable", b"while away")
    back.close()
    doomed = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho-doomed",
                         protocol=paho.MQTTv311)  # fmt: skip
    doomed.will_set("interop/will", b"doomed", qos=1)
    doomed.connect("127.0.0.1", port)
    doomed.loop_start()
    wait_until(doomed.is_connected, 5, "paho CONNACK")
    sock = doomed.socket()
    assert sock is not None
    sock.close()  # abrupt: no DISCONNECT
    assert watcher.expect() == ("interop/will", b"doomed")
    doomed.loop_stop()
    watcher.close()
    publisher.close()


def test_mqtt5_clients_are_refused_at_once_in_a_form_they_read(spawn: Spawner, port: int) -> None:
    """The broker speaks MQTT 3.1.1. An MQTT 5 client gets CONNACK 0x84 in MQTT 5's form and
    says so at once; a 3.1.1 CONNACK left paho and mqttools waiting for their timeout."""
    broker = spawn.broker(port)
    reasons: list[object] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="v5-paho", protocol=paho.MQTTv5)
    client.on_connect = lambda _c, _u, _f, reason, _p: reasons.append(reason)
    client.connect("127.0.0.1", port)
    try:
        wait_until(lambda: client.loop(0.05) is not None and reasons, 5, "paho's CONNACK")
    finally:
        client.disconnect()
    assert str(reasons[0]) == "Unsupported protocol version"

    async def mqttools_connect() -> str:
        v5 = mqttools.Client("127.0.0.1", port, connect_delays=[], response_timeout=5)
        try:
            await v5.start()
        except mqttools.ConnectError as exc:
            return str(exc)
        await v5.stop()
        return "connected"

    assert asyncio.run(mqttools_connect()) == "UNSUPPORTED_PROTOCOL_VERSION(132)"
    broker.wait_for(r"Refused 127\.0\.0\.1:\d+: unsupported protocol MQTT level 5 \(MQTT 5\.0\)")
