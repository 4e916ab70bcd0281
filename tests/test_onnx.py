"""ONNX and int8 students: both load in ONNX Runtime, the float one matches PyTorch, the int8
accuracy is measured and logged to the trial's MLflow run beside both ONNX models."""
from __future__ import annotations

import mlflow
import mlflow.onnx
import numpy as np
import onnxruntime as ort
import pytest
import torch

import kdtune
from kdtune import deploy
from kdtune.data.resolve import load_splits
from kdtune.models.resolve import build_model
from kdtune.onnx_student import CHECKED, TOLERANCE, onnx_student


@pytest.fixture(scope="module")
def trained(mnist_root):
    """An mlp student trained for one epoch on 3,000 real MNIST images, as its deployable model."""
    spec = kdtune.load_spec({"name": "onnx", "data": {"root": str(mnist_root), "train_limit": 3000, "val_size": 200,
                                                        "test_limit": 500}, "student": {"arch": "mlp", "width": 32}})
    splits = load_splits(spec.data, 0)
    torch.manual_seed(0)
    student = build_model(spec.student, splits.in_shape, splits.num_classes, "student", 32)
    optimizer = torch.optim.Adam(student.parameters(), 1e-3)
    for i in range(0, len(splits.train_y), 64):
        loss = torch.nn.functional.cross_entropy(student(splits.train_x[i:i + 64]).logits, splits.train_y[i:i + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return deploy.deployable(student, splits), splits


def run(model, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


@pytest.mark.slow
def test_float_and_int8_onnx_students(trained, tmp_path):
    model, splits = trained
    test_images = deploy.raw_images(splits, None)
    student, why = onnx_student(model, test_images, splits.test_y, deploy.raw_images(splits, None, "train"))
    assert student is not None, why

    images = test_images.numpy()
    with torch.no_grad():
        expected = model(test_images).numpy()
    float_logits, int8_logits = run(student.float_model, images), run(student.int8_model, images)
    assert np.abs(float_logits[:CHECKED] - expected[:CHECKED]).max() <= TOLERANCE
    assert student.max_abs_diff <= TOLERANCE
    labels = splits.test_y.numpy()
    assert student.float_acc == pytest.approx(float((expected.argmax(1) == labels).mean()), abs=1 / len(labels))
    assert student.int8_acc == pytest.approx(float((int8_logits.argmax(1) == labels).mean()))
    assert student.float_acc > 0.5 and student.int8_acc > 0.5  # a trained student, quantized, still classifies
    assert any(node.op_type == "QuantizeLinear" for node in student.int8_model.graph.node)
    assert student.float_latency_ms > 0 and student.int8_latency_ms > 0

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("onnx")).info.run_id
    deploy.log_onnx(uri, run_id, student, deploy.example(splits))
    logged = client.get_run(run_id)
    assert logged.data.metrics["int8_test_acc"] == pytest.approx(student.int8_acc)
    assert logged.data.tags[deploy.QUANTIZED_TAG] == student.quantized()
    mlflow.set_tracking_uri(uri)
    for name in deploy.ONNX_NAMES:  # both flavours load back as ONNX models that ONNX Runtime runs
        [found] = [m for m in mlflow.search_logged_models(experiment_ids=[logged.info.experiment_id], output_format="list")
                   if m.name == name]
        assert run(mlflow.onnx.load_model(found.model_uri), images[:4]).shape == (4, splits.num_classes)
