"""The documentation's generated tables: the layer table of docs/layers.md from the registry, the accepted
keys of docs/config-keys.md from `Args`.

`python -m neox_zoology.doc_tables` rewrites both tables in place (each is the block of `|` lines under its
header line); `--check` exits 1 naming the pages that differ. tests/test_architecture.py checks that the pages
hold exactly what this writes, so a default, a key or a layer type cannot change without its docs.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from neox_zoology import registry

ROOT = Path(__file__).resolve().parent.parent
LAYERS_PAGE = ROOT / "docs" / "layers.md"
KEYS_PAGE = ROOT / "docs" / "config-keys.md"
LAYER_HEADER = "| name (aliases) | what | YAML section (defaults) | TP split |"
KEYS_HEADER = "| key | default | what it does |"


def yaml_value(v) -> str:
    """A default as a YAML flow value (floats that YAML reads back as floats: 1.0e-5, not 1e-05)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        if "e" in repr(v) or (v != 0 and abs(v) < 1e-3):  # YAML 1.1 reads 1e-05 and 1e+20 as text
            mantissa, exp = f"{v:.1e}".split("e")
            return f"{mantissa}e{int(exp)}"
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def layer_rows() -> list[str]:
    """One row per registered layer type: its config name (aliases), doc, own section with defaults (plus the
    top-level keys it reads) and tensor-parallel split."""
    rows = [LAYER_HEADER, "|---|---|---|---|"]
    for name in registry.names():
        spec = registry.get(name)
        shown = registry.config_name(name)
        aliases = [a for a in (spec.name, *spec.aliases) if a != shown and registry.config_refusal(a) is None]
        title = f"`{shown}`" + (f" ({', '.join(f'`{a}`' for a in aliases)})" if aliases else "")
        own = {k: v for k, v in spec.defaults.items() if k not in spec.inherits}
        section = f"`{spec.name}: {{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in own.items()) + "}`"
        if spec.inherits:
            section += "; reads top-level " + ", ".join(f"`{k}`" for k in spec.inherits)
        tp = spec.tp_split + (f" ({spec.tp_note})" if spec.tp_note else "")
        rows.append(f"| {title} | {_cell(spec.doc)} | {_cell(section)} | {_cell(tp)} |")
    return rows


def key_rows() -> list[str]:
    """One row per top-level key of `Args`: name, default, documentation."""
    from neox_zoology.config.args import Args

    rows = [KEYS_HEADER, "|---|---|---|"]
    for f in dataclasses.fields(Args):
        if "doc" not in f.metadata or f.name == "mixer_sections":
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(section)"
        rows.append(f"| `{f.name}` | `{default}` | {_cell(f.metadata['doc'])} |")
    return rows


def replace_table(text: str, rows: list[str]) -> str:
    """`text` with the table starting at rows[0] (its header line) replaced by `rows`."""
    lines = text.split("\n")
    start = lines.index(rows[0])
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:start] + rows + lines[end:])


def pages() -> dict[Path, str]:
    """Each generated page's path and its text with the table regenerated."""
    return {page: replace_table(page.read_text(), rows())
            for page, rows in ((LAYERS_PAGE, layer_rows), (KEYS_PAGE, key_rows))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neox_zoology.doc_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the pages whose table differs")
    args = parser.parse_args(argv)
    fresh = pages()
    stale = [page for page, text in fresh.items() if page.read_text() != text]
    if args.check:
        for page in stale:
            print(f"{page.relative_to(ROOT)}: table differs from the code; run python -m neox_zoology.doc_tables")
        return 1 if stale else 0
    for page in stale:
        page.write_text(fresh[page])
    print(f"rewrote {len(stale)} page(s): {', '.join(str(p.relative_to(ROOT)) for p in stale) or 'none changed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
