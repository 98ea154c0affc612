"""sharedcare: a regional health and care record-sharing hub."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sharedcare")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"
