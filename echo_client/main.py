"""The echo client: subscribe to the ping topic, republish each payload on the pong topic."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.properties import Properties

from common import cli, logs
from common.aiomqtt_fixes import Client
from common.client import ClientSettings, client_parser, client_settings, fallback, make_client
from common.constants import EXIT_FORCED, EXIT_OK, EXIT_SOFTWARE, EXIT_USAGE
from common.lifecycle import CLIENT_SHUTDOWN_LIMIT, install_stop_handlers
from common.properties import publish_properties
from common.reconnect import Link
from common.show import show

logger = logging.getLogger("echo_client")

DEFAULT_MAX_PAYLOAD = 1024 * 1024


@dataclass(frozen=True, slots=True)
class EchoSettings:
    """Where to echo and what is too big to echo."""

    client: ClientSettings
    max_payload: int = DEFAULT_MAX_PAYLOAD
    share: str | None = None
    """A shared subscription group to echo as a member of (MQTT 5 section 4.8.2)."""

    @property
    def ping_filters(self) -> tuple[str, str]:
        """What is ping traffic: the ping topic, and each device's under it.

        A device of an MQTT 3.1.1 fleet (``ping_client --devices N --protocol 3.1.1``) pings on
        ``<ping>/<device>`` and is answered on ``<pong>/<device>``: 3.1.1 has no response topic.
        """
        ping = self.client.ping_topic
        return ping, f"{ping}/+"

    @property
    def subscriptions(self) -> list[str]:
        """The filters subscribed to: the ping filters, or their shared forms."""
        filters = self.ping_filters
        return [f"$share/{self.share}/{f}" for f in filters] if self.share else list(filters)

    def is_ping(self, topic: str) -> bool:
        """Whether the topic name ``topic`` is ping traffic.

        Echoing anything else is how echo loops start.
        """
        return _matches_any(topic, self.ping_filters)


@functools.lru_cache(maxsize=65_536)
def _matches_any(topic: str, filters: tuple[str, ...]) -> bool:
    """Whether a topic name matches one of ``filters``.

    Cached: every ping is matched twice (its topic and its response topic), and a fleet has one
    response topic per device.
    """
    name = aiomqtt.Topic(topic)
    return any(name.matches(f) for f in filters)


@functools.lru_cache(maxsize=65_536)
def is_topic_name(text: str) -> bool:
    """Whether ``text``, a string read off the wire, is a topic name one may publish to.

    Not empty and no wildcard (MQTT 5 section 4.7); paho has already refused a string with
    U+0000 in it, and its two-byte length keeps it within 65,535 bytes.
    """
    try:
        aiomqtt.Topic(text)
    except ValueError:
        return False
    return True


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> EchoSettings:
    """Parse flags, falling back to ``MQTT_*`` variables; exit 64 on a malformed value."""
    parser = client_parser(
        "echo_client",
        "Republish every message on the ping topic, byte for byte, to the pong topic (or to an "
        "MQTT 5 request's response topic, with its correlation data).",
        environ,
        epilog=cli.exit_codes(
            (EXIT_OK, "stopped by SIGTERM or SIGINT"),
            (EXIT_USAGE, "bad usage: a malformed flag or environment variable"),
            (EXIT_SOFTWARE, "the installed aiomqtt lacks the internals this client relies on"),
            (EXIT_FORCED, "a shutdown overran its bound and the watchdog ended the process"),
        ),
    )
    cli.add_option(
        parser,
        environ,
        "--max-payload",
        convert=cli.positive_int,
        default=DEFAULT_MAX_PAYLOAD,
        help="payloads larger than this many bytes are logged and skipped",
    )
    cli.add_option(
        parser,
        environ,
        "--share",
        convert=share_group,
        default=None,
        help="subscribe as a member of this shared subscription group ($share/GROUP/<ping "
        "topic>): several echo clients then split the pings, each answered once",
    )
    cli.add_version(parser, lambda: cli.versions("echo_client", "aiomqtt", "paho-mqtt"))
    args = parser.parse_args(argv)
    return EchoSettings(
        client=client_settings(parser, args, "echo_client", environ),
        max_payload=args.max_payload,
        share=args.share,
    )


def share_group(text: str) -> str:
    """Parse a shared subscription group name: not empty, no '/', '+' or '#'."""
    if not text or any(c in text for c in "/+#"):
        raise ValueError(f"a share group is a non-empty name without '/', '+' or '#': {text!r}")
    return text


class Ownership:
    """Acknowledges each ping once its echo is acknowledged, in the order the pings came.

    The client is made with manual acknowledgement. Had paho acknowledged a ping on receipt, an
    echo client killed before its echo reached the broker would lose that ping for good; held
    until then, the ping stays in the broker's session (``--session persistent``) and comes
    again. Acknowledgements keep the order of the pings [MQTT-4.6.0-2], so one whose echo is
    not acknowledged yet holds back those after it. One connection's pings only: the link's
    next connection starts afresh, and the broker resends what was not acknowledged.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        """Acknowledge through ``client`` (a :class:`common.aiomqtt_fixes.Client`, or nothing)."""
        self._ack = client.ack if isinstance(client, Client) else None
        self._waiting: deque[tuple[aiomqtt.Message, asyncio.Task[None] | None]] = deque()

    def settled(self, message: aiomqtt.Message) -> None:
        """``message`` needs nothing more: acknowledge it in its turn."""
        self.when_done(message, None)

    def when_done(self, message: aiomqtt.Message, echo: asyncio.Task[None] | None) -> None:
        """Acknowledge ``message`` in its turn, once ``echo`` (its echo's publish) succeeds."""
        if self._ack is None or not message.qos:
            return
        self._waiting.append((message, echo))
        if echo is None:
            self._release()
        else:
            echo.add_done_callback(lambda _: self._release())

    def _release(self) -> None:
        waiting = self._waiting
        while waiting:
            message, echo = waiting[0]
            if echo is not None and (
                not echo.done() or echo.cancelled() or echo.exception() is not None
            ):
                # Not done yet, or failed: the link is breaking, and the broker resends it.
                return
            waiting.popleft()
            assert self._ack is not None  # noqa: S101 - only messages to acknowledge wait
            self._ack(message)


class Echo:
    """Counts what it echoes; one instance lives across reconnects."""

    def __init__(self, settings: EchoSettings) -> None:
        """Prepare to echo per ``settings``."""
        self.settings = settings
        self.echoed = 0
        self.bytes = 0
        self.skipped = 0

    async def session(self, client: Client) -> None:
        """Echo until the link breaks (the Link has subscribed to the ping topic)."""
        qos = self.settings.client.qos
        owner = Ownership(client)
        # QoS 1/2 echoes are not awaited one by one (that would wait a PUBACK per message);
        # they run as tasks of this group, cancelled when the link breaks. One that fails (no
        # PUBACK in time) breaks the link: the broker then sends again every ping whose echo
        # was not acknowledged, since those pings were not acknowledged either.
        try:
            async with asyncio.TaskGroup() as echoes:
                async for message in client.messages:
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    if not self.settings.is_ping(message.topic.value):
                        # Never echo anything but ping traffic (a stale subscription, a
                        # retained message on another topic): that is how echo loops start.
                        logger.warning(
                            "Ignoring %s on %s: not the ping topic.",
                            show(payload),
                            message.topic.value,
                        )
                        owner.settled(message)
                        continue
                    logger.info("Got %s on %s.", show(payload), message.topic.value)
                    if len(payload) > self.settings.max_payload:
                        self.skipped += 1
                        logger.warning(
                            "Skipping %d-byte payload: over the %d-byte limit.",
                            len(payload),
                            self.settings.max_payload,
                        )
                        owner.settled(message)
                        continue
                    topic, properties = self._answer(message)
                    size = client.oversized(topic, payload, qos, properties)
                    if size is not None:
                        # Sent, the broker would end the connection, and paho send it again
                        # on the next (at QoS 1 and 2): one ping would stop every echo.
                        self.skipped += 1
                        logger.warning("Not echoing %s on %s: %s.", show(payload), topic,
                                       client.too_large(size))  # fmt: skip
                        owner.settled(message)
                        continue
                    logger.info("Publishing %s on %s.", show(payload), topic)
                    if qos == 0:
                        await self._publish(client, topic, payload, properties)
                        owner.settled(message)
                    else:
                        echo = self._publish(client, topic, payload, properties)
                        owner.when_done(message, echoes.create_task(echo, name="echo-publish"))
        except* aiomqtt.MqttError as failed:
            raise failed.exceptions[0] from None

    async def _publish(
        self, client: aiomqtt.Client, topic: str, payload: bytes, properties: Properties | None
    ) -> None:
        try:
            async with asyncio.timeout(client.timeout):
                await client.publish(topic, payload, qos=self.settings.client.qos,
                                     properties=properties, timeout=math.inf)  # fmt: skip
        except TimeoutError:
            raise aiomqtt.MqttError(
                f"no acknowledgement for the echo of {show(payload)} within {client.timeout:g} s"
            ) from None
        self.echoed += 1
        self.bytes += len(payload)

    def _answer(self, message: aiomqtt.Message) -> tuple[str, Properties | None]:
        """Decide where to echo, and with what.

        An MQTT 5 request's response topic and correlation data (section 4.10), else the pong
        topic (``<pong>/<device>`` for a ping on ``<ping>/<device>``).
        """
        settings = self.settings
        ping, pong = settings.client.ping_topic, settings.client.pong_topic
        asked = getattr(message.properties, "ResponseTopic", None)
        if not asked:
            device = message.topic.value[len(ping) + 1 :]  # "" for the ping topic itself
            return (f"{pong}/{device}" if device else pong), None
        if not is_topic_name(asked):
            # MQTT 5 forbids wildcards in a response topic (section 3.3.2.3.5), but not every
            # broker checks: mosquitto 2.0 passes "/pong/#" on. Nowhere to publish an answer.
            logger.warning("Ignoring response topic %r: not a topic name.", asked)
            return pong, None
        if settings.is_ping(asked):
            # Answering on the ping topic would echo our own answer for ever.
            logger.warning("Ignoring response topic %s: it is the ping topic.", asked)
            return pong, None
        properties = publish_properties()
        correlation = getattr(message.properties, "CorrelationData", None)
        if correlation is not None:
            properties.CorrelationData = correlation
        return asked, properties


async def amain(settings: EchoSettings) -> int:
    """Echo until SIGTERM/SIGINT, then log a summary; return the exit status."""
    stop = asyncio.Event()
    install_stop_handlers(stop, hard_limit=CLIENT_SHUTDOWN_LIMIT)
    address = settings.client.address
    link = Link(
        make_client(settings.client, manual_ack=True),
        fallback=fallback(settings.client, manual_ack=True),
        address=address,
        interval=settings.client.reconnect_interval,
        topics=[(topic, settings.client.qos) for topic in settings.subscriptions],
        # The devices' topics are for MQTT 3.1.1 fleets only: a broker whose ACL does not let
        # the echo read them still gets its pings echoed.
        optional=settings.subscriptions[1:],
    )
    echo = Echo(settings)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(link.run(echo.session), name="echo-link")
        await stop.wait()
        link.stop()
        runner.cancel()
    logger.info(
        "Echoed %d messages (%d bytes), skipped %d; disconnected %.3f s, %d reconnects.",
        echo.echoed,
        echo.bytes,
        echo.skipped,
        link.downtime(),
        link.reconnects,
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    """Run the echo client as a program: ``python -m echo_client --help``."""
    settings = parse(argv, os.environ)
    logs.configure("echo_client", settings.client.log_level)
    sys.exit(asyncio.run(amain(settings)))
