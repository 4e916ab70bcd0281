"""`python -m kdtune.sweep SPEC`: parse the flags and call `kdtune.run`.

Bad input (spec, data, models, teacher checkpoint, tracking URI) exits with status 2 and one
message, before Ray starts; an interrupted sweep exits 130; a sweep whose tracking server went
down exits 3 once results/ is complete, having named what MLflow is missing.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m kdtune.sweep",
                                     description="Search distillation recipes with Ray Tune + Optuna, log to MLflow.")
    parser.add_argument("spec", help="YAML spec, e.g. search_spaces/mnist.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a spec key (validated like the file); repeatable")
    parser.add_argument("--results-dir", default="results", help="results/<name>/ goes here (default: results)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    parser.add_argument("--smoke", action="store_true",
                        help="the same sweep shrunk for a short CPU run: a data slice, 2-3 epochs, 4 samples, "
                             "2 seeds (docs/getting-started.md)")
    parser.add_argument("--address", help="join an existing Ray cluster (default: a private local one)")
    parser.add_argument("--storage", help="where Ray keeps trial state: shared path or s3:// / gs:// URI")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this spec")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from kdtune import load_spec, run
    from kdtune.errors import USER_ERRORS, SpecError

    args = parse_args(argv)
    try:
        spec = load_spec(args.spec, args.set, smoke=args.smoke)
        result = run(spec, results_dir=args.results_dir, tracking_uri=args.tracking_uri, address=args.address,
                     storage=args.storage, resume=args.resume)
        return 130 if result.status == "KILLED" else 3 if result.mlflow_missing else 0
    except SpecError as exc:
        print(f"kdtune: spec error: {exc}", file=sys.stderr)
    except USER_ERRORS as exc:
        print(f"kdtune: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("kdtune: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
