"""ONNX and int8 students: both load in ONNX Runtime, the float one matches PyTorch, the int8
accuracy is measured and logged to the trial's MLflow run beside both ONNX models, and
`mlflow models serve` answers raw images with each flavour."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import mlflow
import mlflow.onnx
import numpy as np
import onnxruntime as ort
import pytest
import requests
import torch

import kdtune
from kdtune import deploy
from kdtune.data.resolve import load_splits
from kdtune.models.resolve import build_model
from kdtune.onnx_student import CHECKED, TOLERANCE, onnx_student
from test_server import HOST, MLFLOW, free_port


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


@pytest.fixture(scope="module")
def exported(trained):
    """The trained student as ONNX (float and int8), checked against PyTorch on the test images."""
    model, splits = trained
    test_images = deploy.raw_images(splits, None)
    student, why = onnx_student(model, test_images, splits.test_y, deploy.raw_images(splits, None, "train"),
                                timing_seconds=0.3)
    assert student is not None, why
    return student


@pytest.fixture(scope="module")
def logged(trained, exported, tmp_path_factory):
    """The PyTorch and both ONNX models logged to one MLflow run, as a front student's are: (uri, run)."""
    model, splits = trained
    uri = f"sqlite:///{tmp_path_factory.mktemp('onnx-mlflow') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("onnx")).info.run_id
    deploy.log_student(uri, run_id, model, deploy.example(splits))
    deploy.log_onnx(uri, run_id, exported, deploy.example(splits))
    return uri, client.get_run(run_id)


def model_uri(uri: str, run, name: str) -> str:
    mlflow.set_tracking_uri(uri)
    [found] = [m for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
               if m.name == name]
    return found.model_uri


@pytest.mark.slow
def test_float_and_int8_onnx_students(trained, exported, logged):
    model, splits = trained
    student, test_images = exported, deploy.raw_images(splits, None)
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

    uri, logged_run = logged
    assert logged_run.data.metrics["int8_test_acc"] == pytest.approx(student.int8_acc)
    assert logged_run.data.tags[deploy.QUANTIZED_TAG] == student.quantized()
    for name in deploy.ONNX_NAMES:  # both flavours load back as ONNX models that ONNX Runtime runs
        assert run(mlflow.onnx.load_model(model_uri(uri, logged_run, name)), images[:4]).shape == (4, splits.num_classes)


def served(uri: str, model: str, images: np.ndarray, folder):
    """`mlflow models serve` of one logged model (this environment, a free loopback port): its
    predictions for raw test images posted to /invocations."""
    port = free_port()
    log = open(folder / f"serve-{port}.log", "w")
    proc = subprocess.Popen([MLFLOW, "models", "serve", "-m", model, "--env-manager", "local", "--host", HOST,
                             "-p", str(port)], env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (folder / f"serve-{port}.log").read_text()[-3000:]
            try:
                answer = requests.post(f"http://{HOST}:{port}/invocations", json={"inputs": images.tolist()}, timeout=30)
                break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            raise AssertionError(f"mlflow models serve did not answer in 120 s: {model}")
        assert answer.status_code == 200, answer.text[:2000]
        return answer.json()["predictions"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.skipif(MLFLOW is None, reason="needs the `mlflow` CLI")
def test_mlflow_models_serve_answers_raw_images_with_each_flavour(trained, logged, tmp_path):
    model, splits = trained
    images = deploy.raw_images(splits, 16).numpy()
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    uri, logged_run = logged
    for name, tolerance in ((deploy.MODEL_NAME, 1e-5), (deploy.ONNX_NAMES[0], TOLERANCE), (deploy.ONNX_NAMES[1], None)):
        predictions = served(uri, model_uri(uri, logged_run, name), images, tmp_path)
        if name in deploy.ONNX_NAMES:  # the onnx flavour names its outputs: {"logits": [...]}
            predictions = predictions["logits"]
        logits = np.asarray(predictions, dtype=np.float32)
        assert logits.shape == expected.shape, name
        if tolerance is None:  # int8: its own logits, the same classes on most images
            assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.75, name
        else:
            assert np.abs(logits - expected).max() <= tolerance, name
