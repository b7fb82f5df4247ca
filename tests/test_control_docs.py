"""docs/osc.md matches the address table, and the table matches the live-parameter schema."""

from __future__ import annotations

from pathlib import Path

from streamnode.config import OscConfig
from streamnode.control.osc import ADDRESSES, OUT_ADDRESSES, markdown_table
from streamnode.live_params import (
    BRUSH_ORDER_OSC,
    GROUPS,
    TRIGGERS,
    BrushParams,
    LiveParams,
    LoraParams,
    NodeParams,
)

DOC = (Path(__file__).resolve().parent.parent / "docs" / "osc.md").read_text(encoding="utf-8")


def test_docs_show_the_generated_address_table() -> None:
    start = DOC.index("<!-- BEGIN ADDRESS TABLE")
    start = DOC.index("\n", start) + 1
    end = DOC.index("<!-- END ADDRESS TABLE -->")
    assert DOC[start:end] == markdown_table(), (
        "docs/osc.md is out of date: paste streamnode.control.osc.markdown_table() between the markers"
    )


def test_docs_list_every_output_address_and_every_osc_setting() -> None:
    for address, tags, _ in OUT_ADDRESSES:
        assert f"| `{address}` | {tags} |" in DOC
    for field in OscConfig.model_fields:
        if field != "enabled":
            assert f"`osc.{field}`" in DOC, field


def test_table_ranges_come_from_the_live_parameter_schema() -> None:
    by_address = {p.address: p for p in ADDRESSES}
    models = ((LiveParams, None), (NodeParams, None), *((g.params, g.name) for g in GROUPS))
    assert {BrushParams, LoraParams} <= {m for m, _ in models}
    for model, key in models:
        for name, info in model.model_fields.items():
            address = info.json_schema_extra["osc"]
            param = by_address[address]
            assert param.key == (key or name) and param.description == info.description, address
            if key:
                assert param.field == name
            meta = {type(m).__name__: m for m in info.metadata}
            if "Ge" in meta and len(param.args) == 1:
                assert (param.args[0].min, param.args[0].max) == (meta["Ge"].ge, meta["Le"].le), address
    assert by_address["/prompt"].args[0].max_len == LiveParams.model_fields["prompt"].metadata[0].max_length
    assert by_address["/t_index"].repeat == (1, 8)
    assert {p.address for p in ADDRESSES} == {
        *(i.json_schema_extra["osc"] for m, _ in models for i in m.model_fields.values()),
        *(t.address for t in TRIGGERS), BRUSH_ORDER_OSC["osc"]}
