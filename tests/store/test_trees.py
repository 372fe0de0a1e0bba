"""The map over nested containers of tensors (trajscope.store.trees)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import torch

from trajscope.store.trees import tree_map

Pair = namedtuple("Pair", "x y")


@dataclasses.dataclass(frozen=True)
class Box:
    a: object
    b: object = None


def test_tree_map_keeps_structure() -> None:
    tree = {"p": Pair(1, [2, (3, "s")]), "o": OrderedDict(k=4), "box": Box(5, {"q": 6}), "n": None}
    out = tree_map(lambda v: v * 10, tree, leaf=int)
    assert out == {"p": Pair(10, [20, (30, "s")]), "o": {"k": 40}, "box": Box(50, {"q": 60}), "n": None}
    assert type(out["p"]) is Pair and type(out["o"]) is dict
    # without a leaf type every non-container is a leaf
    assert tree_map(repr, [1, ("a", None)]) == ["1", ("'a'", "None")]
    # a leaf type is checked before the container rules
    assert tree_map(len, {"t": (1, 2, 3)}, leaf=tuple) == {"t": 3}


def test_tree_map_tensors() -> None:
    batch = (torch.ones(2), {"y": torch.arange(3), "name": "b"})
    out = tree_map(lambda t: t.double(), batch, leaf=torch.Tensor)
    assert out[0].dtype == torch.float64 and out[1]["y"].dtype == torch.float64 and out[1]["name"] == "b"
