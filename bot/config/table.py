"""How a table of the configuration is declared: a frozen pydantic dataclass whose fields are the TOML
file's keys, with checks that speak our words. One declaration gives the loader, the one-line errors and
the JSON Schema that editors complete and check the file with.

A typo must never silently disable a safety check: unknown keys are errors, and every error is one line
naming its key (`clusters[0].endpoints[1]: ...`). The file is validated as JSON in pydantic's strict mode
(TOML's values are JSON's: an integer is a number, a string is never a number, a list is a list);
objects built in code (tests, `dataclasses.replace`) are validated as Python, strictly too.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    ValidationInfo,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticOmit, core_schema

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, phrased as one line naming the key."""


@dataclass(frozen=True)
class Load:
    """What validating a file knows that a value cannot: where its relative paths start, and the file."""

    base: Path
    source: Path | None = None


def loading(info: ValidationInfo) -> Load | None:
    """The file being loaded, or None when the object is built in code (its values are taken as they are)."""
    return info.context if isinstance(info.context, Load) else None


class Problem(ValueError):
    """A check's one-line reason. `key` continues the path when the reason is about a key of the table being
    checked rather than the value itself (`cert and key go together` is about `key`)."""

    def __init__(self, reason: str, *key: str | int) -> None:
        super().__init__(reason)
        self.key = key


def kind(value: object) -> str:
    """A TOML value's kind, as errors name it."""
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- checks of one value

class Check:
    """A check of a value in our words (the test returns the value, perhaps normalised, or raises ValueError),
    and what the JSON Schema says of the same rule so an editor flags it too."""

    def __init__(self, test: Callable[[Any], Any], schema: dict[str, Any] | None = None, missing: str = "") -> None:
        self.test, self.schema, self.missing = test, schema or {}, missing   # missing: what an absent key's error says

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.test, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(schema), **self.schema}


def bounds(*, gt: float | None = None, ge: float | None = None, le: float | None = None, says: str = "") -> Check:
    """A number's range; the reason reads "must be greater than 0 and at most 1" unless `says` puts it otherwise."""
    limits = [(word, limit) for word, limit in (("greater than", gt), ("at least", ge), ("at most", le))
              if limit is not None]
    reason = says or "must be " + " and ".join(f"{word} {limit:g}" for word, limit in limits)

    def test(value: float) -> float:
        if (gt is not None and not value > gt) or (ge is not None and value < ge) or (le is not None and value > le):
            raise ValueError(reason)
        return value
    schema = {k: v for k, v in (("exclusiveMinimum", gt), ("minimum", ge), ("maximum", le)) if v is not None}
    return Check(test, schema)


def matches(pattern: str, says: str) -> Check:
    """A string that `pattern` matches whole (a trailing newline does not slip through); the reason is the value
    and `says`: "'#incident' is not a Slack ID"."""
    whole = re.compile(pattern)

    def test(value: str) -> str:
        if not whole.fullmatch(value):
            raise ValueError(f"{value!r} {says}")
        return value
    return Check(test, {"pattern": f"^(?:{pattern})$"})


def one_of(what: str, *choices: str) -> Check:
    """A string that is one of `choices`: "'ssh' is not a launcher kind (manual or command)"."""
    named = " or ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 1 else choices)

    def test(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not a {what} ({named})")
        return value
    return Check(test, {"enum": list(choices)})


def some(what: str) -> Check:
    """A list with at least one item."""
    def test(value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError(f"at least one {what} is needed")
        return value
    return Check(test, {"minItems": 1}, missing=f"at least one {what} is needed")


def to_path(value: object, info: ValidationInfo, existing: bool = False) -> Path:
    """A path as the file writes it: `~` expanded, relative to the config file's directory; `existing`: a file
    that must be there when the configuration is loaded. (Code gives a Path, taken as it is.)"""
    load = loading(info)
    if not isinstance(value, str | Path):
        raise ValueError(f"expected a string, got {kind(value)}")
    found = Path(os.path.expanduser(value))
    if load is None:
        return found
    found = found if found.is_absolute() else load.base / found
    if existing and not found.is_file():
        raise ValueError(f"{value}: no such file")
    return found


def path(*, existing: bool = False) -> PlainValidator:
    def parse(value: object, info: ValidationInfo) -> Path:
        return to_path(value, info, existing)
    return PlainValidator(parse, json_schema_input_type=str)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION = r"(\d+(?:\.\d+)?[smhd])+"


def parse_duration(text: str) -> float:
    """"6h", "30m", "1d", "1h30m", "90s" -> seconds; ValueError otherwise."""
    matches = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not matches or "".join(n + u for n, u in matches) != text.strip():
        raise ValueError(f"{text!r} is not a duration like 6h, 30m, 1d or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in matches)


def duration(shortest: str = "0s", of: str = "") -> PlainValidator:
    """A duration the file writes as text ("6h", "15s", "1h30m") and the bot holds in seconds (code gives
    seconds); at least `shortest`, the shortest `of` (schedule, interval) there may be."""
    least = parse_duration(shortest)

    def parse(value: object, info: ValidationInfo) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool) and loading(info) is None:
            return float(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {kind(value)}")
        seconds = parse_duration(value)
        if seconds < least:
            raise ValueError(f"{value!r} is too often; the shortest {of} is {shortest}")
        return seconds
    return PlainValidator(parse, json_schema_input_type=Annotated[str, Field(pattern=f"^{DURATION}$")])


# ---------------------------------------------------------------- what the loader fills in

class Derived:
    """A field the loader fills in (a secret read from the environment or a file, the file's own path): never
    a key of the file, so it is not in the schema and a file that sets it is told it is an unknown key."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def refuse(value: object, info: ValidationInfo) -> object:
            if loading(info) is not None:
                raise PydanticCustomError("unknown_key", "unknown key")
            return value
        return core_schema.with_info_before_validator_function(refuse, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        raise PydanticOmit


class Secret(Derived):
    """A secret from the table's `<name>_env` (an environment variable) or `<name>_file` key, never inline in
    the file. `read` turns the variable's or the file's text into the secret, or says why it is not one."""

    def __init__(self, read: Callable[[str], str] = str) -> None:
        self.read = read


HMAC_KEY_MIN = 32  # characters; HMAC-SHA256's own strength


def hmac_key(what: str) -> Secret:
    """A key of at least HMAC_KEY_MIN characters; too short, the error says how long it is, never what it is."""
    def read(key: str) -> str:
        if len(key) < HMAC_KEY_MIN:
            raise ValueError(f"{what} has {len(key)} characters; it needs at least {HMAC_KEY_MIN} "
                             "(e.g. openssl rand -hex 32)")
        return key
    return Secret(read)


def _read_secret(table: object, name: str, secret: Secret) -> str | None:
    env, file = getattr(table, f"{name}_env"), getattr(table, f"{name}_file")
    if env and file:
        raise Problem(f"give {name}_env or {name}_file, not both", f"{name}_file")
    if env:
        text, key = os.environ.get(env), f"{name}_env"
        if not text:
            raise Problem(f"environment variable {env} is not set", key)
    elif file:
        key = f"{name}_file"
        try:
            text = file.read_text().strip()
        except OSError as e:
            raise Problem(f"{file}: cannot read: {e.strerror}", key) from None
        except UnicodeDecodeError:
            raise Problem(f"{file}: not UTF-8 text", key) from None
    else:
        return None
    try:
        return secret.read(text)
    except ValueError as e:
        raise Problem(str(e), key) from None


# ---------------------------------------------------------------- a table

TABLE = ConfigDict(
    extra="forbid", strict=True, allow_inf_nan=False,
    # Code builds tables by field name; the loader validates by key only (by_name=False), so a field named
    # otherwise than its key (`every_seconds`, key `every`) is not a key of the file.
    validate_by_name=True, validate_by_alias=True,
    use_attribute_docstrings=True,   # the docstring under a field is its description in the schema
)


@pydantic_dataclass(frozen=True, config=TABLE)
class Table:
    """The base of every table: reads its secrets when a file is loaded."""

    @classmethod
    def unknown(cls, key: str) -> str:
        """What an error says of a key the table does not take (a table may say more, like where it goes)."""
        return "unknown key"

    @model_validator(mode="after")
    def _read_secrets(self, info: ValidationInfo) -> Self:
        if loading(info) is not None:
            for name, field in fields_of(type(self)).items():
                for secret in (m for m in field.metadata if isinstance(m, Secret)):
                    object.__setattr__(self, name, _read_secret(self, name, secret))
        return self


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def table(cls: type[T]) -> type[T]:
    """Declares a table: a frozen pydantic dataclass of its keys (derive it from Table)."""
    if not issubclass(cls, Table):
        raise TypeError(f"{cls.__name__}: a table derives from Table (its secrets, its unknown keys)")
    return typing.cast(type[T], pydantic_dataclass(frozen=True, config=TABLE)(cls))


def fields_of(cls: type) -> dict[str, FieldInfo]:
    """A table's fields as pydantic holds them (with the metadata of their annotations)."""
    return typing.cast(dict[str, FieldInfo], getattr(cls, "__pydantic_fields__", {}))


# ---------------------------------------------------------------- the one line

_EXPECTED = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
             "bool_type": "true or false", "tuple_type": "a list", "list_type": "a list", "dataclass_type": "a table",
             "dict_type": "a table"}
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "unknown_key")


def one_line(errors: list[ErrorDetails], root: type) -> str:
    """The problem to show, `key.path[0].key: reason`: an unknown key first (a typo in a required key is the typo,
    not the key it misses), else the first one. The reason never repeats a value that could be a secret."""
    error = next((e for e in errors if e["type"] in _UNKNOWN), errors[0])
    loc, kind_ = tuple(error["loc"]), error["type"]
    if kind_ in _UNKNOWN:
        reason = next((t.unknown(str(loc[-1])) for t in _tables_at(root, loc[:-1])), "unknown key")
    elif kind_ in _EXPECTED:
        reason = f"expected {_EXPECTED[kind_]}, got {kind(error['input'])}"
    elif kind_ == "finite_number":
        reason = f"must be a finite number, not {error['input']}"
    elif kind_ == "missing":
        field = _field_at(root, loc)
        says = [m.missing for m in (field.metadata if field else []) if isinstance(m, Check) and m.missing]
        examples = field.examples if field else None
        like = f" (like {' or '.join(map(str, examples))})" if examples else ""
        reason = says[0] if says else "missing" + like
    elif kind_ == "value_error":
        problem = error.get("ctx", {}).get("error")
        reason, loc = str(problem), loc + getattr(problem, "key", ())
    else:
        reason = error["msg"]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return f"{key or 'config'}: {reason}"


def _field_at(root: type, loc: tuple[int | str, ...]) -> FieldInfo | None:
    """The field a key path names (for what its declaration says), through nested tables and lists of them."""
    if not loc or isinstance(loc[-1], int):
        return None
    fields = [(n, f) for t in _tables_at(root, loc[:-1]) for n, f in fields_of(t).items()]
    return next((f for n, f in fields if (f.validation_alias or n) == loc[-1]), None)


def _tables_at(root: type, loc: tuple[int | str, ...]) -> list[type[Table]]:
    """The tables a key path names: `clusters[0]` is a ClusterConfig."""
    if not loc:
        return [root] if issubclass(root, Table) else []
    if isinstance(loc[-1], int):
        return _tables_at(root, loc[:-1])
    field = _field_at(root, loc)
    return [t for t in _types_in(field.annotation) if isinstance(t, type) and issubclass(t, Table)] if field else []


def _types_in(annotation: Any) -> list[Any]:
    """The types an annotation is made of (`tuple[ClusterConfig, ...]`, `StoreConfig | None`: the tables)."""
    args = typing.get_args(annotation)
    return [annotation] if not args else [t for a in args for t in _types_in(a)]
