"""kdtune's report: the analysis of a sweep rebuilt from MLflow (`python -m kdtune.report`), the
sweep's own end-of-run report, model registration and `--sync` of runs MLflow missed."""
