"""MkDocs hook: renders the spec reference page from the schema itself, so it cannot drift.

Every key of kdtune.spec.Spec (through its JSON Schema, kdtune/spec.schema.json) becomes a table row with
its type, default, allowed values and description; the methods' parameters come from their registry.
"""
from __future__ import annotations

import json

from mkdocs.structure.files import File

PAGE = "spec-reference.md"
INTRO = """# Spec reference

Generated from the schema (`kdtune.spec`, the same JSON Schema as `kdtune/spec.schema.json`) when the docs
are built. A key not listed here is refused with exit status 2; see [The spec](spec.md) for how a spec is read,
searched and overridden, and [Troubleshooting](troubleshooting.md) for the messages.

Every `search_spaces/*.yaml` begins with `# yaml-language-server: $schema=../kdtune/spec.schema.json`: an editor
with the YAML language server (VS Code's YAML extension, Neovim's yamlls, ...) completes these keys and marks wrong
ones. Give your own spec the same first line, with the path to that file from where your spec lives.
"""


def resolve(field: dict, defs: dict) -> dict:
    """The model a field refers to ($ref, or Optional[model] as anyOf [$ref, null]), else the field itself."""
    refs = [f for f in field.get("anyOf", [field]) if "$ref" in f]
    return defs[refs[0]["$ref"].split("/")[-1]] if refs else field


def type_of(field: dict) -> str:
    if "anyOf" in field:
        return " or ".join(dict.fromkeys(type_of(f) for f in field["anyOf"]))
    if "$ref" in field:
        return "mapping"
    kind = field.get("type", "any")
    if kind == "array":
        return f"list of {type_of(field.get('items', {}))}"
    if kind == "object":
        return "mapping"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}.get(kind, kind)


def allowed(field: dict) -> str:
    options = [f for f in field.get("anyOf", [field])]
    values = [v for f in options for v in f.get("enum", [f["const"]] if "const" in f else [])]
    if values and any(f.get("type") == "boolean" for f in options):
        values += [True, False]
    parts = [", ".join(f"`{json.dumps(v)}`" for v in values)] if values else []
    for f in options:
        for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
            if key in f:
                parts.append(f"{sign} {f[key]:g}")
        if "pattern" in f:
            parts.append(f"matches `{f['pattern']}`")
        if "minItems" in f:
            parts.append(f"at least {f['minItems']} item(s)")
    return "; ".join(parts)


def spec_defaults() -> dict:
    """Every default as a spec holds it, including those made by a factory, which JSON Schema omits
    (the teacher's step schedule, the two objectives)."""
    from kdtune.spec import Spec
    return Spec(name="defaults").model_dump(mode="json")


def default_of(key: str, field: dict, target: dict, required: list[str], defaults: dict) -> str:
    """The spec's own default at `key`; a nested model's defaults are its own rows."""
    value = defaults
    for part in key.split("."):
        value = value.get(part, KeyError) if isinstance(value, dict) else KeyError
    if key.split(".")[-1] in required:
        return "required"
    if "properties" in target and value is not None:
        return "see below"
    if value is KeyError:  # inside an optional model that is unset by default
        value = field.get("default", {"array": [], "object": {}}.get(field.get("type")))
    return f"`{json.dumps(value)}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sections(model: dict, defs: dict, defaults: dict, path: str = "") -> list[str]:
    """One table per model, its nested models after it, keys as dotted paths."""
    rows, nested = [], []
    for name, field in model.get("properties", {}).items():
        key, target = f"{path}{name}", resolve(field, defs)
        if "properties" in target:
            nested.append((key, target))
        default = default_of(key, field, target, model.get("required", []), defaults)
        rows.append(f"| `{key}` | {type_of(field)} | {cell(default)} | {cell(allowed(field))} "
                    f"| {cell(field.get('description', ''))} |")
    title = f"## `{path[:-1]}`" if path else "## Top level"
    about = [model["description"].strip().splitlines()[0], ""] if path and model.get("description") else []
    lines = [title, "", *about, "| key | type | default | allowed | description |", "|---|---|---|---|---|", *rows, ""]
    for key, target in nested:
        lines += sections(target, defs, defaults, f"{key}.")
    return lines


def method_table() -> list[str]:
    from kdtune.distill import METHODS
    lines = ["## Method parameters", "",
             "Under `search.space.loss.<method>`: a plain value or a search range, e.g. "
             "`loss: {kd: {temperature: {uniform: [1, 8]}}}`. See [Methods](methods.md).", "",
             "| method | parameter | default | allowed |", "|---|---|---|---|"]
    for name, cls in sorted(METHODS.items()):
        if not cls.params:
            lines.append(f"| `{name}` | | | |")
        for param, spec in cls.params.items():
            kind = "an integer" if spec.integer else "a number"
            lines.append(f"| `{name}` | `{param}` | `{spec.default:g}` | {kind} in {spec.describe()} |")
    return lines + [""]


def reference_markdown() -> str:
    from kdtune.schema import json_schema
    schema = json_schema()
    return "\n".join([INTRO, *sections(schema, schema["$defs"], spec_defaults()), *method_table()])


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=reference_markdown()))
    return files
