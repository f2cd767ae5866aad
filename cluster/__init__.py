"""Setting a Hyperfleet cluster up and running it: CLI, local stack, Anthropic emulator."""

from .settings import Settings

__all__ = ["Settings"]
