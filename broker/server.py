"""The broker's listening sockets: bound by us, with a one-line reason when that fails."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from common import cli

logger = logging.getLogger("broker")


BACKLOG = 4096
"""Connections the kernel completes for the broker before it accepts them (capped by
net.core.somaxconn, 4096 by default since Linux 5.4).

A full accept queue drops a SYN, and the client sends it again only after a second. A fleet
retrying every 100 ms is a thousand SYNs at once when the broker comes back: with asyncio's
default of 100, one device of a 1,000-device fleet came back 1.3 s after the first instead of
0.6 s. The backlog is given to ``create_server`` too, which listens again, with its own default.
"""


class BindError(Exception):
    """The broker could not listen on the requested address."""


def bind(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket, turning each OS error into a one-line reason."""
    where = cli.join_address(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    # Create the socket with IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted
    # sockets whose proto is IPPROTO_TCP, and socket.create_server() leaves it 0. Without
    # NODELAY, a pong that follows another packet to the same client waits on Nagle.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # SO_REUSEADDR: a restart never waits out TIME_WAIT (it does not allow two listeners).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"port {port} on {host} is already in use") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BindError(f"address {host} is not an address of this machine") from exc
        if exc.errno == errno.EACCES:
            raise BindError(f"permission denied to listen on {where}") from exc
        raise BindError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return sock


@dataclass(frozen=True, slots=True)
class Listener:
    """A bound socket and, for the TLS listeners, its TLS context."""

    sock: socket.socket
    tls: ssl.SSLContext | None = None
    websocket: bool = False
    """MQTT over WebSockets (and the live page), not over TCP."""

    @property
    def kind(self) -> str:
        """What is served, as the log line says it."""
        if self.websocket:
            scheme = "wss" if self.tls else "ws"
            return f"MQTT over WebSockets ({scheme}://{self.address}/mqtt)"
        return "MQTT over TLS" if self.tls else "MQTT"

    @property
    def address(self) -> str:
        """``host:port`` (``[host]:port`` for IPv6), as logs and amqtt's config show it."""
        host, port = self.sock.getsockname()[:2]
        return cli.join_address(host, port)


def tls_context(
    cert: Path, key: Path, client_ca: Path | None = None, *, require: bool = False
) -> ssl.SSLContext:
    """Build a server TLS context (TLS 1.2 or newer) for the certificate chain and key.

    With ``client_ca``, clients' certificates are checked against it: optional, or, with
    ``require``, a client without one signed by it fails the handshake (as mosquitto's
    ``require_certificate``).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        why = _unloadable(cert, key, exc)
        raise BindError(f"cannot load TLS certificate {cert} and key {key}: {why}") from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(client_ca)
        except (ssl.SSLError, OSError) as exc:
            why = (f"{client_ca} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                   if getattr(exc, "reason", None) == "NO_CERTIFICATE_OR_CRL_FOUND"
                   else str(exc))  # fmt: skip
            raise BindError(f"cannot load the clients' CA --tls-ca {client_ca}: {why}") from exc
        context.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
    context.sslobject_class = SaysWhyHandshake
    return context


def _unloadable(cert: Path, key: Path, exc: Exception) -> str:
    """Say why a certificate and key did not load: OpenSSL says only "PEM lib" for most."""
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return f"{key} is not the private key of {cert}"
    try:
        cert_text, key_text = cert.read_text(errors="replace"), key.read_text(errors="replace")
    except OSError:
        return str(exc)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        return f"{cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    if "PRIVATE KEY-----" not in key_text:
        return f"{key} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)"
    return str(exc)


class SaysWhyHandshake(ssl.SSLObject):
    """A server-side TLS connection that logs why its handshake failed.

    asyncio and uvloop close such a connection and log the reason only in debug mode, so a
    client whose certificate was refused left no line in the broker's log. They take the
    context's ``sslobject_class`` (a documented hook), and call its ``do_handshake``.
    """

    refused: ClassVar[dict[str, int]] = {}
    """Handshakes failed so far, by what :func:`handshake_failure` says of them. Each reason is
    logged the 1st, 10th, 100th and every 1,000th time: a client retrying every 100 ms must not
    fill the log, and a new reason is always seen."""

    def do_handshake(self) -> None:
        """Go on with the handshake; log a failure (then raise it, as before)."""
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            why = handshake_failure(exc)
            count = SaysWhyHandshake.refused[why] = SaysWhyHandshake.refused.get(why, 0) + 1
            if count in {1, 10, 100} or count % 1000 == 0:
                logger.warning("Refused a TLS client: %s (%d refused for this so far).",
                               why, count)  # fmt: skip
            raise


def handshake_failure(exc: ssl.SSLError) -> str:
    """Say why a TLS handshake failed, from the server's side, in a few words."""
    reason = exc.reason or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "it sent no certificate, and --require-certificate asks for one"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate did not verify against --tls-ca: {exc.verify_message}"
    if reason in {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"}:
        return f"it does not trust this broker's certificate ({reason})"
    if reason in {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"}:
        return f"it did not start a TLS handshake: plain MQTT or HTTP on a TLS port? ({reason})"
    return reason or str(exc)


def common_name(peercert: object) -> str | None:
    """Return the common name (CN) of a verified peer certificate (``getpeercert()``'s)."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None
