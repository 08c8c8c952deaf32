"""Cheap bounds checked before the expensive part of a request: the JSON structure of a body before it is parsed.

`json_budget(body, max_depth, max_elements)` measures a JSON text's nesting depth and number of values with a few
passes of C-speed bytes operations (no parser, no Python loop over the bytes): escaped backslashes and escaped
quotes are removed (`\\\\` then `\\"`, left to right, which is how JSON pairs them), so every quote left delimits a
string; the text outside the strings keeps only `[]{},`, whose count bounds the values and whose running sum of
opens minus closes is the depth (numpy). Memory stays within a small multiple of the body. It is an upper bound
on the structure of valid JSON; invalid JSON is left for the parser to refuse.
"""
from __future__ import annotations

import numpy as np

_STRUCTURE = b"[]{},"
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(_STRUCTURE)))
_STEP = np.zeros(256, np.int32)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1

INLINE_BYTES = 64 * 1024
"""Bodies up to this size are measured on the event loop (microseconds); larger ones in a worker thread."""


class BudgetExceeded(ValueError):
    """The body's structure is over a limit; the message names the setting."""


def json_budget(body: bytes, max_depth: int, max_elements: int) -> tuple[int, int]:
    """(depth, values) of `body`; BudgetExceeded as soon as one is over its limit."""
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    quotes = text.count(b'"')
    strings = quotes // 2
    if strings > max_elements:
        raise _too_many(strings, max_elements)
    outside = b"".join(text.split(b'"')[0::2]) if quotes else text
    structure = outside.translate(None, _NOT_STRUCTURE)
    del text, outside
    values = strings + structure.count(b",") + structure.count(b"[") + structure.count(b"{") + 1
    if values > max_elements or len(structure) > 3 * max_elements:
        raise _too_many(values, max_elements)
    if not structure:
        return 0, values
    depth = int(np.cumsum(_STEP[np.frombuffer(structure, np.uint8)]).max())
    if depth > max_depth:
        raise BudgetExceeded(f"the request body nests {depth} levels deep; the limit is {max_depth} "
                             "(MAX_JSON_DEPTH)")
    return depth, values


def _too_many(n: int, limit: int) -> BudgetExceeded:
    return BudgetExceeded(f"the request body has at least {n} JSON values; the limit is {limit} "
                          "(MAX_JSON_ELEMENTS)")
