"""No teacher: cross-entropy only, the baseline every distilled student is compared with."""
from kdtune.distill.base import Distiller, register


@register
class NoDistillation(Distiller):
    name = "none"

    @classmethod
    def teacher_keys(cls, student_has_maps):
        return ()

    def losses(self, s, t, labels, idx, progress):
        return {"ce": self.ce(s, labels)}
