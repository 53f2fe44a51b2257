"""MQTT over WebSockets: clients nobody here wrote (paho, MQTT.js), raw frames, bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests import mqtt_raw as m
from tests.mqtt_raw import RawClient
from tests.support import (
    ECHO_READY,
    REPO,
    MqttProbe,
    Proc,
    Spawner,
    free_port,
    port_accepts,
    reference_broker,
    wait_until,
)

VERSIONS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}


@pytest.fixture
def ws_port() -> int:
    """A free port for the WebSocket listener."""
    return free_port()


def ws_broker(spawn: Spawner, port: int, ws_port: int, *args: str) -> Proc:
    """Start the broker with a WebSocket listener; wait until that listens."""
    broker = spawn.broker(port, "--ws-port", str(ws_port), *args)
    broker.wait_for(rf"Listening on 127\.0\.0\.1:{ws_port} for MQTT over WebSockets")
    return broker


def paho_client(
    version: str, port: int, *, websockets: bool, client_id: str, tls_ca: Path | None = None
) -> tuple[paho.Client, list[bytes], threading.Event]:
    """A connected paho client (over WebSockets or TCP) that collects what it receives."""
    got: list[bytes] = []
    arrived = threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=VERSIONS[version],
        transport="websockets" if websockets else "tcp",
    )
    if websockets:
        client.ws_set_options(path="/mqtt")
    if tls_ca is not None:
        client.tls_set(ca_certs=str(tls_ca))

    def on_message(_c: object, _u: object, message: paho.MQTTMessage) -> None:
        got.append(bytes(message.payload))
        arrived.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    wait_until(client.is_connected, 5, f"CONNACK for {client_id}")
    return client, got, arrived


def subscribed(client: paho.Client, topic: str, qos: int) -> None:
    """Subscribe and wait for the SUBACK."""
    done = threading.Event()
    client.on_subscribe = lambda *_a: done.set()
    client.subscribe(topic, qos)
    assert done.wait(5), f"no SUBACK for {topic}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("route", ["ws->ws", "tcp->ws", "ws->tcp"])
def test_paho_round_trips_over_websockets(  # noqa: PLR0917 - fixtures and the matrix
    spawn: Spawner, port: int, ws_port: int, version: str, qos: int, route: str
) -> None:
    ws_broker(spawn, port, ws_port)
    source, sink = route.split("->")
    sub_port = ws_port if sink == "ws" else port
    pub_port = ws_port if source == "ws" else port
    sub, got, _ = paho_client(version, sub_port, websockets=sink == "ws", client_id="sub")
    pub, _, _ = paho_client(version, pub_port, websockets=source == "ws", client_id="pub")
    try:
        subscribed(sub, "ws/t", qos)
        payload = bytes(range(256)) * 3  # binary, and longer than one small frame
        pub.publish("ws/t", payload, qos).wait_for_publish(5)
        pub.publish("ws/t", b"last", qos).wait_for_publish(5)
        # In order, once each: a duplicate of the first would come before the last.
        wait_until(lambda: b"last" in got, 5, "both messages")
        assert got == [payload, b"last"]
    finally:
        for client in (sub, pub):
            client.disconnect()
            client.loop_stop()


@pytest.mark.parametrize("version", ["4", "5"], ids=["3.1.1", "5"])
def test_mqttjs_round_trips_over_websockets(
    spawn: Spawner, port: int, ws_port: int, version: str
) -> None:
    node = shutil.which("node")
    modules = REPO / "web" / "node_modules"
    if node is None or not (modules / "mqtt").is_dir():
        pytest.fail("MQTT.js is not installed: make web (needs node and npm; .ci/run has them)")
    ws_broker(spawn, port, ws_port)
    result = subprocess.run(
        [node, str(REPO / "tests" / "mqttjs_roundtrip.js"), f"ws://127.0.0.1:{ws_port}/mqtt",
         version],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "NODE_PATH": str(modules)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(x["qos"], x["granted"], x["payload"]) for x in lines] == [
        (q, q, [0, 1, 2, 255, q]) for q in (0, 1, 2)
    ]


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_our_clients_ping_over_websockets(
    spawn: Spawner, port: int, ws_port: int, version: str
) -> None:
    """--transport websockets: the echo_client and the probe (one, then a fleet) through our
    broker's WebSocket port, at QoS 1; the logs name the broker by its ws:// URL."""
    ws_broker(spawn, port, ws_port)
    over_ws = ("--port", str(ws_port), "--transport", "websockets", "-V", version)
    echo = spawn.start("echo_client", *over_ws, "--qos", "1", name="echo")
    echo.wait_for(ECHO_READY)
    assert f"Connected to ws://127.0.0.1:{ws_port}/mqtt as " in echo.err()
    for fleet in ((), ("--devices", "3")):
        result = spawn.run("ping_client", *over_ws, "--qos", "1", "-c", "3", "-i", "0.05",
                           *fleet)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        sent = 9 if fleet else 3
        assert f"{sent} sent, {sent} received, 0 lost" in result.stdout, result.stdout
        assert f"ws://127.0.0.1:{ws_port}/mqtt" in result.stdout


def test_our_clients_ping_over_mosquittos_websockets(
    spawn: Spawner, port: int, ws_port: int, tmp_path: Path
) -> None:
    """Our clients over WebSockets through another broker: mosquitto's ``protocol
    websockets`` listener, MQTT 5."""
    with reference_broker(port, tmp_path, f"listener {ws_port} 127.0.0.1\nprotocol websockets\n"):
        wait_until(lambda: port_accepts(ws_port), 10, "mosquitto's WebSocket listener")
        over_ws = ("--port", str(ws_port), "--transport", "websockets")
        echo = spawn.start("echo_client", *over_ws, name="echo")
        echo.wait_for(ECHO_READY)
        result = spawn.run("ping_client", *over_ws, "-c", "3", "-i", "0.05")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 sent, 3 received, 0 lost" in result.stdout, result.stdout
    assert "falling back" not in result.stderr


def test_a_websocket_client_at_the_tcp_port_is_told_what_to_check(
    spawn: Spawner, port: int, ws_port: int
) -> None:
    """--transport websockets at the MQTT TCP port: exit 2, and the one line says to check the
    port and the path (paho keeps nothing of the broker's HTTP answer)."""
    ws_broker(spawn, port, ws_port)
    result = spawn.run("ping_client", "--port", str(port), "--transport", "websockets",
                       "-c", "1", "--connect-timeout", "1")  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"No usable link to ws://127.0.0.1:{port}/mqtt within 1 s: WebSocket handshake error,"
        " connection not upgraded (the HTTP upgrade was refused: is the port the broker's"
        " WebSocket port, and --ws-path its path?)."
    ) in result.stderr


def ws(ws_port: int, **kwargs: object) -> ClientConnection:
    """A raw WebSocket to the broker's MQTT path, with the mqtt subprotocol."""
    return connect(f"ws://127.0.0.1:{ws_port}/mqtt", subprotocols=["mqtt"],  # type: ignore[list-item]
                   open_timeout=5, **kwargs)  # type: ignore[arg-type] # fmt: skip


def test_packets_may_span_frames_and_frames_may_hold_several_packets(
    spawn: Spawner, port: int, ws_port: int
) -> None:
    ws_broker(spawn, port, ws_port)
    with ws(ws_port) as conn:
        assert conn.subprotocol == "mqtt"
        hello = m.connect("framed")
        conn.send(hello[:5])  # half a CONNECT in one message,
        conn.send(hello[5:])  # the rest in the next
        assert conn.recv(5) == b"\x20\x02\x00\x00"
        # SUBSCRIBE and PINGREQ in one frame; a PUBLISH fragmented over two frames of one message.
        conn.send(m.subscribe(1, ("f/t", 0)) + m.PINGREQ_PACKET)
        replies = b""
        while len(replies) < 7:
            replies += bytes(conn.recv(5))  # type: ignore[arg-type]
        assert replies == b"\x90\x03\x00\x01\x00\xd0\x00"
        data = m.publish("f/t", b"spanning")
        conn.send([data[:3], data[3:]])
        assert conn.recv(5) == data


def test_the_tcp_listener_and_the_websocket_one_share_everything(
    spawn: Spawner, port: int, ws_port: int
) -> None:
    """A will, retained messages and $SYS across both listeners; keepalive holds over WS."""
    broker = ws_broker(spawn, port, ws_port, "--sys-interval", "0.2")
    tcp = MqttProbe(port)
    tcp.subscribe("will/ws")
    tcp.subscribe("$SYS/broker/clients/connected")
    seen: list[tuple[str, bytes]] = []

    def heard(message: tuple[str, bytes]) -> bool:
        seen.extend(tcp.drain())
        return message in seen

    with ws(ws_port) as conn:
        conn.send(m.connect("silent", keepalive=1, will=("will/ws", b"gone", 1, False)))
        assert conn.recv(5) == b"\x20\x02\x00\x00"
        wait_until(lambda: heard(("$SYS/broker/clients/connected", b"2")), 5, "$SYS: 2 online")
        # Silent for more than 1.5 x keepalive: closed, and its will is published.
        wait_until(lambda: heard(("will/ws", b"gone")), 5, "the will")
        with pytest.raises(ConnectionClosed):
            conn.recv(5)
    broker.wait_for(r"Client silent closed: silent for more than 1\.5 s")
    tcp.close()


def test_a_text_frame_closes_with_1003_and_others_go_on(
    spawn: Spawner, port: int, ws_port: int
) -> None:
    broker = ws_broker(spawn, port, ws_port)
    with ws(ws_port) as conn:
        conn.send(m.connect("texter"))
        assert conn.recv(5) == b"\x20\x02\x00\x00"
        conn.send("CONNECT as text")
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1003
    broker.wait_for(r"Closed texter: a text frame; MQTT over WebSockets is binary")
    assert RawClient(port).connect("after") == (False, 0)


def test_a_frame_over_the_packet_limit_closes_with_1009(
    spawn: Spawner, port: int, ws_port: int
) -> None:
    broker = ws_broker(spawn, port, ws_port, "--max-packet-size", "1024")
    with ws(ws_port, max_size=None) as conn:
        conn.send(m.connect("big"))
        assert conn.recv(5) == b"\x20\x02\x00\x00"
        conn.send(m.publish("big/t", bytes(4000)))
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    broker.wait_for(r"Closed big: .*frame.*1024|Closed big: .*over size limit")


def http(ws_port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes to the WebSocket port and read until it closes."""
    with socket.create_connection(("127.0.0.1", ws_port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_bad_requests_get_a_clear_http_answer(spawn: Spawner, port: int, ws_port: int) -> None:
    broker = ws_broker(spawn, port, ws_port)
    key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\n" + key
    # An MQTT client on the wrong port.
    assert http(ws_port, m.connect("lost")).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    broker.wait_for(rf"not an HTTP request on the WebSocket port .*MQTT over TCP is on port {port}")
    # A wrong subprotocol, or none.
    wrong = b"GET /mqtt HTTP/1.1\r\nHost: x\r\n" + upgrade + b"Sec-WebSocket-Protocol: chat\r\n\r\n"
    assert http(ws_port, wrong).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    broker.wait_for(r"Refused a WebSocket upgrade from \S+: invalid subprotocol")
    none = b"GET /mqtt HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n"
    assert http(ws_port, none).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    broker.wait_for(r"Refused a WebSocket upgrade from \S+: missing subprotocol")
    # Another path; a plain GET of the MQTT path; a file outside the page.
    elsewhere = (
        b"GET /chat HTTP/1.1\r\nHost: x\r\n" + upgrade + b"Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
    assert http(ws_port, elsewhere).startswith(b"HTTP/1.1 404 Not Found\r\n")
    plain = http(ws_port, b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert plain.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    for path in (b"/../pyproject.toml", b"/node_modules/mqtt/package.json", b"/etc/passwd"):
        answer = http(ws_port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), path
    # Another method than GET: 405, not "not an HTTP request" and a 400 (curl -I, a POST).
    for method in (b"HEAD", b"POST"):
        answer = http(ws_port, method + b" / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\n"), answer
        broker.wait_for(rf"HTTP 405 for {method.decode()} from \S+: this port serves GET only")
    assert "not an HTTP request on the WebSocket port (did not" not in broker.err()
    assert "Traceback" not in broker.err()


def test_a_request_that_comes_a_line_at_a_time_is_served(
    spawn: Spawner, port: int, ws_port: int
) -> None:
    """As from telnet or a slow client: only the request's first bytes are its method. Its last
    line, empty, starts with a CR, and was taken for an MQTT client on the wrong port (400).

    The pause between lines shapes the input, so that each line is a read of its own; it waits
    for nothing, and the answer is checked whatever the reads were.
    """
    broker = ws_broker(spawn, port, ws_port)
    with socket.create_connection(("127.0.0.1", ws_port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for line in (b"GET /mqtt HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            sock.sendall(line)
            time.sleep(0.2)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 426 Upgrade Required\r\n"), answer
    assert "not an HTTP request" not in broker.err()


def test_a_slow_upgrade_is_cut_off_and_stalls_nobody(
    spawn: Spawner, port: int, ws_port: int
) -> None:
    broker = ws_broker(spawn, port, ws_port, "--handshake-timeout", "1")
    with socket.create_connection(("127.0.0.1", ws_port), timeout=5) as slow:
        slow.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        started = time.monotonic()
        with ws(ws_port) as conn:  # meanwhile, another client is served at once
            conn.send(m.connect("quick"))
            assert conn.recv(5) == b"\x20\x02\x00\x00"
        answer = b""
        while chunk := slow.recv(4096):
            answer += chunk
        assert time.monotonic() - started < 4
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    broker.wait_for(r"Closed \S+: no WebSocket upgrade within 1 s\.")


def test_the_page_and_mqttjs_are_served_and_the_tcp_port_points_there(
    spawn: Spawner, port: int, ws_port: int
) -> None:
    ws_broker(spawn, port, ws_port)
    page = http(ws_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert page.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"text/html" in page.split(b"\r\n\r\n", 1)[0]
    assert b'<script src="/mqtt.min.js">' in page
    script = http(ws_port, b"GET /mqtt.min.js HTTP/1.1\r\nHost: x\r\n\r\n")
    assert script.startswith(b"HTTP/1.1 200 OK\r\n"), script[:200]
    told = http(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert f"MQTT over WebSockets is at ws://127.0.0.1:{ws_port}/mqtt".encode() in told


def test_wss_carries_mqtt_with_the_tls_certificate(
    spawn: Spawner, port: int, ws_port: int, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    broker = spawn.broker(port, "--wss-port", str(ws_port), "--tls-cert", str(cert),
                          "--tls-key", str(key))  # fmt: skip
    broker.wait_for(rf"Listening on 127\.0\.0\.1:{ws_port} for MQTT over WebSockets \(wss://")
    sub, got, arrived = paho_client("5", ws_port, websockets=True, client_id="wss", tls_ca=cert)
    try:
        subscribed(sub, "wss/t", 1)
        publisher = MqttProbe(port)
        publisher.publish("wss/t", b"secret", 1)
        assert arrived.wait(5)
        assert got == [b"secret"]
        publisher.close()
    finally:
        sub.disconnect()
        sub.loop_stop()
    # Without trusting the certificate, the upgrade never happens.
    context = ssl.create_default_context()
    with pytest.raises((ssl.SSLError, InvalidStatus, OSError)):
        connect(f"wss://127.0.0.1:{ws_port}/mqtt", subprotocols=["mqtt"],  # type: ignore[list-item]
                ssl=context, open_timeout=5).close()  # fmt: skip


def test_without_mqttjs_the_page_says_what_to_run(
    spawn: Spawner, port: int, ws_port: int, tmp_path: Path
) -> None:
    page = tmp_path / "web"
    shutil.copytree(REPO / "web", page, ignore=shutil.ignore_patterns("node_modules"))
    ws_broker(spawn, port, ws_port, "--http-dir", str(page))
    missing = http(ws_port, b"GET /mqtt.min.js HTTP/1.1\r\nHost: x\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"/mqtt.min.js is not installed (run `make web` to install MQTT.js)." in missing


def test_websocket_clients_log_in_as_tcp_ones_do(
    spawn: Spawner, port: int, ws_port: int, password_file: Path
) -> None:
    broker = ws_broker(spawn, port, ws_port, "--password-file", str(password_file))
    with ws(ws_port) as conn:
        conn.send(m.connect("anon"))
        assert conn.recv(5) == b"\x20\x02\x00\x05"  # not authorized
    with ws(ws_port) as conn:
        conn.send(m.connect("alice-ws", username="alice", password="wonderland"))
        assert conn.recv(5) == b"\x20\x02\x00\x00"
    broker.wait_for(r"Client anon from \S+ refused: not authorized\.")
