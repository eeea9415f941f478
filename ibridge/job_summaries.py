"""The end-of-run lines of the jobs that train nothing: ``qlogit``, ``dashboard``, ``export``.

:func:`ibridge.summary.print_run` prints a stage table for the jobs that train or evaluate;
for these it prints what :func:`job_tables` and :func:`job_files` give: qlogit's main
numbers as a small table and the paths of its plots, the files ``dashboard`` wrote, and the
folder ``export`` wrote (or the hub repository it pushed to).
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

# qlogit's headline numbers (results.json "qlogit"), in the order shown, with their labels.
QLOGIT_ROWS = (
    ("identity_max_abs_error_token", "identity error, per token", ".1e"),
    ("identity_max_abs_error_sequence", "identity error, per sequence", ".1e"),
    ("implicit_reward_acc", "implicit-reward accuracy", ".3f"),
    ("auroc_token_reward", "AUROC first error: token reward", ".3f"),
    ("auroc_token_reward_position_matched", "  the same, position-matched", ".3f"),
    ("auroc_r_t", "AUROC first error: r_t", ".3f"),
    ("auroc_position_only", "AUROC of the position alone", ".3f"),
    ("spearman_reward_gold", "Spearman r(x, y) vs gold", ".3f"),
    ("num_pairs", "pairs analysed", "d"),
)


def _value(value, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return format(value, fmt)


def job_tables(results: dict) -> list[Table]:
    """Tables beyond the stage table: qlogit's numbers."""
    metrics = results.get("qlogit")
    if not isinstance(metrics, dict):
        return []
    table = Table(title="qlogit — logits as Q-function (docs/design.md §1)", title_justify="left",
                  box=box.SIMPLE_HEAD, show_header=False)
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    for key, label, fmt in QLOGIT_ROWS:
        if key in metrics:
            table.add_row(label, _value(metrics[key], fmt))
    return [table]


def job_files(results: dict) -> list[tuple[str, str]]:
    """``(label, path)`` of what qlogit, dashboard and export wrote."""
    run_dir = Path(results.get("run_dir", "."))
    files: list[tuple[str, str]] = []
    if isinstance(results.get("qlogit"), dict):
        folder = run_dir / "qlogit"
        files += [(f"plot {png.stem}", str(png)) for png in sorted(folder.glob("*.png"))]
        files += [(name, str(folder / name)) for name in ("qlogit.json", "tokens.jsonl") if (folder / name).is_file()]
    dashboard = results.get("dashboard")
    if isinstance(dashboard, dict):
        for name in ("workspace", "report"):
            if dashboard.get(f"{name}_url"):
                files.append((f"{name} (saved)", dashboard[f"{name}_url"]))
            if dashboard.get(name):
                files.append((f"{name} spec", dashboard[name]))
    export = results.get("export")
    if isinstance(export, dict):
        if export.get("folder"):
            files.append(("export folder", export["folder"]))
            files.append(("model card", str(Path(export["folder"]) / "README.md")))
        if export.get("url"):
            files.append(("pushed to", export["url"]))
        elif export.get("upload_command"):
            files.append(("upload with", export["upload_command"]))
    return files
