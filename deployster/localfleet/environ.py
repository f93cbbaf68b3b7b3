"""A unit's environment, parsed and substituted the way systemd does it.

Three jobs, each a pure function:

- `parse_environment_assignments`: one `Environment=` value, a list of
  shell-quoted `KEY=VALUE` words (`"A=b c" D=e`). Invalid words are ignored,
  as systemd ignores them with a warning.
- `parse_environment_file`: the text of an `EnvironmentFile=`. A port of
  systemd's small state machine (`parse_env_file_internal`): `#` and `;` start
  comments, values may be single- or double-quoted, a backslash continues a
  line, a line without `=` is skipped.
- `expand_exec_argv`: `$VAR` and `${VAR}` in the words of an Exec line
  (systemd's `replace_env_argv`). A word that is exactly `$VAR` becomes the
  value split on whitespace (an unset variable removes the word); `${VAR}`
  anywhere in a word is replaced by the value as is (unset: empty); `$$` is a
  literal `$`; `$VAR` inside a longer word stays literal.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NEWLINE = "\n\r"
_WHITESPACE = " \t\n\r"
_COMMENT_STARTS = "#;"
# Characters a backslash escapes inside double quotes (systemd's SHELL_NEED_ESCAPE).
_DOUBLE_QUOTE_ESCAPABLE = '"\\`$'


def is_valid_env_name(name: str) -> bool:
    return _ENV_NAME.fullmatch(name) is not None


def split_words(text: str) -> list[str]:
    """Split on whitespace with shell quoting; unbalanced quotes fall back to plain whitespace."""
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def parse_environment_assignments(words: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Split `KEY=VALUE` words; returns the assignments and the words that were ignored."""
    assignments: dict[str, str] = {}
    ignored: list[str] = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not is_valid_env_name(key):
            ignored.append(word)
            continue
        assignments[key] = value
    return assignments, ignored


def parse_environment_file(text: str) -> dict[str, str]:
    """Parse `KEY=VALUE` lines as systemd reads an `EnvironmentFile=`."""
    parser = _EnvFileParser()
    for char in text:
        parser.feed(char)
    parser.finish()
    return parser.assignments


class _EnvFileParser:
    """Character-by-character state machine; the states are systemd's."""

    def __init__(self) -> None:
        self.assignments: dict[str, str] = {}
        self._state = "pre_key"
        self._key: list[str] = []
        self._value: list[str] = []
        # Length of the value up to its last non-whitespace (or escaped) character,
        # so that unquoted trailing whitespace is dropped.
        self._value_keep = 0

    def feed(self, char: str) -> None:
        handler = getattr(self, f"_in_{self._state}")
        handler(char)

    def finish(self) -> None:
        if self._state in (
            "pre_value",
            "value",
            "value_escape",
            "single_quote",
            "double_quote",
            "double_quote_escape",
        ):
            self._push()

    def _push(self) -> None:
        key = "".join(self._key).rstrip(_WHITESPACE)
        value = "".join(self._value[: self._value_keep])
        if is_valid_env_name(key):
            self.assignments[key] = value
        self._key.clear()
        self._value.clear()
        self._value_keep = 0

    def _append(self, char: str, significant: bool = True) -> None:
        self._value.append(char)
        if significant:
            self._value_keep = len(self._value)

    def _in_pre_key(self, char: str) -> None:
        if char in _COMMENT_STARTS:
            self._state = "comment"
        elif char not in _WHITESPACE:
            self._state = "key"
            self._key.append(char)

    def _in_key(self, char: str) -> None:
        if char in _NEWLINE:
            self._state = "pre_key"
            self._key.clear()
        elif char == "=":
            self._state = "pre_value"
        else:
            self._key.append(char)

    def _in_pre_value(self, char: str) -> None:
        if char in _NEWLINE:
            self._state = "pre_key"
            self._push()
        elif char == "'":
            self._state = "single_quote"
        elif char == '"':
            self._state = "double_quote"
        elif char == "\\":
            self._state = "value_escape"
        elif char not in _WHITESPACE:
            self._state = "value"
            self._append(char)

    def _in_value(self, char: str) -> None:
        if char in _NEWLINE:
            self._state = "pre_key"
            self._push()
        elif char == "\\":
            self._state = "value_escape"
        else:
            self._append(char, significant=char not in _WHITESPACE)

    def _in_value_escape(self, char: str) -> None:
        self._state = "value"
        if char not in _NEWLINE:
            self._append(char)

    def _in_single_quote(self, char: str) -> None:
        if char == "'":
            self._state = "pre_value"
        else:
            self._append(char)

    def _in_double_quote(self, char: str) -> None:
        if char == '"':
            self._state = "pre_value"
        elif char == "\\":
            self._state = "double_quote_escape"
        else:
            self._append(char)

    def _in_double_quote_escape(self, char: str) -> None:
        self._state = "double_quote"
        if char in _DOUBLE_QUOTE_ESCAPABLE:
            self._append(char)
        elif char not in _NEWLINE:
            self._append("\\")
            self._append(char)

    def _in_comment(self, char: str) -> None:
        if char == "\\":
            self._state = "comment_escape"
        elif char in _NEWLINE:
            self._state = "pre_key"

    def _in_comment_escape(self, char: str) -> None:
        self._state = "comment"


def expand_exec_argv(words: Iterable[str], env: Mapping[str, str]) -> list[str]:
    """Substitute variables in the words of an Exec line (systemd's `replace_env_argv`)."""
    argv: list[str] = []
    for word in words:
        if word.startswith("$") and word[1:2] not in ("{", "$"):
            value = env.get(word[1:])
            if value is not None:
                argv.extend(split_words(value))
            continue
        argv.append(_replace_braced_variables(word, env))
    return argv


def _replace_braced_variables(word: str, env: Mapping[str, str]) -> str:
    out: list[str] = []
    index = 0
    while index < len(word):
        char = word[index]
        if char == "$" and word.startswith("$", index + 1):
            out.append("$")
            index += 2
        elif char == "$" and word.startswith("{", index + 1):
            end = word.find("}", index + 2)
            if end == -1:
                out.append(word[index:])
                break
            out.append(env.get(word[index + 2 : end], ""))
            index = end + 1
        else:
            out.append(char)
            index += 1
    return "".join(out)
