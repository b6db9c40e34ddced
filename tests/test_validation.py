"""Validation that cannot be bypassed (issue 10, point 9): every bad input below raises
:class:`~xslim_xdit.ConfigError` naming the field (or flag, or file key) and what is accepted,
before any model runs. Each case gave a ``TypeError``, ``AttributeError``, a bare
``ValueError`` or no error at all before."""

import pytest

from xslim_xdit import ConfigError, Schedule, XSlimConfig

# ---------------------------------------------------------------- Schedule step lists


@pytest.mark.parametrize("key", ["full_steps", "block_steps", "token_steps"])
@pytest.mark.parametrize("bad", [None, 0, 3, "03", b"0", {0: 1}, 2.0])
def test_schedule_step_lists_must_be_lists(key, bad):
    """``None``, an int, a float or a mapping gave ``TypeError: ... is not iterable`` (a string
    was iterated character by character, a mapping by its keys)."""
    kwargs = {"num_steps": 10, "full_steps": (0,), key: bad}
    with pytest.raises(
        ConfigError, match=rf"^schedule\.{key} must be a list of integer step indices in \[0, 9\]"
    ):
        Schedule(**kwargs)


@pytest.mark.parametrize("bad", [None, [0, 3], "schedule", 4])
def test_schedule_from_dict_needs_a_mapping(bad):
    with pytest.raises(ConfigError, match=r"^schedule must be a mapping with keys num_steps, full_steps"):
        Schedule.from_dict(bad)


@pytest.mark.parametrize("missing", ["num_steps", "full_steps"])
def test_schedule_from_dict_names_a_missing_key(missing):
    d = {"num_steps": 4, "full_steps": [0, 3]}
    del d[missing]
    with pytest.raises(ConfigError, match=rf"^schedule\.{missing} must be given"):
        Schedule.from_dict(d)


def test_a_bad_schedule_inside_a_config_names_the_schedule_field():
    with pytest.raises(ConfigError, match=r"^schedule\.full_steps must be a list"):
        XSlimConfig(mode="schedule", schedule={"num_steps": 4, "full_steps": 0})


def test_repeated_steps_are_listed_in_the_message():
    """The repeat check was quadratic (``out.count(s)`` per step: 49 s for this list on the
    shared CPU); it is one pass with a set now. No wall-clock assertion: the message must list
    the repeated steps."""
    steps = list(range(39_999)) + [1234]
    with pytest.raises(
        ConfigError, match=r"^schedule\.full_steps must be a list without repeated steps; repeated: 1234$"
    ):
        Schedule(num_steps=40_000, full_steps=steps)
    with pytest.raises(ConfigError, match=r"repeated: 2, 5$"):
        Schedule(num_steps=10, full_steps=(0,), token_steps=[5, 2, 5, 2, 2])


def test_step_lists_still_accept_any_iterable_of_ints():
    s = Schedule(num_steps=6, full_steps=range(0, 6, 5), block_steps=[2], token_steps={3, 1})
    assert (s.full_steps, s.block_steps, s.token_steps) == ((0, 5), (2,), (1, 3))
    assert Schedule.from_dict(s.to_dict()) == s
