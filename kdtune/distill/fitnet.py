"""Romero et al. 2015 (FitNets): regress the student's hint layer onto the teacher's."""
import torch.nn.functional as F
from torch import nn

from kdtune.distill.base import Distiller, Param, register


@register
class FitNet(Distiller):
    """CE + beta * MSE(regressor(hint), teacher hint).

    A conv student hints with its last map against the teacher's last map through a 1x1
    conv (the maps share spatial size, only channels differ); a student without maps hints
    with its embedding through a linear layer. The regressor trains with the student.
    """

    name = "fitnet"
    params = {"beta": Param(100.0, positive=True)}

    def __init__(self, student, teacher, num_train, ce_weight=1.0, **params):
        super().__init__(student, teacher, num_train, ce_weight, **params)
        self.use_maps = bool(student.maps)
        if self.use_maps:
            self.regressor = nn.Conv2d(student.maps[-1].shape[1], teacher["map1"].shape[1], 1)
        else:
            self.regressor = nn.Linear(student.embedding.shape[1], teacher["embedding"].shape[1])

    @classmethod
    def teacher_keys(cls, student_has_maps):
        return ("map1",) if student_has_maps else ("embedding",)

    def losses(self, s, t, labels, idx, progress):
        hint, target = (s.maps[-1], t["map1"]) if self.use_maps else (s.embedding, t["embedding"])
        return {"ce": self.ce(s, labels),
                "hint": self.hp["beta"] * F.mse_loss(self.regressor(hint), target)}
