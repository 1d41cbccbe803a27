"""Export the JSON Schema of every model to ``schemas/json/`` (``python -m schemas.export``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.messages import MESSAGES, Message

JSON_DIR = Path(__file__).parent / "json"


def file_name(model: type[Message]) -> str:
    name = model.__name__
    kebab = "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")
    return f"{kebab}.schema.json"


def render(model: type[Message]) -> str:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://propeller.dev/schemas/{file_name(model)}"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def rendered() -> dict[str, str]:
    """Every schema file's name and the text it should hold."""
    return {file_name(m): render(m) for m in MESSAGES}


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (JSON_DIR / name).write_text(text)
    print(f"wrote {len(MESSAGES)} schemas to {JSON_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
