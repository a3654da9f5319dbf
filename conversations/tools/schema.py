"""The JSON-schema subset tools declare their arguments in, and its validator.

The model's arguments are untrusted input: `problem(schema, value)` says what
is wrong with them, in words the model can act on, or None. Supported: `type`
(object, string, number, integer, boolean), `properties`, `required`,
`additionalProperties: false`, `enum`, `minLength`/`maxLength`,
`minimum`/`maximum`, plus the annotations `description` and `title`. A tool
declaring anything else is refused when it is defined (`check_supported`)."""

from __future__ import annotations

import math
from typing import Any

SUPPORTED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "description",
    "title",
}
TYPES = {"object", "string", "number", "integer", "boolean"}
_JSON_NAMES: dict[type, str] = {dict: "object", list: "array", str: "string"}


def check_supported(schema: dict[str, Any], where: str = "parameters") -> None:
    unsupported = set(schema) - SUPPORTED
    if unsupported:
        raise ValueError(f"{where}: unsupported schema keywords {sorted(unsupported)}")
    if schema.get("type") not in TYPES:
        raise ValueError(f"{where}: type must be one of {sorted(TYPES)}")
    if schema.get("additionalProperties", False) is not False:
        raise ValueError(f"{where}: additionalProperties may only be false")
    for name, child in schema.get("properties", {}).items():
        check_supported(child, f"{where}.{name}")


def problem(schema: dict[str, Any], value: Any, where: str = "the arguments") -> str | None:
    """What is wrong with `value` against `schema`, or None if nothing is."""
    expected = schema["type"]
    if not _is_type(value, expected):
        return f"{where} must be {_a(expected)}, not {_a(_type_of(value))}"
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(repr(choice) for choice in schema["enum"])
        return f"{where} must be one of {choices}"
    if expected == "object":
        return _object_problem(schema, value, where)
    if expected == "string":
        return _string_problem(schema, value, where)
    if expected in ("number", "integer"):
        return _number_problem(schema, value, where)
    return None


def _object_problem(schema: dict[str, Any], value: dict[str, Any], where: str) -> str | None:
    properties = schema.get("properties", {})
    missing = [name for name in schema.get("required", []) if name not in value]
    if missing:
        return f"{where}: missing required {_names(missing)}"
    extra = [name for name in value if name not in properties]
    if extra and schema.get("additionalProperties", True) is False:
        allowed = _names(list(properties)) if properties else "none"
        return f"{where}: unexpected {_names(extra)} (allowed: {allowed})"
    for name, child in properties.items():
        if name in value:
            found = problem(child, value[name], f"{name!r}")
            if found:
                return found
    return None


def _string_problem(schema: dict[str, Any], value: str, where: str) -> str | None:
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return f"{where} is too long: {len(value)} characters, at most {schema['maxLength']}"
    if "minLength" in schema and len(value) < schema["minLength"]:
        return f"{where} is too short: {len(value)} characters, at least {schema['minLength']}"
    return None


def _number_problem(schema: dict[str, Any], value: float, where: str) -> str | None:
    if not math.isfinite(value):
        return f"{where} must be a finite number"
    if "minimum" in schema and value < schema["minimum"]:
        return f"{where} must be at least {schema['minimum']}"
    if "maximum" in schema and value > schema["maximum"]:
        return f"{where} must be at most {schema['maximum']}"
    return None


def _is_type(value: Any, expected: str) -> bool:
    # bool is an int in Python, never a number in JSON.
    if expected == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if expected == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if expected == "number":
        return isinstance(value, int | float)
    return isinstance(value, {"object": dict, "string": str}[expected])


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _a(kind: str) -> str:
    return kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


def _names(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names)


def check_json_schema(schema: dict[str, Any], where: str) -> None:
    """An MCP server's schema: any valid JSON Schema (checked with `jsonschema`)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"{where}: not a valid JSON Schema: {exc.message[:200]}") from None


def json_schema_problem(schema: dict[str, Any], value: Any) -> str | None:
    """What is wrong with `value` against an MCP tool's JSON Schema, or None."""
    import jsonschema
    from referencing import Registry

    # An empty registry: a `$ref` to anywhere outside the schema is never fetched.
    validator = jsonschema.validators.validator_for(schema)(schema, registry=Registry())
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where + ': ' if where else ''}{error.message[:300]}"
