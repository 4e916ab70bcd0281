"""The worked example of a new method (examples/new_method.py) registers, is searchable, and trains a step."""
import importlib

import pytest
import torch

from kdtune import load_spec
from kdtune.distill import METHODS
from kdtune.models import create_model
from kdtune.space import parse_space


@pytest.fixture
def example():
    """The example's module, registered for this test only (other tests list the built-in methods)."""
    before = dict(METHODS)
    module = importlib.reload(importlib.import_module("examples.new_method"))
    yield module
    METHODS.clear()
    METHODS.update(before)


def test_the_example_registers_and_its_parameter_is_searchable(example):
    assert METHODS["logit_mse"] is example.LogitMSE
    space = {"loss": {"none": {}, "logit_mse": {"beta": {"uniform": [0.1, 10]}}}}
    spec = load_spec({"name": "x", "search": {"space": space}})
    assert set(parse_space(spec).methods) == {"none", "logit_mse"}


def test_the_example_trains_a_step_with_the_loss_written_out(example):
    torch.manual_seed(0)
    student = create_model("mlp", (1, 28, 28), 10, width=16)
    x, labels, teacher_logits = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), 3 * torch.randn(8, 10)
    features = student(x)
    method = METHODS["logit_mse"](features, {"logits": teacher_logits}, num_train=8, beta=0.5)
    terms = method.losses(features, {"logits": teacher_logits}, labels, torch.arange(8), 0.0)
    logits = features.logits.detach()
    log_probs = logits - logits.exp().sum(1, keepdim=True).log()
    assert terms["ce"].item() == pytest.approx(-log_probs[torch.arange(8), labels].mean().item(), rel=1e-5)
    assert terms["logit_mse"].item() == pytest.approx(0.5 * ((logits - teacher_logits) ** 2).mean().item(), rel=1e-5)
    before = [p.detach().clone() for p in student.parameters()]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    sum(terms.values()).backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
    assert METHODS["logit_mse"](features, {"logits": teacher_logits}, 8).hp == {"beta": 1.0}  # the default
