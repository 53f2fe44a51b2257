"""Independent MQTT clients (mosquitto's command-line tools) against our broker and echo."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support import Spawner


def tool(name: str) -> str:
    """Return the path of a mosquitto command-line tool, or fail with how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install mosquitto-clients (.ci/run does)")
    return path


def test_mosquitto_clients_round_trip_through_broker_and_echo(spawn: Spawner, port: int) -> None:
    spawn.broker(port)
    echo = spawn.start("echo_client", "--port", str(port), name="echo")
    echo.wait_for("Connected to")
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
