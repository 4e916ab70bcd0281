"""dml and byot, the methods without a frozen teacher, on a real MNIST slice: dml's peers start
distinct, each logs its CE and KL terms and its accuracy, both learn, and the student is peer 0
alone; byot's auxiliary heads are logged and dropped from the deployed student."""
import pytest
import torch

from kdtune import load_spec
from kdtune.data.resolve import load_splits
from kdtune.distill import METHODS
from kdtune.models import count_params
from kdtune.space import parse_space, resolve
from kdtune.trial import SweepData, build_student, run_trial


@pytest.fixture(scope="module")
def world(mnist_root):
    spec = load_spec({"name": "own", "data": {"root": str(mnist_root), "val_size": 500, "train_limit": 2500,
                                              "test_limit": 500},
                      "student": {"arch": "cnn"}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.003},
                      "search": {"space": {"loss": {"none": {}, "dml": {}, "byot": {}}}}})
    return spec, SweepData(load_splits(spec.data, spec.seed), {})


def trained(world, config):
    spec, data = world
    reports, states = [], []
    metrics = run_trial(resolve(spec, config), data, lambda m, get_state: (reports.append(m),
                                                                          states.append(get_state and get_state())))
    return metrics, reports, states[-1]


def test_a_space_of_teacher_free_methods_chooses_no_teacher(world):
    spec, _ = world
    assert parse_space(spec).teachers == []
    assert resolve(spec, {"loss": "dml"}).teacher is None


def test_dml_peers_start_distinct(world):
    spec, data = world
    student = build_student(resolve(spec, {"loss": "dml", "student.arch": "mlp", "width": 32}).spec, data)
    x = data.splits.train_x[:2]
    with torch.no_grad():
        dml = METHODS["dml"](student(x), {}, 10, student_model=student, peers=3)
    assert len(dml.peers) == 2
    first = dict(student.named_parameters())
    for peer in dml.peers:
        assert all(not torch.equal(first[name], p) for name, p in peer.named_parameters())
    assert not torch.equal(dml.peers[0].fc1.weight, dml.peers[1].fc1.weight)


@pytest.mark.slow
def test_dml_two_peers_both_learn_and_the_student_is_peer_0(world):
    spec, data = world
    metrics, reports, state = trained(world, {"loss": "dml", "student.arch": "mlp", "width": 64})
    for epoch in reports:  # every peer's accuracy, every epoch
        assert {"val_acc_peer0", "val_acc_peer1"} <= set(epoch)
    assert {"loss_ce", "loss_kl", "loss_ce_peer1", "loss_kl_peer1"} <= set(metrics)
    assert all(metrics[k] > 0 for k in ("loss_ce", "loss_kl", "loss_ce_peer1", "loss_kl_peer1"))
    assert metrics["val_acc_peer0"] == metrics["val_acc"]
    assert metrics["val_acc_peer0"] > 0.75 and metrics["val_acc_peer1"] > 0.75  # chance is 0.1
    one = count_params(build_student(resolve(spec, {"loss": "dml", "student.arch": "mlp", "width": 64}).spec, data))
    assert metrics["params"] == one and metrics["extra_params"] == one  # the other peer trains beside it
    assert sum(v.numel() for k, v in state["student"].items() if "num_batches" not in k) == one  # what a logged model loads


@pytest.mark.slow
def test_byot_logs_its_heads_and_deploys_the_student_alone(world):
    spec, data = world
    metrics, reports, state = trained(world, {"loss": "byot", "student.arch": "cnn", "width": 6})
    student = build_student(resolve(spec, {"loss": "byot", "student.arch": "cnn", "width": 6}).spec, data)
    own = count_params(student)
    assert metrics["params"] == own and metrics["extra_params"] > 0
    assert set(state["student"]) == set(student.state_dict())  # the logged model: the student's own weights
    assert all("val_acc_aux0" in epoch for epoch in reports)
    assert metrics["val_acc_aux0"] > 0.5 and metrics["val_acc"] > 0.75
    assert {"loss_ce", "loss_ce_aux0", "loss_kl_aux0", "loss_hint_aux0"} <= set(metrics)
