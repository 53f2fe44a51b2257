"""The one asyncio feature Python 3.10 lacks that we use: TaskGroup."""

import sys

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup
else:  # pragma: no cover - exercised only on 3.10
    from taskgroup import TaskGroup

__all__ = ["TaskGroup"]
