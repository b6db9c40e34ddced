"""HunyuanVideo 1.5 beyond its tiny config (text-to-video, which ``test_families.py`` runs through
the family suite): image-to-video, where the image-embedding tokens are valid and lead the
condition sequence."""

from __future__ import annotations

from family_suite import FamilyTesterMixin

from xslim_xdit.testing import sample


class TestHunyuanVideo15ImageToVideoFamily(FamilyTesterMixin):
    family = "hunyuan_video15"

    def sample(self, model, steps=None):
        return sample(model, self.family, steps=steps or self.steps, batch=self.batch, image=True)
