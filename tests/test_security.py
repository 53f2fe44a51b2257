"""Locked-down defaults and the optional protections: authentication, TLS, connection limit."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest

from broker.server import BindError, tls_context
from broker.settings import parse
from tests import mqtt_raw as m
from tests.mqtt_raw import RawClient
from tests.support import ECHO_READY, REPO, Spawner, base_env, wait_until


def test_broker_binds_loopback_by_default() -> None:
    assert parse([], {}).host == "127.0.0.1"


def test_supervisord_conf_has_no_inet_server_and_a_private_socket() -> None:
    conf = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    conf.read(REPO / "supervisord.conf")
    assert "inet_http_server" not in conf.sections()
    assert conf.get("unix_http_server", "file") == "%(here)s/run/sv.sock"
    assert conf.get("unix_http_server", "chmod") == "0700"
    assert conf.get("supervisorctl", "serverurl") == "unix://%(here)s/run/sv.sock"


def test_with_a_password_file_only_known_users_get_in(
    spawn: Spawner, port: int, password_file: Path
) -> None:
    broker = spawn.broker(port, "--password-file", str(password_file))
    broker.wait_for("Clients must authenticate")
    anonymous = RawClient(port)
    assert anonymous.connect("anon") == (False, 5)  # 5: not authorized
    assert anonymous.closed_within(3)
    wrong = RawClient(port)
    assert wrong.connect("wrong", username="alice", password="rabbit") == (False, 5)
    unknown = RawClient(port)
    assert unknown.connect("who", username="mallory", password="wonderland") == (False, 5)
    right = RawClient(port)
    assert right.connect("alice-1", username="alice", password="wonderland") == (False, 0)
    assert broker.count("refused: not authorized") == 3


def test_clients_use_credentials_from_the_environment(
    spawn: Spawner, port: int, password_file: Path
) -> None:
    spawn.broker(port, "--password-file", str(password_file))
    creds = {"MQTT_USERNAME": "alice", "MQTT_PASSWORD": "wonderland"}
    spawn.start("echo_client", "--port", str(port), env=base_env(**creds),
                name="echo").wait_for(ECHO_READY)  # fmt: skip
    result = spawn.run("ping_client", "--port", str(port), "--count", "2", "--interval", "0.1",
                       env=base_env(**creds))  # fmt: skip
    assert result.returncode == 0, result.stderr
    refused = spawn.run("ping_client", "--port", str(port), "--count", "1",
                        "--connect-timeout", "1")  # fmt: skip
    assert refused.returncode == 2
    assert "Not authorized" in refused.stderr or "not authori" in refused.stderr.lower()


def test_malformed_password_file_is_a_usage_error(spawn: Spawner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("alice:plaintext\n")
    result = spawn.run("broker", "--password-file", str(bad), timeout=10)
    assert result.returncode == 64
    assert "expected 'name:$argon2...'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_password_file_with_nobody_in_it_is_said_at_start_up(
    spawn: Spawner, port: int, tmp_path: Path
) -> None:
    """Comments only: the broker starts (a user may be added and SIGHUP sent), and says that
    every client will be refused, which it then is."""
    empty = tmp_path / "empty.txt"
    empty.write_text("# users: make add-user NAME=...\n\n")
    broker = spawn.broker(port, "--password-file", str(empty))
    broker.wait_for(rf"{empty} has no users: every client will be refused")
    assert RawClient(port).connect("anyone", username="alice", password="x") == (False, 5)


def test_a_directory_is_no_password_or_acl_file(spawn: Spawner, tmp_path: Path) -> None:
    for flag in ("--password-file", "--acl-file"):
        result = spawn.run("broker", flag, str(tmp_path), timeout=10)
        assert result.returncode == 64
        assert f"{tmp_path} is a directory, not a file" in result.stderr, result.stderr


def test_a_certificate_and_key_that_do_not_load_say_why(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    """Not OpenSSL's "[SSL] PEM lib (_ssl.c:3905)", which it says of most of these."""
    cert, key = certificate
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    readme = REPO / "README.md"
    for given, why in (
        ((cert, other), f"{other} is not the private key of {cert}"),
        ((cert, cert), f"{cert} holds no PEM private key"),
        ((readme, key), f"{readme} holds no PEM certificate"),
    ):
        with pytest.raises(BindError, match=re.escape(why)):
            tls_context(*given)
    with pytest.raises(BindError, match=re.escape(f"--tls-ca {readme}: {readme} holds no PEM")):
        tls_context(cert, key, client_ca=readme)


def test_our_clients_ping_over_wss(
    spawn: Spawner, port: int, certificate: tuple[Path, Path]
) -> None:
    """--transport websockets with --tls-ca: MQTT over WebSockets over TLS (wss://)."""
    from tests.support import free_port  # noqa: PLC0415

    cert, key = certificate
    wss_port = free_port()
    broker = spawn.broker(port, "--wss-port", str(wss_port), "--tls-cert", str(cert),
                          "--tls-key", str(key))  # fmt: skip
    broker.wait_for(rf"Listening on 127\.0\.0\.1:{wss_port} for MQTT over WebSockets \(wss://")
    wss = ["--port", str(wss_port), "--tls-ca", str(cert), "--transport", "websockets"]
    spawn.start("echo_client", *wss, name="echo").wait_for(ECHO_READY)
    result = spawn.run("ping_client", *wss, "--count", "3", "--interval", "0.1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 sent, 3 received" in result.stdout
    assert f"--- wss://127.0.0.1:{wss_port}/mqtt ping statistics ---" in result.stdout


def test_tls_listener_carries_the_round_trip(
    spawn: Spawner, port: int, certificate: tuple[Path, Path]
) -> None:
    from tests.support import free_port  # noqa: PLC0415

    cert, key = certificate
    tls_port = free_port()
    broker = spawn.broker(port, "--tls-port", str(tls_port), "--tls-cert", str(cert),
                          "--tls-key", str(key))  # fmt: skip
    broker.wait_for(rf"Listening on 127\.0\.0\.1:{tls_port} for MQTT over TLS")
    tls = ["--port", str(tls_port), "--tls-ca", str(cert)]
    spawn.start("echo_client", *tls, name="echo").wait_for(ECHO_READY)
    result = spawn.run("ping_client", *tls, "--count", "3", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    assert "3 sent, 3 received" in result.stdout
    # A client that does not trust the certificate is refused, and says so in one line.
    untrusting = spawn.run("ping_client", "--port", str(tls_port), "--tls", "--count", "1",
                           "--connect-timeout", "1")  # fmt: skip
    assert untrusting.returncode == 2
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting.stderr
    assert "Traceback" not in untrusting.stderr
    # ... and the broker says why it lost that client (asyncio alone logs nothing of it).
    broker.wait_for(r"Refused a TLS client: it does not trust this broker's certificate "
                    r"\(TLSV1_ALERT_UNKNOWN_CA|SSLV3_ALERT_BAD_CERTIFICATE\) "
                    r"\(1 refused for this so far\)\.")  # fmt: skip
    # A plain MQTT client on the TLS port: closed, and the log says what it looked like.
    plain = RawClient(tls_port)
    plain.send(m.connect("plain"))
    assert plain.closed_within(5)
    broker.wait_for(r"Refused a TLS client: it did not start a TLS handshake: plain MQTT or HTTP "
                    r"on a TLS port\? \(WRONG_VERSION_NUMBER\) "
                    r"\(1 refused for this so far\)\.")  # fmt: skip


def test_max_connections_refuses_extra_clients_at_once(spawn: Spawner, port: int) -> None:
    broker = spawn.broker(port, "--max-connections", "3")
    held = [RawClient(port) for _ in range(3)]
    for i, c in enumerate(held):
        assert c.connect(f"held-{i}") == (False, 0)
    extra = RawClient(port)
    assert extra.closed_within(3)
    broker.wait_for(r"Refused a connection: 3 in use, --max-connections 3 \(1 refused so far\)")
    held[0].close()
    wait_until(lambda: broker.count("disconnected") >= 1, 5, "the slot to free up")
    assert RawClient(port).connect("after") == (False, 0)


def test_a_failed_login_cannot_take_over_a_client_id(
    spawn: Spawner, port: int, password_file: Path
) -> None:
    """Take-over [MQTT-3.1.4-2] happens only after authentication succeeds."""
    spawn.broker(port, "--password-file", str(password_file))
    alice = RawClient(port)
    assert alice.connect("alice-box", username="alice", password="wonderland",
                         clean=False) == (False, 0)  # fmt: skip
    assert alice.subscribe(1, ("alice/inbox", 1)) == [1]
    impostor = RawClient(port)
    assert impostor.connect("alice-box", username="alice", password="guess") == (False, 5)
    assert impostor.closed_within(3)
    assert alice.barrier() == []  # still connected, still served
    again = RawClient(port)
    assert again.connect("alice-box", username="alice", password="wonderland",
                         clean=False) == (True, 0)  # fmt: skip
    assert alice.closed_within(3)  # a real take-over, by the rightful owner


def test_the_open_file_limit_caps_connections_with_a_reason(spawn: Spawner, port: int) -> None:
    """At its open-file limit the broker refuses and says why; libuv closed them in silence."""
    broker = spawn.broker(port, open_files=100)  # room for 100 - 64 = 36
    held = [RawClient(port) for _ in range(36)]
    for i, c in enumerate(held):
        assert c.connect(f"held-{i}") == (False, 0)
    extra = RawClient(port)
    assert extra.closed_within(3)
    broker.wait_for(r"Refused a connection: 36 in use, all that the open-file limit of 100 "
                    r"leaves room for \(ulimit -n\) \(1 refused so far\)\.")  # fmt: skip
    held[0].close()
    wait_until(lambda: broker.count("disconnected") >= 1, 5, "the slot to free up")
    assert RawClient(port).connect("after") == (False, 0)
    assert held[-1].barrier() == []  # the others still served
