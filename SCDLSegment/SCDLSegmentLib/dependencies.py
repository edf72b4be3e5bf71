"""Which Python packages the engine needs and which are missing, checked without importing them.

torch is installed through the PyTorch extension (it picks the CUDA build that matches the
driver); the other packages through Slicer's pip helpers. numpy and SimpleITK come with Slicer
and are never installed or replaced by this module. Installing happens only after the user
clicked and confirmed, on the GUI thread (see ``SCDLSegmentLogic.installDependencies``).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SLICER_PROVIDED",
    "pinned_installed",
    "TORCH_REQUIREMENT",
    "RequirementStatus",
    "check_requirements",
    "read_requirements",
    "unsatisfied",
]

#: torch versions the engine supports (the same range as scdlcore's pyproject.toml).
TORCH_REQUIREMENT = "torch>=2.4"
#: Packages that ship with Slicer: never installed, upgraded or replaced by this module.
SLICER_PROVIDED = ("numpy", "SimpleITK")

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class RequirementStatus:
    """One requirement and what is installed.

    Attributes:
        requirement: as written, e.g. ``"monai>=1.4"``.
        name: the distribution name, e.g. ``"monai"``.
        installed: the installed version, or None when missing.
        satisfied: whether the installed version meets the requirement.
    """

    requirement: str
    name: str
    installed: str | None
    satisfied: bool

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.requirement}: missing"
        state = "ok" if self.satisfied else "too old"
        return f"{self.requirement}: {self.installed} ({state})"


def pinned_installed(names: Iterable[str], version: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """``name==version`` for each of ``names`` that is installed: pip constraints that keep those packages
    as they are while other packages install (Slicer 5.10's pip_install has no skip list)."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def read_requirements(path: str | Path) -> list[str]:
    """The requirement lines of a requirements.txt (comments, blank lines and ``-`` options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def check_requirements(
    requirements: Iterable[str], version_of: Callable[[str], str] = importlib.metadata.version
) -> list[RequirementStatus]:
    """Check each requirement against the installed distributions' metadata (nothing is imported).

    Args:
        requirements: PEP 508 strings such as ``"monai>=1.4"``.
        version_of: returns a distribution's installed version or raises ``PackageNotFoundError``.

    Raises:
        ValueError: a requirement that is not a PEP 508 string, or names a package that ships with
            Slicer (those must not be installed by pip here).
    """
    statuses = []
    for requirement in requirements:
        name = _name(requirement)
        if name.lower() in {provided.lower() for provided in SLICER_PROVIDED}:
            raise ValueError(f"{requirement!r}: {name} comes with Slicer and must not be installed or replaced by pip.")
        try:
            installed = version_of(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        statuses.append(
            RequirementStatus(requirement, name, installed, installed is not None and _meets(requirement, installed))
        )
    return statuses


def unsatisfied(statuses: Sequence[RequirementStatus]) -> list[str]:
    """The requirements to install."""
    return [status.requirement for status in statuses if not status.satisfied]


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"{requirement!r} is not a requirement such as 'monai>=1.4'.")
    return match.group(1)


def _meets(requirement: str, installed: str) -> bool:
    """Whether ``installed`` satisfies the version specifier (and markers) of ``requirement``."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.version import InvalidVersion
    except ImportError:  # packaging is not a Slicer 5.10 guarantee: then any installed version counts
        return True
    try:
        parsed = Requirement(requirement)
        return parsed.specifier.contains(installed, prereleases=True)
    except (InvalidRequirement, InvalidVersion) as err:
        raise ValueError(f"{requirement!r} (installed {installed}) cannot be checked: {err}") from err
