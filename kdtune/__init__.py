"""kdtune: search knowledge-distillation recipes with Ray Tune + Optuna, tracked in MLflow.

    import kdtune
    spec = kdtune.load_spec("search_spaces/mnist.yaml", overrides={"search.num_samples": 4})
    result = kdtune.run(spec, teacher=my_teacher, student=make_student, data=(train, test))
    result.front

The CLI, `python -m kdtune.sweep SPEC`, is a thin layer over `kdtune.run`.
"""
from kdtune.errors import DataError, SpecError, TeacherError, TrackingError
from kdtune.loading import load_spec
from kdtune.runner import SweepResult, run

__all__ = ["load_spec", "run", "SweepResult", "SpecError", "DataError", "TeacherError", "TrackingError"]
