"""kickgate: build VM base images, prove them with testinfra, register only what passed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kickgate")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
