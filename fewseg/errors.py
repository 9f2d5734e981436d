"""The project's own error types: what a user can fix, reported as one line that names the file or the setting.

Any other exception is a bug and keeps its traceback (see :func:`fewseg.stages.run_stage`). This module imports
nothing, so every stage can use it without pulling in (and being rerun for edits of) the config or I/O code.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input data: the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(ValueError):
    """A configuration problem, reported before any job runs."""


class WeightsError(ValueError):
    """A checkpoint that is not a SegGPT state dict, or does not fit the requested model."""
