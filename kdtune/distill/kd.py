"""Hinton et al. 2015: match the teacher's temperature-softened class distribution."""
import torch
import torch.nn.functional as F

from kdtune.distill.base import Distiller, Param, register


class KDLoss(torch.autograd.Function):
    """KD's two weighted terms, (w_kd * T^2 * KL, w_ce * CE), with their gradient in closed form.

    On a small student a CPU step is mostly per-op overhead: one autograd node with the analytic
    gradient, w_kd * T * (softmax(s/T) - softmax(t/T)) / B + w_ce * (softmax(s) - q) / B for the
    label-smoothed one-hot q (labels gathered and scattered, never one-hot encoded), runs about a
    tenth faster than the loss written op by op. tests/test_methods.py checks values and gradient
    against the composed loss.
    """

    @staticmethod
    def forward(ctx, logits, teacher_logits, labels, temperature, w_kd, w_ce, label_smoothing):
        dtype, logits = logits.dtype, logits.float()  # under bf16 autocast too: softmaxes in fp32
        batch, classes = logits.shape
        log_q = F.log_softmax(logits / temperature, dim=1)
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
        p = log_p.exp()
        kd = (p * (log_p - log_q)).sum() * (w_kd * temperature ** 2 / batch)
        log_s = F.log_softmax(logits, dim=1)
        labels = labels.unsqueeze(1)
        ce = log_s.gather(1, labels).sum() * (-w_ce * (1 - label_smoothing) / batch)
        if label_smoothing:  # q = (1 - eps) * one_hot + eps / classes
            ce = ce - log_s.sum() * (w_ce * label_smoothing / (classes * batch))
        ctx.save_for_backward(log_q, p, log_s, labels)
        ctx.scales = w_kd * temperature / batch, w_ce / batch, label_smoothing, dtype
        return kd, ce

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        log_q, p, log_s, labels = ctx.saved_tensors
        kd_scale, ce_scale, label_smoothing, dtype = ctx.scales
        grad_s = log_s.exp()
        if label_smoothing:
            grad_s -= label_smoothing / log_s.shape[1]
        grad_s.scatter_add_(1, labels, grad_s.new_full(labels.shape, label_smoothing - 1.0))
        grad = (log_q.exp() - p).mul_(grad_kd * kd_scale)
        grad.add_(grad_s.mul_(grad_ce * ce_scale))
        return grad.to(dtype), None, None, None, None, None, None


@register
class KD(Distiller):
    """(1 - alpha) * CE + alpha * T^2 * KL; T^2 keeps the soft gradients' scale independent of T."""

    name = "kd"
    params = {"temperature": Param(4.0, positive=True), "alpha": Param(0.9, 0.0, 1.0)}

    def losses(self, s, t, labels, idx, progress):
        temperature, alpha = self.hp["temperature"], self.hp["alpha"]
        kd, ce = KDLoss.apply(s.logits, t["logits"], labels, temperature, alpha,
                              (1 - alpha) * self.ce_weight, self.label_smoothing)
        return {"ce": ce, "kd": kd}
