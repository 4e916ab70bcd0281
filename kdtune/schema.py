"""The spec's JSON Schema, for YAML editors: `python -m kdtune.schema` rewrites kdtune/spec.schema.json.

Each search_spaces/*.yaml begins with `# yaml-language-server: $schema=../kdtune/spec.schema.json`, so an
editor with the YAML language server completes keys and marks wrong ones; the docs' spec reference is
rendered from the same schema, and a test checks that the file is what the schema generates.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kdtune.spec import Spec

SCHEMA_FILE = Path(__file__).with_name("spec.schema.json")
REGENERATE = "python -m kdtune.schema"


def json_schema() -> dict:
    """The spec's JSON Schema (draft 2020-12), as pydantic generates it from kdtune.spec."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **Spec.model_json_schema()}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the schema file; with --check, only say whether it is up to date (exit 1 if not)."""
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    if check:
        current = SCHEMA_FILE.read_text() if SCHEMA_FILE.exists() else ""
        if current != schema_text():
            print(f"{SCHEMA_FILE.name} is out of date with kdtune/spec.py; run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    SCHEMA_FILE.write_text(schema_text())
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
