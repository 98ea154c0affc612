"""A client key for the registry tests, generated once per session."""

from __future__ import annotations

from typing import Any

import pytest

from sharedcare.iam.client import generate_key


@pytest.fixture(scope="session")
def es_key() -> Any:
    return generate_key("ES384", kid="registry-es384")
