"""YAML with line numbers, for error messages that point at the line to fix.

``yaml.safe_load`` forgets where each value came from; an experiment file
with twenty arms needs "line 47: unknown key 'rhoo'" rather than "somewhere,
a bad key". ``load_marked`` composes the node tree (PyYAML nodes carry
``start_mark``), constructs the plain data with the safe constructor, and
records the line of every mapping key and sequence item by its path, e.g.
``("arms", 2, "rho") -> 31``. It also rejects duplicate keys, which
``safe_load`` silently resolves to the last one, and aliases (``*name``):
a few hundred bytes of nested aliases expand to gigabytes (the "billion
laughs"), and no zsgd file needs them. Without aliases the data is at most
as large as the file, which is capped at ``MAX_BYTES``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zsgd.errors import ZsgdError

PathKey = tuple[Any, ...]
MAX_BYTES = 4 * 1024 * 1024  # experiment and config files are a few kB; a bigger one is a mistake


class _AliasFound(Exception):
    def __init__(self, line: int, anchor: str) -> None:
        self.line, self.anchor = line, anchor


class Marked:
    """Plain data from a YAML file plus the line of each path in it."""

    def __init__(self, path: Path, data: Any, lines: dict[PathKey, int], text: str) -> None:
        self.path, self.data, self.lines, self.text = path, data, lines, text

    def line(self, *path: Any) -> int | None:
        """The line of ``path``, or of its closest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)

    def error(self, message: str, *path: Any) -> ZsgdError:
        """A one-line ZsgdError: ``FILE:LINE: message``."""
        line = self.line(*path)
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        return ZsgdError(f"{where}: {' '.join(message.split())}")


def _loader(text: str) -> Any:
    """A SafeLoader that refuses aliases while composing (before anything is expanded)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _AliasFound(event.start_mark.line + 1, event.anchor)
            return super().compose_node(parent, index)

    return NoAliasLoader(text)


def load_marked(path: Path, what: str = "experiment file") -> Marked:
    """Read and parse ``path``; ZsgdError (with the line) for unreadable or oversized files, bad YAML,
    aliases, duplicate keys."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ZsgdError(f"{path}: {path.stat().st_size:,} bytes is too large for a {what} (at most {MAX_BYTES:,})")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ZsgdError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ZsgdError(f"{path}: not a text file (UTF-8 YAML expected; byte {exc.start} is not UTF-8)") from None
    loader = _loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[PathKey, int] = {}
        if node is not None:
            _walk(loader, node, (), lines, path)
        data = loader.construct_document(node) if node is not None else None
    except _AliasFound as exc:
        raise ZsgdError(f"{path}:{exc.line}: YAML aliases (*{exc.anchor}) are not accepted; write the value out") from None
    except RecursionError:
        raise ZsgdError(f"{path}: nested too deeply to be a {what}") from None
    except ValueError as exc:  # a value PyYAML resolves but Python cannot build: a 5000-digit int, the date 2024-13-45
        why = "a number of more than 4300 digits" if "digits" in str(exc) else " ".join(str(exc).split())[:100]
        raise ZsgdError(f"{path}: invalid value in the {what} ({why})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ZsgdError(f"{path}{where}: invalid YAML ({' '.join(str(problem).split())})") from None
    finally:
        loader.dispose()
    return Marked(path, data, lines, text)


def _walk(loader: Any, node: Any, prefix: PathKey, lines: dict[PathKey, int], path: Path) -> None:
    import yaml

    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                raise ZsgdError(f"{path}:{line}: a mapping key must be a plain value") from None
            if key in seen:
                shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:57] + "..."
                raise ZsgdError(f"{path}:{line}: duplicate key {shown} (first on line {seen[key]})")
            seen[key] = line
            lines[prefix + (key,)] = line
            _walk(loader, value_node, prefix + (key,), lines, path)
            lines[prefix + (key,)] = line  # the key's line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            _walk(loader, item, prefix + (i,), lines, path)
