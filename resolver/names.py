"""DNS names as the policy sees them: lower case, no trailing dot, checked against RFC 1035 limits."""
from __future__ import annotations

import re

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def normalize(name: str) -> str:
    """Lower case without the trailing dot: the one form names are compared in."""
    return name.rstrip(".").lower() if name.endswith(".") else name.lower()


def name_problem(name: object) -> str | None:
    """Why `name` is not a usable DNS name, or None when it is."""
    if not isinstance(name, str):
        return f"{name!r} is not a name (expected text)"
    if name != name.strip() or not name:
        return f"{name!r} is not a valid name (empty or surrounded by spaces)"
    if name != name.lower():
        return f"{name!r} is not a valid name (write names in lower case)"
    if name.endswith("."):
        return f"{name!r} is not a valid name (no trailing dot, please)"
    if len(name) > 253:
        return f"{name!r} is not a valid name (longer than 253 characters)"
    for label in name.split("."):
        if not _LABEL.match(label):
            return f"{name!r} is not a valid name (bad label {label!r})"
    return None


def suffixes(name: str):
    """`a.b.c` -> `a.b.c`, `b.c`, `c`: the names whose subtree contains `name`, most specific first."""
    while True:
        yield name
        dot = name.find(".")
        if dot < 0:
            return
        name = name[dot + 1:]


def is_within(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)
