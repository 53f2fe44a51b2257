"""Names and numbers every process agrees on."""

from typing import Final

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 10008
PING_TOPIC: Final = "/ping"
PONG_TOPIC: Final = "/pong"
RECONNECT_INTERVAL: Final = 0.1
"""Seconds between two connection attempts while the broker is unreachable."""

ENV_PREFIX: Final = "MQTT_"
"""Every CLI flag ``--some-flag`` falls back to the environment variable ``MQTT_SOME_FLAG``."""

# Exit codes. 0 is a clean stop; the others follow sysexits.h where one fits.
EXIT_OK: Final = 0
EXIT_USAGE: Final = 64
"""A malformed flag or environment variable (EX_USAGE)."""
EXIT_UNAVAILABLE: Final = 69
"""The broker could not listen on its address, e.g. the port is taken (EX_UNAVAILABLE)."""
EXIT_SOFTWARE: Final = 70
"""A library we rely on no longer has the internals we use, e.g. after an upgrade (EX_SOFTWARE)."""
EXIT_CANTCREAT: Final = 73
"""sysexits.h: an output file could not be written (a report, the password file)."""
EXIT_CONFIG: Final = 78
"""sysexits.h EX_CONFIG: a configuration file (the broker's ACL) is malformed."""
EXIT_FORCED: Final = 124
"""The orderly shutdown overran its bound and the watchdog ended the process (as timeout(1))."""
