"""Tian et al. 2020 (CRD): contrast each student embedding with its own teacher embedding
against many other samples' embeddings, kept in momentum memory banks."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.distill.base import Distiller, Param, register


def nce_loss(scores: torch.Tensor, num_train: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE with uniform noise Pn = 1/num_train: column 0 of `scores` (B x K+1) is the positive."""
    m, pn = scores.shape[1] - 1, 1.0 / num_train
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + m * pn + eps))
    log_d0 = torch.log(m * pn / (neg + m * pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


@register
class CRD(Distiller):
    """CE + beta * (NCE(student vs teacher bank) + NCE(teacher vs student bank)).

    Linear heads project both embeddings to `feat_dim` (so their dims may differ). The
    banks stand in for the embeddings of the whole training set, giving `nce_k` negatives
    per sample without a forward of them; the normaliser Z is estimated on the first batch
    and then fixed, as in the reference.
    """

    name = "crd"
    params = {"feat_dim": Param(128, 1, integer=True), "nce_k": Param(16384, 1, integer=True),
              "nce_t": Param(0.07, positive=True), "nce_mom": Param(0.5, 0.0, 1.0),
              "beta": Param(0.8, positive=True)}

    def __init__(self, student, teacher, num_train, ce_weight=1.0, **params):
        super().__init__(student, teacher, num_train, ce_weight, **params)
        dim = int(self.hp["feat_dim"])
        self.num_train = num_train
        self.k = min(int(self.hp["nce_k"]), num_train - 1)
        self.embed_s = nn.Linear(student.embedding.shape[1], dim)
        self.embed_t = nn.Linear(teacher["embedding"].shape[1], dim)
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("bank_s", torch.rand(num_train, dim) * 2 * stdv - stdv)
        self.register_buffer("bank_t", torch.rand(num_train, dim) * 2 * stdv - stdv)
        self.register_buffer("z_s", torch.tensor(-1.0))  # normaliser of the student's scores
        self.register_buffer("z_t", torch.tensor(-1.0))  # ... and of the teacher's; < 0: unset

    teacher_keys = ("embedding",)

    def negatives(self, device) -> torch.Tensor:
        """K bank rows drawn uniformly (with replacement), once per batch and shared by its
        samples: one B x K product instead of B gathers of K rows, which cost 30x more on a CPU."""
        return torch.randint(0, self.num_train, (self.k,), device=device)

    def scores(self, bank, v, idx, negatives, z):
        """exp(<bank row, v> / T) / Z, B x (K+1): each sample's own row, then the negatives.
        Z is set from the first batch's scores (of all workers). `index_select` copies the rows, so the
        in-place bank update that follows cannot invalidate the graph."""
        positive = (bank.index_select(0, idx) * v).sum(1, keepdim=True)
        dots = torch.cat([positive, v @ bank.index_select(0, negatives).t()], dim=1)
        out = torch.exp(dots / self.hp["nce_t"])
        z_now = torch.where(z < 0, self.gather(out.detach().mean().reshape(1)).mean() * self.num_train, z)
        z.copy_(z_now)
        return out / z_now

    def losses(self, s, t, labels, idx, progress):
        v_s = F.normalize(self.embed_s(s.embedding.flatten(1)), dim=1)
        v_t = F.normalize(self.embed_t(t["embedding"].flatten(1)), dim=1)
        negatives = self.negatives(idx.device)
        loss_s = nce_loss(self.scores(self.bank_t, v_s, idx, negatives, self.z_s), self.num_train)
        loss_t = nce_loss(self.scores(self.bank_s, v_t, idx, negatives, self.z_t), self.num_train)
        with torch.no_grad():  # every worker's rows, so that the banks stay the same on all
            mom, rows = self.hp["nce_mom"], self.gather(idx)
            for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
                bank[rows] = F.normalize(bank[rows] * mom + self.gather(v.detach()) * (1 - mom), dim=1)
        return {"ce": self.ce(s, labels), "crd": self.hp["beta"] * (loss_s + loss_t)}
