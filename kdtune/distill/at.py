"""Zagoruyko & Komodakis 2017: attention transfer, matching where each stage looks."""
import torch
import torch.nn.functional as F

from kdtune.distill.base import Distiller, Param, attention, register


def attention_distance(student_map: torch.Tensor, teacher_attention: torch.Tensor) -> torch.Tensor:
    """mean((a_s - a_t)^2) of L2-normalised attention maps, the teacher's average-pooled to
    the student's spatial size first (stages may differ in resolution, never in where they look)."""
    s_att = attention(student_map)
    if teacher_attention.shape[-2:] != s_att.shape[-2:]:
        teacher_attention = F.adaptive_avg_pool2d(teacher_attention.unsqueeze(1), s_att.shape[-2:]).squeeze(1)
    return (F.normalize(s_att.flatten(1), dim=1) - F.normalize(teacher_attention.flatten(1), dim=1)).pow(2).mean()


@register
class AttentionTransfer(Distiller):
    """CE + beta/2 * sum over the last two stages of the attention distance.

    Only spatial maps are compared, so channel counts may differ; beta is large because
    each normalised map's squared differences are tiny.
    """

    name = "at"
    params = {"beta": Param(1000.0, positive=True)}
    needs_conv_student = True

    teacher_keys = ("attention0", "attention1")

    def losses(self, s, t, labels, idx, progress):
        at = sum(attention_distance(s.maps[i - 2], t[f"attention{i}"]) for i in range(2))
        return {"ce": self.ce(s, labels), "at": self.hp["beta"] / 2 * at}
