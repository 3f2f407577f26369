"""The documentation that is generated (scripts/mkdocs_hooks.py) matches its sources."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

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


def test_the_committed_configuration_reference_is_what_the_code_says() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == hooks().configuration_reference(), (
        "docs/configuration.md is stale: run `.venv/bin/python scripts/mkdocs_hooks.py`"
    )


def test_the_reference_has_every_setting_with_its_default() -> None:
    page = hooks().configuration_reference()
    rows = {m[1]: m[0] for m in re.finditer(r"^\| `(\w+)` \|.*$", page, re.M)}
    assert set(rows) == {str(f.validation_alias) for f in RWDBSettings.model_fields.values()}
    assert "| `RWDB_POOL_SIZE` | `pool_size` | `int` | `5` |" in rows["RWDB_POOL_SIZE"]
    assert (
        "| `RWDB_PIN_MODE` | `pin_mode` | one of `lsn`, `window`, `off` | `lsn` |"
        in (rows["RWDB_PIN_MODE"])
    )


def test_a_setting_without_a_docstring_stops_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    field = RWDBSettings.model_fields["pool_size"]
    monkeypatch.setattr(field, "description", None)
    with pytest.raises(ValueError, match=r"RWDBSettings\.pool_size has no docstring"):
        hooks().configuration_reference()


def test_readme_sections_of_the_site_exist_and_links_become_site_links() -> None:
    module = hooks()
    for title, headings in module.README_PAGES.values():
        page = module.readme_page(title, headings)
        assert "](docs/" not in page
    linked = module.site_links(
        "[a](docs/x.md) [b](benchmarks/r.md) [c](#nowhere) ![i](docs/p.png)", "docs/"
    )
    assert linked == "[a](x.md) b (`benchmarks/r.md` in the repository) c ![i](p.png)"
