"""The study's error types (a module of their own, so every study module can raise them)."""

from __future__ import annotations

__all__ = ["StudyConfigError", "StudyWorkersError"]


class StudyConfigError(ValueError):
    """A study YAML problem; the message names the file and the dotted key."""


class StudyWorkersError(RuntimeError):
    """The process pool running the study's runs died (not an error of one run)."""
