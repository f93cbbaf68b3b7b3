"""Tag policies: which pushed tag an auto-deploy takes, in the style Keel's users know.

A policy string is one of:

* ``all``, ``major``, ``minor``, ``patch``: semantic versions. A tag is taken when it is a
  newer version than the live one, within the bound: ``all`` and ``major`` any newer version,
  ``minor`` the same major version, ``patch`` the same major and minor version. Never a
  downgrade, never the live version again. Pre-releases (``1.3.0-rc.1``) only with
  ``prerelease: true`` (Keel's ``all`` always takes them; here that is an explicit opt-in).
  With no live release yet, any version is taken; a live version that is not semver stops
  semver policies (nothing to compare with).
* ``glob:<pattern>`` (shell wildcards, whole tag), ``regexp:<pattern>`` (RE2 syntax, as
  Keel's Go ``regexp`` is, searched as its ``MatchString`` does: anchor with ``^...$``),
  ``exact:<tag>``. These
  have no order: a matching tag is taken, the live one again too when it was pushed anew
  (``latest`` with a new digest: Keel #297).

Regular expressions run on RE2 (``google-re2``), whose matching takes time linear in the
tag's length whatever the pattern: ``^(a+)+$`` cannot freeze the server. A pattern RE2 cannot
run (backreferences, lookaround) or one longer than ``MAX_PATTERN`` characters is refused
when the policy is stored; a tag longer than ``MAX_TAG`` (Docker's own bound) never matches.

Versions are parsed by the ``semver`` library (SemVer 2.0 precedence, pre-release rules,
build metadata ignored) after an optional leading ``v``; ``1.2`` is read as ``1.2.0``.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

import re2
import semver

SEMVER_KINDS = ("all", "major", "minor", "patch")
PATTERN_KINDS = ("glob", "regexp", "exact")
MAX_TAG = 128  # characters of a Docker tag
MAX_PATTERN = 256  # characters of a policy's pattern

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error comes back as the 400's sentence
_RE2_OPTIONS.max_mem = 1 << 20  # a pattern whose program needs more is refused


@functools.lru_cache(maxsize=256)
def _regexp(pattern: str) -> re2._Regexp:
    """The compiled pattern; ValueError with a sentence when RE2 cannot run it."""
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as exc:
        why = exc.args[0].decode(errors="replace") if exc.args else "not valid"
        raise ValueError(
            f"the regular expression {pattern!r} is not one RE2 runs ({why}): "
            "use RE2 syntax, without backreferences or lookaround"
        ) from None


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
        if len(pattern) > MAX_PATTERN:
            raise ValueError(f"the pattern of a tag policy has at most {MAX_PATTERN} characters")
        if kind == "regexp":
            _regexp(pattern)
        return cls(kind, pattern)

    def __str__(self) -> str:
        return f"{self.kind}:{self.pattern}" if self.pattern else self.kind

    def wants(self, tag: str, live: str | None, prerelease: bool = False) -> str | None:
        """None when the policy takes ``tag`` over the live version ``live``, else why not."""
        if len(tag) > MAX_TAG:
            return f"a tag has at most {MAX_TAG} characters, this one {len(tag)}"
        if self.kind == "glob":
            return (
                None
                if fnmatch.fnmatchcase(tag, self.pattern)
                else f"tag {tag!r} does not match {self}"
            )
        if self.kind == "regexp":
            matched = _regexp(self.pattern).search(tag)
            return None if matched else f"tag {tag!r} does not match {self}"
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
