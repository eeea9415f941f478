"""wandb dashboards for a sweep: a saved Workspace and a Report (`ibridge dashboard`)."""
