"""docs/operations/metrics.md, stats() and the Prometheus families say the same: a field added to
one and not the others fails here."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from channels_rabbitmq import prometheus
from channels_rabbitmq.stats import COUNTS, LayerStats, LinkStats

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


def test_the_count_table_is_what_the_snapshots_hold_besides_their_structured_fields() -> None:
    structured = {"queue", "state", "consume_state", "publish_state", "dropped", "confirm_latency"}
    link = {field.name for field in dataclasses.fields(LinkStats)}
    assert {count.field for count in COUNTS} == link - structured
    assert len({count.field for count in COUNTS}) == len(COUNTS)
    assert {count.kind for count in COUNTS} == {"counter", "gauge"}


def test_the_documented_kind_of_every_count_is_the_table_s() -> None:
    rows = documented_rows()
    assert {count.field: count.kind for count in COUNTS} == {
        name: kind for name, kind in rows.items() if kind in ("counter", "gauge")
    }


def documented_families() -> dict[str, tuple[str, str]]:
    """The Prometheus table of the page: family name -> (kind, the stats field it reads)."""
    text = DOCUMENT.read_text()
    table = text[text.index("| Metric | Type | Labels | From `stats()` |") :].split("\n\n", 1)[0]
    families: dict[str, tuple[str, str]] = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        source = re.findall(r"`([a-z_()]+)`", cells[3])
        families[cells[0].strip("`")] = (cells[1], source[0] if source else "")
    return families


def test_prometheus_exports_every_count_under_its_documented_name_and_type() -> None:
    families = documented_families()
    for count in COUNTS:
        name = prometheus.PREFIX + count.metric
        assert families.get(name) == (count.kind, count.field), name
    exported = {metric.name for metric in prometheus.ChannelLayerCollector({}).describe()}
    # prometheus_client names a counter family without its _total.
    documented = {name.removesuffix("_total") for name in families}
    assert exported == documented
