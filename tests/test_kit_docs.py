"""The kits never drift from the code: the generated TouchDesigner files equal what the
address table makes today, and the kit READMEs name only flags the CLI has and addresses the
node serves."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from support import load_script

from streamnode.control.osc import ADDRESSES, OUT_ADDRESSES
from streamnode.live_params import GROUPS

ROOT = Path(__file__).resolve().parent.parent
TD = ROOT / "touchdesigner"
OBS = ROOT / "obs"
READMES = [ROOT / "README.md", TD / "README.md", OBS / "README.md"]
SUBCOMMANDS = ("run", "demo", "bench", "doctor", "sources", "build-engines", "osc", "presets")


generate = load_script(TD / "generate.py", "td_generate")


# -- generated files ------------------------------------------------------------------------------


def test_generated_files_are_up_to_date() -> None:
    for name, text in generate.render().items():
        committed = (TD / name).read_text(encoding="utf-8")
        assert committed == text, f"touchdesigner/{name} is stale: run python touchdesigner/generate.py"


def test_generator_check_mode(tmp_path: Path) -> None:
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1  # nothing there yet: stale
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.main(["--check", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["osc_map.csv", "streamnode_params.json"]


def test_osc_map_covers_the_table_exactly() -> None:
    rows = list(csv.DictReader(io.StringIO(generate.render()["osc_map.csv"])))
    assert [r["address"] for r in rows if r["direction"] == "in"] == [p.address for p in ADDRESSES]
    assert [r["address"] for r in rows if r["direction"] == "out"] == [a for a, _, _ in OUT_ADDRESSES]
    for r in rows:
        if r["td_chop_channel"]:
            assert "/" + r["td_chop_channel"] == r["address"]  # the CHOP sends channel `x` as `/x`
            assert r["osc_types"] in ("i", "f", "— or i"), r["address"]  # numbers only reach a CHOP


def test_parameter_page_names_are_legal_touchdesigner_names() -> None:
    doc = json.loads(generate.render()["streamnode_params.json"])
    names = []
    for page in doc["pages"]:
        for n in range(64 if page.get("group") else 1):
            names += [e["name"].format(n=n) for e in page["pars"]]
    # TouchDesigner: a capital, then lower-case letters and digits; no underscores.
    bad = [n for n in names if not re.fullmatch(r"[A-Z][a-z0-9]*", n)]
    assert not bad
    assert len(names) == len(set(names))
    assert {"Nodehost", "Nodeport", "Replyport", "Prefix", "Connect"}.isdisjoint(names)  # the extension's own
    addresses = {e["address"] for page in doc["pages"] for e in page["pars"]}
    assert addresses == {p.address for p in ADDRESSES}


# -- READMEs vs the CLI and the OSC table ---------------------------------------------------------


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@cache
def cli_help(command: str) -> frozenset[str]:
    """The flags `streamnode COMMAND --help` prints (the real CLI, in a subprocess)."""
    out = subprocess.run([sys.executable, "-m", "streamnode.cli", command, "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return frozenset(FLAG.findall(out.stdout))


@cache
def script_help(name: str) -> frozenset[str]:
    if name == "streamnode_watchdog.py":
        return frozenset(FLAG.findall(load_script(OBS / name, "kit_watchdog_help").build_parser().format_help()))
    if name == "generate.py":
        out = subprocess.run([sys.executable, str(TD / "generate.py"), "--help"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
        return frozenset(FLAG.findall(out.stdout))
    raise AssertionError(f"unknown script {name}")
STREAMNODE_CMD = re.compile(r"(?<![\w/.-])streamnode\s+(" + "|".join(SUBCOMMANDS) + r")(?![\w-])([^`\n]*)")
SCRIPT_CMD = re.compile(r"(?<![\w-])(streamnode_watchdog\.py|generate\.py)(?![\w-])([^`\n]*)")
ADDRESS = re.compile(r"(?<![\w/.:~<-])/[a-z][a-z0-9_]*(?:/[A-Za-z0-9_<>]+)*")
PREFIXES = ("/vj1",)  # the example prefix the READMEs use


def kit_texts() -> list[tuple[str, str]]:
    texts = [(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8")) for p in READMES]
    texts.append(("obs/streamnode_obs.py", (OBS / "streamnode_obs.py").read_text(encoding="utf-8")))
    return texts


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_readme_commands_use_only_real_flags(readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    problems = []
    commands = STREAMNODE_CMD.findall(text)
    assert commands, "the README shows no streamnode command at all?"
    for command, rest in commands:
        for flag in FLAG.findall(rest):
            if flag not in cli_help(command):
                problems.append(f"streamnode {command} {flag}")
    for script, rest in SCRIPT_CMD.findall(text):
        for flag in FLAG.findall(rest):
            if flag not in script_help(script):
                problems.append(f"{script} {flag}")
    # Flags named in prose belong to one of these commands too.
    known = set().union(*(cli_help(c) for c in {c for c, _ in commands} | {"run"}))
    if readme.parent == OBS:
        known |= script_help("streamnode_watchdog.py")
    if readme.parent == TD:
        known |= script_help("generate.py")
    # Other tools' command lines (pip, python -m venv) carry their own flags.
    prose = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("pip ", "python ")))
    problems += [f"{flag} (prose)" for flag in set(FLAG.findall(prose)) if flag not in known]
    assert not problems, f"{readme.relative_to(ROOT)} names flags the code does not have: {problems}"


GROUP_INDEX = r"^/(" + "|".join(g.name for g in GROUPS) + r")/\d+/"


def valid_address(token: str) -> bool:
    if token in PREFIXES:
        return True  # the prefix on its own ("--osc-prefix /vj1")
    for prefix in PREFIXES:
        if token.startswith(prefix + "/"):
            token = token[len(prefix):]
    inputs = {p.address for p in ADDRESSES}
    outputs = {a for a, _, _ in OUT_ADDRESSES}
    token = re.sub(r"^/at/(beat|bar|\d+bars)(?=/)", "", token)  # one change quantized: /at/bar/prompt
    indexed = re.sub(GROUP_INDEX, r"/\1/N/", token)  # the indexed groups: /brush/0/prompt
    if token in inputs or indexed in inputs or token in outputs:
        return True
    applied = "/streamnode/applied"
    if token.startswith(applied + "/"):
        rest = re.sub(GROUP_INDEX, r"/\1/N/", token[len(applied):])
        return rest in inputs or rest == "/<address>"
    return False


@pytest.mark.parametrize(("name", "text"), kit_texts(), ids=lambda v: v if "/" in v and len(v) < 40 else "")
def test_kit_names_only_real_osc_addresses(name: str, text: str) -> None:
    tokens = set(ADDRESS.findall(text))
    unknown = sorted(t for t in tokens if not valid_address(t))
    assert not unknown, f"{name} names OSC addresses the node does not have: {unknown}"


def test_address_check_catches_typos() -> None:
    assert valid_address("/guidance") and valid_address("/vj1/streamnode/heartbeat")
    assert valid_address("/brush/3/rect") and valid_address("/streamnode/applied/brush/0/prompt")
    assert not valid_address("/guidence") and not valid_address("/streamnode/hearbeat")
    assert not valid_address("/streamnode/applied/nope")
    assert ADDRESS.findall("see `shm://td_in`, docs/shm-format.md and `/prompt`") == ["/prompt"]
    assert "--osc" not in cli_help("run") and "--osc-reply" in cli_help("run")  # whole flags, not substrings
