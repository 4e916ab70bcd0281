"""Yang et al. 2021 (SRRL): train the student's penultimate features to work with the teacher's
own classifier (softmax regression representation learning)."""
import torch.nn.functional as F
from torch import nn

from kdtune.distill.base import Distiller, Param, register


@register
class SRRL(Distiller):
    """CE + alpha * MSE(r(s), t) + beta * MSE(W_t(r(s)), z_t).

    The connector r maps the student's embedding s to the teacher's width: a bias-free Linear,
    batch norm and ReLU (the reference's 1x1 conv-BN-ReLU on the pooled embedding; the ReLU
    suits a teacher embedding read after its last ReLU). The feature term matches r(s) to the
    teacher's embedding t; the softmax-regression term passes r(s) through the teacher's frozen
    classifier W_t and matches the result to the teacher's logits z_t with an L2 loss, as in the
    paper and the authors' code. W_t's weights come with the teacher targets (the teacher's body
    never runs here) and take no gradient; r and the student train through them.
    """

    name = "srrl"
    params = {"alpha": Param(1.0, 0.0), "beta": Param(1.0, 0.0)}
    teacher_keys = ("logits", "embedding")
    needs_teacher_head = True

    def __init__(self, student, teacher, num_train, ce_weight=1.0, teacher_head=None, **params):
        super().__init__(student, teacher, num_train, ce_weight, **params)
        if teacher_head is None:
            raise ValueError("srrl needs the teacher's classifier head (teacher_head)")
        dim = teacher["embedding"].shape[1]
        self.project = nn.Linear(student.embedding.shape[1], dim, bias=False)
        self.norm = nn.BatchNorm1d(dim)
        object.__setattr__(self, "head", teacher_head)  # the teacher's: not trained, saved or counted here

    def connect(self, embedding):
        """r(s). A batch of one (an epoch's last, at some sizes) is normalised with the running
        statistics: batch statistics of a single sample are undefined."""
        norm = self.norm
        h = F.batch_norm(self.project(embedding), norm.running_mean, norm.running_var, norm.weight, norm.bias,
                         self.training and len(embedding) > 1, norm.momentum, norm.eps)
        return F.relu(h)

    def losses(self, s, t, labels, idx, progress):
        connected = self.connect(s.embedding)
        return {"ce": self.ce(s, labels),
                "srrl_feature": self.hp["alpha"] * F.mse_loss(connected, t["embedding"]),
                "srrl_sr": self.hp["beta"] * F.mse_loss(self.head(connected), t["logits"])}
