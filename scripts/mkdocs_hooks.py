"""mkdocs hooks (mkdocs.yml): pages written at build time from their one source.

* ``configuration.md`` (committed, so that it also reads on GitHub): every
  ``RWDBSettings`` field (variable, type, default, description) from the class itself;
  the build fails when the committed page differs (``python scripts/mkdocs_hooks.py``
  rewrites it), and so does tests/unit/test_docs.py;
* ``quick-start.md``, ``guarantees.md``, ``testing.md``: sections of README.md, which
  stays the front page (on the index as in the repository) without a second copy to keep.

README's links into docs/ become site links; a link to another file of the repository
becomes its path in code, as the site does not hold it.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, get_args

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]

# page -> (title, README sections, from the first heading named up to the next "## ")
README_PAGES = {
    "quick-start.md": ("Quick start", ["Try it (fresh machine, two commands)", "Use it"]),
    "guarantees.md": ("Guarantees", ["Read-your-writes"]),
    "testing.md": ("Testing kit", ["Testing your app (the pytest plugin)"]),
}


def readme_section(readme: str, heading: str) -> str:
    """The ``## heading`` section of README.md, down to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if match is None:
        raise LookupError(f"README.md has no section '## {heading}' (scripts/mkdocs_hooks.py)")
    return match.group(1)


def slug(heading: str) -> str:
    """The anchor mkdocs' toc gives a heading (near enough for the README's headings)."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.lower()).strip())


def site_links(markdown: str, prefix: str) -> str:
    """Relative links made to work from the site: ``prefix`` + ``x.md`` (docs/ seen
    from README.md, ../ nothing from docs/) becomes a site link; an anchor this page
    lacks, or a file the site does not hold, becomes text naming it."""
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", markdown, re.M)}

    def fix(match: re.Match[str]) -> str:
        text, target = match.group(1), match.group(2)
        if target.startswith(("http://", "https://", "mailto:")):
            return match.group(0)
        if target.startswith("#"):
            return match.group(0) if target[1:] in anchors else text
        if prefix == "docs/" and target.startswith("docs/"):
            return f"[{text}]({target.removeprefix('docs/')})"
        if prefix == "docs/" or target.startswith("../"):
            return f"{text} (`{target.removeprefix('../')}` in the repository)"
        return match.group(0)

    return re.sub(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)", fix, markdown).replace("](docs/", "](")


def readme_page(title: str, headings: list[str]) -> str:
    readme = (ROOT / "README.md").read_text()
    body = "".join(f"## {h}\n{readme_section(readme, h)}" for h in headings)
    note = "<!-- generated from README.md by scripts/mkdocs_hooks.py: edit README.md -->\n"
    return f"{note}# {title}\n\n{site_links(body, 'docs/')}"


def type_name(annotation: Any) -> str:
    """`int`, `float` (or unset), one of `lsn`, `window`, `off`: as a reader says them."""
    args = get_args(annotation)
    if isinstance(annotation, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" (or unset)" if type(None) in args else "")
    if str(annotation).startswith("typing.Literal"):
        return "one of " + ", ".join(f"`{a}`" for a in args)
    name = getattr(annotation, "__name__", str(annotation))
    return "secret string" if name == "SecretStr" else f"`{name}`"


def default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def configuration_reference() -> str:
    """docs/configuration.md: one row per RWDBSettings field, from the class."""
    from fastapi_rwdb import RWDBSettings

    rows = []
    for name, field in RWDBSettings.model_fields.items():
        if not field.description:
            raise ValueError(
                f"RWDBSettings.{name} has no docstring: write one below the field "
                "(it is the field's line in the configuration reference)"
            )
        description = " ".join(field.description.split()).replace("|", "\\|")
        rows.append(
            f"| `{field.validation_alias}` | `{name}` | {type_name(field.annotation)} "
            f"| {default_text(field.default)} | {description} |"
        )
    head = (
        "<!-- generated from RWDBSettings by `python scripts/mkdocs_hooks.py`: do not edit -->\n"
        "# Configuration reference\n\n"
        "`RWDBSettings` reads these variables from the environment and from `.env` in the\n"
        "working directory; in code, pass the attribute instead\n"
        "(`RWDBSettings(pool_size=10)`). A bad value stops start-up with `SettingsError`\n"
        "naming the variable; no password or URL is ever echoed. This page is generated\n"
        "from the class (each field's docstring), and checked against it at each build.\n\n"
        "| variable | attribute | type | default | meaning |\n| --- | --- | --- | --- | --- |\n"
    )
    return head + "\n".join(rows) + "\n"


CONFIGURATION = ROOT / "docs" / "configuration.md"


def on_pre_build(config: MkDocsConfig) -> None:
    if CONFIGURATION.read_text() != configuration_reference():
        raise PluginError(
            "docs/configuration.md differs from what RWDBSettings says: "
            "run `.venv/bin/python scripts/mkdocs_hooks.py` and commit the page"
        )


def on_files(files: Files, config: MkDocsConfig) -> Files:
    pages = {path: readme_page(*spec) for path, spec in README_PAGES.items()}
    for path, content in pages.items():
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: MkDocsConfig, files: Files) -> str:
    """docs/ pages link to the repository's files with ``../``: name them instead."""
    return site_links(markdown, "../")


if __name__ == "__main__":
    CONFIGURATION.write_text(configuration_reference())
    print(f"wrote {CONFIGURATION.relative_to(ROOT)}")
