"""One short module per job, wiring the rest of the package."""

from ibridge.jobs import eval as eval_job
from ibridge.jobs import pipeline, qlogit, report, train

JOBS = {
    "pipeline": pipeline.run,
    "train": train.run,
    "eval": eval_job.run,
    "qlogit": qlogit.run,
    "report": report.run,
}
