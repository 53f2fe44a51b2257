"""broker/deferred.py: the broker program leaves out what amqtt imports but never uses, and
amqtt still works when a path that needs one of those modules is taken.

Each check runs in a fresh interpreter: stand-ins must go into ``sys.modules`` before amqtt is
imported, and this test process has imported amqtt already.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

from tests.mqtt_raw import RawClient, publish
from tests.support import PYTHON, REPO, Spawner, base_env, free_port

DEFERRED = ("yaml", "websockets", "importlib.metadata")

# `python -X importtime` writes one line per module the interpreter imports, e.g.
# "import time:       417 |      11463 |             yaml". The flag changes no import, so the
# broker process under it imports exactly what `python -m broker` does, on every Python version.
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", re.MULTILINE)


def imported(stderr: str) -> set[str]:
    """The modules an ``-X importtime`` run reports having imported."""
    return set(IMPORT_LINE.findall(stderr))


def run_python(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter from the repository; fail with its stderr if it fails."""
    done = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=base_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_broker_program_does_not_load_the_deferred_modules(spawn: Spawner, port: int) -> None:
    broker = spawn.broker(port, interpreter_args=("-X", "importtime"))
    # The broker has served a connect, a subscription and a delivery: whatever start-up and
    # the hot path import is imported by now.
    client = RawClient(port)
    client.connect("deferred-check")
    assert client.subscribe(1, ("t", 0)) == [0]
    client.send(publish("t", b"x"))
    assert client.message().payload == b"x"
    assert imported(broker.err()).isdisjoint(DEFERRED), sorted(
        imported(broker.err()) & set(DEFERRED)
    )
    # Control: the same reading sees all three when amqtt's broker is imported the ordinary
    # way, on this interpreter, so an empty answer above is not a blind check.
    plain = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", "import amqtt.broker"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=base_env(), check=True,
    )  # fmt: skip
    assert imported(plain.stderr) >= set(DEFERRED)


def test_stand_ins_leave_sys_modules_and_yaml_still_works(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listeners:\n  default:\n    type: tcp\n")
    out = run_python(f"""
        import sys
        from broker.deferred import import_amqtt, StandIn
        stood = import_amqtt()
        assert set(stood) >= {{"yaml", "websockets", "importlib.metadata"}}, stood
        assert not any(isinstance(m, StandIn) for m in sys.modules.values())
        assert "yaml" not in sys.modules and "websockets" not in sys.modules
        import amqtt.utils
        print(amqtt.utils.read_yaml_config({str(config)!r}))
        import yaml
        assert amqtt.utils.yaml is yaml and not isinstance(yaml, StandIn)
    """)
    assert out.strip() == "{'listeners': {'default': {'type': 'tcp'}}}"


def test_websockets_listener_works_through_the_stand_ins() -> None:
    port = free_port()
    out = run_python(f"""
        import asyncio, sys
        from broker.deferred import import_amqtt
        assert "websockets" in import_amqtt()
        from amqtt.broker import Broker

        async def main():
            broker = Broker({{
                "listeners": {{"default": {{"type": "ws", "bind": "127.0.0.1:{port}"}}}},
                "plugins": {{"broker.plugins.AllowAnonymous": {{}}}},
            }})
            await broker.start()
            from amqtt.client import MQTTClient
            import amqtt.adapters, websockets
            # Serving ws loaded websockets; the placeholder amqtt bound is now the real class.
            assert amqtt.adapters.ConnectionClosed is websockets.ConnectionClosed
            client = MQTTClient()
            await client.connect("ws://127.0.0.1:{port}/")
            await client.subscribe([("t", 0)])
            await client.publish("t", b"over websockets")
            message = await asyncio.wait_for(client.deliver_message(), 10)
            print(message.publish_packet.payload.data)
            await client.disconnect()
            await broker.shutdown()

        asyncio.run(main())
    """)
    assert out.strip() == "b'over websockets'"


def test_entry_point_plugins_load_through_the_forwarder() -> None:
    out = run_python("""
        import asyncio, warnings
        from broker.deferred import import_amqtt
        assert "importlib.metadata" in import_amqtt()
        from amqtt.contexts import BaseContext
        from amqtt.plugins.manager import PluginManager
        import amqtt.plugins.manager as manager

        async def main():
            # With no configuration, amqtt loads plugins by entry point (deprecated upstream).
            context = BaseContext()
            context.config = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                plugins = PluginManager("amqtt.broker.plugins", context)._plugins
            import importlib.metadata
            assert manager.EntryPoint is importlib.metadata.EntryPoint
            print(sorted(type(p).__name__ for p in plugins))

        asyncio.run(main())
    """)
    assert "AnonymousAuthPlugin" in out, out
