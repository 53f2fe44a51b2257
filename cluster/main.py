"""Set up, start and join a two-node RabbitMQ cluster on loopback, for our two clients.

``python -m cluster write`` lays out a directory (``run/cluster`` by default): a data and a
config directory per node, the MQTT plugin file, an Erlang cookie, and a supervisord.conf that
runs epmd, both nodes, the join, and then ping_client against node 1 and echo_client against
node 2. ``make cluster`` writes it and runs it with tools/run.sh, like ``make run``.

The nodes run RabbitMQ's own start script (``/usr/lib/rabbitmq/bin/rabbitmq-server`` on
Debian) as the current user. Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that switches
to the ``rabbitmq`` user and sends the node's output to /var/log/rabbitmq/startup_log; going
round it keeps every file in our directory and the node's log in ``logs/cluster/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common import logs
from common.constants import EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE

logger = logging.getLogger("cluster")

REPO = Path(__file__).resolve().parent.parent
NODES = ("pingpong1@localhost", "pingpong2@localhost")
DEFAULT_PORTS = (10011, 10012, 10013, 10014, 10015)
"""Node 1's and node 2's MQTT ports, their Erlang distribution ports, and epmd's."""
JOIN_DEADLINE = 120.0
"""Seconds the join waits for both nodes to listen (a node boots in about 10 s here)."""
EPMD_DEADLINE = 30.0


class ClusterError(Exception):
    """Something the user can fix; said in one line."""


@dataclass(frozen=True)
class Layout:
    """Where a cluster lives and which ports it uses; written to ``cluster.json``."""

    directory: str
    logs: str
    mqtt: tuple[int, int]
    dist: tuple[int, int]
    epmd: int
    bin: str
    """The directory of rabbitmq-server and rabbitmqctl."""

    @classmethod
    def load(cls, directory: Path) -> Layout:
        """Read the layout ``write`` left in ``directory``."""
        try:
            data = json.loads((directory / "cluster.json").read_text())
        except OSError as exc:
            raise ClusterError(f"{directory}: no cluster here ({exc.strerror})") from None
        mqtt1, mqtt2 = data["mqtt"]
        dist1, dist2 = data["dist"]
        return cls(
            data["directory"], data["logs"], (mqtt1, mqtt2), (dist1, dist2), data["epmd"],
            data["bin"],
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        """Return what every Erlang program here needs: the cookie's home, and epmd's port."""
        return {
            **os.environ,
            "HOME": str(Path(self.directory) / "home"),
            "ERL_EPMD_PORT": str(self.epmd),
        }

    def node_env(self, index: int) -> dict[str, str]:
        """Node ``index`` (0 or 1)'s environment for rabbitmq-server."""
        base = Path(self.directory) / f"node{index + 1}"
        return {
            **self.env(),
            "RABBITMQ_NODENAME": NODES[index],
            "RABBITMQ_DIST_PORT": str(self.dist[index]),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(Path(self.directory) / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),
            # epmd is a program of the supervisord.conf: a node must not start its own.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-start_epmd false",
        }


def find_rabbitmq() -> Path:
    """Return the directory holding RabbitMQ's own rabbitmq-server and rabbitmqctl scripts."""
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists():
        return debian
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise ClusterError(
            "RabbitMQ is not installed (Debian and Ubuntu: apt-get install rabbitmq-server)"
        )
    return Path(found).resolve().parent


def find_epmd() -> str:
    """Return Erlang's epmd (Debian's is on PATH; others keep it under erts-*/bin)."""
    found = shutil.which("epmd") or next(
        (str(p) for p in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None
    )
    if found is None:
        raise ClusterError("Erlang's epmd was not found (it comes with RabbitMQ's Erlang)")
    return found


NODE_CONF = """\
# Written by `python -m cluster write`; rewritten on every `make cluster`.
# MQTT only: no AMQP listener.
listeners.tcp = none
mqtt.listeners.tcp.default = {mqtt}
mqtt.allow_anonymous = true
# RabbitMQ's guest user (which anonymous MQTT clients are) may connect only from loopback by
# default; everything here is on loopback, but say it, as a cluster across hosts would need it.
loopback_users = none
# The node's log goes to its stdout, which supervisord writes to logs/cluster/rabbitN.log:
# one line per event, no colours.
log.console = true
log.console.level = info
log.console.use_colors = off
log.console.formatter.single_line = on
log.file = false
"""


def supervisord_conf(layout: Layout, python: str) -> str:
    """Return the supervisord.conf of a cluster run."""
    d, logs = layout.directory, layout.logs
    me = f"{python} -m cluster"

    def program(name: str, command: str, extra: str = "") -> str:
        # supervisord stops programs in reverse priority order: the clients first (the ping
        # client's summary is not spoiled by the nodes going away), epmd last.
        priority = ("epmd", "rabbit1", "rabbit2", "join", "echo_client", "ping_client").index(name)
        return (
            f"[program:{name}]\ncommand={command}\ndirectory={REPO}\npriority={10 + priority}\n"
            "autostart=true\n"
            f"autorestart=true\nstartsecs=1\nstartretries=3\nstopsignal=TERM\nstopwaitsecs=15\n"
            f"stopasgroup=true\nkillasgroup=true\nredirect_stderr=true\n"
            f"stdout_logfile={logs}/{name}.log\nstdout_logfile_maxbytes=10MB\n"
            f"stdout_logfile_backups=3\n{extra}\n"
        )

    return (
        "; Written by `python -m cluster write` (make cluster); rewritten on every run.\n"
        "; Control it: .venv/bin/supervisorctl -c " + f"{d}/supervisord.conf status\n\n"
        f"[unix_http_server]\nfile={d}/sv.sock\nchmod=0700\n\n"
        f"[supervisord]\nlogfile={logs}/supervisord.log\nlogfile_maxbytes=5MB\n"
        f"logfile_backups=2\npidfile={d}/supervisord.pid\ndirectory={REPO}\n"
        f"childlogdir={logs}\nnodaemon=false\nenvironment=PYTHONUNBUFFERED=\"1\"\n\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
        f"[supervisorctl]\nserverurl=unix://{d}/sv.sock\n\n"
        "; The Erlang port mapper the two nodes and rabbitmqctl find each other through, on a\n"
        "; port of its own, so that this cluster neither needs nor disturbs a system RabbitMQ.\n"
        + program("epmd", f"{find_epmd()} -port {layout.epmd}")
        + "; Each node waits for epmd, then runs rabbitmq-server in the foreground.\n"
        + program("rabbit1", f"{me} node 1 --dir {d}")
        + program("rabbit2", f"{me} node 2 --dir {d}")
        + "; Once both nodes listen: node 2 joins node 1, then the clients are started.\n"
        + program("join", f"{me} join --dir {d}",
                  "autorestart=unexpected\nexitcodes=0\nstartsecs=0\n")
        + "; Every round trip crosses the cluster: pings go to node 1, echoes come from node 2.\n"
        + program("echo_client", f"{python} -m echo_client --port {layout.mqtt[1]}",
                  "autostart=false\n")
        + program("ping_client", f"{python} -m ping_client --port {layout.mqtt[0]}",
                  "autostart=false\n")
    )  # fmt: skip


def write(directory: Path, logs: Path, ports: Sequence[int]) -> Path:
    """Lay out a fresh cluster in ``directory``; return its supervisord.conf."""
    directory, logs = directory.resolve(), logs.resolve()
    pidfile = directory / "supervisord.pid"
    if pidfile.exists() and _alive(pidfile):
        return directory / "supervisord.conf"  # running: tools/run.sh attaches to it
    bin_dir = find_rabbitmq()
    layout = Layout(
        str(directory), str(logs), (ports[0], ports[1]), (ports[2], ports[3]), ports[4],
        str(bin_dir),
    )  # fmt: skip
    for node in ("node1", "node2"):
        # A fresh cluster every time: a node's old data would remember an old membership.
        shutil.rmtree(directory / node, ignore_errors=True)
    home = directory / "home"
    home.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    if not cookie.exists():
        # Erlang refuses a cookie that others can read.
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
    (directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
    for index in (0, 1):
        base = directory / f"node{index + 1}"
        (base / "mnesia").mkdir(parents=True)
        (base / "log").mkdir()
        (base / "rabbitmq.conf").write_text(NODE_CONF.format(mqtt=layout.mqtt[index]))
    (directory / "cluster.json").write_text(json.dumps(asdict(layout), indent=2) + "\n")
    conf = directory / "supervisord.conf"
    conf.write_text(supervisord_conf(layout, sys.executable))
    return conf


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_ports(ports: Sequence[int], deadline: float, what: str) -> float:
    """Wait until every port accepts; return the seconds it took."""
    start = time.monotonic()
    while not all(_accepts(port) for port in ports):
        if time.monotonic() - start > deadline:
            raise ClusterError(f"{what} did not listen within {deadline:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - start


def node(layout: Layout, number: int) -> None:
    """Wait for epmd, then become node ``number``'s rabbitmq-server (never returns)."""
    _wait_for_ports([layout.epmd], EPMD_DEADLINE, f"epmd on port {layout.epmd}")
    server = str(Path(layout.bin) / "rabbitmq-server")
    logger.info("Starting %s (%s), MQTT on port %d.", NODES[number - 1], server,
                layout.mqtt[number - 1])  # fmt: skip
    os.execve(server, [server], layout.node_env(number - 1))  # noqa: S606 - RabbitMQ's script


def join(layout: Layout, conf: Path) -> None:
    """Join node 2 to node 1 once both listen, then start the clients."""
    waited = _wait_for_ports(layout.mqtt, JOIN_DEADLINE, "the two RabbitMQ nodes")
    logger.info("Both nodes listen (after %.1f s); joining %s to %s.", waited, NODES[1], NODES[0])
    start = time.monotonic()
    ctl = str(Path(layout.bin) / "rabbitmqctl")
    for args in (["stop_app"], ["join_cluster", NODES[0]], ["start_app"]):
        done = subprocess.run(  # noqa: S603 - RabbitMQ's own tool, fixed arguments
            [ctl, "-n", NODES[1], *args], env=layout.env(), capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        output = (done.stdout + done.stderr).strip()
        if done.returncode != 0 and "already_member" not in output:
            last = output.splitlines()[-1] if output else f"exit {done.returncode}"
            raise ClusterError(f"rabbitmqctl {' '.join(args)} failed: {last}")
    _wait_for_ports(layout.mqtt, JOIN_DEADLINE, f"{NODES[1]} after joining")
    logger.info("%s joined %s in %.1f s; starting echo_client (node 2) and ping_client (node 1).",
                NODES[1], NODES[0], time.monotonic() - start)  # fmt: skip
    supervisorctl = str(Path(sys.executable).parent / "supervisorctl")
    subprocess.run(  # noqa: S603 - our own supervisorctl, fixed arguments
        [supervisorctl, "-c", str(conf), "start", "echo_client", "ping_client"], check=True,
        timeout=30,
    )  # fmt: skip


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``python -m cluster`` arguments."""
    parser = argparse.ArgumentParser(
        prog="cluster", description="A two-node RabbitMQ cluster for ping_client and echo_client."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="lay out a fresh cluster; print its supervisord.conf")
    w.add_argument("--dir", type=Path, default=REPO / "run" / "cluster")
    w.add_argument("--logs", type=Path, default=REPO / "logs" / "cluster")
    w.add_argument(
        "--ports", default=",".join(map(str, DEFAULT_PORTS)),
        help="node 1 MQTT, node 2 MQTT, node 1 and node 2 distribution, epmd "
        "(default %(default)s)",
    )  # fmt: skip
    n = sub.add_parser("node", help="run one node (supervisord does)")
    n.add_argument("number", type=int, choices=(1, 2))
    n.add_argument("--dir", type=Path, required=True)
    j = sub.add_parser("join", help="join node 2 to node 1, then start the clients")
    j.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "write":
        try:
            args.ports = [int(p) for p in args.ports.split(",")]
        except ValueError:
            parser.error(f"--ports: five port numbers separated by commas: {args.ports!r}")
        if len(args.ports) != 5 or not all(0 < p < 65536 for p in args.ports):
            parser.error(f"--ports: five port numbers separated by commas: {args.ports}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cluster write|node|join``."""
    args = parse(argv)
    logs.configure(f"cluster {args.command}", "INFO")
    try:
        if args.command == "write":
            sys.stdout.write(f"{write(args.dir, args.logs, args.ports)}\n")
        elif args.command == "node":
            node(Layout.load(args.dir), args.number)
        else:
            join(Layout.load(args.dir), args.dir / "supervisord.conf")
    except ClusterError as exc:
        logger.error("%s.", exc)  # noqa: TRY400 - one line, no traceback
        sys.exit(EXIT_UNAVAILABLE)
    except subprocess.SubprocessError as exc:
        logger.error("%s.", exc)  # noqa: TRY400 - one line, no traceback
        sys.exit(EXIT_SOFTWARE)
    sys.exit(EXIT_OK)
