"""Semantic versions of validated checkpoints: parsing, bumping and their directory names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from packaging.version import InvalidVersion, Version

from ..errors import ConfigurationError, PromotionError

BUMPS = ("major", "minor", "patch")
MAX_VERSION_LENGTH = 64
_SEMVER = re.compile(r"v?(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})(?:-?(?:a|b|rc|alpha|beta|c|pre|preview)\.?(0|[1-9][0-9]{0,8})?)?", re.IGNORECASE)


def parse_version(version: str | Version) -> Version:
    """Parse a semantic version: ``MAJOR.MINOR.PATCH`` (each at most 9 digits) with an optional
    pre-release such as ``"1.1.0rc1"``; anything else raises :class:`PromotionError` before any file
    is touched."""
    text = str(version) if isinstance(version, Version) else version
    parsed = None
    if isinstance(text, str) and len(text) <= MAX_VERSION_LENGTH and _SEMVER.fullmatch(text.strip()):
        try:
            parsed = Version(text)
        except InvalidVersion:
            parsed = None
    if parsed is None or len(parsed.release) != 3 or parsed.epoch != 0 or parsed.local is not None or parsed.post is not None or parsed.dev is not None:
        shown = text if not isinstance(text, str) or len(text) <= MAX_VERSION_LENGTH else f"{text[:20]}... ({len(text)} characters)"
        raise PromotionError(
            f"{shown!r} is not a semantic version; use MAJOR.MINOR.PATCH such as '1.0.0' "
            "(pre-releases such as '1.1.0rc1' are allowed; at most 9 digits per number)"
        )
    return parsed


def next_version(existing: Sequence[Version], bump: str) -> Version:
    """The version after the highest of ``existing`` when bumping its ``major``, ``minor`` or ``patch``."""
    check_bump(bump)
    major, minor, patch = max(existing).release if existing else (0, 0, 0)
    if bump == "major":
        return Version(f"{major + 1}.0.0")
    if bump == "minor":
        return Version(f"{major}.{minor + 1}.0")
    return Version(f"{major}.{minor}.{patch + 1}")


def check_bump(bump: str) -> None:
    """Raise :class:`ConfigurationError` unless ``bump`` is one of :data:`BUMPS`."""
    if bump not in BUMPS:
        raise ConfigurationError(f"bump must be one of {', '.join(BUMPS)}, not {bump!r}")


def directory_name(version: Version) -> str:
    """The name a validated version is stored under: ``v1.0.0``."""
    return f"v{version}"


def versions_named(names: Iterable[str]) -> list[Version]:
    """The versions among directory ``names`` that are exactly a version's name, lowest first."""
    found = []
    for name in names:
        try:
            version = parse_version(name[1:])
        except PromotionError:
            continue
        if name == directory_name(version):
            found.append(version)
    return sorted(found)
