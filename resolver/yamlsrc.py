"""YAML reading that remembers where each value came from, for `path:line` errors.

Mappings load as `Located` dicts and sequences as `LocatedList`s; both know the line of every key
or item. Duplicate keys, non-UTF-8 bytes, oversized files and nesting too deep are problems, not
crashes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 32
MAX_VALUES = 4_000_000      # values after expanding aliases: a "billion laughs" file is a problem


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = "" if self.severity == "error" else f"{self.severity}: "
        return f"{self.path}:{self.line}: {prefix}{self.message}"


class Located(dict):
    """A mapping that knows its own line and the line of each key."""

    line = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict = {}

    def line_of(self, key) -> int:
        return self.lines.get(key, self.line)


class LocatedList(list):
    line = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.lines[index] if index < len(self.lines) else self.line


class _DuplicateKey(Exception):
    def __init__(self, key, line):
        super().__init__(key)
        self.key, self.line = key, line


class _TooDeep(Exception):
    def __init__(self, line):
        super().__init__(line)
        self.line = line


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):   # libyaml when present: ~10x faster
    depth = 0


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Located:
    out = Located()
    out.line = node.start_mark.line + 1
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            key = str(key)
        if key in out:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        out[key] = _construct_nested(loader, value_node)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> LocatedList:
    out = LocatedList()
    out.line = node.start_mark.line + 1
    for item in node.value:
        out.append(_construct_nested(loader, item))
        out.lines.append(item.start_mark.line + 1)
    return out


def _construct_nested(loader: _Loader, node):
    loader.depth += 1
    try:
        if loader.depth > MAX_DEPTH:
            raise _TooDeep(node.start_mark.line + 1)
        return loader.construct_object(node, deep=True)
    finally:
        loader.depth -= 1


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
# Timestamps stay strings: the policy parses them itself and insists on a time zone.
_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def _expanded_size(value, seen: dict) -> int:
    """How many values `value` holds once aliases are expanded; each shared object is counted
    once per use but walked only once, so this is fast even when the answer is huge."""
    if not isinstance(value, (dict, list)):
        return 1
    known = seen.get(id(value))
    if known is None:
        items = value.values() if isinstance(value, dict) else value
        known = seen[id(value)] = 1 + sum(_expanded_size(v, seen) for v in items)
    return known


def parse_yaml(text: str, path: str) -> tuple[object, list[Problem]]:
    """Parse YAML text; return (data, problems). Data is None when the text is unusable."""
    try:
        loader = _Loader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
        if _expanded_size(data, {}) > MAX_VALUES:
            return None, [Problem(path, 1, f"expands to more than {MAX_VALUES} values (YAML aliases?)")]
        return data, []
    except _DuplicateKey as e:
        return None, [Problem(path, e.line, f"duplicate key {e.key!r}")]
    except _TooDeep as e:
        return None, [Problem(path, e.line, f"nested more than {MAX_DEPTH} levels deep")]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        return None, [Problem(path, line, f"invalid YAML: {e.problem or e.context}")]
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as e:
        return None, [Problem(path, 1, f"invalid YAML: {e}")]


def read_yaml(path: Path, shown: str | None = None) -> tuple[object, list[Problem], bytes]:
    """Read and parse one file; return (data, problems, raw bytes)."""
    shown = shown or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, [Problem(shown, 1, f"file is {size} bytes, more than {MAX_FILE_BYTES}")], b""
        raw = path.read_bytes()
    except OSError as e:
        return None, [Problem(shown, 1, f"cannot read: {e.strerror or e}")], b""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return None, [Problem(shown, line, "not valid UTF-8")], raw
    data, problems = parse_yaml(text, shown)
    return data, problems, raw
