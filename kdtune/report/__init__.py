"""kdtune's report: the analysis of a sweep, built from its files at its end or rebuilt from MLflow
(`python -m kdtune.report`). The sweep's epilogue (kdtune.epilogue) and the registry
(kdtune.registry) use it; nothing here imports the Tune layer."""
