#!/usr/bin/env bash
# Submit a kdtune sweep to a running Ray cluster as a Ray job: the driver runs on the head node,
# the trials on every node. Run it from the repository root:
#
#   RAY_DASHBOARD=http://HEAD:8265 sweeps/ray-job.sh search_spaces/mnist.yaml \
#       --storage /shared/kdtune --results-dir /shared/kdtune/results \
#       --tracking-uri http://MLFLOW_HOST:5000 [more `python -m kdtune.sweep` options]
#
# Environment:
#   RAY_DASHBOARD       job server on the head (default http://127.0.0.1:8265)
#   KDTUNE_WORKING_DIR  uploaded as the job's working dir (default: . = this repo, without .git, results,
#                       data, MLflow files), so kdtune and the spec are there on every node. Set it empty
#                       (KDTUNE_WORKING_DIR=) when kdtune is installed on every node: nothing is uploaded,
#                       and SPEC and every path must then be absolute paths valid on the head.
#   KDTUNE_CACHE        passed on to the job (teacher cache dir on the head), when set
#   RAY_AUTH_MODE       default token. Ray >= 2.52 clusters started by `ray start --head` use token auth
#                       when a token exists; the job client sends the token (RAY_AUTH_TOKEN, or the file in
#                       RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token: the cluster's, see `ray get-auth-token`)
#                       only in token mode. Harmless against a cluster without auth.
#
# The job's driver gets RAY_ADDRESS and RAY_AUTH_MODE from the cluster: `--address auto` joins it
# (without --address, kdtune would start a private one-node Ray inside the job).
set -euo pipefail

spec="${1:?usage: sweeps/ray-job.sh SPEC [python -m kdtune.sweep options...]}"
shift
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

runtime_env='{"excludes": [".git", "/results", "/data", "mlflow.db", "mlruns", "mlartifacts", "*.egg-info"]'
if [[ -n "${KDTUNE_CACHE:-}" ]]; then
    runtime_env+=", \"env_vars\": {\"KDTUNE_CACHE\": \"${KDTUNE_CACHE}\"}"
fi
runtime_env+='}'

upload=()
if [[ -n "${KDTUNE_WORKING_DIR-.}" ]]; then
    upload=(--working-dir "${KDTUNE_WORKING_DIR-.}")
fi

exec ray job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" \
    ${upload[@]+"${upload[@]}"} --runtime-env-json "$runtime_env" \
    -- python -m kdtune.sweep "$spec" --address auto "$@"
