"""docs/osc.md matches the address table, and the table matches the config schema."""

from __future__ import annotations

from pathlib import Path

from streamnode.config import BrushConfig, OscConfig, StreamConfig
from streamnode.control.osc import ADDRESSES, OUT_ADDRESSES, markdown_table

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


def test_table_ranges_come_from_the_config_schema() -> None:
    by_address = {p.address: p for p in ADDRESSES}
    for address, field in [("/guidance", "guidance_scale"), ("/delta", "delta"), ("/strength", "strength"),
                           ("/seed", "seed"), ("/similarity", "similarity_threshold"),
                           ("/similarity/max_skip", "similarity_max_skip"),
                           ("/prompt/transition", "prompt_transition_frames")]:
        arg = by_address[address].args[0]
        meta = {type(m).__name__: m for m in StreamConfig.model_fields[field].metadata}
        assert (arg.min, arg.max) == (meta["Ge"].ge, meta["Le"].le), address
        assert by_address[address].key == field
    assert by_address["/prompt"].args[0].max_len == StreamConfig.model_fields["prompt"].metadata[0].max_length
    assert by_address["/t_index"].repeat == (1, 8)
    assert by_address["/brush/N/blur"].args[0].max == BrushConfig.model_fields["mask_blur"].metadata[1].le
    for p in ADDRESSES:  # brush fields are BrushConfig fields (what the regions code reads)
        if p.is_brush and p.field != "clear":
            assert p.field in BrushConfig.model_fields, p.address
