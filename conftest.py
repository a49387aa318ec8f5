"""Repository defaults for pytest runs in this checkout (the kickgate plugin itself needs none)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end test that boots real QEMU guests (runs in CI too)")
