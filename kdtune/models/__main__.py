"""`python -m kdtune.models [PATTERN] [--num-classes N] [--format table|csv]`.

Lists every built-in model with its family, the input shape it was designed for and its
parameter count, so a user picks a family without reading code; with timm installed, the timm
models matching PATTERN too (a shell pattern as timm.list_models takes, e.g. 'mobilenetv3*'),
named as a spec names them (timm:<name>). Models are built on the meta device: counted, never
allocated.
"""
from __future__ import annotations

import argparse
import fnmatch
from typing import Optional

import pandas as pd
import torch

from kdtune.models import MODELS, count_params, timm_models

TIMM_CLASSES = 1000  # timm's own default: the ImageNet head its models are published with


def timm_rows(pattern: str, num_classes: Optional[int]) -> list[dict]:
    """One row per timm model matching `pattern`, at its default configuration (3 input channels)."""
    import timm

    rows = []
    for name in timm_models.names(pattern):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=num_classes or TIMM_CLASSES)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        rows.append({"name": f"{timm_models.TIMM}{name}", "family": "timm", "in_shape": "x".join(map(str, size)),
                     "num_classes": num_classes or TIMM_CLASSES, "params": count_params(model)})
    return rows


def listing(num_classes: Optional[int] = None, pattern: Optional[str] = None) -> pd.DataFrame:
    """One row per built-in at its published configuration (width unset), for `num_classes`
    classes or each family's own (10 for MNIST nets, 100 for CIFAR ones); given a `pattern`,
    only the built-ins and timm models whose names match it."""
    rows = []
    for name, builder in MODELS.items():
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        classes = num_classes or builder.default_num_classes
        with torch.device("meta"):
            model = builder(in_shape=builder.default_in_shape, num_classes=classes)
        rows.append({"name": name, "family": builder.__module__.rsplit(".", 1)[-1],
                     "in_shape": "x".join(map(str, builder.default_in_shape)), "num_classes": classes,
                     "params": count_params(model)})
    if pattern:
        rows += timm_rows(pattern.removeprefix(timm_models.TIMM), num_classes)
    return pd.DataFrame(rows, columns=["name", "family", "in_shape", "num_classes", "params"]).sort_values(
        ["family", "params"], ignore_index=True)


def main(argv: Optional[list[str]] = None) -> None:
    description = __doc__.split("\n\n")[1].replace("\n", " ")
    parser = argparse.ArgumentParser(prog="python -m kdtune.models", description=description)
    parser.add_argument("pattern", nargs="?", default=None,
                        help="list only models matching this shell pattern, timm's among them (e.g. 'mobilenetv3*')")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the final layer (default: each family's dataset, 10 for MNIST, 100 for CIFAR)")
    parser.add_argument("--format", choices=("table", "csv"), default="table")
    args = parser.parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        parser.error("--num-classes must be at least 1")
    table = listing(args.num_classes, args.pattern)
    if args.format == "csv":
        print(table.to_csv(index=False), end="")
        return
    print(table.to_string(index=False, formatters={"params": "{:,}".format}))
    if args.pattern is None:
        count = len(timm_models.names())
        print(f"\ntimm: {count:,} models, arch timm:<name>; list some with a pattern, e.g. "
              "python -m kdtune.models 'mobilenetv3*'" if count else
              f"\ntimm models (arch timm:<name>) need the extra: {timm_models.INSTALL.split('; ', 1)[1]}")


if __name__ == "__main__":
    main()
