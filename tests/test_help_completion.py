"""`ibridge --help` from the YAML comments, tab completion after the JOB word, make's next step."""

from __future__ import annotations

import os
import subprocess
import sys

from ibridge.cli import CONF_DIR
from ibridge.completion import rewrite_line
from ibridge.config import JOBS
from ibridge.helptext import help_text, yaml_comments
from tests.conftest import REPO
from tests.test_cli_smoke import ibridge


def test_yaml_comments_on_the_line_or_above_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# what this file is\n# (two lines)\nkind: toy\nouter:\n  # above inner\n  # and more\n"
                    "  inner: 1   # beside it\n  plain: 2\n\n  # after a blank line\n  other: 'a # not a comment'\n"
                    "list:\n  - x  # an item, not a key\n")
    comments, opening = yaml_comments(path)
    assert opening == "what this file is (two lines)"
    assert comments == {"outer.inner": "above inner and more beside it", "outer.other": "after a blank line"}


def test_help_shows_every_option_with_its_comment(tmp_path, model_cache):
    out = ibridge(["train", "objective=jsd", "--help"], tmp_path, model_cache).stdout
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "job = train   pipeline | train | eval | qlogit | report | dashboard | export" in out
    assert "lr = 0.001" in out and "learning rate of demonstration (SFT-family) stages" in out
    assert "  objective.name = jsd" in out  # the composed config: objective=jsd's settings
    assert "cap on g'(s): below s* with g'(s*) = max_weight" in out  # conf/objective/jsd.yaml's comment
    assert "sft.max_steps = -1   > 0 overrides epochs" in out
    assert "  objective  " in out and "[jsd]" in out  # the groups, the current option marked
    assert "hydra." not in out.split("Options")[1]  # Hydra's own settings are not ibridge's options


def _shown(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_every_key_of_the_main_config_is_listed():
    text = help_text(CONF_DIR, [], 80)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / "config.yaml")
    for key in ("job", "seed", "lr", "checkpoint", "sft.save_every", "dpo.lr", "eval.max_new_tokens", "resume",
                "hub_id", "export.push"):
        assert f"\n  {key} = {_shown(OmegaConf.select(cfg, key))}" in text, key


def test_completion_rewrites_the_job_word():
    assert rewrite_line("ibridge train objective=j", JOBS) == ("ibridge job=train objective=j", [])
    assert rewrite_line("ibridge train ", JOBS) == ("ibridge job=train ", [])
    assert rewrite_line("ibridge tr", JOBS) == ("ibridge tr", ["train"])
    assert rewrite_line("ibridge ", JOBS)[1] == list(JOBS)
    assert rewrite_line("ibridge -m train lr=1e-3,1e-4 seed=", JOBS)[0] == "ibridge -m job=train lr=1e-3,1e-4 seed="


def _complete(line: str, tmp_path) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COMP_LINE": line, "COMP_POINT": str(len(line))}
    proc = subprocess.run([sys.executable, "-m", "ibridge", "-sc", "query=bash"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def test_tab_completion_after_the_job_word(tmp_path):
    assert {"objective=jsd", "objective=sft_kl"} <= _complete("ibridge train objective=", tmp_path)
    assert "objective=jsd" in _complete("ibridge train objective=j", tmp_path)
    assert "train" in _complete("ibridge tr", tmp_path)


def test_make_setup_says_what_to_run_next():
    # -o: take the installed venv as up to date, so only setup's own recipe prints
    proc = subprocess.run(["make", "-n", "-o", ".venv/bin/ibridge", "setup"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert "source .venv/bin/activate" in proc.stdout, proc.stdout
    readme = (REPO / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and 'eval "$(ibridge -sc install=bash)"' in readme
