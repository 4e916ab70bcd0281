"""`python -m kdtune.report EXPERIMENT`: the analysis of an experiment's sweeps rebuilt from MLflow.

    python -m kdtune.report EXPERIMENT [--tracking-uri URI] [--out DIR] [--sweep RUN_ID]
                            [--register NAME --max-params N] [--reference METRIC=VALUE ...]
    python -m kdtune.report --sync RESULTS_DIR [--tracking-uri URI]

Exit status 0; 2 on bad input (unknown experiment or sweep, unreachable tracking URI, nothing to
register); 3 when --sync could not upload everything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m kdtune.report",
                                     description="Rebuild a kdtune report from MLflow alone, register the best "
                                                 "student, or upload a sweep's missing runs.")
    parser.add_argument("experiment", nargs="?", help="MLflow experiment (the spec's name, e.g. mnist-kd)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    parser.add_argument("--out", help="report folder (default: reports/<EXPERIMENT>)")
    parser.add_argument("--sweep", metavar="RUN_ID", help="one sweep's parent run (default: every sweep)")
    parser.add_argument("--register", metavar="NAME", help="register the most accurate front student in the model registry")
    parser.add_argument("--max-params", type=int, metavar="N", help="with --register: at most N parameters")
    parser.add_argument("--reference", action="append", default=[], metavar="METRIC=VALUE",
                        help="hypervolume reference point for an objective, e.g. params=1e6 (repeatable)")
    parser.add_argument("--sync", metavar="RESULTS_DIR", help="upload what a sweep's results hold and MLflow misses")
    args = parser.parse_args(argv)
    if not args.sync and not args.experiment:
        parser.error("EXPERIMENT is required (or --sync RESULTS_DIR)")
    if args.register and args.max_params is None:
        parser.error("--register needs --max-params N")
    return args


def main(argv=None) -> int:
    from kdtune import tracking
    from kdtune.report.runs import ReportError

    args = parse_args(argv)
    tracking.use_retries()
    try:
        if args.sync:
            from kdtune.epilogue import sync

            left = sync(Path(args.sync), args.tracking_uri)
            if left:
                print(f"kdtune: still missing from MLflow: {', '.join(left)}", file=sys.stderr)
                return 3
            return 0
        return report(args)
    except (ReportError, tracking.TrackingError) as exc:
        print(f"kdtune: error: {exc}", file=sys.stderr)
        return 2


def report(args) -> int:
    from kdtune import tracking
    from kdtune.report.build import terminal, write_report
    from kdtune.report.runs import ReportError, load

    uri = tracking.absolute_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    trials, sweeps = load(uri, args.experiment, args.sweep)
    reference = {}
    for item in args.reference:
        metric, _, value = item.partition("=")
        try:
            reference[metric] = float(value)
        except ValueError:
            raise ReportError(f"--reference {item!r}: expected METRIC=NUMBER") from None
    out = Path(args.out or Path("reports") / args.experiment)
    spec_dict = sweeps[-1]["spec"]  # objectives and space of the latest sweep
    names = ", ".join(f"{s['name']} ({s['run_id']}, {s['status']})" for s in sweeps)
    built = write_report(trials, spec_dict, out, f"kdtune report: {args.experiment}",
                         f"Rebuilt from MLflow ({uri}): {len(sweeps)} sweep(s): {names}; {len(trials)} trial runs.",
                         reference, sweeps[0]["teacher_test_acc"] if len(sweeps) == 1 else None)
    print(f"kdtune: experiment {args.experiment!r} at {uri}: {len(sweeps)} sweep(s), {len(trials)} trial runs")
    print(terminal(built, out))
    for sweep in sweeps:
        if sweep.get("optuna_storage"):
            print(f"Optuna study of sweep {sweep['run_id']}: optuna.load_study(study_name={sweep['optuna_study']!r}, "
                  f"storage={sweep['optuna_storage']!r})")
    if args.register:
        from kdtune.registry import register

        objs = {o["metric"]: o["mode"] for o in spec_dict["search"]["objectives"]}
        version, description = register(uri, built, args.register, args.max_params, objs.get(built["metric"], "max"),
                                        spec_dict["data"]["dataset"])
        print(f"registered {args.register} version {version.version}: {description}")
        print(f"load it with: mlflow.pytorch.load_model('models:/{args.register}/{version.version}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
