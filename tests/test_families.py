"""The per-family suite (:mod:`family_suite`) on every family the package registers with a tiny
model: one test class per family, made here, so a family added to ``xslim_xdit/adapters/`` is
tested without editing this file."""

from __future__ import annotations

from family_suite import FamilyTesterMixin

from xslim_xdit.adapters import registered_adapters

#: the package's own families (a family registered by a test file opts itself in there)
PACKAGE_FAMILIES = [
    a.name for a in registered_adapters() if a.__module__.startswith("xslim_xdit.") and a.has_tiny_model()
]

for _family in PACKAGE_FAMILIES:
    _name = "Test" + "".join(part.capitalize() for part in _family.split("_")) + "Family"
    globals()[_name] = type(_name, (FamilyTesterMixin,), {"family": _family, "__module__": __name__})


def test_every_package_family_is_in_the_suite():
    assert {"dit", "pixart", "flux", "hunyuan_video"} <= set(PACKAGE_FAMILIES)
    made = {
        cls.family
        for cls in globals().values()
        if isinstance(cls, type) and issubclass(cls, FamilyTesterMixin)
    }
    assert made >= set(PACKAGE_FAMILIES)
