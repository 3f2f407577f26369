"""mkdocs hooks (mkdocs.yml): what the site shows that is not written by hand.

* The table of docs/configuration.md is made at build time from ``RWDBSettings``
  itself: one row per field (variable, attribute, type, default, and the field's
  docstring as its meaning). Nothing is committed for it, so a setting added to the
  class appears with no other edit, and none can be left out or outlive its field.
  A field without a docstring stops the build (and tests/unit/test_docs.py fails).
* A docs/ page's link to another file of the repository (``../benchmarks/...``)
  becomes that path in code: the site does not hold those files, and the project has
  no public repository address to link to instead.

``python scripts/mkdocs_hooks.py`` prints the table, to read it without building.
"""

from __future__ import annotations

import re
import types
from typing import Any, get_args

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page
from pydantic_settings import BaseSettings

# Where docs/configuration.md wants the table; the page keeps its prose around it.
TABLE_MARKER = (
    "<!-- rwdb-settings-table: replaced by the table at build time (scripts/mkdocs_hooks.py) -->"
)
CONFIGURATION_PAGE = "configuration.md"


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


def settings_table(settings_class: type[BaseSettings] | None = None) -> str:
    """The configuration reference's table: one row per field of ``settings_class``
    (``RWDBSettings`` unless a test passes another), in the class's order."""
    if settings_class is None:
        from fastapi_rwdb import RWDBSettings

        settings_class = RWDBSettings
    rows = []
    for name, field in settings_class.model_fields.items():
        if not field.description or not field.description.strip():
            raise ValueError(
                f"{settings_class.__name__}.{name} has no docstring: write one as a string "
                "literal on the line below the field (it is the field's meaning in the "
                "configuration reference, docs/configuration.md)"
            )
        variable = field.validation_alias if isinstance(field.validation_alias, str) else name
        description = " ".join(field.description.split()).replace("|", "\\|")
        default = field.get_default(call_default_factory=True)
        rows.append(
            f"| `{variable}` | `{name}` | {type_name(field.annotation)} "
            f"| {default_text(default)} | {description} |"
        )
    head = "| variable | attribute | type | default | meaning |\n| --- | --- | --- | --- | --- |\n"
    return head + "\n".join(rows) + "\n"


def configuration_page(markdown: str) -> str:
    """docs/configuration.md with its table in place of the marker."""
    if TABLE_MARKER not in markdown:
        raise ValueError(
            f"docs/{CONFIGURATION_PAGE} lost the marker the settings table goes in: "
            f"put back the line {TABLE_MARKER}"
        )
    return markdown.replace(TABLE_MARKER, settings_table())


def repository_links(markdown: str) -> str:
    """``[text](../path)`` (a file of the repository outside docs/) becomes
    ``text (`path` in the repository)``; other links are left as they are."""

    def fix(match: re.Match[str]) -> str:
        text, target = match.group(1), match.group(2)
        path = target.removeprefix("../")
        return text if text.strip("`") == path else f"{text} (`{path}` in the repository)"

    return re.sub(r"(?<!!)\[([^\]]*)\]\((\.\./[^)\s]+)\)", fix, markdown)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri == CONFIGURATION_PAGE:
        try:
            markdown = configuration_page(markdown)
        except ValueError as exc:
            raise PluginError(str(exc)) from None
    return repository_links(markdown)


if __name__ == "__main__":
    print(settings_table(), end="")
