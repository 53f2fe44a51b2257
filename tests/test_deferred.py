"""broker/deferred.py: the broker program leaves out what amqtt imports but never uses, and
amqtt still works when a path that needs one of those modules is taken.

Each check runs in a fresh interpreter: stand-ins must go into ``sys.modules`` before amqtt is
imported, and this test process has imported amqtt already.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

from tests.support import PYTHON, REPO, Spawner, base_env, free_port

# An extension module each of the deferred modules loads: visible in /proc/PID/maps, so the
# check reads the real broker process rather than trusting its word.
MARKERS = {
    "yaml": "/yaml/_yaml.",
    "websockets": "/websockets/speedups.",
    "importlib.metadata": "/_csv.",  # importlib.metadata imports csv
}


def loaded_markers(pid: int) -> set[str]:
    """The deferred modules whose extension module is mapped into process ``pid``."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {module for module, marker in MARKERS.items() if marker in maps}


def run_python(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter from the repository; fail with its stderr if it fails."""
    done = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=base_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_broker_program_does_not_load_the_deferred_modules(spawn: Spawner, port: int) -> None:
    broker = spawn.broker(port)
    assert loaded_markers(broker.popen.pid) == set()
    # Control: the same check sees all three in a process that imports amqtt the ordinary way.
    code = "import amqtt.broker, sys, time; print('imported', flush=True); time.sleep(60)"
    with subprocess.Popen(
        [PYTHON, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, env=base_env()
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "imported"
            assert loaded_markers(proc.pid) == set(MARKERS)
        finally:
            proc.kill()


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
