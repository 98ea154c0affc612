"""Bundle builders that splice stored resource bytes instead of re-serialising them.

A searchset of 50 resources is assembled from their stored JSON bytes, so the hub never
parses a resource it only passes through (ARCHITECTURE: orjson, bytes in and out).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BundleWriter:
    """Accumulates entries as bytes and renders one Bundle."""

    def __init__(self, bundle_type: str):
        self.type = bundle_type
        self.entries: list[bytes] = []
        self.links: list[dict[str, str]] = []
        self.total: int | None = None

    def link(self, relation: str, url: str) -> None:
        self.links.append({"relation": relation, "url": url})

    def add(self, entry: dict[str, Any], resource: bytes | None = None) -> None:
        """Add an entry; ``resource`` bytes, when given, become ``entry.resource``."""
        raw = orjson.dumps(entry)
        if resource:
            raw = raw[:-1] + (b',"resource":' if len(raw) > 2 else b'"resource":') + resource + b"}"
        self.entries.append(raw)

    def add_rendered(self, entries: bytes) -> None:
        """Add entries already rendered as JSON objects joined by commas (nothing for b"")."""
        if entries:
            self.entries.append(entries)

    def render(self) -> bytes:
        head: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": _now()},
            "type": self.type,
        }
        if self.total is not None:
            head["total"] = self.total
        if self.links:
            head["link"] = self.links
        if not self.entries:  # FHIR JSON has no empty arrays (json.html#arrays)
            return orjson.dumps(head)
        return orjson.dumps(head)[:-1] + b',"entry":[' + b",".join(self.entries) + b"]}"


def bundle(bundle_type: str, entries: Iterable[dict[str, Any]]) -> bytes:
    writer = BundleWriter(bundle_type)
    for entry in entries:
        writer.add(entry)
    return writer.render()
