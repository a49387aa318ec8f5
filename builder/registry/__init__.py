"""Image registries: where verified images are promoted to."""
