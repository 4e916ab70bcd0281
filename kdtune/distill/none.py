"""No teacher: cross-entropy only, the baseline every distilled student is compared with."""
from kdtune.distill.base import Distiller, register


@register
class NoDistillation(Distiller):
    name = "none"
    teacher_keys = ()

    def losses(self, s, t, labels, idx, progress):
        return {"ce": self.ce(s, labels)}
