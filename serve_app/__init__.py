"""The HTTP API on Ray Serve (lands with issue 4)."""

__all__: list[str] = []
