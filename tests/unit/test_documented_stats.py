"""docs/operations/metrics.md, stats() and the Prometheus families say the same: a field added to
one and not the others fails here."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from channels_rabbitmq import prometheus
from channels_rabbitmq.stats import LayerStats, LinkStats

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "operations" / "metrics.md"


def documented_rows() -> dict[str, str]:
    """The first table of the page: field name(s) -> kind."""
    rows: dict[str, str] = {}
    text = DOCUMENT.read_text()
    table = text[text.index("| Field | Kind | What it is |") :].split("\n\n", 1)[0]
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            rows[name] = cells[1]
    return rows


def link_only_rows() -> set[str]:
    text = DOCUMENT.read_text()
    table = text[text.index("`LinkStats` adds:") :].split("\n\n", 2)[1]
    return {
        name for line in table.splitlines()[2:] for name in re.findall(r"`([a-z_]+)`", line.split("|")[1])
    }


def test_every_field_of_layer_stats_is_documented_and_nothing_else() -> None:
    fields = {field.name for field in dataclasses.fields(LayerStats)}
    assert set(documented_rows()) == fields | {"is_up"}


def test_link_stats_adds_exactly_the_documented_fields() -> None:
    layer = {field.name for field in dataclasses.fields(LayerStats)} - {"links"}
    link = {field.name for field in dataclasses.fields(LinkStats)}
    assert link - layer == link_only_rows()
    assert layer - link == set()


def test_prometheus_exports_every_documented_counter_and_gauge() -> None:
    rows = documented_rows()
    exported = {field for _name, field, _help in prometheus._COUNTERS} | {
        field for _name, field, _help in prometheus._GAUGES
    }
    counters = {name for name, kind in rows.items() if kind == "counter"}
    gauges = {name for name, kind in rows.items() if kind == "gauge"}
    assert {field for _name, field, _help in prometheus._COUNTERS} == counters
    assert {field for _name, field, _help in prometheus._GAUGES} == gauges
    assert exported == counters | gauges
