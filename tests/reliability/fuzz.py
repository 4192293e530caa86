"""Hypothesis strategies that build any request message from its descriptor.

Strings include NUL, SQL-injection shapes, unicode and 1 MB values; numbers the
edges (negative, zero, huge, NaN, infinity); enums unknown values. Invalid
UTF-8 cannot be put in a Python proto string, so `wire_string` appends a raw
length-delimited field holding it to the serialized bytes (the last value of a
field wins when parsing). Calls go through generic channel methods with identity
serializers, so those bytes reach the server as they are.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor
MB = 1_000_000
SQL_INJECTION = [
    "' OR '1'='1",
    "admin' --",
    "'; DROP TABLE users; --",
    '" OR 1=1 --',
    "1; SELECT pg_sleep(5)",
    "%' OR 1=1 --",
    "') UNION SELECT id, digest FROM api_keys --",
    "\\'; DELETE FROM roles; --",
]
SPECIAL_STRINGS = [
    "",
    "\x00",
    "a\x00b",
    "*",
    "../../etc/passwd",
    "ty_sk_" + "A" * 38,
    "💥" * 100,
    "\u202e\ufeff\ud7ff",
    " " * 300,
    "x" * MB,
    *SQL_INJECTION,
]
INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xf0\x28\x8c\xbc", b"\x00\xfe\xff"]
RESERVED_KEYS = {"te", "content-type", "user-agent", "host", "connection", "grpc-timeout"}


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted({lo, hi, 0, 1, min(hi, 2**31 - 1), max(lo, -1)})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_STRING: st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_STRINGS)),
    F.TYPE_BYTES: st.binary(max_size=64),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    F.TYPE_FLOAT: st.floats(allow_nan=True, allow_infinity=True, width=32),
    F.TYPE_INT32: _ints(32, True),
    F.TYPE_SINT32: _ints(32, True),
    F.TYPE_SFIXED32: _ints(32, True),
    F.TYPE_INT64: _ints(64, True),
    F.TYPE_SINT64: _ints(64, True),
    F.TYPE_SFIXED64: _ints(64, True),
    F.TYPE_UINT32: _ints(32, False),
    F.TYPE_FIXED32: _ints(32, False),
    F.TYPE_UINT64: _ints(64, False),
    F.TYPE_FIXED64: _ints(64, False),
    F.TYPE_ENUM: st.integers(-3, 12),
}


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _value(field: Any, depth: int) -> st.SearchStrategy[Any] | None:
    if field.type == F.TYPE_MESSAGE:
        if depth >= 2:
            return None
        return fields_of(field.message_type, depth + 1)
    return _SCALARS[field.type]


def fields_of(descriptor: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Random values for a random subset of the fields of `descriptor`."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    field: Any
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key = _SCALARS[field.message_type.fields_by_name["key"].type]
            value = _value(field.message_type.fields_by_name["value"], depth)
            if value is not None:
                optional[field.name] = st.dictionaries(key, value, max_size=2)
            continue
        value = _value(field, depth)
        if value is None:
            continue
        optional[field.name] = st.lists(value, max_size=3) if _is_repeated(field) else value
    return st.fixed_dictionaries({}, optional=optional)


def fill(message: Message, values: dict[str, Any]) -> Message:
    """Set `values` (from `fields_of`) on `message`; returns it."""
    descriptor = message.DESCRIPTOR
    for name, value in values.items():
        field: Any = descriptor.fields_by_name[name]
        target = getattr(message, name)
        if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.type == F.TYPE_MESSAGE:
                    fill(target[k], v)
                else:
                    target[k] = v
        elif _is_repeated(field):
            for item in value:
                if field.type == F.TYPE_MESSAGE:
                    fill(target.add(), item)
                else:
                    target.append(item)
        elif field.type == F.TYPE_MESSAGE:
            fill(target, value)
        else:
            setattr(message, name, value)
    return message


def string_paths(descriptor: Any, depth: int = 0) -> list[tuple[int, ...]]:
    """Field-number paths to every string field, through messages up to one level deep."""
    paths: list[tuple[int, ...]] = []
    for field in descriptor.fields:
        if field.type == F.TYPE_STRING:
            paths.append((field.number,))
        elif field.type == F.TYPE_MESSAGE and depth < 1:
            paths += [(field.number, *p) for p in string_paths(field.message_type, depth + 1)]
    return paths


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def delimited(number: int, payload: bytes) -> bytes:
    """A length-delimited wire field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def wire_string(path: tuple[int, ...], raw: bytes) -> bytes:
    """Wire bytes that set the string at `path` to `raw` (any bytes, invalid UTF-8 too)."""
    data = delimited(path[-1], raw)
    for number in reversed(path[:-1]):
        data = delimited(number, data)
    return data


metadata_keys = st.from_regex(r"[a-z][a-z0-9_.-]{0,15}", fullmatch=True).filter(
    lambda k: k not in RESERVED_KEYS and not k.startswith("grpc-") and not k.endswith("-bin")
)
metadata_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
random_metadata = st.lists(
    st.one_of(
        st.tuples(metadata_keys, metadata_values),
        st.tuples(metadata_keys.map(lambda k: k + "-bin"), st.binary(max_size=64)),
    ),
    max_size=4,
)
