"""Pool scaling and the Hypercore node provider (lands with issue 5)."""

__all__: list[str] = []
