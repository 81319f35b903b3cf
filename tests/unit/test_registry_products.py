"""The registry keeps versions, aliases, golden set, gate limits and history per product (issue 16, item 6); a
registry folder made before products existed is the product "default", unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspection.errors import RegistryError
from inspection.registry import Registry, RegistryConfig, list_products, product_home
from inspection.runner.inferencer import load_inferencer
from tests.fixtures.serving import version_copy


@pytest.fixture
def two_products(known_export: Path, synth_store: Path, tmp_path: Path) -> tuple[Path, Registry, Registry]:
    """One registry folder with products `impeller` (versions imp-1, imp-2) and `tile` (tile-1), each with its own
    golden set; imp-1 and tile-1 promoted."""
    root = tmp_path / "reg"
    imp = Registry.init(root, RegistryConfig(golden_set=str(synth_store)), product="impeller")
    tile = Registry.init(root, RegistryConfig(golden_set=str(synth_store), golden_parts=0.3), product="tile")
    for reg, version in ((imp, "imp-1"), (imp, "imp-2"), (tile, "tile-1")):
        reg.register(version_copy(known_export, tmp_path / version, version))
    assert imp.promote("imp-1", reason="first").promoted and tile.promote("tile-1", reason="first").promoted
    return root, imp, tile


def test_products_keep_their_own_versions_aliases_golden_sets_and_history(two_products) -> None:
    root, imp, tile = two_products
    assert imp.versions() == ["imp-1", "imp-2"] and tile.versions() == ["tile-1"]
    assert sorted(p.name for p in (root / "versions").iterdir() if not p.name.startswith(".")) == [
        "imp-1",
        "imp-2",
        "tile-1",
    ]  # one shared versions folder
    assert imp.home == product_home(root, "impeller") == root / "products" / "impeller"
    assert (imp.home / "golden.json").read_text() != (tile.home / "golden.json").read_text()
    assert imp.promote("imp-2", reason="second").promoted
    assert imp.aliases() == {"production": "imp-2", "previous": "imp-1"}
    assert tile.aliases() == {"production": "tile-1", "previous": None}  # untouched
    assert imp.rollback(reason="per product") == "imp-1"
    assert Registry(root, product="tile").alias("production") == "tile-1"
    with pytest.raises(RegistryError, match="'tile' has no `previous`"):
        tile.rollback(reason="nothing there")
    assert [h["action"] for h in imp.history()] == ["register", "register", "promote", "promote", "rollback"]
    assert [h["action"] for h in tile.history()] == ["register", "promote"]
    assert {h["product"] for h in imp.history()} == {"impeller"}
    assert list_products(root) == ["impeller", "tile"]  # no default product: the root holds none of its files
    assert Registry(root).versions() == []


def test_a_version_of_one_product_never_serves_another(two_products, tmp_path) -> None:
    root, imp, tile = two_products
    with pytest.raises(RegistryError, match="belongs to product 'impeller'"):
        tile.promote("imp-2", reason="wrong product", force=True)
    with pytest.raises(RegistryError, match="belongs to product 'impeller'"):
        load_inferencer(root, "imp-1", product="tile", warmup_runs=0)
    # the alias edited by hand to point at another product's version: the runner's loader refuses it too
    (tile.home / "aliases.json").write_text(json.dumps({"production": "imp-1", "previous": None}))
    with pytest.raises(RegistryError, match="belongs to product"):
        tile.get(tile.alias("production"))
    with pytest.raises(RegistryError, match="already registered for product 'impeller'"):
        tile.register(root / "versions" / "imp-1")
    assert load_inferencer(root, "imp-1", product="impeller", warmup_runs=0).version == "imp-1"


def test_a_card_that_names_its_product_is_registered_only_for_it(known_export: Path, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    export = version_copy(known_export, tmp_path / "t", "tile-7", product="tile")
    with pytest.raises(RegistryError, match="trained for product 'tile'.*--product tile"):
        Registry(root, product="impeller").register(export)
    with pytest.raises(RegistryError, match="trained for product 'tile'"):
        Registry(root).register(export)  # nor into the default product
    assert Registry(root, product="tile").register(export) == "tile-7"


@pytest.mark.parametrize("name", ["", "a/b", "..", "-x", "x" * 65, "tile space"])
def test_product_names_are_checked(tmp_path: Path, name: str) -> None:
    with pytest.raises(RegistryError, match="allowed are"):
        Registry(tmp_path, product=name)


def test_an_old_single_product_registry_is_the_default_product(
    known_export: Path, synth_store: Path, tmp_path: Path
) -> None:
    """A registry folder as earlier releases wrote it (no product anywhere) keeps working, unchanged, as the
    product "default" next to new products in the same folder."""
    root = tmp_path / "reg"
    old = Registry.init(root, RegistryConfig(golden_set=str(synth_store)))
    version = old.register(known_export)
    meta_path = root / "versions" / version / "registered.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("product")  # as written before products existed
    meta_path.write_text(json.dumps(meta))
    assert old.promote(version, reason="old registry").promoted
    assert (root / "aliases.json").is_file() and not (root / "products").exists()  # the layout it always had
    assert Registry(root).versions() == [version] and Registry(root, product="default").alias() == version
    assert load_inferencer(root, version, warmup_runs=0).version == version
    new = Registry.init(root, RegistryConfig(golden_set=str(synth_store)), product="tile")
    new.register(version_copy(known_export, tmp_path / "tile-1", "tile-1"))
    assert list_products(root) == ["default", "tile"]
    assert Registry(root).versions() == [version] and new.versions() == ["tile-1"]
    with pytest.raises(RegistryError, match="belongs to product 'default'"):
        new.get(version)


def test_cli_per_product(known_export: Path, synth_store: Path, tmp_path: Path, capsys) -> None:
    from inspection.cli import main

    root = str(tmp_path / "r")
    tile = ["registry", "--root", root, "--product", "tile"]
    assert main([*tile, "init", "--golden-set", str(synth_store)]) == 0
    assert main([*tile, "register", str(known_export)]) == 0
    v = capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*tile, "promote", v, "--reason", "cli"]) == 0
    capsys.readouterr()
    assert main([*tile, "list"]) == 0
    assert "production" in capsys.readouterr().out
    assert main(["registry", "--root", root, "list"]) == 0  # the default product has no versions
    assert capsys.readouterr().out == ""
    assert main(["registry", "--root", root, "products"]) == 0
    assert capsys.readouterr().out == f"tile\t{v}\n"
    assert main([*tile, "history"]) == 0
    assert [json.loads(line)["action"] for line in capsys.readouterr().out.splitlines()] == ["register", "promote"]
    assert main([*tile, "rollback"]) == 1
    assert "'tile' has no `previous`" in capsys.readouterr().err
