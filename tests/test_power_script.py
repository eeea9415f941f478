"""docs/reproduction/power.py: bases needed for a 2-point effect, and the time of `make reproduce`.

The power is checked against scipy's noncentral t distribution (an independent computation of
the two-sided one-sample t-test's power), the reading of a report against its own numbers.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def power():
    spec = importlib.util.spec_from_file_location("power", ROOT / "docs" / "reproduction" / "power.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["power"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _t_power(n: int, effect: float, sd: float, alpha: float) -> float:
    df, nc = n - 1, effect / sd * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


@pytest.mark.parametrize("sd,rows", [(3.26, 9), (3.92, 2), (1.0, 1)])
def test_bases_needed_is_the_smallest_n_with_80_percent_power(power, sd, rows):
    n = power.bases_needed(sd, rows)
    assert _t_power(n, 2.0, sd, 0.05 / rows) >= 0.8 > _t_power(n - 1, 2.0, sd, 0.05 / rows)


def test_the_previous_reports_are_read_as_printed(power):
    report = (ROOT / "docs" / "reproduction" / "forgetting" / "report.md").read_text()
    lr = next(c for c in power.HEADLINE if c.grid == "forgetting" and c.label == "lr 3e-4")
    # report.md: | sft | 0.0003 | 8 | +0.049 ± 0.012 | ... | +0.060 | +0.026 | +0.061 |
    assert power.per_base_effects(report, lr) == {"1": 0.060, "2": 0.026, "null": 0.061}
    s_w2, m = power.seed_variance(report, lr)
    assert m == 2
    # DPO gold se over 2 seeds per base, arm (sft 3e-4, 8 ep) and baseline (sft 1e-3, 8 ep):
    # base 1: 0.001, 0.013; base 2: 0.022, 0.011; null: 0.010, 0.010
    by_hand = 2 * ((0.001**2 + 0.013**2) + (0.022**2 + 0.011**2) + (0.010**2 + 0.010**2)) / 3
    assert s_w2 == pytest.approx(by_hand)


def test_the_time_estimate_by_hand(power):
    # (3278 - 225 - 225 x 8.5 - 45 x 17.5) / 21 = 16.81 s per command; per base 10 x 17.5 + 6 x 8.5 = 226 s
    assert power.command_overhead_s() == pytest.approx(353 / 21)
    total, _ = power.reproduce_seconds(12)
    assert total == pytest.approx(12 * 226 + 12 * 26 + 7 * 353 / 21 + 4)
    assert power.reproduce_seconds(12, cached_bases=3)[0] == pytest.approx(total - 3 * 26)
