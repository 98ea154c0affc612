"""The pix tables, registered on the store's metadata so one migration history covers all."""

from __future__ import annotations

from sharedcare.store.schema import metadata  # noqa: F401
