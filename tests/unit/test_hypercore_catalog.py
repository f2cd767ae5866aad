from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.hypercore_standin import CatalogError, Image, ImageCatalog

NODE_IMAGE = "ghcr.io/hyperfleet/node:latest"


def test_the_default_catalog_runs_the_node_agent_on_the_workload_address() -> None:
    image = ImageCatalog.default().get(NODE_IMAGE)
    assert image is not None
    argv, env = image.render(workload_ip="127.88.0.7", python="/venv/bin/python")
    assert argv == ["/venv/bin/python", "-m", "cluster.cli", "node"]
    assert env == ["HYPERFLEET_NODE_IP=127.88.0.7"]


def test_placeholders_are_replaced_and_other_braces_kept() -> None:
    image = Image(("{python}", "-c", "print({'a': 1}, '{workload_ip}')"), ("X={workload_ip}:80",))
    argv, env = image.render(workload_ip="127.88.1.2", python="py")
    assert argv == ["py", "-c", "print({'a': 1}, '127.88.1.2')"]
    assert env == ["X=127.88.1.2:80"]


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_json_and_yaml_files_load_alike(tmp_path: Path, suffix: str) -> None:
    data = {"images": {"a/b:1": {"argv": ["/bin/true"], "env": ["K=V=W"]}, "c:2": {"argv": ["x"]}}}
    path = tmp_path / f"catalog{suffix}"
    path.write_text(json.dumps(data))  # JSON is YAML too
    catalog = ImageCatalog.load(path)
    assert catalog.get("a/b:1") == Image(("/bin/true",), ("K=V=W",))
    assert catalog.get("c:2") == Image(("x",), ())
    assert catalog.get("missing") is None


def test_to_json_reads_back(tmp_path: Path) -> None:
    catalog = ImageCatalog({"a:1": Image(("{python}", "-V"), ("A=1",))})
    path = tmp_path / "c.json"
    path.write_text(catalog.to_json())
    assert ImageCatalog.load(path) == catalog


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ({"images": {"a:1": {"argv": []}}}, "images.a:1.argv"),
        ({"images": {"a:1": {"argv": ["x"], "env": ["NOEQUALS"]}}}, "is not K=V"),
        ({"images": {"a:1": {"argv": ["x"], "env": ["=v"]}}}, "is not K=V"),
        ({"images": {"a:1": {"argv": ["x"], "cmd": ["y"]}}}, "images.a:1.cmd"),
        ({"image": {}}, "images"),
        ([], "top level: Input should be a valid dictionary"),
    ],
)
def test_invalid_catalogs_name_the_bad_key(tmp_path: Path, data: object, complaint: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match=complaint) as error:
        ImageCatalog.load(path)
    assert str(path) in str(error.value)


def test_unreadable_files_are_catalog_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="No such file"):
        ImageCatalog.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CatalogError, match="not valid json"):
        ImageCatalog.load(tmp_path / "broken.json")
    (tmp_path / "broken.yaml").write_text("images: [")
    with pytest.raises(CatalogError, match="not valid yaml"):
        ImageCatalog.load(tmp_path / "broken.yaml")
