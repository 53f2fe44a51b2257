"""aiomqtt's Client with its fixes: the only module that touches aiomqtt's, or paho's, internals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from collections.abc import Sequence
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common import properties

logger = logging.getLogger(__name__)

_QOS_TOLD: set[tuple[str, int, int]] = set()
"""(broker, its Maximum QoS, the QoS asked for): the downgrades already logged."""


class ClosedBeforeConnack(aiomqtt.MqttError):
    """The broker ended the connection before it answered the CONNECT."""


class PacketTooLarge(aiomqtt.MqttError):
    """A PUBLISH larger than the broker's Maximum Packet Size: not sent (see Client.oversized)."""


def publish_size(
    topic: str, payload: bytes, qos: int, properties: Properties | None, *, v5: bool
) -> int:
    """Return the bytes of the PUBLISH paho sends for these, fixed header included (3.3)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    if v5:
        remaining += len(properties.pack()) if properties is not None else 1  # type: ignore[no-untyped-call]
    length_bytes = (
        1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    )
    return 1 + length_bytes + remaining


INTERNALS: dict[str, type | tuple[type, ...]] = {
    "_connected": asyncio.Future,
    "_disconnected": asyncio.Future,
    "_pending_subscribes": dict,
    "_client": mqtt.Client,
    "_lock": asyncio.Lock,
    "_misc_task": (asyncio.Task, type(None)),
    "_loop": asyncio.AbstractEventLoop,
}
"""aiomqtt's private attributes that :class:`Client` relies on; checked when a client is made."""

OVERRIDDEN = (
    "_client_connect",
    "_on_connect",
    "_on_disconnect",
    "_on_socket_close",
    "_on_socket_register_write",
    "_on_socket_unregister_write",
)
"""aiomqtt's private methods that :class:`Client` overrides: were one renamed, the override
would never be called. Checked with INTERNALS."""


class Client(aiomqtt.Client):
    """aiomqtt's Client with its fixes; the only place that touches aiomqtt's private names.

    - A connect fails at once when the broker hangs up before CONNACK. aiomqtt 2.5 ignores such
      a disconnect and waits out its whole timeout (5 s here), so a broker that accepts and
      closes connections would stretch the 100 ms reconnect loop to 5 s per attempt.
    - The error a lost connection leaves in aiomqtt's ``_disconnected`` future is marked as
      seen when it is set. Nobody reads it when the connection ends by another error first
      (no SUBACK, a cancelled task), or when the broker hangs up right after CONNACK (aiomqtt's
      ``__aenter__`` then replaces the future), and asyncio later logs "Future exception was
      never retrieved" at ERROR: a stray line for an outage the reconnect loop reports itself.
      Whoever awaits the future still gets the error.
    - A lost connection fails every subscription still waiting for its SUBACK at once. aiomqtt
      leaves them waiting out the whole timeout, so a broker that hangs up right after CONNACK
      would hold the 100 ms reconnect loop for 5 s per attempt.
    - After a lost connection the next connect waits for its own CONNACK, and reports a
      refusing one: aiomqtt left the last connection's CONNACK standing (see __aenter__).
    - The subscriptions in :attr:`at_connack` are sent from paho's CONNACK callback, before
      paho sends again the QoS 1 and 2 messages the last connection left unacknowledged (see
      :meth:`subscribed`).
    - A connect cancelled while paho connects in aiomqtt's executor thread waits for that
      thread, then says DISCONNECT and closes (see :meth:`_abandon`).
    - Manual acknowledgement (paho's ``manual_ack``), which aiomqtt 2.5 does not expose
      (empicano/aiomqtt#345): see :meth:`ack`.
    - :attr:`lost`, done when the connection ends, for what a lost connection does not end in
      aiomqtt: a publish waiting for its confirmation waits out its whole timeout.
    - The socket is watched for writing exactly while paho has something to write, and a
      closed socket is watched no more (see :meth:`_on_socket_register_write`).
    - No more QoS 1 and 2 messages in flight than the broker's Receive Maximum allows
      (:attr:`max_inflight`).
    - :attr:`maximum_qos` holds the broker's Maximum QoS, and :meth:`publish` keeps to it;
      :attr:`maximum_packet_size` its Maximum Packet Size, and :meth:`publish` sends nothing
      larger (see :meth:`oversized`).
    """

    protocol_level = 4
    """4 (MQTT 3.1.1) or 5, as made by make_client."""
    address = ""
    """The broker, as the logs name it (``host:port``, or a ws:// URL), as made by make_client."""
    disconnect_reason: int | None = None
    """The reason code of the last disconnect (the broker's, in an MQTT 5 DISCONNECT)."""
    disconnect_text: str | None = None
    """The reason string of the broker's MQTT 5 DISCONNECT, if it gave one."""
    disconnect_name: str | None = None
    """The name of the reason code of the broker's MQTT 5 DISCONNECT, if it sent one."""
    at_connack: Sequence[tuple[str, int]] = ()
    """(filter, QoS) pairs to subscribe to as soon as a connection is accepted."""
    maximum_qos = 2
    """The highest QoS the broker takes in a PUBLISH: its MQTT 5 CONNACK's Maximum QoS, else 2."""
    max_inflight = 1000
    """QoS 1 and 2 messages this client lets be unacknowledged at once (make_client gives paho
    this), or fewer: as many as the broker's Receive Maximum (its MQTT 5 CONNACK) allows."""
    maximum_packet_size: int | None = None
    """The largest packet the broker takes (its MQTT 5 CONNACK's Maximum Packet Size), if it
    said."""
    _early: dict[str, asyncio.Future[Any]] | None = None
    _writing: Any = None
    """The socket paho has something to write on (between its register and unregister)."""
    _attempt: concurrent.futures.Future[None]
    """The current connect in aiomqtt's executor thread: not begun, under way, or over."""

    @property
    def lost(self) -> asyncio.Future[None]:
        """Done once the current connection has ended (an error: how it was lost)."""
        return self._disconnected

    def acknowledge_manually(self) -> None:
        """Leave the PUBACK (QoS 1) or PUBCOMP (QoS 2) of each received message to :meth:`ack`.

        By default paho acknowledges a message as soon as it is queued for the application,
        before the application has seen it: a process that dies then has lost a message the
        broker counts as delivered.
        """
        self._client.manual_ack_set(True)

    def ack(self, message: aiomqtt.Message) -> None:
        """Acknowledge ``message`` (nothing to do at QoS 0).

        Acknowledge in the order the messages came [MQTT-4.6.0-2].
        """
        if message.qos:
            self._client.ack(message.mid, message.qos)

    async def __aenter__(self) -> Self:
        """Connect, and wait for this connection's own CONNACK.

        aiomqtt renews its CONNACK future only in a clean exit. After a lost connection it
        stayed done: the next connect went on before its CONNACK, and ignored a refusing one
        (a reconnect "not authorized" said "connection closed before SUBACK"). It is renewed
        here, before the connect, not when the connection is lost: a CONNACK and a loss read
        while the connect is still under way are then this connection's.
        """
        if not self._lock.locked():  # else aiomqtt refuses: entered twice at once
            if self._connected.done():
                self._connected = asyncio.Future()
            self._attempt = concurrent.futures.Future()
        try:
            return await super().__aenter__()
        except asyncio.CancelledError:
            await self._abandon()
            raise

    def _client_connect(self) -> None:
        """Connect, in aiomqtt's executor thread, unless the attempt was abandoned first."""
        attempt = self._attempt
        if not attempt.set_running_or_notify_cancel():
            return
        try:
            super()._client_connect()
        finally:
            attempt.set_result(None)

    async def _abandon(self) -> None:
        """After a cancelled connect: let a connect still in its thread end, then close it.

        A cancellation does not stop the thread. The connect went on after a stop, and then
        scheduled aiomqtt's reader and its once-a-second task on the loop: a probe stopped
        during a slow name lookup logged "Task was destroyed but it is pending!" at exit, and
        paho "Event loop is closed". aiomqtt also kept its lock, as if still connected.
        """
        if not self._attempt.cancel():  # under way, or over
            await asyncio.wrap_future(self._attempt)
            await asyncio.sleep(0)  # what the connect scheduled on the loop runs now
        if self._connected.cancelled():  # with the wait for it: paho's callbacks read it
            self._connected = asyncio.Future()
        self._client.disconnect()  # paho closes the socket once its DISCONNECT is out
        if self._misc_task is not None:
            self._misc_task.cancel()
        if self._lock.locked():
            self._lock.release()

    async def subscribed(self, topic: str, qos: int) -> Any:  # noqa: ANN401 - aiomqtt's
        """Subscribe to ``topic`` and return the SUBACK's codes, as ``subscribe`` does.

        A topic in :attr:`at_connack` was subscribed to from the CONNACK callback: this waits
        for that SUBACK. paho sends again what the last connection left unacknowledged right
        after that callback, before a coroutine can subscribe, and the echo's answer to such a
        ping could reach the broker before the SUBSCRIBE that would deliver it: lost, at
        QoS 1, after every broker restart. From the callback, the SUBSCRIBE goes first.
        """
        early = self._early.pop(topic, None) if self._early is not None else None
        if early is None:
            return await self.subscribe(topic, qos=qos, timeout=math.inf)
        try:
            return await early
        finally:
            for mid, pending in list(self._pending_subscribes.items()):
                if pending is early:  # waited for no more (a timeout): its SUBACK finds nobody
                    del self._pending_subscribes[mid]

    async def publish(
        self,
        /,
        topic: str,
        payload: Any = None,  # noqa: ANN401 - aiomqtt's
        qos: int = 0,
        *args: Any,  # noqa: ANN401 - aiomqtt's
        **kwargs: Any,  # noqa: ANN401 - aiomqtt's
    ) -> None:
        """Publish as aiomqtt does, at no higher a QoS than the broker's :attr:`maximum_qos`.

        A client must not publish above it [MQTT-3.2.2-11], and a broker disconnects one that
        does (0x9B, QoS not supported): mosquitto with ``max_qos 1`` did so at every ping of
        ``--qos 2``, paho sent the ping again on the next connection, and the probe went round
        that loop, saying only "Disconnected during message iteration". Said once per process
        and broker, at WARNING.
        """
        if qos > self.maximum_qos:
            told = (self.address, self.maximum_qos, qos)
            if told not in _QOS_TOLD:
                _QOS_TOLD.add(told)
                logger.warning(
                    "%s takes at most QoS %d (its CONNACK's Maximum QoS): publishing at QoS %d,"
                    " not %d.",
                    self.address, self.maximum_qos,
                    self.maximum_qos, qos,
                )  # fmt: skip
            qos = self.maximum_qos
        properties = kwargs.get("properties", args[1] if len(args) > 1 else None)
        if (size := self.oversized(topic, payload, qos, properties)) is not None:
            raise PacketTooLarge(self.too_large(size))
        await super().publish(topic, payload, qos, *args, **kwargs)

    def oversized(
        self,
        topic: str,
        payload: Any,  # noqa: ANN401 - what aiomqtt takes
        qos: int,
        properties: Properties | None = None,
    ) -> int | None:
        """Return the size of this PUBLISH if it exceeds the broker's Maximum Packet Size.

        A client must send no larger packet [MQTT-3.2.2-15]; paho does not check, and the
        broker ends the connection (0x95): a ping too large for it went round the reconnect
        loop, lost every time, and an echo that sent one at QoS 1 would have sent it again on
        every connection. None if it fits, or if the broker set no maximum.
        """
        limit = self.maximum_packet_size
        if limit is None:
            return None
        if isinstance(payload, str):
            payload = payload.encode()
        elif isinstance(payload, int | float):
            payload = str(payload).encode()
        elif payload is None:
            payload = b""
        size = publish_size(
            topic, payload, min(qos, self.maximum_qos), properties, v5=self.protocol_level == 5
        )
        return size if size > limit else None

    def too_large(self, size: int) -> str:
        """Say that a ``size``-byte PUBLISH is over the broker's Maximum Packet Size."""
        return (
            f"a {size}-byte PUBLISH is over the Maximum Packet Size of {self.address}"
            f" ({self.maximum_packet_size} bytes, from its CONNACK)"
        )

    def _on_socket_register_write(
        self,
        client: mqtt.Client,  # noqa: ARG002 - paho's callback signature
        userdata: Any,  # noqa: ANN401, ARG002 - paho's callback signature
        sock: Any,  # noqa: ANN401 - paho's socket-like
    ) -> None:
        """Watch ``sock`` for writing: at once on the loop's thread, else from the loop.

        aiomqtt always scheduled the watch for later, and stopped it at once. When paho wrote
        everything and said so before the scheduled watch began, the socket stayed watched with
        nothing to write (a writer woken on every pass of the loop), and when paho then closed
        it, the closed socket stayed in the selector: the next connection, given the same file
        descriptor, failed with "Exception in callback ...add_reader(...): FileNotFoundError"
        at ERROR, and waited out a 5 s timeout.
        """
        self._writing = sock
        try:
            running = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # aiomqtt's connect, in its executor thread
            running = False
        if running:
            self._watch_writes(sock)
        else:
            self._loop.call_soon_threadsafe(self._watch_writes, sock)

    def _watch_writes(self, sock: Any) -> None:  # noqa: ANN401 - paho's socket-like
        if self._writing is sock and sock.fileno() != -1:  # still wanted, on an open socket
            self._loop.add_writer(sock.fileno(), self._write)

    def _write(self) -> None:
        """Write what paho has queued; an error ends the connection, as in aiomqtt."""
        try:
            self._client.loop_write()
        except Exception as exc:  # noqa: BLE001 - as aiomqtt: any error means a broken connection
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def _on_socket_unregister_write(
        self,
        client: mqtt.Client,
        userdata: Any,  # noqa: ANN401 - paho's callback signature
        sock: Any,  # noqa: ANN401 - paho's socket-like
    ) -> None:
        self._writing = None
        super()._on_socket_unregister_write(client, userdata, sock)

    def _on_socket_close(
        self,
        client: mqtt.Client,
        userdata: Any,  # noqa: ANN401 - paho's callback signature
        sock: Any,  # noqa: ANN401 - paho's socket-like
    ) -> None:
        """Stop watching ``sock`` at all: a closed file descriptor must leave the selector."""
        self._writing = None
        if sock.fileno() != -1:
            self._loop.remove_writer(sock.fileno())
        super()._on_socket_close(client, userdata, sock)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,  # noqa: ANN401 - paho's callback signature
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self._early = None
        if not self._connected.done() and reason_code == mqtt.CONNACK_ACCEPTED:
            self.maximum_qos = getattr(properties, "MaximumQoS", 2)
            self.maximum_packet_size = getattr(properties, "MaximumPacketSize", None)
            # paho keeps to its own limit, not the broker's [MQTT-3.3.4-7]: an echo with more
            # QoS 2 echoes unacknowledged than our broker's --max-queued 5 was disconnected
            # (0x93) at every burst. paho holds the others back until an acknowledgement. Its
            # setter refuses while connected, so this sets the attribute the setter would.
            receive = getattr(properties, "ReceiveMaximum", 65_535)
            self._client._max_inflight_messages = min(self.max_inflight, receive)
            self._early = {topic: self._subscribe_now(topic, qos) for topic, qos in self.at_connack}
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _subscribe_now(self, topic: str, qos: int) -> asyncio.Future[Any]:
        """Send SUBSCRIBE at once (in a paho callback); the future gets the SUBACK's codes."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Seen, whoever waits: a link that failed on an earlier topic never waits for it.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        result, mid = self._client.subscribe(topic, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            future.set_exception(aiomqtt.MqttCodeError(result, "Could not subscribe to topic"))
        else:
            self._pending_subscribes[mid] = future
        return future

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,  # noqa: ANN401 - paho's callback signature
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.disconnect_reason = getattr(reason_code, "value", None)
        self.disconnect_text = getattr(properties, "ReasonString", None)
        from_broker = getattr(flags, "is_disconnect_packet_from_server", False)
        self.disconnect_name = str(reason_code) if from_broker else None
        if not self._connected.done():
            self._connected.set_exception(
                ClosedBeforeConnack(f"connection closed before CONNACK ({reason_code})")
            )
            # Seen, like the disconnect error below: nobody awaits it if the wait was cancelled.
            self._connected.exception()
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()
        for pending in self._pending_subscribes.values():
            if not pending.done():
                pending.set_exception(
                    aiomqtt.MqttError(f"connection closed before SUBACK ({reason_code})")
                )


PAHO_INTERNALS: dict[str, type] = {"_max_inflight_messages": int}
"""paho's private attributes that :class:`Client` sets; checked with INTERNALS."""


def unsupported(client: Client) -> list[str]:
    """Return what of INTERNALS, OVERRIDDEN and PAHO_INTERNALS is missing (none: supported)."""
    missing = [n for n, kind in INTERNALS.items() if not isinstance(getattr(client, n, None), kind)]
    missing += [n for n in OVERRIDDEN if not callable(getattr(aiomqtt.Client, n, None))]
    paho = getattr(client, "_client", None)
    return missing + [
        f"paho's {n}"
        for n, kind in PAHO_INTERNALS.items()
        if not isinstance(getattr(paho, n, None), kind)
    ]


def closed_before_connack(exc: aiomqtt.MqttError) -> bool:
    """Tell whether the broker hung up on a CONNECT without answering it.

    A broker that speaks only 3.1.1 may do that to an MQTT 5 CONNECT (RabbitMQ 3.10 does).
    """
    return isinstance(exc, ClosedBeforeConnack)


def refuses_mqtt5(exc: aiomqtt.MqttError) -> bool:
    """Tell whether a connect failed because the broker does not speak MQTT 5.

    That is CONNACK 0x84, or 3.1.1's 0x01, which paho reads as 0x84.
    """
    code = getattr(exc, "rc", None)
    return isinstance(exc, aiomqtt.MqttCodeError) and getattr(code, "value", code) == 0x84


def read_publish_properties_fast() -> bool:
    """Have paho read received PUBLISH properties as :class:`~common.properties.PublishProperties`.

    paho 2.2 decodes a PUBLISH in its private ``paho.mqtt._packet``, through that module's
    ``Properties`` name; that name becomes our class, which reads a PUBLISH's properties with
    tables built once and leaves every other packet type to paho's own code. Done only where
    the class is exactly paho's format (``properties.FAST``) and the name is paho's class;
    returns whether received properties are read the fast way (a test holds it true for the
    paho we pin, so that a paho release that moved the name is noticed, not only slower).
    """
    try:
        from paho.mqtt import _packet  # noqa: PLC0415 (paho 2.1 has no such module)
    except ImportError:
        return False
    if properties.FAST and getattr(_packet, "Properties", None) is Properties:
        _packet.Properties = properties.PublishProperties  # type: ignore[attr-defined]
    return getattr(_packet, "Properties", None) is properties.PublishProperties


READS_FAST = read_publish_properties_fast()
"""Whether paho reads received PUBLISH properties the fast way (see above)."""
