"""Zhao et al. 2022 (DKD): KD split into target-class and non-target-class parts, weighted apart."""
import torch
import torch.nn.functional as F

from kdtune.distill.base import Distiller, Param, register


def dkd_terms(student_logits, teacher_logits, labels, temperature):
    """(TCKD, NCKD), each T^2 * batch-mean KL(teacher || student).

    TCKD compares the binary [p_target, 1 - p_target]; it is computed in log space (the
    non-target mass as a logsumexp) so a confident prediction cannot give log(0). NCKD
    compares the distributions over the non-target classes, the target logit pushed to
    -1000 as in the reference.
    """
    gt = F.one_hot(labels, student_logits.shape[1]).bool()

    def binary(logits):
        log_p = F.log_softmax(logits / temperature, dim=1)
        return torch.stack([log_p[gt], log_p.masked_fill(gt, float("-inf")).logsumexp(1)], dim=1)

    tckd = F.kl_div(binary(student_logits), binary(teacher_logits), reduction="batchmean", log_target=True)
    nckd = F.kl_div(F.log_softmax(student_logits / temperature - 1000.0 * gt, dim=1),
                    F.softmax(teacher_logits / temperature - 1000.0 * gt, dim=1), reduction="batchmean")
    return tckd * temperature ** 2, nckd * temperature ** 2


@register
class DKD(Distiller):
    """CE + warm * (alpha * TCKD + beta * NCKD); the linear warm-up over `warmup` epochs keeps
    the large NCKD weight from swamping CE while the student is still random."""

    name = "dkd"
    params = {"alpha": Param(1.0, 0.0), "beta": Param(8.0, 0.0),
              "temperature": Param(4.0, positive=True), "warmup": Param(1.0, positive=True)}

    def losses(self, s, t, labels, idx, progress):
        tckd, nckd = dkd_terms(s.logits, t["logits"], labels, self.hp["temperature"])
        warm = min(progress / self.hp["warmup"], 1.0)
        return {"ce": self.ce(s, labels),
                "tckd": warm * self.hp["alpha"] * tckd,
                "nckd": warm * self.hp["beta"] * nckd}
