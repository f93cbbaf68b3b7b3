"""Tag policies: which pushed tag an auto-deploy takes, in the style Keel's users know.

A policy string is one of:

* ``all``, ``major``, ``minor``, ``patch``: semantic versions. A tag is taken when it is a
  newer version than the live one, within the bound: ``all`` and ``major`` any newer version,
  ``minor`` the same major version, ``patch`` the same major and minor version. Never a
  downgrade, never the live version again. Pre-releases (``1.3.0-rc.1``) only with
  ``prerelease: true`` (Keel's ``all`` always takes them; here that is an explicit opt-in).
  With no live release yet, any version is taken; a live version that is not semver stops
  semver policies (nothing to compare with).
* ``glob:<pattern>`` (shell wildcards, whole tag), ``regexp:<pattern>`` (Python ``re``,
  searched as Keel's Go ``MatchString`` does: anchor with ``^...$``), ``exact:<tag>``. These
  have no order: a matching tag is taken, the live one again too when it was pushed anew
  (``latest`` with a new digest: Keel #297).

Versions are parsed by the ``semver`` library (SemVer 2.0 precedence, pre-release rules,
build metadata ignored) after an optional leading ``v``; ``1.2`` is read as ``1.2.0``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import semver

SEMVER_KINDS = ("all", "major", "minor", "patch")
PATTERN_KINDS = ("glob", "regexp", "exact")


def parse_version(tag: str) -> semver.Version | None:
    """``tag`` as a semantic version (``v1.2.3``, ``1.2.3-rc.1``, ``1.2``), else None."""
    text = tag[1:] if tag[:1] in ("v", "V") else tag
    try:
        return semver.Version.parse(text, optional_minor_and_patch=True)
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class TagPolicy:
    kind: str
    pattern: str = ""

    @classmethod
    def parse(cls, text: str) -> TagPolicy:
        """Raise ValueError with a sentence for a string that is not a policy."""
        if text in SEMVER_KINDS:
            return cls(text)
        kind, colon, pattern = text.partition(":")
        if not colon or kind not in PATTERN_KINDS:
            raise ValueError(
                f"{text!r} is not a tag policy: use all, major, minor, patch, "
                "glob:<pattern>, regexp:<pattern> or exact:<tag>"
            )
        if not pattern:
            raise ValueError(f"the tag policy {text!r} needs a pattern after '{kind}:'")
        if kind == "regexp":
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"the regular expression {pattern!r} does not compile: {exc}"
                ) from None
        return cls(kind, pattern)

    def __str__(self) -> str:
        return f"{self.kind}:{self.pattern}" if self.pattern else self.kind

    def wants(self, tag: str, live: str | None, prerelease: bool = False) -> str | None:
        """None when the policy takes ``tag`` over the live version ``live``, else why not."""
        if self.kind == "glob":
            return (
                None
                if fnmatch.fnmatchcase(tag, self.pattern)
                else f"tag {tag!r} does not match {self}"
            )
        if self.kind == "regexp":
            return None if re.search(self.pattern, tag) else f"tag {tag!r} does not match {self}"
        if self.kind == "exact":
            return None if tag == self.pattern else f"tag {tag!r} is not {self.pattern!r}"
        new = parse_version(tag)
        if new is None:
            return f"tag {tag!r} is not a semantic version (policy {self})"
        if new.prerelease and not prerelease:
            return f"tag {tag!r} is a pre-release and the policy does not take pre-releases"
        if live is None:
            return None
        current = parse_version(live)
        if current is None:
            return f"the live version {live!r} is not a semantic version, so policy {self} cannot compare"
        if new.compare(current) <= 0:
            return f"tag {tag!r} is not newer than the live version {live!r}"
        if self.kind == "minor" and new.major != current.major:
            return f"tag {tag!r} changes the major version of {live!r} (policy minor)"
        if self.kind == "patch" and (new.major, new.minor) != (current.major, current.minor):
            return f"tag {tag!r} changes more than the patch version of {live!r} (policy patch)"
        return None

    @property
    def ordered(self) -> bool:
        """True for semver policies: of two acceptable tags, the higher one wins."""
        return self.kind in SEMVER_KINDS
