"""One short module per job, wiring the rest of the package."""

from ibridge.jobs import dashboard, export, pipeline, qlogit, report, train
from ibridge.jobs import eval as eval_job

JOBS = {
    "pipeline": pipeline.run,
    "train": train.run,
    "eval": eval_job.run,
    "qlogit": qlogit.run,
    "report": report.run,
    "dashboard": dashboard.run,
    "export": export.run,
}
