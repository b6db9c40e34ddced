"""Collection rules for the whole repository (``pytest`` from the root).

``--doctest-modules`` imports every module of the package in the test process. The suite keeps
everything that runs xfuser in subprocesses (on a machine without an accelerator xfuser needs
the compatibility layer, which patches it process-wide), so the xDiT integration's doctests run
in a fresh interpreter (``tests/test_doctests_in_subprocess.py``) and are not collected here.
"""

# tests/_fail_workers.py imports xfuser when imported (a fork server preloads it), so its
# (absent) doctests must not be collected into this process either
collect_ignore = ["xslim_xdit/integrations/xfuser.py", "tests/_fail_workers.py"]


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2 --dist loadgroup``, the README's test command), every test that
    spawns gloo ranks runs on one worker, one after the other: two multi-rank launches side by side
    on a 2-core machine would double the ranks per core and stretch the failure tests' time
    bounds. The single-process tests share the other worker. Without xdist the marker is inert."""
    import pytest

    for item in items:
        if item.get_closest_marker("multiproc") is not None:
            item.add_marker(pytest.mark.xdist_group("multiproc"))
