"""Hinton et al. 2015: match the teacher's temperature-softened class distribution."""
import torch.nn.functional as F

from kdtune.distill.base import Distiller, Param, register


def soft_kl(student_logits, teacher_logits, temperature):
    """KL(softmax(t/T) || softmax(s/T)) averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)


@register
class KD(Distiller):
    """(1 - alpha) * CE + alpha * T^2 * KL; T^2 keeps the soft gradients' scale independent of T."""

    name = "kd"
    params = {"temperature": Param(4.0, positive=True), "alpha": Param(0.9, 0.0, 1.0)}

    def losses(self, s, t, labels, idx, progress):
        temperature, alpha = self.hp["temperature"], self.hp["alpha"]
        return {"ce": (1 - alpha) * self.ce(s, labels),
                "kd": alpha * temperature ** 2 * soft_kl(s.logits, t["logits"], temperature)}
