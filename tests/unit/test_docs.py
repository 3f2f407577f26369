"""The documentation cannot fall behind the code, and README renders on a package index.

The configuration reference's table is generated at build time from ``RWDBSettings``
(scripts/mkdocs_hooks.py), so these tests check what that needs: every field has a
docstring, every field has its row, and docs/configuration.md still has the place the
table goes in. A setting added to the class needs nothing but its docstring.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from pydantic import Field

from fastapi_rwdb import RWDBSettings

ROOT = Path(__file__).resolve().parents[2]


def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(RWDBSettings.model_fields))
def test_every_setting_has_a_description(name: str) -> None:
    description = RWDBSettings.model_fields[name].description
    assert description and description.strip(), (
        f"RWDBSettings.{name} has no docstring: write one on the line below the field "
        "(it is the field's meaning in docs/configuration.md)"
    )


def test_the_reference_has_a_row_for_every_setting_with_its_default() -> None:
    table = hooks().settings_table()
    rows = {m[1]: m[0] for m in re.finditer(r"^\| `(\w+)` \|.*$", table, re.M)}
    assert set(rows) == {str(f.validation_alias) for f in RWDBSettings.model_fields.values()}
    assert rows["RWDB_POOL_SIZE"].startswith("| `RWDB_POOL_SIZE` | `pool_size` | `int` | `5` |")
    assert rows["RWDB_PIN_MODE"].startswith(
        "| `RWDB_PIN_MODE` | `pin_mode` | one of `lsn`, `window`, `off` | `lsn` |"
    )
    assert rows["RWDB_MAX_REPLICA_LAG"].startswith(
        "| `RWDB_MAX_REPLICA_LAG` | `max_replica_lag` | `float` (or unset) | unset |"
    )
    assert "| secret string (or unset) | unset |" in rows["RWDB_SECRET_KEY"]


def test_a_new_setting_is_listed_from_its_docstring_alone() -> None:
    class Extended(RWDBSettings):
        bench_seconds: float = Field(2.5, validation_alias="RWDB_REPLICA_BENCH_SECONDS")
        """How long the replica bench runs."""

    table = hooks().settings_table(Extended)
    assert (
        "| `RWDB_REPLICA_BENCH_SECONDS` | `bench_seconds` | `float` | `2.5` "
        "| How long the replica bench runs. |" in table
    )


def test_a_setting_without_a_docstring_stops_the_reference() -> None:
    class Undocumented(RWDBSettings):
        # a comment is not a docstring: the reference would have nothing to say
        bench_seconds: float = Field(2.5, validation_alias="RWDB_REPLICA_BENCH_SECONDS")

    with pytest.raises(ValueError, match=r"Undocumented\.bench_seconds has no docstring"):
        hooks().settings_table(Undocumented)


def test_the_configuration_page_gets_the_table_in_place_of_its_marker() -> None:
    module = hooks()
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page.count(module.TABLE_MARKER) == 1, "docs/configuration.md lost its table marker"
    built = module.configuration_page(page)
    assert module.TABLE_MARKER not in built
    assert module.settings_table() in built
    with pytest.raises(ValueError, match="lost the marker"):
        module.configuration_page("# Configuration reference\n")


def test_links_to_repository_files_become_their_paths() -> None:
    linked = hooks().repository_links(
        "[a](other.md) [`benchmarks/r.md`](../benchmarks/r.md) [notes](../ci/lowest.txt)"
    )
    assert linked == "[a](other.md) `benchmarks/r.md` notes (`ci/lowest.txt` in the repository)"


def test_every_page_in_docs_is_in_the_site_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = {next(iter(entry.values())) for entry in config["nav"]}
    assert in_nav == {p.name for p in (ROOT / "docs").glob("*.md")}


README_LINK = re.compile(
    r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)"  # [text](target), ![alt](image)
    r"|<(?:img|a)\b[^>]*(?:src|href)=\"([^\"]+)\""  # <img src=...>, <a href=...>
)


def test_readme_links_and_images_work_outside_the_repository() -> None:
    """A package index shows README.md on its own: a relative link or image, or an
    in-page anchor, would be broken there."""
    readme = (ROOT / "README.md").read_text()
    targets = [m[1] or m[2] for m in README_LINK.finditer(readme)]
    relative = [t for t in targets if not t.startswith("https://")]
    assert not relative, f"README.md links or images that break on an index: {relative}"


def test_readme_names_only_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`(docs/[\w.-]+\.md)`", readme))
    assert named, "README.md should point to the documentation pages"
    assert {n for n in named if not (ROOT / n).is_file()} == set()
