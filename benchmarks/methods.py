"""Every distillation method at one student size, same seed and epochs: test accuracy side by side.

    python benchmarks/methods.py search_spaces/mnist.yaml --arch mlp --width 128 [--set key=value ...]

Uses the spec's data, teacher (cached like a sweep) and training settings; writes a CSV.
"""
import argparse
import time

import pandas as pd
import torch
import yaml

from kdtune.distill import METHODS
from kdtune.loading import load_spec, validate
from kdtune.runner import prepare
from kdtune.space import has_maps, parse_space, resolve
from kdtune.trial import run_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--set", action="append", default=[], help="spec override, as for the sweep")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.PARAM=VALUE",
                        help="a method parameter other than its default, e.g. crd.nce_k=256")
    parser.add_argument("--methods", help="comma-separated subset (default: every method the student allows)")
    parser.add_argument("--out", default="benchmarks/methods.csv")
    args = parser.parse_args()
    spec = load_spec(args.spec, args.set)
    methods = [m for m in sorted(METHODS) if has_maps(args.arch) or not METHODS[m].needs_conv_student]
    if args.methods:
        methods = [m for m in methods if m in args.methods.split(",")]
    # one teacher pass for the targets of every method compared here
    raw = spec.model_dump(mode="python")
    raw["search"]["space"] = {"student.arch": args.arch, "loss": {m: {} for m in methods}}
    compared = validate(raw)
    data, teacher, _ = prepare(compared, parse_space(compared))
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    overrides = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}
    rows = []
    for method in methods:
        started = time.time()
        chosen = {k: v for k, v in overrides.items() if k.startswith(f"{method}.")}
        plan = resolve(spec, {"loss": method, "student.arch": args.arch, "width": args.width, **chosen})
        metrics = run_trial(plan, data, lambda metrics, get_state: None)
        rows.append({"method": method, "arch": args.arch, "width": args.width, "params": metrics["params"],
                     "extra_params": metrics["extra_params"], "val_acc": metrics["val_acc"],
                     "test_acc": metrics["test_acc"], "seconds": round(time.time() - started, 1),
                     "params_set": ", ".join(f"{k}={v}" for k, v in chosen.items())})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    print(f"\nteacher test_acc {teacher['test_acc']:.4f}; {spec.train.epochs} epochs, seed {spec.seed}")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
