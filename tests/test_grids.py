"""The sweep grids (conf/grid/*): every cell composes and validates, the toy grids run three
seeds on three base models, and `ibridge report` groups the objectives and beta grids by what
they sweep, with paired effects, without code of their own."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ibridge.analysis.effects import TV_COMPARED
from ibridge.cli import CONF_DIR
from ibridge.config import validate
from ibridge.objectives import OBJECTIVES, FDivergenceObjective
from tests.test_report import _run, _write_run

GRIDS = sorted(p.stem for p in (CONF_DIR / "grid").glob("*.yaml") if p.stem != "none")
TOY_GRIDS = [g for g in GRIDS if g != "lr_paper"]  # lr_paper is for 7-8B models: bases via model=...
REPLICATES = ("seed", "model.pretrain.seed")


def sweep_axes(grid: str) -> dict[str, list[str]]:
    """The grid's axes as Hydra's basic sweeper expands them: key -> list of override values."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"grid={grid}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return {o.get_key_element(): (list(o.sweep_string_iterator()) if o.is_sweep_override()
                                  else [o.get_value_element_as_str()]) for o in parsed}


def cells(axes: dict[str, list[str]]) -> list[list[str]]:
    keys = list(axes)
    return [[f"{k}={v}" for k, v in zip(keys, values, strict=True)] for values in itertools.product(*axes.values())]


@pytest.mark.parametrize("grid", GRIDS)
def test_every_cell_of_every_grid_composes_and_validates(grid):
    axes = sweep_axes(grid)
    # Replicate axes cannot make a cell invalid beyond their own values: one cell per value.
    settings = {k: v for k, v in axes.items() if k not in REPLICATES}
    overrides = cells(settings)
    for key in REPLICATES:
        for value in axes.get(key, [])[1:]:
            overrides.append([*overrides[0], f"{key}={value}"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for cell in overrides:
            validate(compose(config_name="config", overrides=cell))


@pytest.mark.parametrize("grid", TOY_GRIDS)
def test_toy_grids_run_three_seeds_on_three_base_models(grid):
    axes = sweep_axes(grid)
    assert axes["seed"] == ["0", "1", "2"]
    assert axes["model.pretrain.seed"] == ["null", "1", "2"]


def test_objectives_and_beta_grids_sweep_what_the_issue_asks():
    objectives = sweep_axes("objectives")
    assert objectives["objective"] == ["sft", "tv", "chi2", "hellinger", "jsd", "rkl", "dft", "prior_leaning",
                                       "sft_kl", "asft"]
    assert objectives["lr"] == sweep_axes("divergence")["lr"]  # the standard lr
    beta = sweep_axes("beta")
    assert beta["objective"] == ["tv", "chi2", "hellinger", "jsd", "rkl"]
    assert [float(b) for b in beta["objective.beta"]] == [0.01, 0.1, 1.0]
    assert beta["lr"] == objectives["lr"]


# A synthetic run of the beta grid itself: every cell of conf/grid/beta.yaml, a post-DPO win
# rate additive in the objective, beta (f-divergences but tv), the base model and the seed.
OBJECTIVE_EFFECT = {"tv": 0.0, "chi2": 0.01, "hellinger": 0.03, "jsd": 0.05, "rkl": 0.02}
BASE_EFFECT = {"null": 0.0, "1": -0.04, "2": 0.03}


def _win(objective: str, beta: float, base: str, seed: int) -> float:
    return 0.4 + OBJECTIVE_EFFECT[objective] + (0.1 * beta if objective != "tv" else 0.0) + BASE_EFFECT[base] + 0.01 * seed


def test_report_groups_the_beta_grid_by_objective_and_beta_with_bases_as_blocks(tmp_path):
    sweep = tmp_path / "sweep"
    for num, cell in enumerate(cells(sweep_axes("beta"))):
        values = dict(item.split("=", 1) for item in cell)
        win = _win(values["objective"], float(values["objective.beta"]), values["model.pretrain.seed"],
                   int(values["seed"]))
        _write_run(sweep / f"{num}_{','.join(cell)}", {
            "status": "completed", "job": "pipeline", "overrides": cell,
            "stages": {"sft": {"objective": values["objective"], "lr": float(values["lr"])}},
            "eval_by_stage": {"dpo": {"win_rate": win, "gold_reward": win + 0.2}},
        }, None)
    payload, markdown, _ = _run(sweep, tmp_path / "out")
    assert payload["n_runs"] == 5 * 3 * 3 * 3
    assert set(payload["varying"]) == {"objective.beta", "model.pretrain.seed"}
    by_cell: dict[tuple, list] = {}
    for cell in payload["cells"]:
        by_cell.setdefault((cell["objective"], cell["settings"]["objective.beta"]), []).append(cell)
    assert set(by_cell) == {(o, b) for o in OBJECTIVE_EFFECT for b in ("0.01", "0.1", "1")}
    # No plain sft in this grid: no effects against it, and against tv, each f-divergence at
    # each beta, over the three bases as blocks (the base effect cancels in the pairing).
    assert not any(payload["effects"].values())
    vs_tv = payload["effects_vs_tv"]["eval.dpo.win_rate"]
    assert sorted((e["objective"], tuple(e["settings"])) for e in vs_tv) == sorted(
        (o, (f"objective.beta={b}",)) for o in ("chi2", "hellinger", "jsd", "rkl") for b in ("0.01", "0.1", "1"))
    for effect in vs_tv:
        beta = float(next(s for s in effect["settings"] if s.startswith("objective.beta=")).split("=")[1])
        assert effect["mean"] == pytest.approx(OBJECTIVE_EFFECT[effect["objective"]] + 0.1 * beta, abs=1e-12)
        assert set(effect["per_block"]) == {f"model.pretrain.seed={b}" for b in BASE_EFFECT}
        assert len(effect["units"]) == 3  # the bases are the replicates
    assert "objective.beta" in markdown


def test_report_of_the_objectives_grid_pairs_every_objective_with_sft(tmp_path):
    sweep = tmp_path / "sweep"
    effect = {name: 0.01 * i for i, name in enumerate(sweep_axes("objectives")["objective"])}
    for num, cell in enumerate(cells(sweep_axes("objectives"))):
        values = dict(item.split("=", 1) for item in cell)
        win = 0.4 + effect[values["objective"]] + BASE_EFFECT[values["model.pretrain.seed"]] + 0.01 * int(values["seed"])
        _write_run(Path(sweep) / f"{num}_{','.join(cell)}", {
            "status": "completed", "job": "pipeline", "overrides": cell,
            "stages": {"sft": {"objective": values["objective"], "lr": float(values["lr"])}},
            "eval_by_stage": {"dpo": {"win_rate": win}},
        }, None)
    payload, _, _ = _run(sweep, tmp_path / "out")
    assert payload["n_runs"] == 10 * 3 * 3
    vs_sft = {e["objective"]: e for e in payload["effects"]["eval.dpo.win_rate"]}
    assert set(vs_sft) == set(effect) - {"sft"}
    for name, e in vs_sft.items():
        assert e["mean"] == pytest.approx(effect[name], abs=1e-12) and len(e["units"]) == 3
    # against tv: the f-divergences only, not the objectives beside the paper
    assert {e["objective"] for e in payload["effects_vs_tv"]["eval.dpo.win_rate"]} == {"chi2", "hellinger", "jsd",
                                                                                        "rkl"}


def test_the_report_compares_with_tv_exactly_the_f_divergences():
    fdivergences = {name for name, cls in OBJECTIVES.items() if issubclass(cls, FDivergenceObjective)}
    assert TV_COMPARED == fdivergences - {"tv"}
