"""A local emulator of the Anthropic Messages API (see README, "The Anthropic emulator")."""

from .app import Emulator
from .config import EmulatorConfig
from .server import serve

__all__ = ["Emulator", "EmulatorConfig", "serve"]
