"""What ran a trial: the code version (package version and git commit) and library versions.

Recorded on every trial so a result can be traced to the code that produced it, on whichever node
it ran. A Docker image has no `.git`; it gets the commit from `HPSEARCH_GIT_COMMIT` (a build arg).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import optuna
import torch

from hpsearch import __version__

ENV_GIT_COMMIT = "HPSEARCH_GIT_COMMIT"


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout hpsearch runs from (with "-dirty" if it has local changes)."""
    env = os.environ.get(ENV_GIT_COMMIT, "").strip()
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hung
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def code_version() -> str:
    """`0.1.0+g1a2b3c4d5e6f` (or `...-dirty`), or just the package version without git."""
    commit = git_commit()
    return f"{__version__}+g{commit[:12]}{'-dirty' if commit.endswith('-dirty') else ''}" if commit else __version__


@functools.cache
def library_versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
    }
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions
