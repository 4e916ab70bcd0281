"""A new distillation method in one file: logit matching (Ba & Caruana 2014, "Do Deep Nets Really Need
to be Deep?"), the student regressing the teacher's logits with an L2 loss.

Importing the module registers it: then `search.space.loss: {none: {}, logit_mse: {beta: {uniform: [0.1, 10]}}}`
searches it like a built-in. For sweeps, whose trials run in Ray workers, put the file in kdtune/distill/:
every module there is imported with kdtune.distill, in the driver and in every worker.
"""
import torch.nn.functional as F

from kdtune.distill import Distiller, Param, register


@register
class LogitMSE(Distiller):
    """CE + beta * mean((student logits - teacher logits)^2)."""

    name = "logit_mse"  # the key under search.space.loss
    params = {"beta": Param(1.0, positive=True)}  # default, and the range a spec may set or search
    teacher_keys = ("logits",)  # the teacher targets it reads: computed once per sweep, never a live teacher

    def losses(self, s, t, labels, idx, progress):
        """Named, already weighted terms: the trainer sums them and logs each as loss_<name>."""
        return {"ce": self.ce(s, labels), "logit_mse": self.hp["beta"] * F.mse_loss(s.logits, t["logits"])}
