"""`import noisy_meta` stays light: no torch, no Hugging Face datasets, no rich, no probing at import time."""

from __future__ import annotations

import subprocess
import sys


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
