"""Run at start-up by child interpreters whose PYTHONPATH :mod:`serving_patch.compat` extended.

Marks the CUDA-only torch add-ons the parent found unloadable as absent, before anything
imports them (``import`` then raises ImportError and ``importlib.util.find_spec`` returns
None).  Stdlib only, no import of the project: it runs in every child Python process.
"""

import os
import sys

for _name in os.environ.get("SPEC_CONTROLLER_HIDDEN_ADDONS", "").split(","):
    if _name and _name not in sys.modules:
        sys.modules[_name] = None
