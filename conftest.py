"""Collection rules for the whole repository (``pytest`` from the root).

``--doctest-modules`` imports every module of the package in the test process. Importing
``xslim_xdit.integrations.xfuser`` applies xfuser's CPU compatibility layer process-wide (an
import hook and patches), and the suite keeps everything that touches xfuser in subprocesses;
so that module's doctests run in a subprocess (``tests/test_doctests_in_subprocess.py``) and
are not collected here.
"""

collect_ignore = ["xslim_xdit/integrations/xfuser.py"]
