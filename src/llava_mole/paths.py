"""One wording for a path that is not what it should be (a folder where a file belongs, ...)."""

from __future__ import annotations

import os
from pathlib import Path


def not_found_or(path: str | os.PathLike, want: str, not_found: str) -> str:
    """``not_found`` when nothing is at ``path``, else what is wrong with it (for messages)."""
    problem = path_problem(path, want)
    return not_found if problem in (None, "not found") else f"{path}: {problem}"


def path_problem(path: str | os.PathLike, want: str) -> str | None:
    """Why ``path`` is not a usable ``want`` (``"file"`` or ``"folder"``), or ``None``.

    ``"not found"`` only when nothing is there: a folder given for a file (or the reverse)
    says so, since "not found" would send the user looking for a missing path.
    """
    path = Path(path)
    if want == "file":
        if path.is_file():
            return None
        return "is a folder, not a file" if path.is_dir() else "not found"
    if path.is_dir():
        return None
    return "is a file, not a folder" if path.exists() else "not found"
