"""Library settings are validated once, where they are made, and their errors name the setting."""
from pathlib import Path

import numpy as np
import pytest

from apt_data import APTConfig
from apt_data.binpack import pack_greedy
from apt_data.config import OverBudget, SettingError, TokenBudget
from apt_data.loader import APTLoader

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data"


@pytest.mark.parametrize("make, setting", [
    (lambda: APTConfig(thresholds=(1.0,)), "thresholds"),
    (lambda: APTConfig(thresholds="5.5,4"), "thresholds"),
    (lambda: APTConfig(patch_size=0), "patch_size"),
    (lambda: TokenBudget(0), "max_tokens"),
    (lambda: TokenBudget(4096, max_images=0), "max_images"),
    (lambda: APTLoader(PHOTOS, APTConfig(), max_tokens=3, num_workers=0), "max_tokens"),
    (lambda: APTLoader(PHOTOS, APTConfig(), max_tokens=4096, num_workers=0, packing="bins"), "packing"),
    (lambda: pack_greedy([10, 700], 600), "max_tokens"),
])
def test_an_invalid_setting_is_a_value_error_naming_it(make, setting):
    with pytest.raises(SettingError) as e:
        make()
    assert isinstance(e.value, ValueError) and e.value.setting == setting
    assert "--" not in str(e.value)  # library terms: no command-line flags


def test_a_sample_over_the_budget_names_itself_and_the_budget():
    loader = APTLoader(PHOTOS, APTConfig(), max_tokens=150, num_workers=0)
    with pytest.raises(OverBudget, match=r"sample \S+ needs \d+ tokens, more than the batch budget max_tokens=150") as e:
        len(loader)
    assert e.value.setting == "max_tokens"


def test_thresholds_have_one_form():
    for given in ([5, 4], (5.5, 4.0), np.array([5.5, 4.0]), None):
        t = APTConfig(thresholds=given).thresholds
        assert type(t) is tuple and all(type(v) is float for v in t)


def test_the_budget_error_text_exists_once():
    hits = [p for p in (ROOT / "apt_data").rglob("*.py") for line in p.read_text().splitlines()
            if "more than the batch budget" in line]
    assert len(hits) == 1, hits
