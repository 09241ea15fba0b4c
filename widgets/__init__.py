"""JupyterLab front end of the workbench: ``from widgets import Workbench; Workbench()``.

Only UI lives here; everything a panel does is a library call (``workbench.*``), so the same work runs from
code and the command line.
"""

from widgets.app import Workbench
from widgets.jobs import Job, Jobs

__all__ = ["Job", "Jobs", "Workbench"]
