"""The deployable student for ONNX runtimes: a float ONNX model checked against PyTorch, and an
int8 copy quantized by ONNX Runtime's own static quantization, calibrated on train images.

Both take and return what the PyTorch deployable model does (kdtune.deploy): raw images in,
logits out. The int8 copy's test accuracy and latency are measured beside the float model's,
latency as kdtune.measure times PyTorch (the quietest of torch.utils.benchmark blocks, after
warm-up, at deploy.batch_size with deploy.threads intra-op threads), the float and int8 models'
blocks alternating, so that both meet the same slow episodes.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch.utils import benchmark

from kdtune.measure import quietest_ms
from kdtune.spec import DeploySpec

CHECKED = 256  # test images the ONNX model is checked on against PyTorch
TOLERANCE = 1e-4  # the largest absolute logit difference accepted
CALIBRATION = 512  # train images the int8 copy is calibrated on
INPUT, OUTPUT = "images", "logits"


@dataclass
class OnnxStudent:
    """A front student's ONNX models and what they measured."""

    float_model: onnx.ModelProto
    int8_model: onnx.ModelProto
    max_abs_diff: float  # float ONNX against PyTorch on CHECKED test images
    float_acc: float  # test accuracy of the float ONNX model
    int8_acc: float
    float_latency_ms: float
    int8_latency_ms: float

    def quantized(self) -> str:
        """The front table's `quantized` column: what int8 costs in accuracy and buys in latency,
        against this model in float (one trial's student; the table's test_acc is a seeds' mean)."""
        return (f"int8 test_acc {self.int8_acc:.4f} vs float {self.float_acc:.4f} "
                f"({(self.int8_acc - self.float_acc) * 100:+.2f} pt), latency {self.int8_latency_ms / self.float_latency_ms:.2f}x float")

    def metrics(self) -> dict[str, float]:
        """The figures logged to the trial's run."""
        return {"onnx_max_abs_diff": self.max_abs_diff, "onnx_test_acc": self.float_acc,
                "onnx_latency_ms": self.float_latency_ms, "int8_test_acc": self.int8_acc,
                "int8_latency_ms": self.int8_latency_ms}


def export(model: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """The eager deployable model as ONNX, with a dynamic batch axis."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "student.onnx"
        torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False)
        return onnx.load(str(path))


def session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def logits(runner: ort.InferenceSession, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([runner.run([OUTPUT], {INPUT: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


class _Calibration(CalibrationDataReader):
    """Train images, one batch of 32 at a time, for quantize_static's activation ranges."""

    def __init__(self, images: np.ndarray):
        self.batches = iter([{INPUT: images[i:i + 32]} for i in range(0, len(images), 32)])

    def get_next(self) -> Optional[dict]:
        return next(self.batches, None)


def quantize(model: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """ONNX Runtime's static int8 quantization (QDQ, per-channel weights), calibrated on `calibration`.
    Weights use 7 of their 8 bits (`reduce_range`), as ONNX Runtime advises for CPUs without VNNI:
    there, full-range u8 x s8 products saturate, and the default front's depthwise gapnets lost 17
    to 28 points of test accuracy with it (0.3 points or fewer without)."""
    with tempfile.TemporaryDirectory() as folder:
        src, prepared, out = (Path(folder) / name for name in ("f.onnx", "p.onnx", "q.onnx"))
        onnx.save(model, str(src))
        quant_pre_process(str(src), str(prepared))
        quantize_static(str(prepared), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        return onnx.load(str(out))


def latencies_ms(runners: dict, batch: np.ndarray, seconds: float) -> dict:
    """One run of `batch` through each ONNX Runtime session, in milliseconds (`quietest_ms`)."""
    return quietest_ms({name: benchmark.Timer(stmt="runner.run(outputs, feed)",
                                              globals={"runner": runner, "outputs": [OUTPUT], "feed": {INPUT: batch}})
                        for name, runner in runners.items()}, seconds)


def accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    return float((values.argmax(1) == labels).mean())


def onnx_student(model: torch.nn.Module, test_images: torch.Tensor, test_labels: torch.Tensor,
                 train_images: torch.Tensor, batch_size: int = 1, threads: int = 1,
                 timing_seconds: float = DeploySpec().timing_seconds) -> tuple[Optional[OnnxStudent], str]:
    """Export, check and quantize the eager deployable `model` (images in the model's input space).
    Returns (the ONNX student, "") or (None, why) when ONNX Runtime disagrees with PyTorch."""
    images = test_images.cpu().float().numpy()
    float_model = export(model, test_images[:1].cpu())
    runner = session(float_model, threads)
    with torch.no_grad():
        expected = model(test_images[:CHECKED].cpu()).numpy()
    diff = float(np.abs(logits(runner, images[:CHECKED]) - expected).max())
    if not diff <= TOLERANCE:
        return None, f"ONNX Runtime's logits differ from PyTorch's by {diff:.2e} (> {TOLERANCE:g}) on {CHECKED} test images"
    int8_model = quantize(float_model, train_images[:CALIBRATION].cpu().float().numpy())
    int8 = session(int8_model, threads)
    labels = test_labels.cpu().numpy()
    batch = images[:batch_size] if len(images) >= batch_size else np.resize(images, (batch_size, *images.shape[1:]))
    timed = latencies_ms({"float": runner, "int8": int8}, batch, timing_seconds)
    return OnnxStudent(float_model, int8_model, diff, accuracy(logits(runner, images), labels),
                       accuracy(logits(int8, images), labels), timed["float"], timed["int8"]), ""
