"""The stand-in's image catalog: what each ``image_ref`` runs, in place of pulling an image.

A catalog file (JSON, or YAML by suffix) maps an image reference to the image's entrypoint argv and
its env (``"K=V"``, the image's own env, to which a Spawn's env is appended). Two placeholders are
replaced in both: ``{workload_ip}`` (the workload's own address, which a real VM would read from
its interface) and ``{python}`` (the stand-in's interpreter). Hyperfleet's node image is in the
default catalog, ``default_catalog.json`` beside this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CATALOG_FILE = Path(__file__).with_name("default_catalog.json")
MAX_CATALOG_BYTES = 1024 * 1024


class CatalogError(ValueError):
    """A catalog file cannot be read or is not a valid catalog; the message says where."""


class _ImageModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1)
    env: list[str] = []

    @field_validator("env")
    @classmethod
    def _env_entries(cls, env: list[str]) -> list[str]:
        for entry in env:
            if "=" not in entry or entry.startswith("="):
                raise ValueError(f"env entry {entry!r} is not K=V")
        return env


class _CatalogModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: dict[str, _ImageModel]


@dataclass(frozen=True)
class Image:
    """One catalog entry: the entrypoint argv and the image's env, placeholders unreplaced."""

    argv: tuple[str, ...]
    env: tuple[str, ...] = ()

    def render(self, *, workload_ip: str, python: str) -> tuple[list[str], list[str]]:
        """The argv and env to run, with ``{workload_ip}`` and ``{python}`` replaced.

        ``str.replace`` rather than ``str.format``: other braces in a command stay as written.
        """

        def fill(text: str) -> str:
            return text.replace("{workload_ip}", workload_ip).replace("{python}", python)

        return [fill(a) for a in self.argv], [fill(e) for e in self.env]


@dataclass(frozen=True)
class ImageCatalog:
    """Image reference -> ``Image``. Build with ``load``, ``from_mapping`` or ``default``."""

    images: Mapping[str, Image]

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", MappingProxyType(dict(self.images)))

    def get(self, image_ref: str) -> Image | None:
        """The image for ``image_ref``, or None when the catalog does not have it."""
        return self.images.get(image_ref)

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "catalog") -> ImageCatalog:
        """Validates a parsed catalog (``{"images": {ref: {"argv": [...], "env": [...]}}}``).

        Raises:
            CatalogError: the data is not a valid catalog; the message names the bad key.
        """
        try:
            model = _CatalogModel.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'top level'}: {err['msg']}"
                for err in e.errors(include_url=False)
            )
            raise CatalogError(f"{source}: {problems}") from e
        return cls({ref: Image(tuple(m.argv), tuple(m.env)) for ref, m in model.images.items()})

    @classmethod
    def load(cls, path: Path) -> ImageCatalog:
        """Reads a catalog file: YAML for ``.yaml``/``.yml``, JSON otherwise.

        Raises:
            CatalogError: the file is missing, too big, unparsable or not a valid catalog.
        """
        try:
            if path.stat().st_size > MAX_CATALOG_BYTES:
                raise CatalogError(f"{path}: larger than {MAX_CATALOG_BYTES} bytes")
            text = path.read_text()
        except OSError as e:
            raise CatalogError(f"{path}: {e.strerror}") from e
        try:
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise CatalogError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def default(cls) -> ImageCatalog:
        """The catalog shipped with Hyperfleet: its node image runs ``hyperfleet node``."""
        return cls.load(DEFAULT_CATALOG_FILE)

    def to_json(self) -> str:
        """The catalog as a JSON catalog file's text (``load`` reads it back)."""
        images = {ref: {"argv": list(i.argv), "env": list(i.env)} for ref, i in self.images.items()}
        return json.dumps({"images": images}, indent=2) + "\n"
