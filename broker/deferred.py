"""Import amqtt without the modules it imports at start-up but the broker never uses.

amqtt 0.12.1 imports these at module level, whatever its configuration:

- ``yaml`` (amqtt.utils), only to read a YAML config file; the broker passes a dict;
- ``websockets`` (amqtt.adapters, amqtt.broker), only for ``ws`` listeners; ours are TCP;
- ``importlib.metadata`` (amqtt.plugins.manager), only to load plugins by entry point; ours are
  named by dotted path. It alone pulls in 46 modules (email, zipfile, csv, lzma, ...).

They cost 28 % of the broker's start-up: callgrind counts 598 M instructions for
``python -m broker --help`` with them and 428 M without (bytecode compiled in both; 2026-11-29).
``make bench`` has the wall-clock figure, start-up to first CONNACK.

:func:`import_amqtt` imports amqtt while *stand-ins* for those modules sit in ``sys.modules``,
then takes the stand-ins out again, so any later ``import websockets`` gets the real module.
What amqtt's modules keep:

- for ``import yaml`` / ``import websockets.asyncio.server``: the stand-in module, which imports
  the real module on the first attribute read and answers from it (``yaml.full_load``,
  ``websockets.serve``);
- for ``from websockets import ConnectionClosed`` and the like: a placeholder class. amqtt uses
  these names only in annotations and in the ``ws`` listener's code. The first time any real
  module is loaded through a stand-in, every placeholder is replaced by the real object in the
  module that bound it, so a ``ws`` listener would behave as upstream's (tests/test_deferred.py
  serves MQTT over WebSockets through a broker imported this way);
- for ``from importlib.metadata import entry_points``: a function that calls the real one.

Only the broker program does this (``broker/__main__.py``); code that imports ``broker.server``
itself, the tests included, gets amqtt imported the ordinary way.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Names amqtt 0.12.1 binds from each stand-in while it is imported (`from m import name`, or
# read at import time in an annotation). Anything else read from a stand-in loads the real one.
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "yaml": (),
    "websockets": ("ConnectionClosed",),
    "websockets.asyncio": (),
    "websockets.asyncio.connection": ("Connection",),
    "websockets.asyncio.server": ("Server", "ServerConnection"),
    "importlib.metadata": ("EntryPoint", "EntryPoints"),
}
FORWARDERS: dict[str, tuple[str, ...]] = {"importlib.metadata": ("entry_points",)}

_stands_for: dict[int, tuple[object, str, str | None]] = {}
"""By id: each stand-in module -> (it, its module, None); each placeholder -> (it, module, name)."""
_bound: list[tuple[types.ModuleType, str, str, str | None]] = []
"""(importing module, its global, real module, real name or None) for each one amqtt bound."""


def _real(module: str) -> types.ModuleType:
    """Import the real ``module``, first taking any stand-in of its package out of the way."""
    top = module.partition(".")[0]
    for name in list(sys.modules):
        if (name == top or name.startswith(top + ".")) and isinstance(sys.modules[name], StandIn):
            del sys.modules[name]
    real = importlib.import_module(module)
    _heal()
    return real


def _heal() -> None:
    """Rebind every stand-in and placeholder whose real module is now loaded to the real one."""
    for entry in list(_bound):
        importer, global_name, module, name = entry
        real = sys.modules.get(module)
        if real is None or isinstance(real, StandIn):
            continue
        setattr(importer, global_name, real if name is None else getattr(real, name))
        _bound.remove(entry)


class StandIn(types.ModuleType):
    """Stands for a module; the first attribute it does not have imports the real one."""

    def __getattr__(self, name: str) -> object:
        """Answer from the real module (importing it), or its submodule ``name``."""
        if name.startswith("__"):
            raise AttributeError(name)
        real = _real(self.__name__)
        try:
            return getattr(real, name)
        except AttributeError:
            return _real(f"{self.__name__}.{name}")


def _placeholder(module: str, name: str) -> type:
    """Make a class to stand for ``module.name``: an exception class, so ``except`` takes it."""
    cls = type(name, (Exception,), {"__doc__": f"Stands for {module}.{name}."})
    cls.__qualname__ = f"StandIn[{module}.{name}]"  # what a repr or traceback shows
    _stands_for[id(cls)] = (cls, module, name)
    return cls


def _forwarder(module: str, name: str) -> Callable[..., object]:
    """Make a function that calls the real ``module.name``."""

    def forward(*args: object, **kwargs: object) -> object:
        real: Callable[..., object] = getattr(_real(module), name)
        return real(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = name
    return forward


@contextmanager
def standing_in() -> Iterator[list[str]]:
    """Put stand-ins in ``sys.modules`` for the block; yields the names stood in for."""
    stood: list[str] = []
    for module, names in PLACEHOLDERS.items():
        if module in sys.modules:
            continue  # already imported for real: nothing to save
        stand_in = StandIn(module, f"Stand-in for {module}: imports it on first use.")
        _stands_for[id(stand_in)] = (stand_in, module, None)
        if "." not in module:
            stand_in.__path__ = []  # a package, so `import websockets.asyncio` is allowed
        for name in names:
            setattr(stand_in, name, _placeholder(module, name))
        for name in FORWARDERS.get(module, ()):
            setattr(stand_in, name, _forwarder(module, name))
        parent, _, child = module.rpartition(".")
        if isinstance(sys.modules.get(parent), StandIn):
            setattr(sys.modules[parent], child, stand_in)
        sys.modules[module] = stand_in
        stood.append(module)
    try:
        yield stood
    finally:
        for module in stood:
            if isinstance(sys.modules.get(module), StandIn):
                del sys.modules[module]


def import_amqtt() -> list[str]:
    """Import amqtt's broker with stand-ins; return the modules whose import was saved."""
    with standing_in() as stood:
        importlib.import_module("amqtt.broker")
    for name, importer in list(sys.modules.items()):
        if name == "amqtt" or name.startswith("amqtt."):
            for global_name, value in list(vars(importer).items()):
                known = _stands_for.get(id(value))
                if known is not None and known[0] is value:
                    _bound.append((importer, global_name, known[1], known[2]))
    _heal()  # in case something imported a real one while amqtt was being imported
    return stood
