"""`make reproduce` end to end on a tiny sweep: the Makefile's commands, the reports and
docs/reproduction/question.py, on debug=smoke with two base models.

The printed paired effects are checked against an independent computation from the runs'
results.json files (scipy's t-test over the per-base differences).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # 18 smoke pipelines, two at a time


def _gold(folder: Path, objective: str, lr: str, **settings) -> dict[str, float]:
    """Post-DPO gold by base, read straight from results.json."""
    out = {}
    for results in folder.rglob("results.json"):
        data = json.loads(results.read_text())
        if data.get("job") == "report":  # the sweep's own report run (<sweep>/report/...), not a cell
            continue
        overrides = dict(item.split("=", 1) for item in data["overrides"])
        own = {k: v for k, v in overrides.items() if k not in ("objective", "lr", "seed", "model.pretrain.seed",
                                                              "trainer.num_threads", "logger", "debug")}
        if (overrides["objective"], float(overrides["lr"])) == (objective, float(lr)) and own == settings:
            out[overrides["model.pretrain.seed"]] = data["eval_by_stage"]["dpo"]["gold_reward"]
    return out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_reproduce_writes_every_table_with_intervals_p_holm_and_resolved(tmp_path, model_cache):
    out = tmp_path / "reproduce"
    env = {**os.environ, "IBRIDGE_CACHE": str(model_cache), "WANDB_MODE": "offline"}
    bin_dir = Path(sys.executable).parent
    command = ["make", "--no-print-directory", "-o", "setup", "reproduce", f"BIN={bin_dir}", f"REPRO_DIR={out}",
               "REPRO_BASES=2", "REPRO_EXTRA=debug=smoke", "REPRO_FORGETTING=sft,jsd"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"make reproduce: 2 grids x 2 bases in \d+ s", done.stdout)
    for grid in ("forgetting", "default"):
        assert (out / grid / "report.md").is_file()
        assert "p (Holm)" in (out / grid / "report.md").read_text()
    text = (out / "question.md").read_text()
    assert text.startswith("Reading rule")
    for title in ("world=forgetting, 8 SFT epochs", "default world, 2 SFT epochs: the remedies",
                  "does tv's cost come through clipping?"):
        assert title in text
    assert "| tv's cost with clipping minus without |" in text
    # jsd vs sft in each world, by hand from results.json: two bases, a t-interval on 1 df.
    for grid, heading, settings in (("forgetting", "### world=forgetting, 8 SFT epochs",
                                     {"world": "forgetting", "sft.epochs": "8"}),
                                    ("default", "### default world, 2 SFT epochs: the remedies", {})):
        jsd, sft = _gold(out / grid, "jsd", "1e-3", **settings), _gold(out / grid, "sft", "1e-3", **settings)
        diffs = [100 * (jsd[b] - sft[b]) for b in sorted(jsd)]
        assert len(diffs) == 2
        assert _row(text, heading, "jsd vs sft").startswith(_expected(diffs)), (grid, _expected(diffs))


def _row(text: str, heading: str, label: str) -> str:
    """The cells after `label` in the first table under `heading`."""
    table = text[text.index(heading):]
    line = next(row for row in table.splitlines() if row.startswith(f"| {label} |"))
    return line[len(f"| {label} | "):]


def _expected(diffs: list[float]) -> str:
    """What question.py must print for these per-base differences: mean [95% CI] (k/n) | df | p."""
    mean = sum(diffs) / len(diffs)
    above = f"({sum(d > 0 for d in diffs)}/{len(diffs)})"
    if max(diffs) == min(diffs):  # no spread: the point, no p-value
        return f"{mean:+.1f} [{mean:+.1f}, {mean:+.1f}] {above} | {len(diffs) - 1} | —"
    test = stats.ttest_1samp(diffs, 0.0)
    ci = test.confidence_interval()
    return f"{mean:+.1f} [{ci.low:+.1f}, {ci.high:+.1f}] {above} | {len(diffs) - 1} | {test.pvalue:.3f}"
