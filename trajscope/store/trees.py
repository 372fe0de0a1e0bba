"""One map over nested containers ("trees") of tensors, torch-free.

A minibatch, a snapshot's parameter dict or a message between processes is a nesting of dicts,
lists, tuples, named tuples and dataclass instances around leaves (tensors, numbers, strings,
None). :func:`tree_map` rebuilds such a nesting with a function applied to its leaves, so every
walker of the package agrees on what a container is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["tree_map"]


def tree_map(fn: Callable[[Any], Any], tree: Any, *, leaf: type | tuple[type, ...] | None = None) -> Any:
    """``tree`` rebuilt with ``fn`` applied to its leaves.

    Containers, walked recursively:

    * ``dict`` (any subclass): rebuilt as a plain ``dict`` with the same keys, in order;
    * named tuples: the same named-tuple type, field by field;
    * other tuples and lists: a ``tuple``/``list`` (a subclass is rebuilt with ``type(x)(items)``);
    * dataclass instances: :func:`dataclasses.replace` with every ``init`` field mapped.

    Args:
        fn: applied to each leaf; its result takes the leaf's place.
        tree: the nesting to map (a bare leaf is mapped too).
        leaf: if given, ``fn`` is applied only to leaves that are instances of it (checked before
            the container rules, so a leaf type may itself be a container); every other leaf is
            kept as it is. ``None``: ``fn`` is applied to every non-container.
    """

    def walk(x: Any) -> Any:
        if leaf is not None and isinstance(x, leaf):
            return fn(x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, tuple):
            items = [walk(v) for v in x]
            if hasattr(x, "_fields"):  # a named tuple: positional constructor
                return type(x)(*items)
            return tuple(items) if type(x) is tuple else type(x)(items)
        if isinstance(x, list):
            items = [walk(v) for v in x]
            return items if type(x) is list else type(x)(items)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            changes = {f.name: walk(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
            return dataclasses.replace(x, **changes)
        return fn(x) if leaf is None else x

    return walk(tree)
