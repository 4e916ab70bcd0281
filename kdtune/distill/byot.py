"""Zhang et al. 2019, "Be Your Own Teacher": auxiliary classifiers on the student's intermediate
stages learn from its deepest classifier and features. No teacher; the deployed student drops
them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.distill.base import Distiller, Param, register
from kdtune.models import Features


POOLED = 4  # an auxiliary head reads its stage pooled to 4 x 4: a global pool of an early stage keeps too little


class AuxiliaryHead(nn.Module):
    """A stage's feature map pooled, projected to the deepest embedding's width (the feature the
    hint pulls towards the deepest one) and classified."""

    def __init__(self, channels: int, embedding: int, classes: int):
        super().__init__()
        self.project = nn.Linear(channels * POOLED ** 2, embedding)
        self.classify = nn.Linear(embedding, classes)

    def forward(self, feature_map: torch.Tensor) -> Features:
        embedding = F.relu(self.project(F.adaptive_avg_pool2d(feature_map, POOLED).flatten(1)))
        return Features(self.classify(embedding), embedding)


class WithHead(nn.Module):
    """The student's stage `stage` through one auxiliary head: that classifier as a model, to score it."""

    def __init__(self, student: nn.Module, head: AuxiliaryHead, stage: int):
        super().__init__()
        object.__setattr__(self, "student", student)  # not a submodule: the trial owns it
        self.head, self.stage = head, stage

    def forward(self, x):
        return self.head(self.student(x).maps[self.stage])


@register
class BYOT(Distiller):
    """CE of the deepest classifier, and for each auxiliary one: (1 - alpha) * CE + alpha * T^2 *
    KL(deepest softened prediction, detached || its own) + beta * MSE(its feature, the deepest
    embedding, detached). Heads sit on every stage but the last (on a one-stage student, on it)."""

    name = "byot"
    params = {"temperature": Param(3.0, positive=True), "alpha": Param(0.3, 0.0, 1.0),
              "beta": Param(0.03, 0.0, 100.0)}
    teacher_keys = ()
    needs_conv_student = True

    def __init__(self, student, teacher, num_train, ce_weight=1.0, student_model=None, **params):
        super().__init__(student, teacher, num_train, ce_weight, **params)
        if not student.maps or student.embedding is None:
            raise ValueError("byot needs the student's stage feature maps and embedding")
        self.stages = list(range(max(1, len(student.maps) - 1)))
        classes, width = student.logits.shape[1], student.embedding.shape[1]
        self.heads = nn.ModuleList(AuxiliaryHead(student.maps[i].shape[1], width, classes) for i in self.stages)
        object.__setattr__(self, "student", student_model)

    def evaluated(self) -> dict[str, nn.Module]:
        return {f"aux{i}": WithHead(self.student, head, stage) for i, (head, stage) in
                enumerate(zip(self.heads, self.stages))}

    def losses(self, s, t, labels, idx, progress):
        temperature, alpha, beta = self.hp["temperature"], self.hp["alpha"], self.hp["beta"]
        deepest = F.softmax(s.logits.detach().float() / temperature, dim=1)
        target = s.embedding.detach()
        terms = {"ce": self.ce(s, labels)}
        for i, (head, stage) in enumerate(zip(self.heads, self.stages)):
            aux = head(s.maps[stage])
            kl = F.kl_div(F.log_softmax(aux.logits.float() / temperature, dim=1), deepest, reduction="batchmean")
            terms[f"ce_aux{i}"] = (1 - alpha) * self.ce(aux, labels)
            terms[f"kl_aux{i}"] = alpha * temperature ** 2 * kl
            terms[f"hint_aux{i}"] = beta * F.mse_loss(aux.embedding, target)
        return terms
