"""The live page the WebSocket port serves to a plain GET (as mosquitto's ``http_dir``).

Only the page's own files are served, read when asked for: ``index.html`` at ``/``, its script
and style sheet, and MQTT.js (``/mqtt.min.js``) from the npm install in the same directory
(``make web``). Nothing else of the file system is reachable: a path is looked up in a fixed
table, never joined to the directory.
"""

from __future__ import annotations

import email.utils
from pathlib import Path
from typing import Final

from websockets.datastructures import Headers
from websockets.http11 import Response

MQTTJS: Final = "node_modules/mqtt/dist/mqtt.min.js"
"""Where ``npm install`` puts the browser build of MQTT.js, under the page's directory."""

FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/mqtt.min.js": (MQTTJS, "text/javascript; charset=utf-8"),
}


class Page:
    """The files of the live page, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        """Serve the page in ``directory``."""
        self.directory = directory

    @property
    def has_mqttjs(self) -> bool:
        """Whether MQTT.js is installed next to the page (``make web``)."""
        return (self.directory / MQTTJS).is_file()

    def respond(self, path: str) -> Response:
        """Answer a GET of ``path``: the file, 404, or 426 for /mqtt."""
        if path == "/mqtt":
            return _response(426, "Upgrade Required", b"MQTT over WebSockets: ask for an "
                             b"upgrade (Upgrade: websocket, Sec-WebSocket-Protocol: mqtt).\n",
                             "text/plain; charset=utf-8", [("Upgrade", "websocket")])  # fmt: skip
        entry = FILES.get(path)
        if entry is None:
            return _response(404, "Not Found", f"No {path} here: the page is at /.\n".encode(),
                             "text/plain; charset=utf-8")  # fmt: skip
        name, kind = entry
        try:
            body = (self.directory / name).read_bytes()
        except OSError:
            hint = " (run `make web` to install MQTT.js)" if name == MQTTJS else ""
            return _response(404, "Not Found", f"{path} is not installed{hint}.\n".encode(),
                             "text/plain; charset=utf-8")  # fmt: skip
        return _response(200, "OK", body, kind)


def _response(
    status: int, phrase: str, body: bytes, kind: str, extra: list[tuple[str, str]] | None = None
) -> Response:
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Content-Type", kind),
        ("Cache-Control", "no-cache"),
        *(extra or []),
    ])  # fmt: skip
    return Response(status, phrase, headers, body)
