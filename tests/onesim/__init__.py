"""onesim: a protocol-faithful stand-in for OpenNebula's oned, for the unmodified pyone client."""

from .server import OneSim, SimDatastore, SimImage, SimTemplate, SimUser, SimVM
from .template import parse_template

__all__ = ["OneSim", "SimDatastore", "SimImage", "SimTemplate", "SimUser", "SimVM",
           "parse_template"]
