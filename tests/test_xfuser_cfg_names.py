"""The guidance branch a CFG-parallel rank reports to the lead-branch rule
(:mod:`xslim_xdit.integrations.xfuser_cfg`), without xfuser or ranks: the pipeline class decides,
matched by name through its bases; the clock is read at each call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xslim_xdit.integrations.xfuser_cfg import CFG_BRANCHES_BY_RANK, cfg_branch_name


class xFuserQwenImageEditPipeline:  # noqa: N801 - named as xfuser's class, which the table matches
    pass


class UserEditPipeline(xFuserQwenImageEditPipeline):
    pass


@pytest.mark.parametrize("pipe", [xFuserQwenImageEditPipeline(), UserEditPipeline()])
def test_table_pipelines_name_each_rank_by_the_branch_it_holds(pipe):
    clock = SimpleNamespace(name="cond")  # xfuser's pipeline names every rank's calls "cond"
    names = [cfg_branch_name(pipe, clock, cfg_rank=r) for r in range(2)]
    assert [n() for n in names] == list(CFG_BRANCHES_BY_RANK["xFuserQwenImageEditPipeline"])
    assert [n() for n in names] == ["uncond", "cond"]
    clock.name = None  # an unnamed call stays unnamed (the plain sums)
    assert [n() for n in names] == [None, None]


def test_other_pipelines_and_bare_transformers_report_the_call_name():
    clock = SimpleNamespace(name="uncond")
    name = cfg_branch_name(object(), clock, cfg_rank=1)
    assert name() == "uncond"
    clock.name = "cond"
    assert name() == "cond"


@pytest.mark.parametrize("cfg_rank", [2, -1, True, 0.0])
def test_a_cfg_rank_outside_the_table_is_refused(cfg_rank):
    with pytest.raises(ValueError, match="cfg_rank must be one of"):
        cfg_branch_name(xFuserQwenImageEditPipeline(), SimpleNamespace(name="cond"), cfg_rank=cfg_rank)
