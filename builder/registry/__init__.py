"""Registries: where verified images go. `open_registry` is the one place that picks the kind."""

from __future__ import annotations

from builder.options import RegistryOptions
from builder.registry.base import Registry


def open_registry(options: RegistryOptions) -> Registry:
    if options.kind == "opennebula":
        from builder.registry.opennebula import OpenNebulaConfig, OpenNebulaRegistry

        one = options.one
        cfg = OpenNebulaConfig.from_env(endpoint=one.endpoint, auth_file=one.auth_file, datastore=one.datastore,
                                        publish_dir=one.publish_dir, name_policy=one.name_policy,
                                        owner=one.owner)
        return OpenNebulaRegistry(cfg)
    from builder.registry.local import LocalRegistry, default_registry_dir

    return LocalRegistry(options.directory or default_registry_dir())
