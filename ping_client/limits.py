"""What a ping may be, given the broker's limits (its MQTT 5 CONNACK)."""

from __future__ import annotations

from collections.abc import Callable

from paho.mqtt.properties import Properties

from common.aiomqtt_fixes import Client


def too_large(
    client: Client,
    payload: bytes,
    size: int,
    *,
    topic: str,
    qos: int,
    properties: Callable[[bytes], Properties | None],
) -> str:
    """Say that a ``size``-byte ping is over the broker's Maximum Packet Size.

    And which ``--size`` fits, if one does. ``properties`` makes a ping's properties for a
    payload.
    """
    bare = payload.rstrip(b" ")
    fits = len(payload) - (size - (client.maximum_packet_size or 0))
    while fits >= len(bare):  # one length byte fewer may let a byte more fit: try down
        padded = bare.ljust(fits)
        if client.oversized(topic, padded, qos, properties(padded)) is None:
            break
        fits -= 1
    if fits >= len(bare):
        advice = f"At most --size {fits} fits"
    else:
        advice = "Not even an unpadded ping fits: shorter topics, or a broker that takes more"
    return f"Cannot ping: {client.too_large(size)}; nothing sent. {advice}."
