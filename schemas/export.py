"""Export the JSON Schema of every model to ``schemas/json/`` (``python -m schemas.export``).

Each wire message and each manifest kind gets ``<kebab-name>.schema.json``; ``manifest.schema.json``
accepts any manifest kind, for editors that map one schema to a whole manifest directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.manifests import MANIFESTS
from schemas.messages import MESSAGES

JSON_DIR = Path(__file__).parent / "json"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_URL = "https://propeller.dev/schemas/"
ANY_MANIFEST = "manifest.schema.json"


def file_name(model: type[BaseModel]) -> str:
    name = model.__name__
    kebab = "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")
    return f"{kebab}.schema.json"


def _dump(schema: dict[str, Any], name: str) -> str:
    schema["$schema"] = SCHEMA_DIALECT
    schema["$id"] = BASE_URL + name
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def render(model: type[BaseModel]) -> str:
    return _dump(model.model_json_schema(), file_name(model))


def render_any_manifest() -> str:
    """One schema accepting every manifest kind, each selected by its ``kind``."""
    definitions: dict[str, Any] = {}
    choices = []
    for model in MANIFESTS:
        schema = model.model_json_schema()
        definitions.update(schema.pop("$defs", {}))
        definitions[model.__name__] = schema
        choices.append({"$ref": f"#/$defs/{model.__name__}"})
    return _dump(
        {
            "title": "Propeller manifest",
            "description": "Any propeller/v1 manifest; 'kind' selects which.",
            "oneOf": choices,
            "$defs": definitions,
        },
        ANY_MANIFEST,
    )


def rendered() -> dict[str, str]:
    """Every schema file's name and the text it should hold."""
    files = {file_name(m): render(m) for m in (*MESSAGES, *MANIFESTS)}
    files[ANY_MANIFEST] = render_any_manifest()
    return files


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    files = rendered()
    for name, text in files.items():
        (JSON_DIR / name).write_text(text)
    print(f"wrote {len(files)} schemas to {JSON_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
