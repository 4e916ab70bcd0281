"""The JSON Schema file that YAML editors read is the one the spec's pydantic models generate."""
import json
from pathlib import Path

import pytest
import yaml

from kdtune.schema import REGENERATE, SCHEMA_FILE, json_schema

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "search_spaces").glob("*.yaml"))
jsonschema = pytest.importorskip("jsonschema")


def test_the_schema_file_is_what_the_spec_generates():
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), \
        f"{SCHEMA_FILE.name} is out of date with kdtune/spec.py: run `{REGENERATE}` and commit it"


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_each_spec_names_the_schema_for_its_editor_and_validates_against_it(path):
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../kdtune/spec.schema.json", first
    assert (path.parent / first.split("$schema=")[1]).resolve() == SCHEMA_FILE
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize("edit, where", [(("train", "epochz", 1), "epochz"), (("search", "sampler", "grid"), "grid"),
                                         (("train", "epochs", 0), "minimum")])
def test_the_editor_flags_what_load_spec_refuses(edit, where):
    spec = yaml.safe_load((REPO / "search_spaces" / "mnist.yaml").read_text())
    section, key, value = edit
    spec[section][key] = value
    with pytest.raises(jsonschema.ValidationError) as raised:
        jsonschema.validate(spec, json.loads(SCHEMA_FILE.read_text()))
    assert where in str(raised.value)


def test_every_key_has_a_description():
    schema = json_schema()
    models = [schema, *schema["$defs"].values()]
    missing = [f"{model.get('title')}.{key}" for model in models for key, field in model.get("properties", {}).items()
               if not field.get("description")]
    assert not missing, missing
