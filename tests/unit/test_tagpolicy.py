"""Tag policies: semver bounds, pre-releases, never a downgrade, glob/regexp/exact."""

from __future__ import annotations

import time

import pytest

from deployster.policy import AutoDeployPolicy
from deployster.tagpolicy import MAX_PATTERN, MAX_TAG, TagPolicy

TAKEN = None


@pytest.mark.parametrize(
    "policy,tag,live,prerelease,taken",
    [
        ("all", "v2.0.0", "v1.4.2", False, True),
        ("major", "2.0.0", "1.4.2", False, True),
        ("minor", "v1.5.0", "v1.4.2", False, True),
        ("minor", "v2.0.0", "v1.4.2", False, False),
        ("patch", "v1.4.3", "v1.4.2", False, True),
        ("patch", "v1.5.0", "v1.4.2", False, False),
        ("all", "v1.4.2", "v1.4.2", False, False),  # the live version again
        ("all", "v1.4.1", "v1.4.2", False, False),  # a downgrade
        ("all", "v1.10.0", "v1.9.0", False, True),  # numeric, not lexical
        ("all", "v1.5.0-rc.1", "v1.4.2", False, False),
        ("all", "v1.5.0-rc.1", "v1.4.2", True, True),
        ("all", "v1.5.0", "v1.5.0-rc.1", False, True),  # the release after its candidate
        ("all", "v1.5.0-rc.2", "v1.5.0-rc.10", True, False),  # SemVer: numeric identifiers
        ("all", "v1.2", "v1.1.9", False, True),
        ("all", "latest", "v1.1.9", False, False),
        ("all", "v1.0.0", None, False, True),  # nothing live yet
        ("patch", "v1.0.1", "latest", False, False),
        ("glob:build-*", "build-42", "build-41", False, True),
        ("glob:build-*", "release-42", None, False, False),
        ("glob:latest", "latest", "latest", False, True),  # the same tag pushed anew
        ("regexp:^v[0-9]+$", "v12", None, False, True),
        ("regexp:^v[0-9]+$", "v12-rc", None, False, False),
        ("exact:stable", "stable", "stable", False, True),
        ("exact:stable", "staging", None, False, False),
    ],
)
def test_policies(policy: str, tag: str, live: str | None, prerelease: bool, taken: bool) -> None:
    why = TagPolicy.parse(policy).wants(tag, live, prerelease)
    assert (why is None) == taken, why
    if not taken:
        assert tag in why or (live or "") in why


@pytest.mark.parametrize("text", ["", "newest", "glob:", "regexp:([", "force", "exact"])
def test_bad_policies_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        TagPolicy.parse(text)
    with pytest.raises(ValueError):
        AutoDeployPolicy(enabled=True, policy=text)


def test_auto_deploy_is_off_by_default() -> None:
    auto = AutoDeployPolicy()
    assert (auto.enabled, auto.policy, auto.prerelease, auto.destroy_previous, auto.repository) == (
        False,
        "all",
        False,
        True,
        None,
    )


def test_regexps_run_in_linear_time() -> None:
    """``^(a+)+$`` backtracks exponentially in Python's ``re`` (minutes at 30 a's); RE2 does
    not, at the longest tag Docker allows."""
    policy = TagPolicy.parse("regexp:^(a+)+$")
    started = time.monotonic()
    for length in (30, MAX_TAG - 1):
        assert policy.wants("a" * length + "-", None) is not None
        assert policy.wants("a" * length, None) is None
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize(
    "text,words",
    [
        ("regexp:(a)\\1", "RE2"),
        ("regexp:(?<=v)1", "RE2"),
        ("regexp:((a{100}){100}){100}", "RE2"),
        ("regexp:" + "a" * (MAX_PATTERN + 1), f"at most {MAX_PATTERN}"),
        ("exact:" + "a" * (MAX_PATTERN + 1), f"at most {MAX_PATTERN}"),
    ],
)
def test_patterns_re2_cannot_run_or_too_long_are_refused(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        TagPolicy.parse(text)


def test_digits_in_regexps_are_ascii_and_tags_are_bounded() -> None:
    assert TagPolicy.parse("regexp:^v\\d+$").wants("v\u0661\u0662", None) is not None
    assert "at most 128" in (TagPolicy.parse("glob:*").wants("a" * (MAX_TAG + 1), None) or "")
