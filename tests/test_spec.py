"""The spec contract: every bad spec stops the CLI with one clear message, and the
reference spec means what the documentation says.

Bad specs live in tests/bad_specs/, one problem each; the first line of each file says
what the error must name:  `# expect: <key.path> | <fragment> [| <fragment> ...]`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from kdtune.distill import METHODS
from kdtune.models import MODELS
from kdtune.space import Dim, SearchSpace, parse_space, resolve
from kdtune import SpecError, load_spec
from kdtune.loading import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "search_spaces" / "mnist-mlp.yaml"  # the core-sweep contract's spec
DEFAULT = ROOT / "search_spaces" / "mnist.yaml"
CORPUS = sorted((Path(__file__).resolve().parent / "bad_specs").glob("*.yaml"))
WIDTHS = (16, 32, 64, 128, 256)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def expectation(path: Path) -> tuple[str, list[str]]:
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <key.path> | <fragment>'"
    key, *fragments = [part.strip() for part in first.removeprefix("# expect: ").split(" | ")]
    assert key and fragments, path.name
    return key, fragments


def cli_args(spec: Path | str, workdir: Path, *extra: str) -> list[str]:
    return [str(spec), "--results-dir", str(workdir / "results"),
            "--tracking-uri", f"sqlite:///{workdir}/mlflow.db", *extra]


def run_cli(spec: Path | str, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m kdtune.sweep` as a user runs it, in its own interpreter."""
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "kdtune.sweep", *cli_args(spec, workdir, *extra)],
                          cwd=workdir, capture_output=True, text=True, timeout=120)


# One interpreter start costs ~6 s here (torch + mlflow imports), too slow for ~30 files.
# So the corpus runs through a driver that imports what `kdtune.sweep.main` imports once,
# then forks one child per file; each child runs `python -m kdtune.sweep` exactly
# (runpy, __main__, sys.exit(main())) with its own cwd, stdout and stderr, and its exit
# status is the real process status. The !!python case also runs through a fresh
# interpreter (run_cli) to prove the two paths agree.
DRIVER = r"""
import json, os, runpy, sys, traceback
import kdtune  # what main() imports
assert "kdtune.sweep" not in sys.modules
statuses = []
for case in json.load(sys.stdin):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(case["cwd"])
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["kdtune.sweep", *case["args"]]
            try:
                runpy.run_module("kdtune.sweep", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(statuses))
"""


MISSING = "no_such_spec.yaml"
SET_BAD = ("--set", "search.num_samples=4", "--set", "train.epochs=0")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """{case: (status, stdout, stderr, workdir, spec)} for every corpus file, a missing file and a
    bad --set on the reference spec, each run by the CLI in its own process and working dir."""
    base = tmp_path_factory.mktemp("cli")
    runs = [(path.name, path, ()) for path in CORPUS]
    runs += [("missing", base / MISSING, ()), ("set_bad", MNIST, SET_BAD)]
    cases, dirs = [], {}
    for name, spec, extra in runs:
        workdir, logs = base / name / "work", base / name / "logs"
        workdir.mkdir(parents=True)
        logs.mkdir()
        dirs[name] = (workdir, logs, spec)
        cases.append({"cwd": str(workdir), "args": cli_args(spec, workdir, *extra),
                      "out": str(logs / "stdout"), "err": str(logs / "stderr")})
    done = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=base,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    statuses = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(statuses) == len(runs)
    results = {}
    for (name, *_), status in zip(runs, statuses):
        workdir, logs, spec = dirs[name]
        results[name] = (status, (logs / "stdout").read_text(errors="replace"),
                         (logs / "stderr").read_text(errors="replace"), workdir, spec)
    return results


def assert_stopped_cleanly(status: int, stderr: str, workdir: Path, spec: Path | str, key: str, fragments):
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(f"kdtune: spec error: {spec}: {key}: "), line
    for fragment in fragments:
        assert fragment in line, line
    # Nothing started: no MLflow store, no results dir, nothing at all in the working dir.
    assert not (workdir / "mlflow.db").exists()
    assert not (workdir / "results").exists()
    assert list(workdir.iterdir()) == []


def test_corpus_covers_the_brief():
    names = {p.stem for p in CORPUS}
    assert len(CORPUS) >= 18
    for section in ("top", "data", "teacher", "student", "train", "search", "scheduler", "resources"):
        assert f"unknown_{section}_key" in names
    for name in ("empty_range", "inverted_range", "loguniform_nonpositive", "kd_alpha_out_of_range",
                 "unknown_dataset", "unknown_arch", "unknown_method", "unknown_method_param", "unknown_sampler",
                 "unknown_scheduler_type", "unknown_objective_metric", "num_samples_zero", "yaml_syntax_error",
                 "not_a_mapping", "at_with_mlp_student", "python_tag", "wrong_type_epochs"):
        assert name in names


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_spec_stops_the_cli(path, cli_runs):
    key, fragments = expectation(path)
    status, stdout, stderr, workdir, _ = cli_runs[path.name]
    assert_stopped_cleanly(status, stderr, workdir, path, key, fragments)
    assert "hacked" not in stdout


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_spec_load_spec_raises(path):
    key, fragments = expectation(path)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert (info.value.path or "<top>") == key
    assert info.value.file == str(path)
    assert all(f in str(info.value) for f in fragments)


def test_python_tag_is_refused_not_run(tmp_path):
    spec = ROOT / "tests" / "bad_specs" / "python_tag.yaml"
    done = run_cli(spec, tmp_path / "work")
    assert_stopped_cleanly(done.returncode, done.stderr, tmp_path / "work", spec, *expectation(spec))
    assert "hacked" not in done.stdout


def test_missing_file(cli_runs):
    status, _, stderr, workdir, spec = cli_runs["missing"]
    assert not spec.exists()
    assert_stopped_cleanly(status, stderr, workdir, spec, "<top>",
                           ["cannot read the spec file (No such file or directory)"])


def test_set_bad_value_fails_through_the_cli(cli_runs):
    status, _, stderr, workdir, spec = cli_runs["set_bad"]
    assert_stopped_cleanly(status, stderr, workdir, spec, "train.epochs", ["greater than or equal to 1 (got 0)"])


# ---------------------------------------------------------------- the reference spec


@pytest.fixture(scope="module")
def mnist():
    return load_spec(MNIST)


def test_reference_spec_values(mnist):
    assert mnist.name == "mnist-mlp"
    assert mnist.seed == 0
    assert (mnist.data.dataset, mnist.data.root, mnist.data.val_size, mnist.data.train_limit) == ("mnist", "data", 5000, None)
    assert (mnist.teacher.arch, mnist.teacher.checkpoint, mnist.teacher.epochs) == ("mnist_cnn", None, 3)
    assert mnist.student.arch == "mlp"
    assert (mnist.train.epochs, mnist.train.batch_size, mnist.train.optimizer, mnist.train.lr) == (5, 128, "adam", 0.001)
    search = mnist.search
    assert [(o.metric, o.mode) for o in search.objectives] == [("val_acc", "max"), ("params", "min")]
    assert (search.sampler, search.num_samples, search.max_concurrent) == ("tpe", 24, 2)
    assert search.baselines is True
    assert search.scheduler is None
    assert (mnist.resources.cpu, mnist.resources.gpu) == (1, 0)


def test_reference_space(mnist):
    space = parse_space(mnist)
    assert space.params == {"width": Dim("choice", WIDTHS), "train.lr": Dim("loguniform", (0.0003, 0.003))}
    # `loss` is one categorical over the methods, in the file's order; each carries its own parameters.
    assert list(space.methods) == ["none", "kd", "fitnet", "rkd", "crd"]
    assert space.methods["none"] == {}
    assert space.methods["kd"] == {"temperature": Dim("loguniform", (1, 20)), "alpha": Dim("uniform", (0.1, 0.99))}
    assert space.methods["fitnet"] == {"beta": Dim("loguniform", (1, 1000))}
    assert space.methods["rkd"] == {"beta": Dim("loguniform", (0.1, 10))}
    assert space.methods["crd"] == {"beta": Dim("loguniform", (0.1, 10)), "nce_k": Dim("fixed", (256,))}
    assert space.columns == ["width", "train.lr", "loss", "kd.temperature", "kd.alpha", "fitnet.beta", "rkd.beta",
                             "crd.beta", "crd.nce_k"]


def test_reference_space_meaning(mnist):
    """`width` is student.width, `train.lr` is the spec's train.lr, `kd.*` are kd's own parameters."""
    plan = resolve(mnist, {"width": 64, "train.lr": 0.002, "loss": "kd", "kd.temperature": 4.0, "kd.alpha": 0.5})
    assert plan.spec.student.width == 64
    assert plan.spec.train.lr == 0.002
    assert plan.spec.student.arch == "mlp" and plan.spec.train.epochs == 5  # untouched keys stay
    assert (plan.method, plan.method_params, plan.seed) == ("kd", {"temperature": 4.0, "alpha": 0.5}, 0)
    baseline = resolve(mnist, {"width": 16, "train.lr": 0.001, "loss": "none"})
    assert (baseline.method, baseline.method_params, baseline.spec.student.width) == ("none", {}, 16)


def test_baseline_points_enumerate_none_at_every_width(mnist):
    assert parse_space(mnist).baseline_points() == [{"width": w, "loss": "none"} for w in WIDTHS]


def test_defaults_of_a_minimal_spec(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text("name: only-name\n")
    spec = load_spec(path)
    assert spec.seed == 0
    assert spec.data.model_dump() == {"dataset": "mnist", "kwargs": {}, "root": "data", "download": False,
                                      "val_size": 5000, "train_limit": None, "test_limit": None, "num_classes": None,
                                      "augment": {"crop": 0, "flip": False}, "resident": "auto", "resident_mb": None,
                                      "workers": 0, "prefetch": 2}
    assert spec.teacher.model_dump() == {"arch": "mnist_cnn", "kwargs": {}, "features": None, "checkpoint": None,
                                         "epochs": 3, "lr": 1.0, "batch_size": 64, "optimizer": "adadelta",
                                         "momentum": 0.9, "weight_decay": 0.0,
                                         "schedule": {"type": "step", "warmup_epochs": 0,
                                                      "milestones": [1, 2, 3, 4, 5], "gamma": 0.7},
                                         "augment": {"crop": 0, "flip": False}, "cache_dir": None,
                                         "feature_cache_mb": 1024, "cache": "auto", "cache_mb": 4096, "topk": None}
    assert spec.student.model_dump() == {"arch": "mlp", "kwargs": {}, "features": None, "width": None}
    assert spec.train.model_dump() == {"epochs": 5, "batch_size": 128, "optimizer": "adam", "lr": 0.001,
                                       "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
                                       "schedule": {"type": "constant", "warmup_epochs": 0, "milestones": [],
                                                    "gamma": 0.1},
                                       "label_smoothing": 0.0, "ce_weight": 1.0, "checkpoint_every": 2,
                                       "mixed_precision": True, "accumulate": 1}
    search = spec.search
    assert search.space == {}
    assert [(o.metric, o.mode) for o in search.objectives] == [("val_acc", "max"), ("params", "min")]
    assert (search.sampler, search.num_samples, search.max_concurrent, search.baselines) == ("tpe", 24, 2, True)
    assert (search.scheduler, search.max_failures, search.confirm_seeds) == (None, 0, 3)
    assert spec.resources.model_dump() == {"cpu": 1, "gpu": 0, "workers": 1}
    assert spec.ray.model_dump() == {"address": None, "storage_path": None}
    assert spec.mlflow.model_dump() == {"tracking_uri": None}
    # No space: plain KD against the no-distillation baseline, nothing else searched.
    space = parse_space(spec)
    assert space.params == {}
    assert space.methods == {"none": {}, "kd": {}}
    assert space.baseline_points() == [{"loss": "none"}]


def test_scheduler_defaults(tmp_path):
    path = tmp_path / "asha.yaml"
    path.write_text("name: asha\nsearch:\n  scheduler: {type: asha}\n")
    scheduler = load_spec(path).search.scheduler
    assert (scheduler.type, scheduler.grace_period, scheduler.reduction_factor) == ("asha", 1, 3)


# ---------------------------------------------------------------- --set overrides


def test_set_overrides(mnist):
    spec = load_spec(MNIST, ["search.num_samples=4", "train.epochs=1"])
    assert spec.search.num_samples == 4
    assert spec.train.epochs == 1
    unchanged = spec.model_dump()
    unchanged["search"]["num_samples"], unchanged["train"]["epochs"] = 24, 5
    assert unchanged == mnist.model_dump()


def test_set_dotted_space_key(mnist):
    spec = load_spec(MNIST, ["search.space.train.lr={loguniform: [0.001, 0.01]}"])
    assert spec.search.space["train.lr"] == {"loguniform": [0.001, 0.01]}
    assert "train" not in spec.search.space
    space = parse_space(spec)
    assert space.params["train.lr"] == Dim("loguniform", (0.001, 0.01))
    assert space.params["width"] == Dim("choice", WIDTHS)
    assert list(space.methods) == ["none", "kd", "fitnet", "rkd", "crd"]


def test_set_method_param_and_scheduler():
    spec = load_spec(MNIST, ["search.space.loss.kd.temperature=4", "search.scheduler.type=asha"])
    space = parse_space(spec)
    assert space.methods["kd"] == {"temperature": Dim("fixed", (4,)), "alpha": Dim("uniform", (0.1, 0.99))}
    assert spec.search.scheduler.type == "asha"  # `scheduler: null` in the file can still be --set into


@pytest.mark.parametrize("override, edit", [
    ("train.epochs=0", ("train", "epochs", 0)),
    ("search.sampler=cmaes", ("search", "sampler", "cmaes")),
    ("search.num_samples=zero", ("search", "num_samples", "zero")),
    ("student.arch=resnet18", ("student", "arch", "resnet18")),
    ("data.colour=blue", ("data", "colour", "blue")),
    ("search.space.loss.kd.alpha=1.5", None),
    ("search.space.width={choice: []}", None),
])
def test_set_bad_value_fails_like_the_file(tmp_path, override, edit):
    import yaml

    raw = yaml.safe_load(MNIST.read_text())
    if edit is None:
        edited = apply_overrides(raw, [override])
    else:
        section, key, value = edit
        edited = {**raw, section: {**raw[section], key: value}}
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(edited))
    with pytest.raises(SpecError) as from_file:
        load_spec(path)
    with pytest.raises(SpecError) as from_set:
        load_spec(MNIST, [override])
    assert (from_set.value.path, from_set.value.message) == (from_file.value.path, from_file.value.message)
    assert from_set.value.file == str(MNIST)


@pytest.mark.parametrize("override, key, fragment", [
    ("train.epochs", "train.epochs", "--set takes key.path=value"),
    ("train.lr=[0.1", "train.lr", "value is not valid YAML: YAML syntax error"),
    ("train.lr=!!python/name:os.system", "train.lr", "YAML tag not allowed"),
    ("name.first=x", "name", "is not a mapping"),
])
def test_set_malformed(override, key, fragment):
    with pytest.raises(SpecError) as info:
        load_spec(MNIST, [override])
    assert info.value.path == key
    assert fragment in info.value.message
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- student.arch branches

def test_default_spec_searches_both_families_each_at_its_own_widths():
    spec = load_spec(DEFAULT)
    space = parse_space(spec)
    assert space.archs == {"mlp": {"width": Dim("choice", (64, 256))}, "gapnet": {"width": Dim("choice", (4, 6, 12))}}
    assert "width" not in space.params and space.student_values("student.arch", spec.student.arch) == ("gapnet", "mlp")
    assert space.baseline_points() == [{"student.arch": a, f"{a}.width": w, "loss": "none"}
                                       for a, ws in (("gapnet", (4, 6, 12)), ("mlp", (64, 256))) for w in ws]
    assert space.columns[:4] == ["train.lr", "student.arch", "gapnet.width", "mlp.width"]
    plan = resolve(spec, {"student.arch": "mlp", "mlp.width": 256, "loss": "none"})
    assert (plan.spec.student.arch, plan.spec.student.width) == ("mlp", 256)
    plan = resolve(spec, {"student.arch": "gapnet", "gapnet.width": 6, "mlp.width": 256, "loss": "none"})
    assert (plan.spec.student.arch, plan.spec.student.width) == ("gapnet", 6)  # another arch's keys do not apply


def test_arch_branches_sample_only_the_chosen_archs_width():
    space = parse_space(load_spec(DEFAULT))
    seen = set()
    for trial, constants in sample(space, 60):
        arch = trial.params["student.arch"]
        seen.add(arch)
        widths = {k for k in trial.params if k.endswith(".width")}
        assert widths == {f"{arch}.width"}
        assert trial.params[f"{arch}.width"] in space.archs[arch]["width"].args
    assert seen == {"mlp", "gapnet"}


@pytest.mark.parametrize("override,path,fragment", [
    ("search.space.student.arch={mlp: {}, resnet: {}}", "search.space.student.arch.resnet", "unknown arch 'resnet'"),
    ("search.space.student.arch={cnn: {train.lr: 0.1}}", "search.space.student.arch.cnn.train.lr", "not a student key"),
    ("search.space.student.arch={cnn: {width: {choice: [0, 4]}}}", "search.space.student.arch.cnn.width.choice[0]", ""),
    ("search.space.student.arch={cnn: [4, 8]}", "search.space.student.arch.cnn", "expected a mapping"),
])
def test_arch_branch_errors_name_the_key(override, path, fragment):
    with pytest.raises(SpecError) as info:
        load_spec(DEFAULT, [override])
    assert info.value.path == path and fragment in str(info.value)


def test_a_key_searched_both_shared_and_per_arch_is_refused():
    with pytest.raises(SpecError) as info:
        load_spec(MNIST, ["search.space.student.arch={cnn: {width: {choice: [4, 8]}}}"])  # width is also shared here
    assert info.value.path == "search.space.student.arch.cnn.width" and "one place" in str(info.value)


# ---------------------------------------------------------------- define-by-run sampling


def sample(space: SearchSpace, n: int, seed: int = 0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)
        yield trial, constants
        study.tell(trial, 0.0)


def test_define_by_run_samples_only_the_chosen_methods_params(mnist):
    space = parse_space(mnist)
    seen = set()
    for trial, constants in sample(space, 80):
        params = trial.params
        method = params["loss"]
        seen.add(method)
        assert constants == ({"crd.nce_k": 256} if method == "crd" else {})  # fixed values are constants
        assert params["width"] in WIDTHS
        assert 0.0003 <= params["train.lr"] <= 0.003
        own = {name for name in params if "." in name and name.split(".")[0] in METHODS}
        sampled = {f"{method}.{p}" for p, dim in space.methods[method].items() if dim.form != "fixed"}
        assert own == sampled, (method, params)
        if method == "none":
            assert not any(name.startswith("kd.") for name in params)
        if method == "kd":
            assert 1 <= params["kd.temperature"] <= 20 and 0.1 <= params["kd.alpha"] <= 0.99
    assert seen == {"none", "kd", "fitnet", "rkd", "crd"}


def test_define_by_run_fixed_values_are_constants():
    spec = load_spec(MNIST, ["search.space.loss={none: {}, kd: {temperature: 4, alpha: {uniform: [0.1, 0.9]}}}"])
    space = parse_space(spec)
    for trial, constants in sample(space, 30, seed=1):
        if trial.params["loss"] == "kd":
            assert constants == {"kd.temperature": 4}
            assert set(trial.params) == {"width", "train.lr", "loss", "kd.alpha"}
        else:
            assert constants == {}
            assert set(trial.params) == {"width", "train.lr", "loss"}


def test_define_by_run_single_method_is_a_constant():
    spec = load_spec(MNIST, ["search.baselines=false", "search.space.loss={kd: {alpha: 0.5}}"])
    space = parse_space(spec)
    assert list(space.methods) == ["kd"]
    for trial, constants in sample(space, 5):
        assert "loss" not in trial.params
        assert constants == {"loss": "kd", "kd.alpha": 0.5}
    assert space.baseline_points() == [{"width": w} for w in WIDTHS]


def test_at_is_allowed_with_a_conv_student():
    space = parse_space(load_spec(MNIST, ["student.arch=cnn", "search.space.loss={none: {}, at: {beta: 1000}}"]))
    assert space.methods["at"] == {"beta": Dim("fixed", (1000,))}
    with pytest.raises(SpecError) as info:
        load_spec(MNIST, ["search.space.student.arch={choice: [cnn, mlp]}", "search.space.loss={at: {}}"])
    assert info.value.path == "search.space.loss.at"
    assert "'mlp'" in info.value.message


@pytest.mark.parametrize("override, key, message", [
    ("search.scheduler={type: asha, reduction_factor: 1}", "search.scheduler.reduction_factor",
     "Input should be greater than 1 (got 1)"),
    ("student.arch=vit", "student.arch", f"unknown arch 'vit'; built-in: {', '.join(sorted(MODELS))}; or "
                                         "torchvision:<name>, timm:<name>, or an import path package.module:factory"),
])
def test_messages_quote_the_value_once(override, key, message):
    with pytest.raises(SpecError) as info:
        load_spec(MNIST, [override])
    assert (info.value.path, info.value.message) == (key, message)
