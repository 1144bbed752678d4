"""Write ``paper.md`` from the section templates and the study outputs.

    python -m studies.write_paper --mode full   # paper/paper.md from paper/results/

The prose lives in ``studies/sections/*.md``; every number in it is a ``{placeholder}``
filled with :meth:`str.format_map` from a flat dict of values read from the results
(``{budget:g}`` formats a number).  A placeholder is ``{name}`` or ``{name:spec}`` with
``name`` an identifier; every other brace is literal text (``A_{n+1}`` in a formula), and
``{{`` / ``}}`` stay available for a literal ``{name}``.  A section
starts with one header line

    <!-- paper: order=50 results=finc_scaling.json values=finc_scaling.json per=model -->

(every key optional; a file without this header is left out, with a note):

* ``results``: files in the results directory the section needs; the section is left
  out (with a note) when one is missing.  ``{model}`` in a name stands for each model.
* ``values``: results files whose top-level ``"section_values"`` dict (flat
  ``{placeholder: value}``, written by the study) adds placeholders for this section.
* ``per=model``: render the section once per TarFlow model with results, with that
  model's values (:func:`studies.paper_values.model_values`).
* ``order``: sections are written by ``order`` (default 50), then by file name.

All sections also see the global values of :func:`studies.paper_values.global_values`.
A placeholder that no value fills is an error naming the section, never a silent gap;
``tests/test_paper.py`` renders the committed results and also checks that the
templates state no number outside placeholders.
"""

from __future__ import annotations

import argparse
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paper_values
from .common import FULL, MODES, ROOT, Mode, atomic_write_bytes

PAPER = ROOT / "paper" / "paper.md"
SECTIONS = ROOT / "studies" / "sections"
HEADER = re.compile(r"\A<!--\s*paper:(?P<body>[^>]*)-->\s*\n")
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?::[^{}]*)?\}")


class TemplateError(ValueError):
    """A section names a placeholder no value fills, or its header is malformed."""


@dataclass(frozen=True)
class Section:
    name: str
    text: str  # the template without its header line
    order: int = 50
    results: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    per_model: bool = False
    has_header: bool = True

    @classmethod
    def read(cls, path: Path) -> Section:
        raw = path.read_text()
        m = HEADER.match(raw)
        if m is None:
            return cls(path.stem, raw, has_header=False)
        opts: dict[str, list[str]] = {}
        for item in m["body"].split():
            k, sep, v = item.partition("=")
            if not sep or k not in ("order", "results", "values", "per"):
                raise TemplateError(f"{path.name}: bad header item {item!r}")
            opts.setdefault(k, []).extend(v.split(","))
        per = opts.get("per", [])
        if per not in ([], ["model"]):
            raise TemplateError(f"{path.name}: per= must be 'model', got {per}")
        try:
            order = int(opts.get("order", ["50"])[0])
        except ValueError as exc:
            raise TemplateError(f"{path.name}: order must be an integer") from exc
        return cls(path.stem, raw[m.end():], order, tuple(opts.get("results", ())),
                   tuple(opts.get("values", ())), per == ["model"])

    def template(self) -> str:
        """The text in :meth:`str.format` syntax: braces that are no placeholder doubled."""
        parts = re.split(r"(\{\{|\}\}|" + PLACEHOLDER.pattern + ")", self.text)
        return "".join(p if i % 2 else p.replace("{", "{{").replace("}", "}}")
                       for i, p in enumerate(parts))

    def placeholders(self) -> set[str]:
        """Names of the fields the template uses (``{name}``, ``{name:fmt}``)."""
        return {f.split(".")[0].split("[")[0]
                for _, f, _, _ in string.Formatter().parse(self.template()) if f}


def sections(directory: Path = SECTIONS) -> list[Section]:
    found = [Section.read(p) for p in sorted(directory.glob("*.md"))]
    return sorted(found, key=lambda s: (s.order, s.name))


def render_section(section: Section, values: Mapping[str, Any]) -> str:
    missing = sorted(section.placeholders() - set(values))
    if missing:
        raise TemplateError(f"section {section.name}: no value for {', '.join(missing)}")
    return section.template().format_map(values).strip() + "\n"


def _instances(section: Section, mode: Mode, base: dict[str, Any]
               ) -> Iterator[dict[str, Any]] | None:
    """The value dicts to render ``section`` with, or None if its results are missing."""
    models = paper_values.presets(mode) if section.per_model else [None]
    out = []
    for model in models:
        names = [r.replace("{model}", model or "") for r in section.results]
        if any(not (mode.out_dir / n).exists() for n in names):
            continue
        values = dict(base)
        for name in section.values:
            path = mode.out_dir / name
            if not path.exists():
                break
            values.update(paper_values.read_values_file(path))
        else:
            if model is not None:
                values.update(paper_values.model_values(mode, model))
            out.append(values)
    return iter(out) if out else None


def render(mode: Mode, directory: Path = SECTIONS) -> str:
    base = paper_values.global_values(mode)
    parts = []
    for section in sections(directory):
        if not section.has_header:
            print(f"write_paper: section {section.name} left out: no '<!-- paper: ... -->' "
                  "header line")
            continue
        instances = _instances(section, mode, base)
        if instances is None:
            needed = dict.fromkeys(section.results + section.values)  # ordered, unique
            missing = [n for n in needed if "{model}" in n or not (mode.out_dir / n).exists()]
            print(f"write_paper: section {section.name} left out: {', '.join(missing)} "
                  f"not in {mode.out_dir}")
            continue
        parts += [render_section(section, v) for v in instances]
    text = "\n".join(parts)
    return re.sub(r"\n{3,}", "\n\n", text)  # empty optional parts leave blank runs


def write(mode: Mode) -> Path:
    """Render the write-up; in full mode it is paper/paper.md, else beside the results."""
    target = PAPER if mode.out_dir == FULL.out_dir else mode.out_dir / "paper.md"
    atomic_write_bytes(target, render(mode).encode())
    print(f"wrote {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    args = parser.parse_args(argv)
    write(MODES[args.mode])


if __name__ == "__main__":
    main()
