"""Zhang et al. 2018, deep mutual learning: peers of the student's kind, trained together from
different initialisations, each learning from the others' predictions. No teacher."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.distill.base import INPUTS, Distiller, Param, register
from kdtune.models import Features


def fresh_copy(model: nn.Module) -> nn.Module:
    """`model`'s architecture with a new default initialisation, drawn from the trial's seeded RNG."""
    peer = copy.deepcopy(model)
    for module in peer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return peer


@register
class DML(Distiller):
    """Each of `peers` students: CE + alpha * T^2 * KL(mean of the other peers' softened
    predictions, detached || its own). Peer 0 is the trial's student (reported, logged,
    deployed); peers 1.. are this method's own modules, so they count as extra_params."""

    name = "dml"
    params = {"peers": Param(2, 2, 4, integer=True), "temperature": Param(1.0, positive=True),
              "alpha": Param(1.0, 0.0, 10.0)}
    teacher_keys = ()
    needs_inputs = True

    def __init__(self, student, teacher, num_train, ce_weight=1.0, student_model=None, **params):
        super().__init__(student, teacher, num_train, ce_weight, **params)
        self.peers = nn.ModuleList(fresh_copy(student_model) for _ in range(int(self.hp["peers"]) - 1))
        object.__setattr__(self, "student", student_model)  # peer 0 for evaluation, not a submodule

    def evaluated(self) -> dict[str, nn.Module]:
        return {f"peer{i}": peer for i, peer in enumerate([self.student, *self.peers])}

    def losses(self, s, t, labels, idx, progress):
        temperature, alpha = self.hp["temperature"], self.hp["alpha"]
        logits = [s.logits] + [peer(t[INPUTS]).logits for peer in self.peers]
        probs = torch.stack([F.softmax(z.detach().float() / temperature, dim=1) for z in logits])
        total = probs.sum(0)
        terms = {}
        for i, z in enumerate(logits):
            others = (total - probs[i]) / (len(logits) - 1)
            log_q = F.log_softmax(z.float() / temperature, dim=1)
            kl = F.kl_div(log_q, others, reduction="batchmean")
            suffix = f"_peer{i}" if i else ""  # peer 0's are the student's own: ce and kl, as other methods name them
            terms[f"ce{suffix}"] = self.ce(Features(z), labels)
            terms[f"kl{suffix}"] = alpha * temperature ** 2 * kl
        return terms
