"""Park et al. 2019 (RKD): transfer the geometry of a batch, not individual outputs."""
import torch
import torch.nn.functional as F

from kdtune.distill.base import Distiller, Param, register


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix with an exactly zero diagonal (clamped so sqrt stays finite)."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """Distances divided by their mean over distinct pairs: scale-free, so the dims may differ."""
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at e_i between e_j and e_k, for every triplet, flattened."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@register
class RKD(Distiller):
    """CE + beta * (w_dist * distance loss + w_angle * angle loss) on penultimate embeddings."""

    name = "rkd"
    params = {"w_dist": Param(25.0, 0.0), "w_angle": Param(50.0, 0.0), "beta": Param(1.0, positive=True)}

    teacher_keys = ("embedding",)

    def losses(self, s, t, labels, idx, progress):
        beta, student, teacher = self.hp["beta"], s.embedding, t["embedding"]
        with torch.no_grad():
            t_dist = normalized_distances(teacher)
        terms = {"ce": self.ce(s, labels),
                 "rkd_dist": beta * self.hp["w_dist"] * F.smooth_l1_loss(normalized_distances(student), t_dist)}
        if self.hp["w_angle"]:  # w_angle 0 is the paper's RKD-D: no B^3 triplets, 10x cheaper on a CPU
            with torch.no_grad():
                t_angle = angles(teacher)
            terms["rkd_angle"] = beta * self.hp["w_angle"] * F.smooth_l1_loss(angles(student), t_angle)
        return terms
