"""The custom sweep through the Python API, as a notebook would run it: objects in memory.

    python -m examples.api [--smoke] [--data-root DIR]     (from the repository root)

The teacher is trained here (as a user's own teacher would arrive, already trained), the
student is a factory, the data a (train, test) pair of datasets; kdtune.run takes them in
place of the spec's import paths and returns the tables as DataFrames.
"""
import argparse

import torch
import torch.nn.functional as F

import kdtune
from examples.custom.digits import TinyNet, dataset, teacher


def train_teacher(model, train, epochs=1, batch_size=128):
    """A user's own training loop: the teacher arrives trained; kdtune never retrains it."""
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def make_student(num_classes, width=8):
    """The student family: any callable taking num_classes (and width, if searched)."""
    return TinyNet(num_classes=num_classes, width=width)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = dataset(args.data_root)
    spec = kdtune.load_spec("search_spaces/custom.yaml", overrides={"search.num_samples": 4})
    result = kdtune.run(spec, teacher=train_teacher(teacher(num_classes=10), train), student=make_student,
                        data=(train, test), smoke=args.smoke)
    print(result.front[["loss", "student", "params", "val_acc", "test_acc"]].to_string(index=False))
    print(f"experiment {result.experiment_id}, parent run {result.parent_run_id}, files in {result.results_dir}")


if __name__ == "__main__":
    main()
