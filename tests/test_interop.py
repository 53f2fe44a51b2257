"""Independent MQTT clients (mosquitto's command-line tools) against our broker and echo."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess

import mqttools
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import ECHO_READY, MqttProbe, Spawner, tool, wait_until


def test_mosquitto_clients_round_trip_through_broker_and_echo(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    echo.wait_for(ECHO_READY)
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


def test_mqttools_round_trips_through_the_broker(spawn: Spawner, port: int) -> None:
    """mqttools, the library of this system's original one-process version, speaks MQTT 5
    only: its client and echo loop, in that program's style, through our broker."""
    broker = spawn.broker(port)

    async def ping_pong() -> bytes:
        echo = mqttools.Client("127.0.0.1", port, client_id="tools-echo", connect_delays=[0.1])
        ping = mqttools.Client("127.0.0.1", port, client_id="tools-ping", connect_delays=[0.1])
        await echo.start()
        await ping.start()
        try:
            await echo.subscribe("/ping")
            await ping.subscribe("/pong")
            ping.publish(mqttools.Message("/ping", b"1744796556"))
            message = await asyncio.wait_for(echo.messages.get(), 5)
            echo.publish(mqttools.Message("/pong", message.message))
            pong = await asyncio.wait_for(ping.messages.get(), 5)
            return bytes(pong.message)
        finally:
            await ping.stop()
            await echo.stop()

    assert asyncio.run(ping_pong()) == b"1744796556"
    broker.wait_for(r"Client tools-echo connected from .* \(MQTT 5\.0\)\.")


def test_paho_v5_with_properties_and_mosquitto_v5_tools_with_our_echo(
    spawn: Spawner, port: int
) -> None:
    """paho-mqtt with MQTTv5 and properties; mosquitto_pub/mosquitto_sub -V 5 through our
    echo client: versions mixed on one broker."""
    spawn.broker(port)
    got: list[paho.MQTTMessage] = []
    subscribed: list[object] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho-v5-sub", protocol=paho.MQTTv5)
    sub.on_message = lambda _c, _u, message: got.append(message)
    sub.on_subscribe = lambda _c, _u, _m, codes, _p: subscribed.append(codes)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    try:
        sub.subscribe("req/#", qos=1)
        wait_until(lambda: subscribed, 5, "paho's SUBACK")
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho-v5-pub",
                          protocol=paho.MQTTv5)  # fmt: skip
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "reply/me"
        props.CorrelationData = b"id-1"
        props.UserProperty = [("a", "1"), ("b", "2")]
        pub.publish("req/x", b"hello", qos=1, properties=props).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        wait_until(lambda: got, 5, "the message with its properties")
    finally:
        sub.loop_stop()
        sub.disconnect()
    message = got[0]
    assert message.payload == b"hello"
    assert message.properties.ResponseTopic == "reply/me"  # type: ignore[union-attr]
    assert message.properties.CorrelationData == b"id-1"  # type: ignore[union-attr]
    assert message.properties.UserProperty == [("a", "1"), ("b", "2")]  # type: ignore[union-attr]

    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    echo.wait_for(ECHO_READY)
    listener = subprocess.Popen(
        [tool("mosquitto_sub"), "-p", str(port), "-t", "/pong", "-C", "1", "-W", "10", "-V", "5"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # mosquitto_sub's subscription is in place when a pong reaches it; nothing logs that
        # earlier (a connect line is not a SUBACK). So: ping until it has its pong and exits.
        for _ in range(50):
            subprocess.run([tool("mosquitto_pub"), "-p", str(port), "-t", "/ping", "-m", "v5!",
                            "-V", "5"], check=True, timeout=10)  # fmt: skip
            with contextlib.suppress(subprocess.TimeoutExpired):
                listener.wait(0.2)
                break
        out, _ = listener.communicate(timeout=15)
    finally:
        listener.kill()
    assert out.strip() == "v5!"
    assert echo.count("Got b'v5!'") >= 1
