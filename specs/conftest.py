"""Specs run against every selected image through kickgate's `host`, `instance` and `built_image` fixtures.

Helpers shared by the spec modules live here; the fixtures come from the kickgate pytest plugin.
"""

from __future__ import annotations

from typing import Any

import pytest

# pytest-testinfra's own plugin also defines `host` (the local machine by default). Fixtures from
# a conftest always win over plugin fixtures, so importing kickgate's here makes every spec talk
# to the throwaway instance, whatever order the plugins loaded in.
import builder.plugin as _kickgate

host = _kickgate.host
instance = _kickgate.instance


def is_rhel(host: Any) -> bool:
    return bool(host.file("/etc/redhat-release").exists)


@pytest.fixture
def rhel(host: Any) -> bool:
    return is_rhel(host)
