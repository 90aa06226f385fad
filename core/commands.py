"""How each package adds its subcommands to ``supportbot``: a ``register(groups)`` function per module.

``groups`` maps a group name ("root", "eval", ...) to an argparse sub-parsers object. A handler is
``func(args, settings) -> int`` set with ``parser.set_defaults(func=...)``; heavy imports go inside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic-settings costs ~0.2 s to import; `supportbot --help` does not need it
    from core.settings import Settings

Handler = Callable[[argparse.Namespace, "Settings"], int]
Groups = dict[str, Any]  # name -> argparse._SubParsersAction


def add(groups: Groups, group: str, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = groups[group].add_parser(name, help=help, description=help)
    parser.set_defaults(func=handler)
    return parser
