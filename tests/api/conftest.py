"""An HTTP client on the session device's control API, and LU clean-up."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.helpers.processes import DeviceProcess


@pytest.fixture(scope="session")
def api(device: DeviceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=device.api, timeout=60) as client:
        yield client


@pytest.fixture
def lu_name(api: httpx.Client) -> Iterator[str]:
    """A fresh LU name; whatever the test made under it is deleted afterwards."""
    name = f"api-{uuid.uuid4().hex[:10]}"
    yield name
    api.delete(f"/v1/lus/{quote(name, safe='')}", params={"force": True})
