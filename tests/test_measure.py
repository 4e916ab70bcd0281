"""kdtune.measure: FLOPs equal hand counts; latency is positive, the quietest block's, and measured once per
architecture, the baselines' together."""
from __future__ import annotations

import time

import torch
from torch import nn

from kdtune import load_spec
from kdtune import measure
from kdtune.measure import Measurer, feasible, flops, latencies, model_mb, violations


def test_flops_of_a_linear_layer():
    # y = xW^T + b on one sample: in*out multiply-adds, two FLOPs each (the bias add is not counted)
    assert flops(nn.Linear(10, 5), torch.rand(1, 10)) == 2 * 10 * 5


def test_flops_of_a_convolution():
    # 3->8 channels, 3x3 kernel, 8x8 input without padding: 6x6 outputs of 8 channels, each 3*3*3 multiply-adds
    assert flops(nn.Conv2d(3, 8, 3), torch.rand(1, 3, 8, 8)) == 2 * (6 * 6 * 8) * (3 * 3 * 3)


def test_flops_of_a_depthwise_convolution():
    # groups = channels: each output sees one input channel, 3*3 multiply-adds; 8x dense conv's cost / 8
    assert flops(nn.Conv2d(8, 8, 3, groups=8), torch.rand(1, 8, 8, 8)) == 2 * (6 * 6 * 8) * (3 * 3)


def test_model_mb_grows_with_the_weights():
    small, large = model_mb(nn.Linear(10, 10)), model_mb(nn.Linear(100, 100))
    assert 0 < small < large
    assert large * 1e6 > 100 * 101 * 4  # float32 weights and bias, plus torch.save's framing


def test_latencies_are_positive_and_ordered_by_work():
    deep = nn.Sequential(*[nn.Linear(256, 256) for _ in range(40)]).eval()
    timed = latencies({"small": nn.Linear(256, 5).eval(), "deep": deep}, torch.rand(1, 256), threads=1, seconds=0.2)
    assert 0 < timed["small"] < timed["deep"]  # 40 layers of 256x256 against one of 256x5


class SlowAtFirst(nn.Module):
    """A forward that a neighbour slows by 5 ms for its first 0.3 s of forwards: a slow episode."""

    def __init__(self):
        super().__init__()
        self.until = None

    def forward(self, x):
        self.until = self.until or time.perf_counter() + 0.3
        if time.perf_counter() < self.until:
            time.sleep(0.005)
        return x


def test_latency_is_the_quietest_blocks_not_the_slow_episodes():
    timed = latencies({"episodic": SlowAtFirst()}, torch.rand(1, 4), threads=1, seconds=0.6)
    assert timed["episodic"] < 1  # ms: the 5-ms episode covers the warm-up and the first blocks only


def test_measured_once_per_architecture(monkeypatch):
    spec = load_spec({"name": "m", "student": {"arch": "gapnet", "width": 4}})
    measurer = Measurer((1, 28, 28), 10)
    timed = []
    monkeypatch.setattr(measure, "latencies", lambda models, *args: timed.append(list(models)) or dict.fromkeys(models, 0.5))
    first = measurer(spec.student)
    again = measurer(spec.student.model_copy())  # a second trial of the same architecture
    wider = measurer(spec.student.model_copy(update={"width": 8}))
    assert len(timed) == 2
    assert again == first
    assert first["params"] < wider["params"] and first["flops"] < wider["flops"]


def test_architectures_measured_together_are_timed_in_one_window(monkeypatch):
    spec = load_spec({"name": "m", "student": {"arch": "gapnet", "width": 4}})
    students = [spec.student, spec.student.model_copy(update={"width": 8}), spec.student.model_copy()]
    measurer = Measurer((1, 28, 28), 10, timing_seconds=0.2)
    measurer(students[0])
    timed = []
    monkeypatch.setattr(measure, "latencies", lambda models, *args: timed.append(list(models)) or dict.fromkeys(models, 0.5))
    figures = measurer.measure_all(students)
    assert len(timed) == 1 and len(timed[0]) == 1  # only the new width is timed; the cached one is reused
    assert len(figures) == 2 and measurer.cache[measure.arch_key(students[0])]["latency_ms"] != 0.5


def test_latency_of_a_real_student_is_positive():
    spec = load_spec({"name": "m", "student": {"arch": "gapnet", "width": 4}})
    assert Measurer((1, 28, 28), 10, timing_seconds=0.5)(spec.student)["latency_ms"] > 0


def test_violations_are_optuna_constraints():
    spec = load_spec({"name": "c", "search": {"constraints": [{"metric": "params", "max": 100},
                                                              {"metric": "latency_ms", "min": 1, "max": 2}]}})
    constraints = spec.search.constraints
    assert violations({"params": 150, "latency_ms": 1.5}, constraints) == [50, -0.5, -0.5]
    assert not feasible({"params": 150, "latency_ms": 1.5}, constraints)
    assert feasible({"params": 100, "latency_ms": 2}, constraints)
