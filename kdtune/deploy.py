"""The deployable student: a trained student as an MLflow model that needs nothing from kdtune,
nor from the code that defined the student (an import path, a notebook's factory).

The logged model takes images as the dataset gives them before kdtune's normalisation: for
a built-in dataset, images scaled to [0, 1] (what torchvision's `ToTensor` gives), shape
`[N, C, H, W]`, which it normalises itself with the dataset's mean and std; for datasets
given by import path or to `kdtune.run`, the tensors those datasets return (kdtune adds no
normalisation to them). It returns the class logits `[N, num_classes]`. It is a TorchScript
trace, so `mlflow.pytorch.load_model` loads it with torch alone.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torch import nn

from kdtune.data.base import DATASETS
from kdtune.data.splits import Splits
from kdtune.space import resolve
from kdtune.trial import SweepData, build_student

MODEL_NAME = "student"
MODEL_URI_TAG = "kdtune.model_uri"
ONNX_NAMES = ("student_onnx", "student_int8")  # the float and int8 ONNX models beside the PyTorch one
QUANTIZED_TAG = "kdtune.quantized"  # what int8 costs and buys, as the front table's `quantized` column says it
EXAMPLES = 2  # images in the logged input example
CHECKED = 16  # images the trace is checked on against the eager student


class Deployable(nn.Module):
    """Images in, logits out: the sweep's normalisation, then the student."""

    def __init__(self, student: nn.Module, mean, std):
        super().__init__()
        self.student = student
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student((images - self.mean) / self.std).logits


def normalisation(splits: Splits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) kdtune applied to the images; identity for data given already as tensors."""
    if splits.mean is not None:
        return tuple(splits.mean), tuple(splits.std)
    channels = splits.in_shape[0]
    return (0.0,) * channels, (1.0,) * channels


def raw_images(splits: Splits, count: int | None, split: str = "test") -> torch.Tensor:
    """The first `count` (None: all) images of a split in the deployable model's own input space."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in normalisation(splits))
    return (getattr(splits, f"{split}_x")[:count].cpu().float() * std + mean).contiguous()


def trained_student(spec, config: dict, data: SweepData, state: dict) -> nn.Module:
    """The student of one trial (`config` as Tune gave it), built as the trial built it, with the
    trained weights of its checkpoint's `student` state."""
    student = build_student(resolve(spec, config).spec, data)
    student.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    return student


def deployable(student: nn.Module, splits: Splits) -> torch.jit.ScriptModule:
    """`student` wrapped with the sweep's normalisation and traced on CPU. A trace that does not
    reproduce the eager student (data-dependent control flow) is refused."""
    model = Deployable(student.cpu(), *normalisation(splits)).eval()
    images = raw_images(splits, CHECKED)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, and still loads anywhere
        traced = torch.jit.trace(model, images[:EXAMPLES], check_trace=False)
        if not torch.allclose(traced(images), model(images), rtol=1e-4, atol=1e-5):
            raise ValueError("the TorchScript trace of the student does not reproduce it (data-dependent control flow?)")
    return traced


def input_description(dataset: str) -> str:
    """What the logged model takes, in words, for the model registry's description."""
    if dataset in DATASETS:
        return "Input: images scaled to [0, 1], float32 [N, C, H, W]; it normalises them itself. Output: logits."
    return ("Input: float32 [N, C, H, W] tensors as the sweep's own datasets returned them (kdtune added no "
            "normalisation). Output: logits.")


def example(splits: Splits) -> np.ndarray:
    """The logged input example: real test images in the model's input space, float32."""
    return raw_images(splits, EXAMPLES).numpy()


def use_run_experiment(tracking_uri: str, run_id: str) -> None:
    """log_model files a model under the active experiment (else Default), not under its run's: there
    the run page's "Logged models" and the experiment's Models tab would not list it."""
    import mlflow

    if mlflow.get_tracking_uri() != tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)


def log_student(tracking_uri: str, run_id: str, model: torch.jit.ScriptModule, input_example: np.ndarray) -> str:
    """Log `model` to the run with `mlflow.pytorch.log_model` (the input example gives the
    signature), tag the run with the URI that loads it, and return that URI."""
    import mlflow.pytorch

    use_run_experiment(tracking_uri, run_id)
    quiet = logging.getLogger("mlflow.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning is about pickled modules; this is a TorchScript archive
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.pytorch.log_model(model, name=MODEL_NAME, input_example=input_example, run_id=run_id,
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                            serialization_format="pickle")  # a ScriptModule goes through torch.jit.save
    finally:
        quiet.setLevel(level)
    mlflow.MlflowClient(tracking_uri).set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def log_onnx(tracking_uri: str, run_id: str, student, input_example: np.ndarray) -> None:
    """Log a kdtune.onnx_student.OnnxStudent beside the PyTorch model: both models with MLflow's
    onnx flavour, their accuracy and latency as metrics, and the `quantized` summary as a tag."""
    import mlflow
    import mlflow.onnx

    use_run_experiment(tracking_uri, run_id)
    client = mlflow.MlflowClient(tracking_uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in zip(ONNX_NAMES, (student.float_model, student.int8_model)):
            mlflow.onnx.log_model(model, name=name, input_example=input_example, run_id=run_id,
                                  save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"])
    for key, value in student.metrics().items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, QUANTIZED_TAG, student.quantized())
