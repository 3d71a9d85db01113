"""
AMP's wire format in the standard library alone, for a client that must start fast
(C{graceful-ctl}): boxes, the argument types the admin commands use, and how a value of a key
this side does not know is decoded.

A box is a sequence of key/value pairs, each a 16-bit big-endian length and that many bytes
(keys at most 255 bytes, values at most 65,535), ended by an empty key.  An AmpList value is its
items' boxes, concatenated.  This module imports nothing of Twisted: the command definitions
in L{graceful_plugin.control} stay the source of truth, and the tests check every schema here
against them, both ways.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    # Not imported at run time: typing alone would cost this client 2 ms of CPU.
    from collections.abc import Mapping
    from typing import Any

#: AMP's limits (Twisted's C{MAX_KEY_LENGTH} and C{MAX_VALUE_LENGTH}).
MAX_KEY_LENGTH = 0xFF
MAX_VALUE_LENGTH = 0xFFFF

#: The largest box a reader accepts: far above any answer of a graceful server.
MAX_BOX_LENGTH = 4 * 1024 * 1024

ASK = b"_ask"
ANSWER = b"_answer"
COMMAND = b"_command"
ERROR = b"_error"
ERROR_CODE = b"_error_code"
ERROR_DESCRIPTION = b"_error_description"
UNHANDLED_ERROR_CODE = b"UNHANDLED"
UNKNOWN_ERROR_CODE = b"UNKNOWN"


class WireError(ValueError):
    """
    Bytes that are not AMP, or a value that does not fit its declared type.
    """


def encodeBox(box: Mapping[bytes, bytes]) -> bytes:
    """
    One box on the wire, keys sorted as Twisted sends them.

    @raise WireError: a key or value is longer than AMP allows.
    """
    out = []
    for key, value in sorted(box.items()):
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise WireError(f"key {key[:32]!r} is empty or longer than {MAX_KEY_LENGTH} bytes")
        if len(value) > MAX_VALUE_LENGTH:
            raise WireError(f"the value of {key!r} is longer than {MAX_VALUE_LENGTH} bytes")
        out.append(len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value)
    out.append(b"\x00\x00")
    return b"".join(out)


class BoxReader:
    """
    Cut a byte stream into boxes, as the bytes arrive.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def pending(self) -> int:
        """
        How many bytes are buffered that do not make a whole box yet.
        """
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[bytes, bytes]]:
        """
        Take more bytes; return the boxes they complete.

        @raise WireError: the stream is not AMP.
        """
        self._buffer += data
        boxes: list[dict[bytes, bytes]] = []
        while True:
            box, used = _parseBox(self._buffer)
            if box is None:
                if len(self._buffer) > MAX_BOX_LENGTH:
                    raise WireError(f"a box longer than {MAX_BOX_LENGTH} bytes")
                return boxes
            del self._buffer[:used]
            boxes.append(box)


def _parseBox(data: bytes | bytearray, start: int = 0) -> tuple[dict[bytes, bytes] | None, int]:
    """
    The box starting at C{start} in C{data} and the offset just past it, or C{(None, start)}
    if it is not all there yet.
    """
    box: dict[bytes, bytes] = {}
    at = start
    end = len(data)
    while True:
        if at + 2 > end:
            return None, start
        keyLength = int.from_bytes(data[at : at + 2], "big")
        at += 2
        if keyLength == 0:
            return box, at
        if keyLength > MAX_KEY_LENGTH:
            raise WireError(f"a key length of {keyLength} bytes (AMP allows {MAX_KEY_LENGTH})")
        if at + keyLength + 2 > end:
            return None, start
        key = bytes(data[at : at + keyLength])
        at += keyLength
        valueLength = int.from_bytes(data[at : at + 2], "big")
        at += 2
        if at + valueLength > end:
            return None, start
        box[key] = bytes(data[at : at + valueLength])
        at += valueLength


def parseBoxes(data: bytes) -> list[dict[bytes, bytes]]:
    """
    Every box in C{data}, which must hold whole boxes only (an AmpList value).

    @raise WireError: C{data} is not a sequence of whole boxes.
    """
    boxes = []
    at = 0
    while at < len(data):
        box, after = _parseBox(data, at)
        if box is None:
            raise WireError("a list value ends in the middle of a box")
        boxes.append(box)
        at = after
    return boxes


# -- argument types ----------------------------------------------------------------------------


class Field:
    """
    One argument or response key: its type (C{"integer"}, C{"float"}, C{"unicode"},
    C{"boolean"} or C{"list"} with C{items}), as Twisted's C{amp.Integer} and the like.
    (A plain class: C{dataclasses} alone would cost this client a few milliseconds to import.)
    """

    __slots__ = ("type", "optional", "items")

    def __init__(self, type: str, optional: bool = False, items: Schema | None = None) -> None:
        self.type = type
        self.optional = optional
        self.items = items

    def __repr__(self) -> str:
        return f"Field({self.type!r}, optional={self.optional!r}, items={self.items!r})"


Schema = tuple[tuple[bytes, Field], ...]


def Integer(optional: bool = False) -> Field:
    return Field("integer", optional)


def Float(optional: bool = False) -> Field:
    return Field("float", optional)


def Unicode(optional: bool = False) -> Field:
    return Field("unicode", optional)


def Boolean(optional: bool = False) -> Field:
    return Field("boolean", optional)


def AmpList(items: Schema, optional: bool = False) -> Field:
    return Field("list", optional, items)


def encodeValue(field: Field, value: Any) -> bytes:
    """
    C{value} on the wire, as Twisted's argument type of the same name encodes it.
    """
    if field.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError(f"expected an integer, not {value!r}")
        return str(value).encode("ascii")
    if field.type == "float":
        if not isinstance(value, float):
            raise WireError(f"expected a float, not {value!r}")
        return str(value).encode("ascii")
    if field.type == "unicode":
        return str(value).encode("utf-8")
    if field.type == "boolean":
        return b"True" if value else b"False"
    if field.type == "list":
        assert field.items is not None
        return b"".join(encodeBox(encodeValues(field.items, item)) for item in value)
    raise WireError(f"unknown field type {field.type!r}")


def encodeValues(schema: Schema, values: Mapping[str, Any]) -> dict[bytes, bytes]:
    """
    A box of C{values} by C{schema}; an optional value that is absent or C{None} is not sent.
    """
    box: dict[bytes, bytes] = {}
    for name, field in schema:
        value = values.get(name.decode("ascii"))
        if value is None:
            if not field.optional:
                raise WireError(f"{name.decode('ascii')} is required")
            continue
        box[name] = encodeValue(field, value)
    return box


def decodeValue(field: Field, raw: bytes) -> Any:
    """
    A value of a known type, decoded strictly.

    @raise WireError: C{raw} is not a value of that type.
    """
    try:
        if field.type == "integer":
            return int(raw)
        if field.type == "float":
            return float(raw)
        if field.type == "unicode":
            return raw.decode("utf-8")
        if field.type == "boolean":
            if raw in (b"True", b"False"):
                return raw == b"True"
            raise WireError(f"{raw[:32]!r} is not a boolean")
        if field.type == "list":
            assert field.items is not None
            return [decodeValues(field.items, box) for box in parseBoxes(raw)]
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"{raw[:32]!r} is not a valid {field.type}") from None
    raise WireError(f"unknown field type {field.type!r}")


def decodeValues(schema: Schema, box: Mapping[bytes, bytes]) -> dict[str, Any]:
    """
    A box as a dictionary: the keys of C{schema} by their types (an optional one that is absent
    is C{None}, as with Twisted), and every other key too, by L{guessValue}, so that a field a
    newer server adds reaches the output without a change here.  Keys starting with C{_}
    (AMP's own: C{_answer}, C{_command} ...) are left out.

    @raise WireError: a known key is missing or not of its type.
    """
    values: dict[str, Any] = {}
    known = set()
    for name, field in schema:
        known.add(name)
        key = name.decode("ascii")
        if name not in box:
            if not field.optional:
                raise WireError(f"{key} is missing")
            values[key] = None
            continue
        try:
            values[key] = decodeValue(field, box[name])
        except WireError as e:
            raise WireError(f"{key}: {e}") from None
    for name, raw in box.items():
        if name not in known and not name.startswith(b"_"):
            values[name.decode("utf-8", "replace")] = guessValue(raw)
    return values


_INTEGER = rb"-?[0-9]+\Z"
#: C{str(float)}'s forms: 1.5, 1e+20, 1.5e-07, inf, -inf, nan.
_FLOAT = rb"-?(?:[0-9]+\.[0-9]+(?:e[-+][0-9]+)?|[0-9]+e[-+][0-9]+|inf)\Z|nan\Z"


def guessValue(raw: bytes) -> Any:
    """
    A value of a key this side has no type for, decoded by its look, as Twisted's argument
    types write them: C{-?[0-9]+} is an integer, C{str(float)}'s forms (C{1.5}, C{1e+20},
    C{inf}, C{nan}) a float, C{True}/C{False} a boolean, bytes that start with a zero byte and
    are whole boxes a list of dictionaries (decoded the same way), anything else text (UTF-8,
    undecodable bytes replaced).  Only an unknown key is guessed: a text field of the same look
    would come out as a number, which is why every key this client uses is declared.
    """
    if re.match(_INTEGER, raw):
        return int(raw)
    if re.match(_FLOAT, raw):
        return float(raw)
    if raw in (b"True", b"False"):
        return raw == b"True"
    if raw[:1] == b"\x00":
        try:
            boxes = parseBoxes(raw)
        except WireError:
            pass
        else:
            return [decodeValues((), box) for box in boxes]
    return raw.decode("utf-8", "replace")
