"""Romero et al. 2015 (FitNets): regress the student's hint layer onto the teacher's."""
import torch.nn.functional as F
from torch import nn

from kdtune.distill.base import Distiller, Param, register


@register
class FitNet(Distiller):
    """CE + beta * MSE(regressor(student embedding), teacher embedding).

    The hint is the penultimate layer for every student: a linear regressor maps the
    student's embedding to the teacher's and trains with it. (A conv-map hint would need
    the teacher's 37k-float maps per image: too large to cache, so a live teacher forward
    in every step.)
    """

    name = "fitnet"
    params = {"beta": Param(100.0, positive=True)}

    def __init__(self, student, teacher, num_train, ce_weight=1.0, **params):
        super().__init__(student, teacher, num_train, ce_weight, **params)
        self.regressor = nn.Linear(student.embedding.shape[1], teacher["embedding"].shape[1])

    teacher_keys = ("embedding",)

    def losses(self, s, t, labels, idx, progress):
        return {"ce": self.ce(s, labels),
                "hint": self.hp["beta"] * F.mse_loss(self.regressor(s.embedding), t["embedding"])}
