"""Every reason and return code the broker sends or reads, by name, in one table.

MQTT 5.0 section 2.4 gives one byte's meaning across packet kinds; 3.1.1 has CONNACK return
codes (section 3.2.2.3) and SUBACK's 0x80. A code of 0x80 or more is a failure.

The ``mqtt5`` codec's reason codes are enums whose stub says ``IntEnum`` but which are not ints
at run time: ``==`` against an int works, ``>=`` raises TypeError. Compare them with
:func:`failed` or by ``.value``, never with an ordering against a number.
"""

from __future__ import annotations

from typing import Final, Protocol


class _Coded(Protocol):
    @property
    def value(self) -> int: ...


# MQTT 5.0, section 2.4.
SUCCESS: Final = 0x00
DISCONNECT_WITH_WILL_MESSAGE: Final = 0x04
NO_MATCHING_SUBSCRIBERS: Final = 0x10
NO_SUBSCRIPTION_EXISTED: Final = 0x11
UNSPECIFIED_ERROR: Final = 0x80
MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
IMPLEMENTATION_SPECIFIC_ERROR: Final = 0x83
UNSUPPORTED_PROTOCOL_VERSION: Final = 0x84
BAD_USER_NAME_OR_PASSWORD: Final = 0x86
NOT_AUTHORIZED: Final = 0x87
SERVER_SHUTTING_DOWN: Final = 0x8B
BAD_AUTHENTICATION_METHOD: Final = 0x8C
KEEP_ALIVE_TIMEOUT: Final = 0x8D
SESSION_TAKEN_OVER: Final = 0x8E
TOPIC_NAME_INVALID: Final = 0x90
PACKET_ID_NOT_FOUND: Final = 0x92
RECEIVE_MAXIMUM_EXCEEDED: Final = 0x93
TOPIC_ALIAS_INVALID: Final = 0x94
PACKET_TOO_LARGE: Final = 0x95
PAYLOAD_FORMAT_INVALID: Final = 0x99

# MQTT 3.1.1: CONNACK return codes (section 3.2.2.3) and the SUBACK failure (section 3.9.3).
UNACCEPTABLE_PROTOCOL_VERSION_311: Final = 0x01
IDENTIFIER_REJECTED_311: Final = 0x02
NOT_AUTHORIZED_311: Final = 0x05
SUBACK_FAILURE_311: Final = 0x80


def value(code: int | _Coded) -> int:
    """Return the number of a reason code, whether an int or one of ``mqtt5``'s enums."""
    return code if isinstance(code, int) else int(code.value)


def failed(code: int | _Coded) -> bool:
    """Whether a reason code says the operation failed (0x80 or more, section 2.4)."""
    return value(code) >= UNSPECIFIED_ERROR
