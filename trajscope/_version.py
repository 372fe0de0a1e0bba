"""The package version, read once from the installed package's metadata.

``pyproject.toml`` is the one place the version is written; an installed (or editable) package
exposes it through :mod:`importlib.metadata`. A source tree used without installing has no
metadata, and reports ``0+unknown`` (a valid PEP 440 version that sorts before every release).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["VERSION"]

try:
    VERSION: str = version("trajscope")
except PackageNotFoundError:  # a source checkout on sys.path without an install
    VERSION = "0+unknown"
