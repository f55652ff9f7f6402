"""docs/configuration.md cannot drift from the schema: every key, its type and default."""
from __future__ import annotations

import dataclasses
import html
import json
import os
import re
from typing import get_type_hints

from chatlearn.config import schema
from chatlearn.config.validate import config_keys, describe_type

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md")

SECTIONS = {
    "Top level": schema.ChatLearnConfig,
    "runtime_env": schema.RuntimeEnvConfig,
    "models.<name>": schema.ModelConfig,
    "models.<name>.lora": schema.LoraConfig,
    "models.<name>.batch_generation": schema.BatchGenerationConfig,
    "runtime": schema.RuntimeConfig,
    "vLLM keys in model_config_file": schema.VLLMArgs,
}


def default_cell(f: dataclasses.Field) -> str:
    """A field's default as the doc writes it: YAML/JSON literal in backticks, or (section)."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, float):
        return f"`{value!r}`"
    return f"`{json.dumps(value)}`"


def doc_tables() -> dict[str, dict[str, tuple[str, str, str]]]:
    """{section heading: {key: (type, default, meaning)}} from the Reference part of the doc."""
    with open(DOC) as f:
        text = f.read()
    reference = text[text.index("\n## Reference\n"):]
    tables: dict[str, dict[str, tuple[str, str, str]]] = {}
    current = None
    for line in reference.splitlines():
        if line.startswith("### "):
            current = html.unescape(line[4:].strip())
            tables[current] = {}
        elif current and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 4, f"row of {current!r} needs 4 cells: {line}"
            key = re.fullmatch(r"`([^`]+)`", cells[0]).group(1)
            assert key not in tables[current], f"{current}: {key} listed twice"
            tables[current][key] = (cells[1], cells[2], cells[3])
    return tables


def test_doc_lists_every_key_with_type_and_default():
    tables = doc_tables()
    assert set(tables) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name in config_keys(cls)}
        rows = tables[section]
        assert list(rows) == list(fields), f"{section}: keys differ from the schema (order too)"
        for name, f in fields.items():
            type_cell, default, meaning = rows[name]
            assert type_cell == describe_type(hints[name]), f"{section}.{name}: type"
            assert default == default_cell(f), f"{section}.{name}: default"
            assert meaning, f"{section}.{name}: no meaning given"


def test_internal_fields_are_not_documented_as_keys():
    tables = doc_tables()
    assert "name" not in tables["models.<name>"] and "config_path" not in tables["Top level"]
