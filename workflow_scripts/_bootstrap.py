"""Make fewseg importable from this checkout when it is not installed (e.g. inside an environment built from envs/)."""

import sys
from pathlib import Path

try:
    import fewseg  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
