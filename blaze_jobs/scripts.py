"""The Lua scripts in ``blaze_jobs/lua/``, read once per process and registered once per client.

A script file may start with ``--#include <name>`` lines: the named shared files
(``events.lua``) are put before it, so the functions they define are in its scope. Every key
a script touches comes in ``KEYS`` (``keys.py`` builds them).
"""

from __future__ import annotations

import re
import threading
import weakref
from functools import cache
from importlib import resources
from typing import Any

INCLUDE = re.compile(r"^--#include (\w+)$", re.MULTILINE)


@cache
def source(name: str) -> str:
    """The text of script ``name`` (``transition`` for ``lua/transition.lua``), includes first."""
    text = resources.files("blaze_jobs").joinpath("lua").joinpath(f"{name}.lua").read_text()
    included = [source(part) for part in INCLUDE.findall(text)]
    return "\n".join([*included, INCLUDE.sub("", text)])


_registered: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def script(client: Any, name: str) -> Any:
    """Script ``name`` registered on ``client`` (redis-py, blocking or asyncio): once per client
    object, so a call is an EVALSHA that loads the script only when Redis lacks it."""
    with _lock:
        scripts = _registered.setdefault(client, {})
        found = scripts.get(name)
        if found is None:
            found = scripts[name] = client.register_script(source(name))
        return found
