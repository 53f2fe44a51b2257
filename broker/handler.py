"""Our BrokerProtocolHandler: strict reading, keepalive, and QoS 1/2 that is never dropped.

Each override names the amqtt 0.12.1 behaviour it replaces and the statement it implements.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.errors import MQTTError
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_0, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING, OutgoingApplicationMessage

from broker import protocol
from broker.protocol import Frame, ProtocolViolation

logger = logging.getLogger("broker")

KEEPALIVE_GRACE = 1.5
"""[MQTT-3.1.2-24]: close a client silent for more than 1.5 times its keepalive."""


class Cork:
    """Hold the writes made while a reader works through packets that are already buffered.

    Under load one read brings many packets; written one by one, each costs a send(). Corked,
    every connection written to gets its share in one write when the reader is about to wait
    for its socket again. A reader releases the cork before anything that could let another
    task run (its next read would wait, a packet amqtt handles, a retained or queued message),
    so nothing else can write to a connection in between and order is kept. With one message
    in flight there is never a second packet buffered: each is written at once, as before.
    """

    def __init__(self) -> None:
        """Start uncorked."""
        self.active = False
        self._held: dict[StrictHandler, list[bytes]] = {}

    def hold(self, handler: StrictHandler, frame: bytes) -> None:
        """Keep ``frame`` for ``handler``'s connection until release()."""
        self._held.setdefault(handler, []).append(frame)

    def release(self) -> None:
        """Write everything held, one write per connection, and stop holding."""
        self.active = False
        if self._held:
            held, self._held = self._held, {}
            for handler, frames in held.items():
                handler.write_out(frames[0] if len(frames) == 1 else b"".join(frames))


CORK = Cork()
"""One for the broker: one reader runs at a time, and it releases before letting another run."""


class SilenceWatch:
    """Cancel a reader that has waited ``limit`` seconds since its last complete packet.

    One timer per connection, re-armed only when it fires: a packet costs a clock read, where
    ``asyncio.wait_for`` around each read cost a task, a timer and two extra loop iterations.
    """

    def __init__(self, limit: float, task: asyncio.Task[Any]) -> None:
        """Start watching ``task``, which reads the connection."""
        self.limit = limit
        self.expired = False
        self.reading = False
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._timer = self._loop.call_at(self._last + limit, self._check)

    @classmethod
    def of_current_task(cls, limit: float) -> SilenceWatch | None:
        """Watch the running task; None when ``limit`` is 0 (keepalive off)."""
        task = asyncio.current_task()
        return cls(limit, task) if limit > 0 and task is not None else None

    def heard(self) -> None:
        """Note a complete packet."""
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self.limit
        if self._loop.time() < due or not self.reading:
            # Heard from since the timer was armed, or busy with a packet: not silent.
            self._timer = self._loop.call_at(max(due, self._loop.time() + 0.1), self._check)
            return
        self.expired = True
        self._task.cancel()

    def forgive(self) -> None:
        """Take back the cancel, once the reader has handled it (Python 3.11 counts them)."""
        uncancel = getattr(self._task, "uncancel", None)
        if uncancel is not None:
            uncancel()

    def close(self) -> None:
        """Stop watching."""
        self._timer.cancel()


class StrictHandler(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler with a strict reader loop."""

    max_packet_size: int = protocol.DEFAULT_MAX_PACKET_SIZE
    router: Any = None
    """The broker, when it routes QoS 0/1 publishes straight from the reader (the hot path)."""
    QOS0_BUFFER_LIMIT = 4 * 1024 * 1024
    """Above this many unsent bytes for a client, QoS 0 messages to it are dropped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - amqtt's signature
        """Create the handler as amqtt does; add a place to keep redelivery tasks."""
        super().__init__(*args, **kwargs)
        self._flows: set[asyncio.Task[None]] = set()
        self.dropped = 0
        self._disconnected: tuple[DisconnectPacket | None] | None = None

    # --- the end of a connection -------------------------------------------------------------

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        """Remember how the connection ended (DISCONNECT or None: lost), then tell amqtt."""
        # amqtt hands the result to a future and forgets it; the broker's client loop reads it
        # through wait_disconnect() in a task that may not have started yet when a client
        # connects and at once says DISCONNECT. That task then saw no future, took None for a
        # lost connection and published the will of a client that had said goodbye
        # [MQTT-3.1.2-10]. The first result is kept for it here.
        if self._disconnected is None:
            self._disconnected = (disconnect,)
        await super().handle_disconnect(disconnect)

    async def wait_disconnect(self) -> DisconnectPacket | None:
        """Wait until the connection ends; the DISCONNECT packet, or None if it was lost."""
        if self._disconnected is None:
            lost = await super().wait_disconnect()
            if self._disconnected is None:
                return lost
        return self._disconnected[0]

    # --- reading ---------------------------------------------------------------------------

    async def _reader_loop(self) -> None:
        # Replaces ProtocolHandler._reader_loop, which reads whatever remaining length a client
        # declares, logs and carries on after malformed packets, and has no keepalive deadline.
        self._reader_ready.set()
        keep_alive = self.session.keep_alive if self.session else 0
        client_id = self.session.client_id if self.session else "?"
        watch = SilenceWatch.of_current_task(keep_alive * KEEPALIVE_GRACE)
        try:
            while True:
                try:
                    frame = await self._read_frame(watch)
                    if await self._handle(frame):
                        break
                except asyncio.CancelledError:
                    if watch is None or not watch.expired:
                        raise
                    watch.forgive()
                    logger.warning(
                        "Client %s closed: silent for more than %g s [MQTT-3.1.2-24].",
                        client_id, watch.limit,
                    )  # fmt: skip
                    break
                except ProtocolViolation as exc:
                    logger.warning("Client %s closed: %s.", client_id, exc)
                    break
                except (EOFError, asyncio.IncompleteReadError, ConnectionError, OSError):
                    break
                except Exception as exc:
                    # A bug in handling one packet must end this connection, visibly, rather
                    # than kill the reader and leave a connection that looks alive but is never
                    # read again (the fate of amqtt's reader after such an error).
                    logger.error(  # noqa: TRY400 - one line; the traceback at DEBUG
                        "Client %s closed: internal error %r.", client_id, exc,
                        exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
                    )  # fmt: skip
                    break
        except asyncio.CancelledError:
            pass
        finally:
            CORK.release()  # after an error, what this reader held still goes out
            if watch is not None:
                watch.close()
        for flow in self._flows:
            flow.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _handle(self, frame: Frame) -> bool:
        """Check and handle one packet; return True after DISCONNECT."""
        publish = protocol.check(frame, connected=True)
        if publish is not None and publish.qos < QOS_2 and self.router is not None:
            CORK.active = True
            await self._route(publish)
        elif frame.packet_type == protocol.PUBACK:  # checked: 2 bytes, a packet id
            self._acknowledged(int.from_bytes(frame.body, "big"))
        else:
            CORK.release()  # amqtt's handling may let other tasks run
            return await self._dispatch(frame)
        if not self._next_frame_buffered():
            CORK.release()  # the next read waits for the socket
        return False

    def _next_frame_buffered(self) -> bool:
        """Whether a whole packet already waits in the stream's buffer (CPython's StreamReader)."""
        stream = getattr(self.reader, "_reader", None)
        buffer = getattr(stream, "_buffer", None)
        return bool(buffer) and protocol.frame_complete(buffer)  # type: ignore[arg-type]

    async def _read_frame(self, watch: SilenceWatch | None) -> Frame:
        if watch is None:
            return await protocol.read_frame(self.reader, self.max_packet_size)
        watch.reading = True
        frame = await protocol.read_frame(self.reader, self.max_packet_size)
        watch.reading = False
        watch.heard()
        return frame

    async def _route(self, publish: protocol.Publish) -> None:
        # Replaces, for QoS 0 and 1, amqtt's path from reader to subscribers: an application
        # message object, the session queue, the client loop's asyncio.wait over four futures,
        # the broadcast queue, a task for the broadcast and a task per subscriber.
        await self.router.route(self.session, publish)
        if publish.qos == 1 and publish.packet_id is not None:
            # The message is ours once PUBACK is sent [MQTT-4.3.2-2]; it is already on its way.
            self.write_now(protocol.encode_puback(publish.packet_id))

    def _transport(self) -> asyncio.WriteTransport | None:
        """Return the connection's transport while it can still be written to, else None."""
        writer = getattr(self.writer, "_writer", None)
        transport: asyncio.WriteTransport | None = writer.transport if writer is not None else None
        if transport is None or transport.is_closing():
            return None
        return transport

    def write_now(self, frame: bytes) -> None:
        """Write an encoded packet without a task or a lock: now, or when the cork is released.

        Safe beside amqtt's own writes: each of them is one write() in one step of a task.
        """
        if CORK.active:
            CORK.hold(self, frame)
        else:
            self.write_out(frame)

    def write_out(self, data: bytes) -> None:
        """Write to the transport, unless the connection is gone or going."""
        transport = self._transport()
        if transport is None:
            return
        try:
            transport.write(data)
        except RuntimeError:
            # amqtt is closing this connection (write_eof sent, close not yet); the caller's
            # reader (the publisher's, for a delivery) must not see the error.
            return

    def write_frame(self, frame: bytes) -> None:
        """Write an encoded QoS 0 PUBLISH now; drop it if the client lags (at most once)."""
        transport = self._transport()
        if transport is None:
            return
        if transport.get_write_buffer_size() > self.QOS0_BUFFER_LIMIT:
            # An unbounded buffer for a client that reads nothing would not be allowed; at
            # most once allows dropping. Said once per thousand, not per message.
            self.dropped += 1
            if self.dropped % 1000 == 1:
                logger.warning(
                    "Client %s is not reading: dropped %d QoS 0 messages so far.",
                    self.session.client_id if self.session else "?", self.dropped,
                )  # fmt: skip
            return
        self.write_now(frame)

    async def _dispatch(self, frame: Frame) -> bool:
        """Decode ``frame`` with amqtt and handle it; return True after DISCONNECT."""
        header = MQTTFixedHeader(frame.packet_type, frame.flags, len(frame.body))
        try:
            packet = await packet_class(header).from_stream(
                BufferReader(frame.body), fixed_header=header
            )
        except (MQTTError, struct.error, ValueError, IndexError) as exc:
            raise ProtocolViolation(f"malformed {frame.name}: {exc}", "MQTT-1.5 / 2.2") from exc
        kind = frame.packet_type
        if kind == protocol.PUBLISH and packet.qos == QOS_2:
            # An incoming QoS 2 flow waits for PUBREL: run it beside the reader.
            self._spawn(self.handle_publish(packet))
        elif kind == protocol.PUBLISH:
            await self.handle_publish(packet)
        elif kind == protocol.PUBREC:
            await self.handle_pubrec(packet)
        elif kind == protocol.PUBREL:
            await self._handle_pubrel(packet)
        elif kind == protocol.PUBCOMP:
            await self.handle_pubcomp(packet)
        elif kind == protocol.SUBSCRIBE:
            await self.handle_subscribe(packet)
        elif kind == protocol.UNSUBSCRIBE:
            await self.handle_unsubscribe(packet)
        elif kind == protocol.PINGREQ:
            await self.handle_pingreq(packet)
        elif kind == protocol.DISCONNECT:
            await self.handle_disconnect(packet)
            return True
        return False

    async def _handle_pubrel(self, pubrel: PubrelPacket) -> None:
        # amqtt ignores a PUBREL it has no waiter for. After a reconnect the client resends
        # PUBREL for a QoS 2 message whose waiter died with the old connection: deliver the
        # stored message now, and answer PUBCOMP either way [MQTT-4.3.3-2, MQTT-4.4.0-1].
        packet_id = pubrel.packet_id
        waiter = self._pubrel_waiters.get(packet_id)
        if waiter is not None and not waiter.done():
            await self.handle_pubrel(pubrel)
            return
        stored = self.session.inflight_in.pop(packet_id, None)
        if stored is not None:
            await self.session.delivered_message_queue.put(stored)
        await self._send_packet(PubcompPacket.build(packet_id))

    def _spawn(self, coro: Any) -> None:  # noqa: ANN401 - a coroutine
        task = asyncio.create_task(coro)
        self._flows.add(task)
        task.add_done_callback(self._flow_done)

    def _flow_done(self, task: asyncio.Task[None]) -> None:
        self._flows.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("Message flow failed: %r", task.exception())

    # --- keepalive: reading is what enforces it --------------------------------------------

    def handle_read_timeout(self) -> None:
        """Unused: the reader loop closes a silent client itself."""

    # --- outgoing QoS 1 and 2: keep until acknowledged ---------------------------------------

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:  # noqa: ANN401
        # Replaces amqtt's outgoing QoS 1 flow, which drops the message after 5 s without
        # PUBACK. At least once means the message stays in the session until acknowledged and
        # is resent (DUP set) on reconnect [MQTT-4.4.0-1]. Incoming QoS 1 is amqtt's.
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        self.session.inflight_out[packet_id] = app_message
        publish = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            await self._send_packet(publish)
            app_message.publish_packet = publish
            app_message.puback_packet = await waiter
        finally:
            self._puback_waiters.pop(packet_id, None)
        self.session.inflight_out.pop(packet_id, None)

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:  # noqa: ANN401
        # Replaces amqtt's outgoing QoS 2 flow, which gives up after 5 s without PUBREC or
        # PUBCOMP and forgets the message. Here it waits; after a reconnect the flow resumes
        # where it stopped: PUBLISH again (DUP) before PUBREC, PUBREL after [MQTT-4.4.0-1].
        if app_message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        self.session.inflight_out[packet_id] = app_message
        loop = asyncio.get_running_loop()
        if app_message.pubrec_packet is None:
            publish = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            waiter: asyncio.Future[Any] = loop.create_future()
            self._pubrec_waiters[packet_id] = waiter
            try:
                await self._send_packet(publish)
                app_message.publish_packet = publish
                app_message.pubrec_packet = await waiter
            finally:
                self._pubrec_waiters.pop(packet_id, None)
        comp: asyncio.Future[Any] = loop.create_future()
        self._pubcomp_waiters[packet_id] = comp
        try:
            app_message.pubrel_packet = PubrelPacket.build(packet_id)
            await self._send_packet(app_message.pubrel_packet)
            app_message.pubcomp_packet = await comp
        finally:
            self._pubcomp_waiters.pop(packet_id, None)
        self.session.inflight_out.pop(packet_id, None)

    async def _retry_deliveries(self) -> None:
        # Replaces amqtt's version, which start() awaits with a 10 s limit per message, holding
        # up the whole connection. Unacknowledged messages are resent in the background.
        for message in list(self.session.inflight_out.values()):
            if message.qos != QOS_0:
                self._spawn(self._handle_message_flow(message))

    def deliver(self, topic: str, data: bytes | bytearray, qos: int, *, retain: bool) -> None:
        """Send a message to this client without making the caller wait for the flow.

        QoS 1 is written at once and kept in the session until PUBACK (no task: a task would
        cost the message a loop iteration before it leaves); QoS 2 runs amqtt's flow as a task.
        """
        session = self.session
        if qos != 1 or session is None:
            self._spawn(self.mqtt_publish(topic, data, qos, retain))
            return
        packet_id = session.next_packet_id
        message = OutgoingApplicationMessage(packet_id, topic, qos, bytes(data), retain)
        message.publish_packet = message.build_publish_packet()  # sent: a resend sets DUP
        session.inflight_out[packet_id] = message  # until PUBACK [MQTT-4.3.2-1, MQTT-4.4.0-1]
        self.write_now(protocol.encode_publish_qos1(topic, bytes(data), packet_id, retain=retain))

    def _acknowledged(self, packet_id: int) -> None:
        """Handle PUBACK: end a resent flow that waits for it, or a message deliver() sent."""
        waiter = self._puback_waiters.get(packet_id)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(PubackPacket.build(packet_id))
            return
        inflight = self.session.inflight_out if self.session else {}
        message = inflight.get(packet_id)
        if message is not None and message.qos == 1:
            del inflight[packet_id]
        else:  # unknown, or a QoS 2 message's id: ignored, as amqtt does
            logger.debug("PUBACK for unknown packet id %d.", packet_id)
