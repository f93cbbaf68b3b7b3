"""fleet's page tokens and page slicing (`api/pagination.go`), byte for byte.

A token is Go's `base64.URLEncoding` (URL alphabet, *with* `=` padding) of the
little-endian struct `{Limit uint16, Page uint16}`. The server answers 400 for
a token that does not decode, has another limit than its `token_limit`, has
page 0, or is given more than once. Like fleet, slicing hands out a
`nextPageToken` whenever a page is full, so a listing whose size is an exact
multiple of the limit ends with one empty page (`{}`); clients loop until the
token is absent either way.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import struct
from collections.abc import Sequence
from typing import TypeVar

_TOKEN_STRUCT = struct.Struct("<HH")
# Go's URL alphabet; padding only at the end. Go, unlike Python, rejects '+' and '/'.
_URL_BASE64 = re.compile(r"[A-Za-z0-9_-]*={0,2}")

T = TypeVar("T")


class InvalidPageTokenError(ValueError):
    """The `nextPageToken` query parameter is not one this server hands out."""


@dataclasses.dataclass(frozen=True)
class PageToken:
    limit: int
    page: int

    def encode(self) -> str:
        return base64.urlsafe_b64encode(_TOKEN_STRUCT.pack(self.limit, self.page)).decode()

    def next(self) -> PageToken:
        return PageToken(self.limit, self.page + 1)


def decode_page_token(value: str) -> PageToken:
    if _URL_BASE64.fullmatch(value) is None or len(value) % 4:
        raise InvalidPageTokenError("illegal base64 data in page token")
    try:
        raw = binascii.a2b_base64(value.replace("-", "+").replace("_", "/"), strict_mode=True)
    except binascii.Error as exc:
        raise InvalidPageTokenError("illegal base64 data in page token") from exc
    if len(raw) < _TOKEN_STRUCT.size:
        # binary.Read reads the 4 bytes it needs and ignores any that follow.
        raise InvalidPageTokenError("unexpected EOF" if raw else "EOF")
    limit, page = _TOKEN_STRUCT.unpack_from(raw)
    return PageToken(limit, page)


def page_token_from_query(values: Sequence[str], limit: int) -> PageToken:
    """The token asked for by the `nextPageToken` values of a query; the first page when there is none."""
    if len(values) > 1:
        raise InvalidPageTokenError("too many values for page token")
    if not values:
        return PageToken(limit, 1)
    token = decode_page_token(values[0])
    if token.limit != limit:
        raise InvalidPageTokenError(f"token limit must be {limit}")
    if token.page == 0:
        raise InvalidPageTokenError("token page must be greater than zero")
    return token


def slice_page(items: Sequence[T], token: PageToken) -> tuple[list[T], PageToken | None]:
    """One page of `items` and the token of the next page, exactly as fleet slices."""
    start = (token.page - 1) * token.limit
    stop = token.page * token.limit
    if start >= len(items):
        return [], None
    if stop > len(items):
        return list(items[start:]), None
    return list(items[start:stop]), token.next()
