"""CIFAR-10 and CIFAR-100 from any copy in the standard pickle layout: tiny random copies written
here load through torchvision's real classes (which refuse them for their checksums) with a
warning naming the files, a missing copy exits 2 naming its folder, and the CIFAR-100 spec runs
end to end with --smoke."""
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

import kdtune
from kdtune.data import DATASETS
from kdtune.data.cifar import checksums, official, write_copy
from kdtune.data.resolve import load_splits
from kdtune.sweep import main as cli_main

from conftest import REPO

TRAIN, TEST = 1200, 200  # above --smoke's val_size of 1000, so 200 images are left to train on
CLASSES = {"cifar10": 10, "cifar100": 100}


def random_copy(root, name, seed, classes):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (TRAIN, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, TRAIN)
    test = rng.integers(0, 256, (TEST, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, TEST)
    write_copy(root, name, train, test)
    return train, test


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """Both datasets' tiny copies under one root, and the arrays written."""
    root = tmp_path_factory.mktemp("cifar")
    return root, {name: random_copy(root, name, seed, classes) for seed, (name, classes) in enumerate(CLASSES.items())}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_copy_is_in_torchvision_layout_and_fails_its_checksums(cifar_root, name):
    root, written = cifar_root
    cls = official(name)
    folder = root / cls.base_folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(checksums(cls))
    labels = "labels" if name == "cifar10" else "fine_labels"
    first = pickle.loads((folder / cls.train_list[0][0]).read_bytes())
    assert first["data"].dtype == np.uint8 and first["data"].shape[1] == 3 * 32 * 32 and labels in first
    assert len(pickle.loads((folder / cls.meta["filename"]).read_bytes())[cls.meta["key"]]) == CLASSES[name]
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        cls(str(root), train=True)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_kdtune_loads_it_with_a_warning_naming_the_files(cifar_root, name):
    root, written = cifar_root
    with pytest.warns(UserWarning, match="official MD5") as record:
        train_x, train_y, test_x, test_y = DATASETS[name].load(root, False)
    [message] = [str(w.message) for w in record if "official MD5" in str(w.message)]
    assert all(f in message for f in checksums(official(name)))
    (train_images, train_labels), (test_images, test_labels) = written[name]
    assert train_x.shape == (TRAIN, 3, 32, 32) and test_x.shape == (TEST, 3, 32, 32) and train_x.dtype == torch.uint8
    for image in (0, 7, TRAIN - 1):  # pixel (row, col) of channel c is images[i, row, col, c]
        assert torch.equal(train_x[image], torch.from_numpy(train_images[image]).permute(2, 0, 1))
    assert torch.equal(test_x[3], torch.from_numpy(test_images[3]).permute(2, 0, 1))
    assert train_y.tolist() == train_labels.tolist() and test_y.tolist() == test_labels.tolist()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_copy_with_the_listed_checksums_loads_without_a_warning(cifar_root, name, monkeypatch, recwarn):
    """The warning's other direction. The official files are not reachable here, so torchvision's
    class is given this copy's own MD5s in place of the official ones: files that match what the
    class lists load quietly."""
    from torchvision.datasets.utils import calculate_md5

    root, written = cifar_root
    cls = official(name)
    md5 = {f: calculate_md5(str(root / cls.base_folder / f)) for f in checksums(cls)}
    listed = type(cls.__name__, (cls,), {"train_list": [[f, md5[f]] for f, _ in cls.train_list],
                                         "test_list": [[f, md5[f]] for f, _ in cls.test_list],
                                         "meta": {**cls.meta, "md5": md5[cls.meta["filename"]]}})
    monkeypatch.setattr("kdtune.data.cifar.official", lambda _: listed)
    train_x, *_ = DATASETS[name].load(root, False)
    assert train_x.shape == (TRAIN, 3, 32, 32)
    assert not [w for w in recwarn if "official MD5" in str(w.message)]


@pytest.mark.parametrize("name, mean, std", [
    ("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ("cifar100", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))])
def test_splits_are_normalised_per_channel_with_the_datasets_class_count(tmp_path, name, mean, std):
    """A subset holding only the first half of the classes still has the dataset's width."""
    classes = CLASSES[name] // 2
    (_, _), (test_images, _) = random_copy(tmp_path, name, 5, classes)
    spec = kdtune.load_spec({"name": "c", "data": {"dataset": name, "root": str(tmp_path), "val_size": 100}})
    with pytest.warns(UserWarning, match="official MD5"):
        splits = load_splits(spec.data, 0)
    assert splits.num_classes == CLASSES[name] and splits.in_shape == (3, 32, 32)
    assert len(splits.train_y) == TRAIN - 100 and len(splits.val_y) == 100
    pixel = test_images[4, 10, 20]  # row 10, column 20, three channels
    for c in range(3):
        assert splits.test_x[4, c, 10, 20].item() == pytest.approx((pixel[c] / 255 - mean[c]) / std[c], rel=1e-5)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_missing_copy_exits_2_naming_the_folder_and_the_download_option(tmp_path, capsys, name):
    status = cli_main([str(REPO / "search_spaces" / "mnist-mlp.yaml"), "--results-dir", str(tmp_path / "results"),
                       "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                       "--set", f"data.dataset={name}", "--set", f"data.root={tmp_path / 'empty'}"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    folder = tmp_path / "empty" / official(name).base_folder
    assert f"no copy in {folder}/" in err and "data.download: true" in err and official(name).filename in err


@pytest.mark.slow
def test_the_cifar100_spec_runs_end_to_end_with_smoke(cifar_root, tmp_path, run_cli):
    root, _ = cifar_root
    # the spec as --smoke shrinks it, smaller still: resnet32x4 is slow on a CPU, so 100 validation
    # images, and no confirmation (tests/test_sweep.py covers it)
    done = run_cli([REPO / "search_spaces" / "cifar100.yaml", "--smoke", "--set", f"data.root={root}",
                    "--set", "data.val_size=100", "--set", "data.train_limit=300", "--set", "search.confirm_seeds=0"],
                   tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "results" / "cifar100-crd"
    trials = pd.read_csv(out / "trials.csv")
    summary = json.loads((out / "summary.json").read_text())
    search = trials[trials["phase"] == "search"]
    assert (trials["status"] == "FINISHED").all() and (search["epochs"] == 1).all()
    assert set(search["loss"]) <= {"none", "kd", "fitnet", "rkd", "crd", "dkd", "srrl"}
    assert summary["spec"]["data"]["augment"] == {"crop": 4, "flip": True}
    assert summary["teacher"]["arch"] == "resnet32x4" and set(search["student.arch"]) == {"resnet8x4"}
    assert set(search.loc[search["loss"] == "none", "width"]) == {16, 32, 64}  # a baseline at each width
    # 162 views cost more passes than 4 one-epoch trials: auto runs the teacher live, and counts it
    assert summary["teacher"]["cache"] == "live"
    live = trials["teacher_passes"].sum()
    assert live > 0 and summary["teacher_forward_passes"]["train"] == pytest.approx(live, abs=1e-3)
    assert "100 classes" in done.stdout
