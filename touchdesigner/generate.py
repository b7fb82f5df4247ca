"""Generate the TouchDesigner kit's OSC map and parameter page from the node's address table.

    python touchdesigner/generate.py           # rewrite osc_map.csv and streamnode_params.json
    python touchdesigner/generate.py --check   # exit 1 if they differ from the code (CI, tests)

Both files come from `streamnode.control.osc.ADDRESSES` and `OUT_ADDRESSES`, so the kit can
never list an address, type or range the node does not have. Run it after changing the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from streamnode.config import OscConfig  # noqa: E402
from streamnode.control.osc import ADDRESSES, OUT_ADDRESSES, Param  # noqa: E402

CSV_NAME = "osc_map.csv"
JSON_NAME = "streamnode_params.json"
OSC_OUT_DAT = "oscout1"
CHOP_EXACT_INT = 2**24  # an OSC Out CHOP sends 32-bit floats: integers above this lose digits
SLIDER_MAX_SEED = 1000  # a 0..4294967295 slider is unusable; the field still takes any seed


def shipped_presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "presets").glob("*.toml"))


# -- names ---------------------------------------------------------------------------------------


GROUP_LETTERS = {"/brush/N/": "B", "/lora/N/": "L", "/controlnet/N/": "C", "/lfo/N/": "F", "/cues/N/": "Q"}
"""The indexed groups' parameter-name letters: B0prompt, L0weight, C0scale, F0target, Q0prompt (Q: the
lighting desk's word for a cue)."""
GROUP_PAGES = {"brush": "Brush {n}", "lora": "Lora {n}", "controlnet": "Controlnet {n}", "lfo": "Lfo {n}",
               "cues": "Cue {n}"}


def td_name(address: str, arg: str = "") -> str:
    """A TouchDesigner custom parameter name: capital first letter, then lower case letters and
    digits only (TD refuses anything else). Brush and LoRA parameters carry "{n}" for the index."""
    for group, letter in GROUP_LETTERS.items():
        if address.startswith(group):
            rest = re.sub(r"[^a-z0-9]", "", (address[len(group):] + arg).lower())
            return letter + "{n}" + rest
    word = re.sub(r"[^a-z0-9]", "", (address + arg).lower())
    return word[:1].upper() + word[1:]


def td_label(address: str, arg: str = "") -> str:
    for group in GROUP_LETTERS:
        address = address.replace(group, "")
    words = [w for w in re.split(r"[/_]", address) if w]
    text = " ".join(words)
    text = text[:1].upper() + text[1:]
    return f"{text} {arg}" if arg else text


def chop_channel(param: Param) -> str:
    """The OSC Out CHOP channel for a one-number address: the address without its leading '/'
    (the CHOP sends a channel named `guidance` as `/guidance`). Empty when a CHOP cannot send it
    (strings, several values)."""
    if param.kind == "trigger":
        return param.address[1:]
    if param.repeat == (1, 1) and len(param.args) == 1 and param.args[0].tag != "s":
        return param.address[1:]
    return ""


# -- example values (also what the tests send to a live node) ------------------------------------


def example_args(param: Param) -> list[Any]:
    """Arguments that the node accepts for this address (its default where it has one)."""
    if param.kind == "trigger":
        return []
    if param.address == "/preset":
        return ["sd-turbo"]
    if param.address == "/t_index":
        return list(param.default)
    if param.address == "/model":
        return ["tiny"]
    if param.address == "/brush/N/mask":
        return ["C:/masks/brush0.png"]
    if param.address == "/brush/N/shm":
        return ["shm://streamnode_masks?plane=0"]
    if param.address == "/brush/order":
        return [1, 0]  # brush 1 at the bottom, brush 0 over it
    if param.address == "/lora/N/source":
        return ["C:/loras/watercolor.safetensors"]
    if param.address == "/controlnet/N/model":
        return ["tiny"]
    out: list[Any] = []
    pairs = [("a neon city at night", 0.7), ("a watercolor forest", 0.3)]
    if param.repeat != (1, 1):  # the blends: two weighted pairs
        seeds = [(7, 0.5), (42, 0.5)]
        for value, weight in seeds if param.args[0].tag == "i" else pairs:
            out += [value, weight]
        return out
    for i, arg in enumerate(param.args):
        default = param.default
        if isinstance(default, (list, tuple)):
            default = default[i]
        if arg.tag == "s":
            out.append(default if default else "a neon city at night")
        elif isinstance(default, bool):
            out.append(int(default))
        elif default is not None:
            out.append(int(default) if arg.tag == "i" else float(default))
        else:
            lo, hi = arg.min or 0.0, arg.max if arg.max is not None else 1.0
            value = (lo + hi) / 2 if arg.name not in ("w", "h", "r") else 0.25
            out.append(int(value) if arg.tag == "i" else round(float(value), 3))
    return out


def concrete(address: str) -> str:
    return address.replace("/N/", "/0/")


def dat_call(param: Param) -> str:
    args = ", ".join(repr(a) for a in example_args(param))
    return f"op('{OSC_OUT_DAT}').sendOSC('{concrete(param.address)}', [{args}])"


def text_format(param: Param) -> str:
    if param.repeat == (1, 1):
        return ""
    if len(param.args) == 1:
        return "numbers separated by spaces, e.g. 32 45"
    first = "seed" if param.args[0].tag == "i" else "prompt"
    return f"{first}:weight pairs separated by |, e.g. " + (
        "7:0.5 | 42:0.5" if first == "seed" else "a neon city:0.7 | a watercolor forest:0.3")


# -- the parameter page -------------------------------------------------------------------------


def par_entries(param: Param) -> list[dict[str, Any]]:
    """TouchDesigner custom parameters for one address (one per argument when it takes several)."""
    base: dict[str, Any] = {"address": param.address, "osc_types": param.signature.replace("— or i", ""),
                            "description": param.description}
    if param.kind == "trigger":
        return [{**base, "name": td_name(param.address), "label": td_label(param.address), "style": "Pulse"}]
    if param.repeat != (1, 1):
        return [{**base, "name": td_name(param.address), "label": td_label(param.address), "style": "Str",
                 "default": " ".join(str(v) for v in param.default) if param.default else "",
                 "text_format": text_format(param),
                 "arg_tags": "".join(a.tag for a in param.args),
                 "repeat": list(param.repeat)}]
    entries = []
    multi = len(param.args) > 1
    for i, arg in enumerate(param.args):
        entry: dict[str, Any] = {**base, "name": td_name(param.address, arg.name if multi else ""),
                                 "label": td_label(param.address, arg.name if multi else "")}
        if multi:
            entry["arg_index"], entry["arg_count"] = i, len(param.args)
        default = param.default[i] if isinstance(param.default, (list, tuple)) else param.default
        if arg.tag == "s":
            if param.address == "/preset":
                entry.update(style="StrMenu", menu=shipped_presets(), default="")
            elif arg.choices:
                entry.update(style="StrMenu", menu=list(arg.choices), default=default or arg.choices[0])
            elif param.address.endswith("/mask"):
                entry.update(style="File", default="")
            else:
                entry.update(style="Str", default=default or "")
            entry["max_len"] = arg.max_len
        elif param.finish is bool:
            entry.update(style="Toggle", default=bool(default))
        else:
            style = "Int" if arg.tag == "i" else "Float"
            lo, hi = arg.min, arg.max
            entry.update(style=style, min=lo, max=hi, clamp=[lo is not None, hi is not None],
                         norm=[lo, min(hi, SLIDER_MAX_SEED) if param.address == "/seed" else hi])
            if default is not None:
                entry["default"] = default
        entries.append(entry)
    return entries


def params_document() -> dict[str, Any]:
    main = [e for p in ADDRESSES if not p.group for e in par_entries(p)]
    groups = [{"name": title, "group": name, "pars": [e for p in ADDRESSES if p.group == name for e in par_entries(p)]}
              for name, title in GROUP_PAGES.items()]
    cfg = OscConfig()
    return {
        "about": "TouchDesigner custom parameter pages for streamnode, generated by touchdesigner/generate.py "
                 "from streamnode.control.osc.ADDRESSES. Do not edit; regenerate.",
        "osc_port": cfg.port,
        "reply_port": cfg.reply_port,
        "pages": [
            {"name": "Streamnode", "pars": main},
            *groups,
        ],
        "replies": [{"address": a, "osc_types": t, "description": d} for a, t, d in OUT_ADDRESSES],
    }


# -- the CSV ------------------------------------------------------------------------------------

CSV_COLUMNS = ["direction", "address", "osc_types", "range", "default", "td_chop_channel", "td_dat_call",
               "td_par", "description"]


def csv_rows() -> list[dict[str, str]]:
    rows = []
    for p in ADDRESSES:
        pars = [e["name"] for e in par_entries(p)]
        note = p.description
        if chop_channel(p) and p.args and p.args[0].tag == "i" and (p.args[0].max or 0) > CHOP_EXACT_INT:
            note += f" A CHOP sends 32-bit floats: exact up to {CHOP_EXACT_INT}; send larger values from the DAT."
        if p.kind == "trigger":
            note += " From a CHOP: a 0→1 step fires it (hold 1 and nothing repeats)."
        rows.append({
            "direction": "in",
            "address": p.address,
            "osc_types": p.signature,
            "range": p.range_text + (f"; {text_format(p)}" if text_format(p) else ""),
            "default": p.default_text,
            "td_chop_channel": chop_channel(p),
            "td_dat_call": dat_call(p),
            "td_par": " ".join(pars),
            "description": note + _GROUP_NOTES.get(p.group or "", ""),
        })
    for address, types, description in OUT_ADDRESSES:
        numeric = types in ("i", "f")
        rows.append({
            "direction": "out",
            "address": address,
            "osc_types": types,
            "range": "",
            "default": "",
            "td_chop_channel": address[1:] if numeric else "",
            "td_dat_call": "" if numeric else "OSC In DAT (strings do not reach an OSC In CHOP)",
            "td_par": "",
            "description": description,
        })
    return rows


_GROUP_NOTES = {
    "brush": " N is the brush index, 0..7 by default (--set runtime.max_brushes=…).",
    "lora": " N is the LoRA index, 0..7 by default (--set runtime.max_loras=…).",
    "controlnet": " N is the ControlNet index, 0..3 by default (--set runtime.max_controlnets=…).",
    "lfo": " N is the LFO index, 0..7 by default (--set runtime.max_lfos=…).",
    "cues": " N is the cue index, 0..15 by default (--set runtime.max_cues=…).",
}


def render() -> dict[str, str]:
    """File name → exact text of every generated file."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows())
    return {
        CSV_NAME: buf.getvalue(),
        JSON_NAME: json.dumps(params_document(), indent=2, ensure_ascii=False) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is stale")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write to (default: touchdesigner/)")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text, encoding="utf-8", newline="\n")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run: python touchdesigner/generate.py", file=sys.stderr)
        return 1
    print(("stale: " if args.check else "written: ") + (", ".join(stale) or "nothing (up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
