"""The docs site agrees with the code: one configuration row per MetaNoiseConfig field, a module map
that names every module of the package, and links between pages that resolve."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from noisy_meta import MetaNoiseConfig

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"


def test_the_configuration_table_has_one_row_per_field():
    text = (DOCS / "configuration.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|", text, flags=re.MULTILINE)
    fields = [f.name for f in dataclasses.fields(MetaNoiseConfig)]
    assert sorted(rows) == sorted(fields)
    for field in dataclasses.fields(MetaNoiseConfig):  # and the defaults it shows are the real ones
        (row,) = [line for line in text.splitlines() if line.startswith(f"| `{field.name}` |")]
        shown = row.split("|")[2].strip().strip("`")
        assert shown == (f'"{field.default}"' if isinstance(field.default, str) else str(field.default)).strip("`"), (
            field.name,
            shown,
        )


def test_the_module_map_names_every_module():
    text = (DOCS / "development.md").read_text()
    listed = set(re.findall(r"^(noisy_meta/\S+\.py)", text, flags=re.MULTILINE))
    modules = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "noisy_meta").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert listed == modules, (sorted(modules - listed), sorted(listed - modules))


def test_links_between_pages_resolve():
    pages = {path.name for path in DOCS.glob("*.md")}
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert target in pages, f"{page.name} links to {target}"
