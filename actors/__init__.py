"""Agent replicas: Ray actors hosting Claude sessions (lands with issue 3)."""

__all__: list[str] = []
