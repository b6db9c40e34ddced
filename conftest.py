"""Collection rules for the whole repository (``pytest`` from the root).

``--doctest-modules`` imports every module of the package in the test process. The suite keeps
everything that runs xfuser in subprocesses (on a machine without an accelerator xfuser needs
the compatibility layer, which patches it process-wide), so the xDiT integration's doctests run
in a fresh interpreter (``tests/test_doctests_in_subprocess.py``) and are not collected here.
"""

# tests/_fail_workers.py imports xfuser when imported (a fork server preloads it), so its
# (absent) doctests must not be collected into this process either
collect_ignore = ["xslim_xdit/integrations/xfuser.py", "tests/_fail_workers.py"]
