"""The configuration's JSON Schema, generated from its tables, for editors (taplo, Even Better TOML: a
`#:schema` comment on the file's first line) and anyone checking a file without the bot.

`python -m bot.config.schema > deploy/etcd-chatops.schema.json` writes it; a test checks that the committed
file is what this prints. The schema checks the shape (keys, types, ranges, patterns); the bot checks more
(files exist, variables are set, URLs parse, age keys are keys, no two clusters share an endpoint).
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from bot.config import Config


class _TomlSchema(GenerateJsonSchema):
    """Pydantic's schema, less what TOML cannot write or an editor does not need: null (TOML has none: an
    optional key is one left out), defaults that are whole tables, titles repeating each key's name."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        generated = super().default_schema(schema)
        if generated.get("default") is None or isinstance(generated.get("default"), dict):
            generated.pop("default", None)
        return generated

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema() -> dict[str, Any]:
    schema = TypeAdapter(Config).json_schema(by_alias=True, mode="validation", schema_generator=_TomlSchema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "etcd-chatops configuration"}


def text() -> str:
    """The schema as the committed file holds it."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(text(), end="")
