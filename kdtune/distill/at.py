"""Zagoruyko & Komodakis 2017: attention transfer, matching where each stage looks."""
from kdtune.distill.base import Distiller, Param, attention, register


@register
class AttentionTransfer(Distiller):
    """CE + beta/2 * sum over stages of mean((att_s - att_t)^2).

    Attention maps are normalised spatial maps, so only the stages' spatial sizes must
    match (the student `cnn` is built so), not their channel counts; beta is large
    because each normalised map's squared differences are tiny.
    """

    name = "at"
    params = {"beta": Param(1000.0, positive=True)}
    needs_conv_student = True

    @classmethod
    def teacher_keys(cls, student_has_maps):
        return ("attention0", "attention1")

    def losses(self, s, t, labels, idx, progress):
        at = sum((attention(s.maps[i]) - t[f"attention{i}"]).pow(2).mean() for i in range(2))
        return {"ce": self.ce(s, labels), "at": self.hp["beta"] / 2 * at}
