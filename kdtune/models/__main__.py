"""`python -m kdtune.models [--num-classes N] [--format table|csv]`.

Lists every built-in model with its family, the input shape it was designed for and its
parameter count, so a user picks a family without reading code. Models are built on the meta
device: counted, never allocated.
"""
from __future__ import annotations

import argparse
from typing import Optional

import pandas as pd
import torch

from kdtune.models import MODELS, count_params


def listing(num_classes: Optional[int] = None) -> pd.DataFrame:
    """One row per built-in at its published configuration (width unset), for `num_classes`
    classes or each family's own (10 for MNIST nets, 100 for CIFAR ones)."""
    rows = []
    for name, builder in MODELS.items():
        classes = num_classes or builder.default_num_classes
        with torch.device("meta"):
            model = builder(in_shape=builder.default_in_shape, num_classes=classes)
        rows.append({"name": name, "family": builder.__module__.rsplit(".", 1)[-1],
                     "in_shape": "x".join(map(str, builder.default_in_shape)), "num_classes": classes,
                     "params": count_params(model)})
    return pd.DataFrame(rows).sort_values(["family", "params"], ignore_index=True)


def main(argv: Optional[list[str]] = None) -> None:
    description = __doc__.split("\n\n")[1].replace("\n", " ")
    parser = argparse.ArgumentParser(prog="python -m kdtune.models", description=description)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the final layer (default: each family's dataset, 10 for MNIST, 100 for CIFAR)")
    parser.add_argument("--format", choices=("table", "csv"), default="table")
    args = parser.parse_args(argv)
    if args.num_classes is not None and args.num_classes < 1:
        parser.error("--num-classes must be at least 1")
    table = listing(args.num_classes)
    if args.format == "csv":
        print(table.to_csv(index=False), end="")
    else:
        print(table.to_string(index=False, formatters={"params": "{:,}".format}))


if __name__ == "__main__":
    main()
