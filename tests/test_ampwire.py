"""
The stdlib AMP of ``graceful-ctl`` (L{graceful_plugin.ampwire}, L{graceful_plugin.ctlclient})
against Twisted's: every command the client uses has the schema control.py defines, and values
encoded by either side decode the same on the other, so the two cannot drift apart.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.protocols import amp

from graceful_plugin import ampwire, control, ctlclient
from graceful_plugin.ampwire import BoxReader, WireError, decodeValues, encodeBox, encodeValues

#: Fields the client sends before control.py declares them: the fork-server work adds C{fresh}
#: to Restart's arguments (an older server ignores an undeclared key, as AMP does).
CLIENT_AHEAD = {(b"Restart", b"fresh")}

_TYPES = {
    amp.Integer: "integer",
    amp.Float: "float",
    amp.Unicode: "unicode",
    amp.Boolean: "boolean",
    amp.AmpList: "list",
}


def _twistedCommand(name: bytes) -> type[amp.Command]:
    command = getattr(control, name.decode())
    assert issubclass(command, amp.Command)
    return command


def _kind(argument: amp.Argument) -> str:
    return _TYPES[type(argument)]


def _assertSchemaWithin(
    where: str, ours: ampwire.Schema, theirs: list[tuple[bytes, amp.Argument]], command: bytes
) -> None:
    declared = dict(theirs)
    for name, field in ours:
        if name not in declared:
            assert (command, name) in CLIENT_AHEAD, f"{where}: {name!r} is not in control.py"
            continue
        argument = declared[name]
        assert field.type == _kind(argument), f"{where}: {name!r} is {field.type}"
        assert field.optional == bool(argument.optional), f"{where}: {name!r} optional"
        if field.type == "list":
            assert isinstance(argument, amp.AmpList) and field.items is not None
            _assertSchemaWithin(f"{where}.{name.decode()}", field.items, argument.subargs, command)


@pytest.mark.parametrize("name", sorted(ctlclient.COMMANDS))
def test_clientSchemasAreControlPys(name: bytes) -> None:
    """
    Every field of every command the client sends or takes is declared in control.py with the
    same type and optionality (list items too), and so are its error codes: a change there that
    the client does not follow fails here.
    """
    ours = ctlclient.COMMANDS[name]
    theirs = _twistedCommand(name)
    assert theirs.commandName == name
    assert ours.requiresAnswer == theirs.requiresAnswer
    _assertSchemaWithin(f"{name.decode()} arguments", ours.arguments, theirs.arguments, name)
    _assertSchemaWithin(f"{name.decode()} response", ours.response, theirs.response, name)
    errors = {code: exception.__name__ for exception, code in theirs.errors.items()}
    for code, kind in ours.errors.items():
        assert errors.get(code) == kind


def test_aheadFieldsMatchOnceDeclared() -> None:
    """
    A field the client sends ahead of control.py has, once control.py declares it, the type
    the client gives it.
    """
    for command, name in CLIENT_AHEAD:
        declared = dict(_twistedCommand(command).arguments)
        if name in declared:
            field = dict(ctlclient.COMMANDS[command].arguments)[name]
            assert (field.type, field.optional) == (_kind(declared[name]), True)


def test_protocolVersion() -> None:
    """
    The client checks the version control.py speaks.
    """
    assert ctlclient.PROTOCOL_VERSION == control.PROTOCOL_VERSION


# -- values, both ways ---------------------------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


def _strategy(argument: amp.Argument) -> st.SearchStrategy[Any]:
    if isinstance(argument, amp.AmpList):
        return st.lists(_valuesStrategy(argument.subargs), max_size=4)
    return {
        "integer": st.integers(min_value=-(2**63), max_value=2**63),
        "float": st.floats(allow_nan=True, allow_infinity=True),
        "unicode": _text,
        "boolean": st.booleans(),
    }[_kind(argument)]


def _valuesStrategy(schema: list[tuple[bytes, amp.Argument]]) -> st.SearchStrategy[Any]:
    required = {}
    optional = {}
    for name, argument in schema:
        (optional if argument.optional else required)[name.decode()] = _strategy(argument)
    return st.fixed_dictionaries(required, optional=optional)  # type: ignore[arg-type]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _known(schema: ampwire.Schema, values: dict[str, Any]) -> dict[str, Any]:
    """
    C{values} as the client sees them: every field of C{schema} (None when absent).
    """
    out = {}
    for name, field in schema:
        key = name.decode()
        value = values.get(key)
        if field.type == "list" and value is not None:
            assert field.items is not None
            value = [_known(field.items, item) for item in value]
        out[key] = value
    return out


def _onlyKnown(schema: ampwire.Schema, decoded: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, field in schema:
        value = decoded[name.decode()]
        if field.type == "list" and value is not None:
            assert field.items is not None
            value = [_onlyKnown(field.items, item) for item in value]
        out[name.decode()] = value
    return out


def _wire(box: amp.AmpBox) -> dict[bytes, bytes]:
    """
    A box Twisted built, through the client's reader.
    """
    boxes = BoxReader().feed(box.serialize())
    assert len(boxes) == 1
    return boxes[0]


def _roundTrips(name: bytes, part: str) -> None:
    ours = ctlclient.COMMANDS[name]
    theirs = _twistedCommand(name)
    schema = getattr(theirs, part)
    ourSchema = getattr(ours, part)
    known = {n for n, _ in ourSchema}
    makeTwisted = theirs.makeArguments if part == "arguments" else theirs.makeResponse
    parseTwisted = theirs.parseArguments if part == "arguments" else theirs.parseResponse

    @settings(max_examples=60, deadline=None)
    @given(_valuesStrategy(schema))
    def check(values: dict[str, Any]) -> None:
        # Twisted encodes, the client decodes: the fields it knows come out equal, and every
        # other field the server sent is there too.
        decoded = decodeValues(ourSchema, _wire(makeTwisted(values, None)))
        assert _same(_onlyKnown(ourSchema, decoded), _known(ourSchema, values))
        assert {k for k in values if k.encode() not in known} <= decoded.keys()
        # The client encodes, Twisted decodes.
        sendable = {k: v for k, v in values.items() if k.encode() in known}
        raw = encodeBox(encodeValues(ourSchema, sendable))
        parsed = parseTwisted(amp.parseString(raw)[0], None)
        # (Twisted reads an optional field left out of a list item as None.)
        expected = _known(ourSchema, sendable)
        for key in sendable:
            assert _same(parsed[key], expected[key])

    check()


@pytest.mark.parametrize("name", sorted(ctlclient.COMMANDS))
@pytest.mark.parametrize("part", ["arguments", "response"])
def test_valuesRoundTripBothWays(name: bytes, part: str) -> None:
    """
    Arguments and answers of every command the client uses, of any value, encoded by Twisted
    decode to the same values in the client, and encoded by the client decode to the same in
    Twisted.
    """
    _roundTrips(name, part)


def test_bytesAreTwisteds() -> None:
    """
    A command box the client writes is byte for byte the one Twisted writes (keys sorted, tag
    in hex).
    """
    ours = encodeBox(
        {b"_ask": b"1", b"_command": b"Restart", b"progress": b"True", b"fresh": b"True"}
    )
    theirs = amp.AmpBox(_ask=b"1", _command=b"Restart", progress=b"True", fresh=b"True")
    assert ours == theirs.serialize()
    box = encodeValues(ctlclient.Stop.arguments, {"drainTimeout": 2.5})
    assert box == control.Stop.makeArguments({"drainTimeout": 2.5}, None)


# -- what a newer server adds --------------------------------------------------------------


class FutureStatus(amp.Command):
    """
    Status as a newer server might answer it: new figures, and a new field on each listener and
    draining generation.
    """

    commandName = b"Status"
    arguments = control.Status.arguments
    response = [
        *[(n, a) for n, a in control.Status.response if n not in (b"listeners", b"draining")],
        (
            b"listeners",
            amp.AmpList(
                [*dict(control.Status.response)[b"listeners"].subargs, (b"bytes", amp.Integer())]
            ),
        ),
        (b"draining", amp.AmpList([*control._generationEntry, (b"cpu", amp.Float())])),
        (b"requests", amp.Integer()),
        (b"p99", amp.Float()),
        (b"healthy", amp.Boolean()),
        (b"release", amp.Unicode()),
        (b"threads", amp.AmpList([(b"tid", amp.Integer()), (b"role", amp.Unicode())])),
    ]


def test_newFieldsPassThrough() -> None:
    """
    Fields the client has no schema for reach its output with the type they were sent as
    (integer, float, boolean, a list of boxes, text), top-level and in list items alike.
    """
    values = {
        "version": 1,
        "pid": 10,
        "generation": 2,
        "state": "serving",
        "uptime": 1.5,
        "listeners": [
            {
                "name": "web",
                "kind": "tcp",
                "address": "127.0.0.1:80",
                "accepting": True,
                "sessions": 3,
                "bytes": 12345,
            }
        ],
        "draining": [{"pid": 9, "generation": 1, "state": "draining", "sessions": 1, "cpu": 0.25}],
        "requests": 77,
        "p99": 1e-05,
        "healthy": False,
        "release": "2026.12 (abc)",
        "threads": [{"tid": 11, "role": "worker"}],
    }
    decoded = decodeValues(
        ctlclient.Status.response, _wire(FutureStatus.makeResponse(values, None))
    )
    # (Optional fields the server left out come out as None.)
    assert _same(_withoutNone(decoded), values)


def _withoutNone(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _withoutNone(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_withoutNone(v) for v in value]
    return value


def test_guessedValues() -> None:
    """
    A value of an unknown key is read by its look, as Twisted writes each type; text that
    looks like nothing else stays text, undecodable bytes included.
    """
    guess = ampwire.guessValue
    assert guess(amp.Integer().toString(-12)) == -12
    for number in (0.5, 1e20, -3.25e-7, math.inf, -math.inf):
        assert guess(amp.Float().toString(number)) == number
    assert math.isnan(guess(amp.Float().toString(math.nan)))
    assert guess(b"True") is True and guess(b"False") is False
    assert guess(b"1.2.3") == "1.2.3"
    assert guess(b"") == ""
    assert guess(b"\x00garbage") == "\x00garbage"
    assert guess(b"caf\xc3\xa9 \xff") == "caf\u00e9 \ufffd"


def test_readerCutsAStreamIntoBoxes() -> None:
    """
    Boxes split anywhere across reads come out whole and in order.
    """
    data = encodeBox({b"_answer": b"1", b"a": b"x" * 300}) + encodeBox({b"_answer": b"2"})
    for cut in range(len(data) + 1):
        reader = BoxReader()
        boxes = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert [b[b"_answer"] for b in boxes] == [b"1", b"2"]
        assert reader.pending() == 0


def test_readerRefusesWhatIsNotAmp() -> None:
    """
    A key longer than AMP allows (HTTP's first bytes, say), a list value cut in the middle of a
    box, or a box that never ends within the size limit are each a L{WireError}.
    """
    with pytest.raises(WireError):
        BoxReader().feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(WireError):
        ampwire.parseBoxes(b"\x00\x01a\x00\x05ab")
    reader = BoxReader()
    with pytest.raises(WireError):
        for _ in range(ampwire.MAX_BOX_LENGTH // 65000 + 2):
            reader.feed(b"\x00\x01k\xff\xff" + b"v" * 0xFFFF)
    with pytest.raises(WireError):
        encodeBox({b"k": b"v" * 0x10000})


def test_clientImportsNoTwisted() -> None:
    """
    ``graceful-ctl``'s modules import nothing of Twisted (nor zope or automat): that is what
    makes it cheap.
    """
    probe = (
        "import sys; import graceful_plugin.ctl;"
        " print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('twisted', 'zope', 'automat')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "[]"
