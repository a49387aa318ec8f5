"""onesim: a protocol-faithful stand-in for OpenNebula's oned, for the unmodified pyone client."""

from .server import OneSim, SimDatastore, SimUser, parse_template

__all__ = ["OneSim", "SimDatastore", "SimUser", "parse_template"]
