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
    assert {"dit", "pixart", "flux", "hunyuan_video", "wan", "sd3"} <= set(PACKAGE_FAMILIES)
    made = {
        cls.family
        for cls in globals().values()
        if isinstance(cls, type) and issubclass(cls, FamilyTesterMixin)
    }
    assert made >= set(PACKAGE_FAMILIES)


def test_every_adapter_module_of_the_package_registers_itself():
    """Adding a family is adding a file: discovery imports every module of the package, and every
    concrete adapter class defined there is registered (no list to edit)."""
    import inspect
    import pkgutil
    import sys

    import xslim_xdit.adapters as package
    from xslim_xdit.adapters import ModelAdapter

    registered = set(registered_adapters())
    for module_info in pkgutil.iter_modules(package.__path__):
        module = sys.modules[f"{package.__name__}.{module_info.name}"]  # imported by discovery
        for cls in vars(module).values():
            concrete = inspect.isclass(cls) and issubclass(cls, ModelAdapter) and cls.model_class_names
            if concrete and cls.__module__ == module.__name__:
                assert cls in registered, f"{cls.__qualname__} in {module.__name__} is not registered"
    assert {a.__module__.rsplit(".", 1)[-1] for a in registered} >= {"dit", "flux", "hunyuan_video", "pixart"}
