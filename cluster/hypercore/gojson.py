"""Hypercore's HTTP mirror speaks Go's ``encoding/json`` applied to its protobuf structs.

That is not protobuf's JSON mapping: field names are the ``.proto`` names (``image_ref``,
``dry_run``, ``source_request``), every zero value is omitted (``omitempty``), an unset message is
omitted but a set empty one is ``{}``, 64-bit integers are JSON numbers (protobuf's mapping makes
them strings), bytes are base64, map keys are strings sorted as strings, and the encoder escapes
``<``, ``>`` and ``&``. Decoding matches keys case-insensitively and ignores unknown ones, as
``encoding/json`` does, and reports type errors with Go's texts.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

_INTS = {
    FieldDescriptor.TYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: ("uint64", 0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: ("int32", -(2**31), 2**31 - 1),
}
_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


class GoJsonError(ValueError):
    """The body is not what ``encoding/json`` would decode into the message; the text is Go's."""


def dumps(value: Any) -> bytes:
    """Encodes like Go's ``json.NewEncoder(w).Encode(value)``: compact, HTML-escaped, newline."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # These characters can only occur inside JSON strings, so replacing them is safe.
    for char, escape in _GO_ESCAPES.items():
        text = text.replace(char, escape)
    return (text + "\n").encode()


def _scalar_to_go(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_go(value)
    return value


def to_go(message: Any) -> dict[str, Any]:
    """The message as ``encoding/json`` renders the Go struct protoc-gen-go makes of it."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if value:
                value_field = field.message_type.fields_by_name["value"]
                items = {str(k): _scalar_to_go(value_field, v) for k, v in value.items()}
                out[field.name] = dict(sorted(items.items()))
        elif field.is_repeated:
            if value:
                out[field.name] = [_scalar_to_go(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if message.HasField(field.name):
                out[field.name] = to_go(value)
        elif value:
            out[field.name] = _scalar_to_go(field, value)
    return out


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


def _type_error(value: Any, where: str, go_type: str) -> GoJsonError:
    shown = f"number {value}" if _json_kind(value) == "number" else _json_kind(value)
    return GoJsonError(
        f"json: cannot unmarshal {shown} into Go struct field {where} of type {go_type}"
    )


def _scalar_from_go(field: FieldDescriptor, value: Any, where: str) -> Any:
    if field.type in _INTS:
        go_type, low, high = _INTS[field.type]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _type_error(value, where, go_type)
        return value
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, where, "bool")
        return value
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(value, where, "float64")
        return float(value)
    if field.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise _type_error(value, where, "string")
        return value
    if field.type == FieldDescriptor.TYPE_BYTES:
        if not isinstance(value, str):
            raise _type_error(value, where, "[]uint8")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise GoJsonError(f"illegal base64 data at input byte 0 ({where})") from e
    raise GoJsonError(f"json: unsupported field type at {where}")  # not in cluster.proto


def _map_key(field: FieldDescriptor, key: str, where: str) -> Any:
    key_field = field.message_type.fields_by_name["key"]
    if key_field.type == FieldDescriptor.TYPE_STRING:
        return key
    try:
        number = int(key, 10)
    except ValueError as e:
        raise GoJsonError(
            f"json: cannot unmarshal number {key} into Go value of type uint32"
        ) from e
    return _scalar_from_go(key_field, number, where)


def from_go(data: Any, message_class: Any) -> Any:
    """Decodes a JSON value into a new message, as ``json.Unmarshal`` fills the Go struct.

    Raises:
        GoJsonError: a value of the wrong JSON type, or a number out of the field's range.
    """
    message = message_class()
    _fill(message, data)
    return message


def _fill(message: Any, data: Any) -> None:
    if data is None:
        return
    name = message.DESCRIPTOR.name
    if not isinstance(data, dict):
        raise GoJsonError(
            f"json: cannot unmarshal {_json_kind(data)} into Go value of type cluster.{name}"
        )
    message.SetInParent()  # a JSON object, even {}, makes a non-nil struct
    fields = {f.name.lower(): f for f in message.DESCRIPTOR.fields}
    for key, value in data.items():
        field = fields.get(key.lower())
        if field is None or value is None:
            continue
        where = f"{name}.{field.name}"
        target = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise _type_error(value, where, "map")
            value_field = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                decoded_key = _map_key(field, k, where)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    _fill(target[decoded_key], v)
                else:
                    target[decoded_key] = _scalar_from_go(value_field, v, where)
        elif field.is_repeated:
            if not isinstance(value, list):
                raise _type_error(value, where, "[]")
            for item in value:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    _fill(target.add(), item)
                else:
                    target.append(_scalar_from_go(field, item, where))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill(target, value)
        else:
            setattr(message, field.name, _scalar_from_go(field, value, where))


def loads(body: bytes) -> Any:
    """Parses a request body as Go's ``json.Decoder.Decode`` would, with Go's texts on failure."""
    text = body.decode("utf-8", errors="replace")
    if not text.strip():
        raise GoJsonError("EOF")
    try:
        return json.JSONDecoder().raw_decode(text.lstrip())[0]
    except json.JSONDecodeError as e:
        if e.pos >= len(e.doc):
            raise GoJsonError("unexpected EOF") from e
        raise GoJsonError(
            f"invalid character {e.doc[e.pos]!r} looking for beginning of value"
        ) from e
