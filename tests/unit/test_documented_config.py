"""The documented CONFIG table agrees with ``LayerConfig.DEFAULTS``: the same keys, the same defaults.

The defaults are written once, on the config object; this test is what keeps the documentation from
drifting away from them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from channels_rabbitmq.config import LayerConfig

#: The docs page that holds the configuration table (move it here if the docs move).
DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SECTION = "## Every key"
TABLE_HEADER = re.compile(r"^\|\s*Key\s*\|\s*Default\s*\|")
# One backticked Python literal, then an optional note for humans in parentheses: `4194304` (4 MiB).
DEFAULT_CELL = re.compile(r"^`(?P<literal>[^`]+)`(?:\s*\([^)]*\))?$")
KEY_CELL = re.compile(r"^`(?P<key>[a-z_]+)`$")


def table_rows(text: str) -> list[tuple[str, str]]:
    """The (key cell, default cell) of each row of the first ``| Key | Default |`` table in the section."""
    lines = text.splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        pytest.fail(f"{DOCUMENT.name} has no {SECTION!r} section")
    rows: list[tuple[str, str]] = []
    in_table = False
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if not in_table:
            in_table = bool(TABLE_HEADER.match(line))
            continue
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.split("|")[1:3]]
        if set("".join(cells)) <= set("-: "):
            continue  # the |---|---| line
        rows.append((cells[0], cells[1]))
    if not rows:
        pytest.fail(f"no '| Key | Default |' table under {SECTION!r} in {DOCUMENT.name}")
    return rows


def parse_table(text: str) -> dict[str, object]:
    """``{key: documented default}``; fails naming the row when a cell is not in the expected form."""
    documented: dict[str, object] = {}
    for key_cell, default_cell in table_rows(text):
        key_match = KEY_CELL.match(key_cell)
        if key_match is None:
            pytest.fail(f"{DOCUMENT.name}: the key cell {key_cell!r} is not one backticked key")
        key = key_match["key"]
        if key in documented:
            pytest.fail(f"{DOCUMENT.name}: {key!r} is documented twice")
        default_match = DEFAULT_CELL.match(default_cell)
        if default_match is None:
            pytest.fail(
                f"{DOCUMENT.name}: the default of {key!r} is not one backticked value: {default_cell!r}"
            )
        try:
            documented[key] = ast.literal_eval(default_match["literal"])
        except (ValueError, SyntaxError):
            pytest.fail(f"{DOCUMENT.name}: the default of {key!r} is not a Python literal: {default_cell!r}")
    return documented


@pytest.fixture(scope="module")
def documented() -> dict[str, object]:
    return parse_table(DOCUMENT.read_text(encoding="utf-8"))


def test_the_documented_keys_are_the_config_keys(documented):
    missing = sorted(LayerConfig.DEFAULTS.keys() - documented.keys())
    extra = sorted(documented.keys() - LayerConfig.DEFAULTS.keys())
    assert not missing, f"CONFIG keys missing from the table in {DOCUMENT.name}: {missing}"
    assert not extra, f"keys in the table of {DOCUMENT.name} that the layer does not take: {extra}"


@pytest.mark.parametrize("key", list(LayerConfig.DEFAULTS))
def test_the_documented_default_is_the_config_default(documented, key):
    if key not in documented:
        pytest.fail(f"{key!r} is not in the table of {DOCUMENT.name}")
    default = LayerConfig.DEFAULTS[key]
    written = documented[key]
    assert (type(written), written) == (type(default), default), (
        f"{DOCUMENT.name} gives {key!r} the default {written!r}; LayerConfig.DEFAULTS has {default!r}"
    )


# The parser itself: it must see a disagreement, and refuse what it cannot read --------------------

TABLE = f"""\
# Title

{SECTION}

Some text.

| Key | Default | Accepted values | Meaning |
|---|---|---|---|
| `host` | `"amqp://h/%2F"` | a URL | a \\| piped `x` cell |
| `max_message_size` | `4194304` (4 MiB) | an int | size |
| `ssl_context` | `None` | a context | TLS |

| Key | Default |
|---|---|
| `ignored` | `1` |

## Next section
"""


def test_the_parser_reads_literals_and_ignores_notes_and_later_tables():
    assert parse_table(TABLE) == {"host": "amqp://h/%2F", "max_message_size": 4194304, "ssl_context": None}


@pytest.mark.parametrize(
    ("row", "complaint"),
    [
        ("| `expiry` | 60 | x | y |", "not one backticked value"),
        ("| `expiry` | `sixty` | x | y |", "not a Python literal"),
        ("| expiry | `60` | x | y |", "not one backticked key"),
        ("| `host` | `None` | x | y |", "documented twice"),
    ],
)
def test_the_parser_fails_naming_the_row_it_cannot_read(row, complaint):
    text = TABLE.replace("| `ssl_context` | `None` | a context | TLS |", row)
    with pytest.raises(pytest.fail.Exception, match=complaint):
        parse_table(text)


def test_the_parser_fails_without_the_section_or_the_table():
    with pytest.raises(pytest.fail.Exception, match=re.escape(f"no {SECTION!r} section")):
        parse_table(TABLE.replace(SECTION, "## Settings"))
    with pytest.raises(pytest.fail.Exception, match=re.escape("no '| Key | Default |' table")):
        parse_table(TABLE.replace("| Key | Default |", "| Name | Value |"))
