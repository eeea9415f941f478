"""A sweep's wandb Workspace and Report, built with `wandb-workspaces` (the `dashboard` extra).

Both read the sweep's `cell` runs (:mod:`ibridge.cell`): the run set is the sweep's
group and job_type ``cell``, grouped by the swept axes (``objective``, ``lr`` and any
other axis that varies, seeds pooled), and the panels answer the paper's questions:

- parallel coordinates: the swept axes → post-SFT and post-DPO win rate;
- SFT lr (log scale) against post-DPO win rate, one point per cell run;
- SFT and DPO win rate by objective, mean ± standard error over seeds (bars);
- per-stage training curves, mean ± standard error over the group's seeds:
  ``sft/train/loss``, ``sft/implicit/weight``, ``sft/kl/token``, ``dpo/train/loss``,
  ``dpo/rewards/margins`` (the stage runs' ``train/loss`` ... kept per stage in the
  cell run's history, so one run set carries curves and results).

Nothing here talks to the network: building the objects and their JSON (what
``save()`` uploads) is offline; ``save()`` is the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Panels' metric keys: what the cell run logs (tests check each was really logged).
RESULT_KEYS = {"sft": "eval/sft/win_rate", "dpo": "eval/dpo/win_rate"}
CURVES = {
    "SFT training": ("sft/train/loss", "sft/implicit/weight", "sft/kl/token"),
    "DPO training": ("dpo/train/loss", "dpo/rewards/margins", "dpo/rewards/accuracies"),
}
# judge=alpaca_eval sweeps (ibridge/judging): the judged numbers the cell runs carry, pinned as columns,
# and a section comparing the judged win rate with the gold one, with the judge's tokens and cost.
JUDGED_COLUMNS = ("eval/dpo/win_rate_se", "eval/dpo/lc_win_rate", "eval/dpo/n_judged", "eval/dpo/gold_win_rate",
                  "eval/dpo/judge_tokens", "eval/dpo/judge_cost_usd", "eval/dpo/judge", "eval/dpo/lc_method")
# Config axes whose values span decades: drawn on a log scale.
LOG_AXES = ("lr", "dpo.lr")


@dataclass
class Sweep:
    """What the dashboard needs to know about a sweep."""

    group: str
    axes: list[str]  # cell-run config keys to group by (seeds pooled), e.g. ["objective", "lr"]
    entity: str = ""
    project: str = "ibridge"
    title: str = ""
    references: dict = field(default_factory=dict)
    judged: bool = False  # judge=alpaca_eval: add the judge's section and columns


def _modules():
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    return wr, ws, expr


def _filters(sweep: Sweep, expr):
    return expr.And(expr.Metric("Group") == sweep.group, expr.Metric("JobType") == "cell")


def _result_panels(sweep: Sweep):
    wr, _, _ = _modules()
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(axis), log=True if axis in LOG_AXES else None)
               for axis in sweep.axes]
    columns += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(RESULT_KEYS[stage]),
                                                 display_name=f"post-{stage.upper()} win rate")
                for stage in ("sft", "dpo")]
    return [
        wr.ParallelCoordinatesPlot(title="Swept axes → post-DPO win rate", columns=columns),
        wr.ScatterPlot(title="SFT learning rate (log) vs post-DPO win rate", x=wr.Config("lr"),
                       y=wr.SummaryMetric(RESULT_KEYS["dpo"]), log_x=True),
        wr.BarPlot(title="Win rate after SFT and after DPO, by objective (mean ± stderr over seeds)",
                   metrics=[RESULT_KEYS["sft"], RESULT_KEYS["dpo"]], orientation="v",
                   groupby=wr.Config("objective"), groupby_aggfunc="mean", groupby_rangefunc="stderr"),
    ]


def _judge_panels():
    """Judged against gold win rate (one point per cell run), and the judge's numbers by objective."""
    wr, _, _ = _modules()
    return [
        wr.ScatterPlot(title="Gold win rate vs AlpacaEval-judged win rate after DPO",
                       x=wr.SummaryMetric("eval/dpo/gold_win_rate"), y=wr.SummaryMetric(RESULT_KEYS["dpo"])),
        wr.BarPlot(title="Judged and length-controlled win rate after DPO, by objective (mean ± stderr)",
                   metrics=[RESULT_KEYS["dpo"], "eval/dpo/lc_win_rate"], orientation="v",
                   groupby=wr.Config("objective"), groupby_aggfunc="mean", groupby_rangefunc="stderr"),
        wr.BarPlot(title="Judge tokens and cost (USD) per post-DPO evaluation, by objective",
                   metrics=["eval/dpo/judge_tokens", "eval/dpo/judge_cost_usd"], orientation="v",
                   groupby=wr.Config("objective"), groupby_aggfunc="mean", groupby_rangefunc="stderr"),
    ]


def _curve_panels(keys: tuple[str, ...]):
    wr, _, _ = _modules()
    return [wr.LinePlot(title=key, x="Step", y=[key], groupby_aggfunc="mean", groupby_rangefunc="stderr")
            for key in keys]


def build_workspace(sweep: Sweep):
    """The saved workspace view: one run set (the sweep's cell runs, grouped by its axes)."""
    wr, ws, expr = _modules()
    sections = [ws.Section(name="Results per cell", panels=_result_panels(sweep), is_open=True)]
    if sweep.judged:
        sections.append(ws.Section(name="AlpacaEval judge", panels=_judge_panels(), is_open=True))
    sections += [ws.Section(name=name, panels=_curve_panels(keys), is_open=True) for name, keys in CURVES.items()]
    return ws.Workspace(
        entity=sweep.entity,
        project=sweep.project,
        name=sweep.title or f"ibridge {sweep.group}",
        sections=sections,
        runset_settings=ws.RunsetSettings(
            filters=_filters(sweep, expr),
            groupby=[expr.Config(axis) for axis in sweep.axes],
            pinned_columns=[*(f"config:{axis}" for axis in sweep.axes), f"summary:{RESULT_KEYS['sft']}",
                            f"summary:{RESULT_KEYS['dpo']}", "summary:status",
                            *(f"summary:{key}" for key in (JUDGED_COLUMNS if sweep.judged else ()))],
        ),
        settings=ws.WorkspaceSettings(max_runs=100, group_by_prefix="first"),
    )


def build_report(sweep: Sweep, with_project: bool = False):
    """The report: the same panels, one panel grid per question.

    `with_project`: name the project in each run set. ``save()`` needs it, and then
    looks the project up on the server, so an offline spec leaves it out: a run set
    without a project reads the report's own.
    """
    wr, _, expr = _modules()
    where = {"entity": sweep.entity, "project": sweep.project} if with_project else {}

    def runset(name: str):
        return wr.Runset(name=name, filters=_filters(sweep, expr), groupby=[f"config.{axis}" for axis in sweep.axes],
                         **where)

    axes = ", ".join(sweep.axes)
    return wr.Report(
        entity=sweep.entity,
        project=sweep.project,
        title=sweep.title or f"ibridge {sweep.group}",
        description=f"Cells of {sweep.group}, grouped by {axes}; seeds pooled (mean ± standard error).",
        blocks=[
            wr.H1("Which SFT objective and learning rate give the best model after DPO?"),
            wr.P(f"One point or line per cell run (job_type cell) of wandb group {sweep.group}, grouped by {axes}."),
            wr.PanelGrid(runsets=[runset("cells")], panels=_result_panels(sweep)),
            *([wr.H2("AlpacaEval judge"), wr.PanelGrid(runsets=[runset("judge")], panels=_judge_panels())]
              if sweep.judged else []),
            *[block for name, keys in CURVES.items()
              for block in (wr.H2(name), wr.PanelGrid(runsets=[runset(name)], panels=_curve_panels(keys)))],
        ],
    )


def workspace_payload(workspace) -> dict:
    """What ``Workspace.save()`` uploads (the upsertView variables), spec as JSON data."""
    import json

    view = workspace._to_model()
    return {"entityName": view.entity, "projectName": view.project, "displayName": view.display_name,
            "type": "project-view",
            "spec": json.loads(view.spec.model_dump_json(by_alias=True, exclude_none=True))}


def report_payload(report) -> dict:
    """What ``Report.save()`` uploads (the upsertView variables), spec as JSON data."""
    import json

    model = report._to_model()
    return {"entityName": model.project.entity_name, "projectName": model.project.name,
            "displayName": model.display_name, "description": model.description, "type": "runs",
            "spec": json.loads(model.spec.model_dump_json(by_alias=True, exclude_none=True))}


def workspace_from_payload(payload: dict):
    """The Workspace a payload describes (the round trip of :func:`workspace_payload`)."""
    import json

    from wandb_workspaces.workspaces import Workspace, internal

    spec = internal.WorkspaceViewspec.model_validate_json(json.dumps(payload["spec"]))
    view = internal.View(entity=payload["entityName"], project=payload["projectName"],
                         display_name=payload["displayName"], name="", id="", spec=spec)
    return Workspace._from_model(view)


def report_from_payload(payload: dict):
    """The Report a payload describes (the round trip of :func:`report_payload`)."""
    import json

    from wandb_workspaces.reports.v2 import Report, internal

    model = internal.ReportViewspec.model_validate(
        {"displayName": payload["displayName"], "description": payload["description"],
         "project": {"name": payload["projectName"], "entityName": payload["entityName"]},
         "spec": json.loads(json.dumps(payload["spec"]))})
    return Report._from_model(model)
