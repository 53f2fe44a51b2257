"""Topic access control: mosquitto's acl_file format, reload on SIGHUP, client certificates."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.acl import AclError, Checker, covers, overlap, parse
from tests.support import Proc, Spawner, base_env, free_port, tool, wait_until

RULES = """\
# anonymous clients
topic read $SYS/#
user alice
topic readwrite dev/alice/#
topic deny dev/alice/secret
topic read news/#
user bob
topic readwrite dev/bob/#
topic write news/today
pattern read clients/%c/cmd
pattern readwrite home/%u/#
"""


# --- the rules, in memory -------------------------------------------------------------------


def test_the_file_is_read_as_mosquitto_reads_it() -> None:
    acl = parse(RULES)
    assert [r.topic_filter for r in acl.anonymous] == ["$SYS/#"]
    assert sorted(acl.users) == ["alice", "bob"]
    assert [r.topic_filter for r in acl.patterns] == ["clients/%c/cmd", "home/%u/#"]
    alice = Checker(acl, "alice", "alice-phone")
    assert alice.may_write("dev/alice/temp")
    assert alice.may_read("dev/alice/temp")
    assert not alice.may_read("dev/alice/secret")
    assert not alice.may_write("dev/alice/secret")
    assert not alice.may_read("dev/bob/temp")
    assert alice.may_read("news/today")
    assert not alice.may_write("news/today")
    assert alice.may_read("clients/alice-phone/cmd")
    assert not alice.may_read("clients/x/cmd")
    assert alice.may_write("home/alice/lamp")
    assert not alice.may_write("home/bob/lamp")
    assert not alice.may_read("$SYS/broker/uptime")  # anonymous lines are anonymous clients'
    anonymous = Checker(acl, None, "anon")
    assert anonymous.may_read("$SYS/broker/uptime")
    assert not anonymous.may_write("$SYS/broker/uptime")  # $SYS is never writable
    assert not anonymous.may_read("home//lamp")  # a %u pattern does not apply without a user


def test_a_subscription_is_granted_when_it_can_match_something_readable() -> None:
    alice = Checker(parse(RULES), "alice", "a")
    assert alice.may_subscribe("#")  # overlaps dev/alice/#; each message is checked after
    assert alice.may_subscribe("dev/+/temp")
    assert not alice.may_subscribe("dev/bob/#")
    assert not alice.may_subscribe("dev/alice/secret")  # wholly denied
    assert not alice.may_subscribe("$SYS/#")
    assert alice.may_subscribe("$share/g/dev/alice/#")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("#", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True), ("+/b", "a/+", True),
     ("a/b", "a/c", False), ("#", "$SYS/x", False), ("$SYS/#", "$SYS/broker/+", True),
     ("a/b/c", "a/b", False)],
)  # fmt: skip
def test_filters_overlap_when_one_topic_matches_both(a: str, b: str, expected: bool) -> None:
    assert overlap(a, b) is expected
    assert overlap(b, a) is expected


def test_a_deny_covers_a_filter_only_when_it_matches_all_its_topics() -> None:
    assert covers("dev/#", "dev/alice/+")
    assert covers("+/x", "a/x")
    assert not covers("dev/alice/secret", "dev/alice/#")
    assert not covers("a/+", "a/#")


@pytest.mark.parametrize(
    ("text", "reason"),
    [("topic read a/#/b\n", "2:"), ("users alice\n", "unknown keyword 'users'"),
     ("user\n", "'user' needs a name"), ("topic read\n", "a rule needs a topic filter"),
     ("topic a+/b\n", "'\\+' must be a whole level")],
)  # fmt: skip
def test_a_malformed_file_names_its_line(text: str, reason: str) -> None:
    with pytest.raises(AclError, match=reason):
        parse("# ok\n" + text if reason == "2:" else text, "acl.txt")


# --- the broker, with real clients ----------------------------------------------------------


@dataclass
class Peer:
    """A paho client (3.1.1 or 5) that records what it receives and what it is told."""

    client: paho.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    granted: list[int] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    event: threading.Event = field(default_factory=threading.Event)

    def subscribe(self, topic_filter: str) -> int:
        """Subscribe at QoS 1; return the SUBACK's code."""
        self.event.clear()
        self.client.subscribe(topic_filter, 1)
        assert self.event.wait(5), "no SUBACK"
        return self.granted[-1]

    def publish(self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False) -> int:
        """Publish; for QoS 1, wait for the PUBACK and return its reason code (3.1.1: 0)."""
        self.event.clear()
        info = self.client.publish(topic, payload, qos, retain=retain)
        info.wait_for_publish(5)
        if qos:
            assert self.event.wait(5), "no PUBACK"
            return self.acks[-1]
        return 0

    def close(self) -> None:
        """Disconnect cleanly."""
        self.client.disconnect()
        self.client.loop_stop()


def peer(
    port: int, client_id: str, version: str, user: str | None = None, *, will: str | None = None,
    tls: tuple[Path, Path, Path] | None = None,
) -> Peer:  # fmt: skip
    """Connect a paho client as ``user`` (password: the user name backwards)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5 if version == "5" else paho.MQTTv311)  # fmt: skip
    if user is not None:
        client.username_pw_set(user, user[::-1])
    if will is not None:
        client.will_set(will, b"gone", 1)
    if tls is not None:
        ca, cert, key = tls
        client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
    p = Peer(client)

    def on_message(_c: object, _u: object, message: paho.MQTTMessage) -> None:
        p.messages.append((message.topic, bytes(message.payload)))

    def on_subscribe(_c: object, _u: object, _mid: int, codes: list[Any], _p: object) -> None:
        p.granted.append(int(getattr(codes[0], "value", codes[0])))
        p.event.set()

    def on_publish(_c: object, _u: object, _mid: int, code: Any, _p: object) -> None:
        p.acks.append(int(getattr(code, "value", 0)))
        p.event.set()

    client.on_message, client.on_subscribe, client.on_publish = on_message, on_subscribe, on_publish
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    wait_until(client.is_connected, 5, f"CONNACK for {client_id}")
    return p


@pytest.fixture
def users(tmp_path: Path, spawn: Spawner) -> Path:
    """A password file with alice and bob (each password: the name backwards)."""
    path = tmp_path / "passwords.txt"
    for name in ("alice", "bob"):
        result = spawn.run("broker.users", "add", name, "--file", str(path),
                           env=base_env(MQTT_NEW_PASSWORD=name[::-1]))  # fmt: skip
        assert result.returncode == 0, result.stderr
    return path


def acl_broker(spawn: Spawner, port: int, tmp_path: Path, users: Path, rules: str = RULES) -> Proc:
    """The broker with the password file and these rules."""
    acl = tmp_path / "acl.txt"
    acl.write_text(rules)
    broker = spawn.broker(port, "--password-file", str(users), "--acl-file", str(acl))
    broker.wait_for(r"Topic access from \S+: \d+ rules, \d+ users, 2 patterns\.")
    return broker


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_each_user_sees_exactly_what_the_rules_allow(
    spawn: Spawner, port: int, tmp_path: Path, users: Path, version: str
) -> None:
    broker = acl_broker(spawn, port, tmp_path, users)
    alice = peer(port, "alice-phone", version, "alice")
    bob = peer(port, "bob-1", version, "bob")
    refused = 0x80 if version == "3.1.1" else 0x87
    try:
        bob.publish("dev/bob/kept", b"old", retain=True)  # retained: checked on delivery too
        assert alice.subscribe("#") == 1  # granted: it overlaps what she may read
        assert alice.subscribe("dev/bob/#") == refused
        assert alice.subscribe("clients/alice-phone/cmd") == 1
        assert bob.publish("dev/bob/temp", b"21") == 0
        assert bob.publish("dev/alice/temp", b"forged") == (0 if version == "3.1.1" else 0x87)
        assert bob.publish("news/today", b"sunny") == 0
        assert alice.publish("dev/alice/secret", b"s") == (0 if version == "3.1.1" else 0x87)
        assert alice.publish("dev/alice/temp", b"22") == 0
        wait_until(lambda: ("dev/alice/temp", b"22") in alice.messages, 5, "alice's own")
        assert alice.messages == [("news/today", b"sunny"), ("dev/alice/temp", b"22")]
        broker.wait_for(r"Client bob-1 may not publish to dev/alice/temp: dropped")
        assert broker.count(r"may not publish to dev/alice/temp") == 1  # once per client, topic
    finally:
        alice.close()
        bob.close()


def test_independent_clients_see_the_same(
    spawn: Spawner, port: int, tmp_path: Path, users: Path
) -> None:
    """mosquitto_sub as alice on '#' gets what she may read and nothing of bob's."""
    acl_broker(spawn, port, tmp_path, users)
    sub = subprocess.Popen(
        ["stdbuf", "-oL", tool("mosquitto_sub"), "-p", str(port), "-V", "5", "-u", "alice",
         "-P", "ecila", "-t", "#", "-v", "-d"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    with sub:
        assert sub.stdout is not None
        wait_until(lambda: "SUBACK" in (sub.stdout.readline() if sub.stdout else ""), 5, "SUBACK")
        for user, topic in (("bob", "dev/bob/x"), ("alice", "dev/alice/x"), ("bob", "news/today")):
            subprocess.run([tool("mosquitto_pub"), "-p", str(port), "-V", "5", "-u", user, "-P",
                            user[::-1], "-t", topic, "-m", user, "-q", "1"],
                           check=True, timeout=10)  # fmt: skip
        seen: list[str] = []
        while len(seen) < 2:
            line = sub.stdout.readline()
            if line.startswith(("dev/", "news/")):
                seen.append(line.strip())
        assert seen == ["dev/alice/x alice", "news/today bob"]
        sub.terminate()


def test_a_will_the_client_may_not_write_is_dropped(
    spawn: Spawner, port: int, tmp_path: Path, users: Path
) -> None:
    broker = acl_broker(spawn, port, tmp_path, users)
    alice = peer(port, "alice-w", "5", "alice")
    alice.subscribe("dev/#")
    bob = peer(port, "bob-w", "5", "bob", will="dev/alice/status")
    bob.client._sock_close()  # lost, not DISCONNECTed: its will is due
    broker.wait_for(r"Client bob-w may not publish to dev/alice/status: its will is dropped\.")
    bob.client.loop_stop()
    assert ("dev/alice/status", b"gone") not in alice.messages
    alice.close()


def test_sighup_reloads_the_rules_for_connected_clients(
    spawn: Spawner, port: int, tmp_path: Path, users: Path
) -> None:
    broker = acl_broker(spawn, port, tmp_path, users)
    alice = peer(port, "alice-r", "5", "alice")
    bob = peer(port, "bob-r", "5", "bob")
    try:
        assert alice.subscribe("#") == 1
        bob.publish("dev/bob/a", b"before")
        (tmp_path / "acl.txt").write_text(RULES + "user alice\ntopic read dev/bob/#\n")
        broker.signal(signal.SIGHUP)
        broker.wait_for(r"Reload: topic access from \S+: \d+ rules")
        bob.publish("dev/bob/a", b"after")
        wait_until(lambda: ("dev/bob/a", b"after") in alice.messages, 5, "the new rule")
        assert ("dev/bob/a", b"before") not in alice.messages
        assert alice.client.is_connected()
        assert bob.client.is_connected()
        # A broken new file keeps the rules in force, and says why.
        (tmp_path / "acl.txt").write_text("topic readwrite\n")
        broker.signal(signal.SIGHUP)
        broker.wait_for(r"Reload: kept the old topic access rules: \S+:1: a rule needs a topic")
        bob.publish("dev/bob/a", b"still")
        wait_until(lambda: ("dev/bob/a", b"still") in alice.messages, 5, "the kept rule")
        broker.wait_for(r"Reload: 2 users from ")
    finally:
        alice.close()
        bob.close()


def test_a_malformed_acl_stops_the_start_with_its_line(spawn: Spawner, tmp_path: Path) -> None:
    acl = tmp_path / "acl.txt"
    acl.write_text("user alice\ntopic read dev/#\ntopic sideways x\n")
    result = spawn.run("broker", "--port", str(free_port()), "--acl-file", str(acl), timeout=10)
    assert result.returncode == 78  # EX_CONFIG
    assert result.stderr == (f"broker: error: {acl}:3: topic filter 'sideways x' has a space\n"), (
        result.stderr
    )


def make_ca(tmp: Path, name: str) -> tuple[Path, Path]:
    """A certificate authority: its certificate and key."""
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    # The extensions a real CA has: Python 3.13's default TLS context checks them (X509_STRICT).
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return cert, key


def client_certificate(tmp: Path, ca: tuple[Path, Path], cn: str) -> tuple[Path, Path]:
    """A client certificate with common name ``cn``, signed by ``ca``."""
    name = f"{cn}-{ca[0].stem}"
    key, csr, cert = tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.pem"
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                    "-keyout", str(key), "-out", str(csr)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    extensions = tmp / f"{name}.ext"
    extensions.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                          "extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\n"
                          "authorityKeyIdentifier=keyid\n")  # fmt: skip
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey",
                    str(ca[1]), "-CAcreateserial", "-days", "1", "-extfile", str(extensions),
                    "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return cert, key


def test_a_client_certificate_is_the_user_the_acl_sees(
    spawn: Spawner, port: int, tmp_path: Path, users: Path, certificate: tuple[Path, Path]
) -> None:
    server_cert, server_key = certificate
    ca = make_ca(tmp_path, "clients-ca")
    alice_cert = client_certificate(tmp_path, ca, "alice")
    stranger = client_certificate(tmp_path, make_ca(tmp_path, "other-ca"), "alice")
    acl = tmp_path / "acl.txt"
    acl.write_text(RULES)
    tls_port = free_port()
    broker = spawn.broker(
        port, "--password-file", str(users), "--acl-file", str(acl), "--tls-port", str(tls_port),
        "--tls-cert", str(server_cert), "--tls-key", str(server_key), "--tls-ca", str(ca[0]),
        "--require-certificate", "--use-identity-as-username",
    )  # fmt: skip
    broker.wait_for(rf"Listening on 127\.0\.0\.1:{tls_port} for MQTT over TLS")
    alice = peer(tls_port, "alice-cert", "5", tls=(server_cert, *alice_cert))  # no password
    try:
        assert alice.subscribe("dev/alice/#") == 1
        assert alice.subscribe("dev/bob/#") == 0x87  # the ACL sees user alice
        assert alice.publish("dev/alice/t", b"x") == 0
        wait_until(lambda: ("dev/alice/t", b"x") in alice.messages, 5, "alice's message")
    finally:
        alice.close()
    # A certificate from another CA, or none: the TLS handshake fails, and the log says why.
    assert refused_in_handshake(tls_port, server_cert, stranger)
    # After the colon, OpenSSL's words: "unable to get local issuer certificate".
    broker.wait_for(r"Refused a TLS client: its certificate did not verify against --tls-ca: "
                    r"\S.* \(1 refused for this so far\)\.")  # fmt: skip
    assert refused_in_handshake(tls_port, server_cert, None)
    broker.wait_for(r"Refused a TLS client: it sent no certificate, and --require-certificate "
                    r"asks for one \(1 refused for this so far\)\.")  # fmt: skip


def refused_in_handshake(port: int, server_cert: Path, cert: tuple[Path, Path] | None) -> bool:
    """Whether a TLS connection with ``cert`` (or none) is refused before any MQTT is read."""
    context = ssl.create_default_context(cafile=str(server_cert))
    if cert is not None:
        context.load_cert_chain(cert[0], cert[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")  # CONNECT
                return tls.recv(4) == b""  # TLS 1.3: the refusal comes after the handshake
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return True


def test_reload_reads_new_users_and_warns_of_unknown_ones(
    spawn: Spawner, port: int, tmp_path: Path, users: Path
) -> None:
    broker = acl_broker(spawn, port, tmp_path, users, RULES + "user carol\ntopic read dev/#\n")
    broker.wait_for(r"The ACL names user carol, who is not in \S+passwords\.txt\.")
    result = spawn.run("broker.users", "add", "carol", "--file", str(users),
                       env=base_env(MQTT_NEW_PASSWORD="lorac"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    broker.signal(signal.SIGHUP)
    broker.wait_for(r"Reload: 3 users from ")
    carol = peer(port, "carol-1", "5", "carol")  # logs in without a restart
    try:
        assert carol.subscribe("dev/#") == 1
    finally:
        carol.close()


def test_an_echo_client_the_acl_keeps_off_the_devices_topics_still_echoes(
    spawn: Spawner, port: int, tmp_path: Path, users: Path
) -> None:
    """The echo's /ping/+ (MQTT 3.1.1 fleets) is refused; it says so once and echoes /ping."""
    acl = tmp_path / "acl.txt"
    acl.write_text("user alice\ntopic read /ping\ntopic write /pong\n"
                   "user bob\ntopic write /ping\ntopic read /pong\n")  # fmt: skip
    spawn.broker(port, "--password-file", str(users), "--acl-file", str(acl)).wait_for(
        r"Topic access from"
    )
    echo = spawn.start("echo_client", "--port", str(port), "--username", "alice", "--password",
                       "ecila", name="echo")  # fmt: skip
    echo.wait_for(r"The broker refused the subscription to /ping/\+ \(SUBACK 0x87\): going on "
                  r"without it\.")  # fmt: skip
    echo.wait_for(r"Subscribed to /ping\.")
    result = spawn.run("ping_client", "--port", str(port), "--username", "bob", "--password",
                       "bob"[::-1], "--count", "3", "--interval", "0.1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 sent, 3 received, 0 lost" in result.stdout
    assert echo.count(r"The broker refused the subscription") == 1
