"""The paper is rendered from templates whose every number is a placeholder."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from studies import write_paper
from studies.common import FULL
from studies.write_paper import Section, TemplateError, render, render_section, sections

# The TarFlow paper's sections (studies/sections/*.md written with this writer).  Other
# applications' sections are checked for placeholders; their own tests judge their prose.
OWN = ("tarflow", "tarflow_model", "costmodel", "published", "targets", "run", "discussion",
       "tarflow_training")
# Digits that are names, not numbers: figure and table labels, dtypes, the GPU model.
ALLOWED = re.compile(r"\b(?:Figure|Table) \d+\b|\b(?:b?float|int)\d+\b|\bA800\b")


def prose(text: str) -> str:
    """The template with what may hold digits removed: header, code, placeholders, links."""
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = text.replace("{{", " ").replace("}}", " ")
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return ALLOWED.sub(" ", text)


def test_every_own_section_exists_with_a_header() -> None:
    found = {s.name: s for s in sections()}
    for name in OWN:
        assert name in found, f"studies/sections/{name}.md is missing"
        assert found[name].has_header


@pytest.mark.parametrize("name", OWN)
def test_section_states_no_number_outside_placeholders(name: str) -> None:
    section = next(s for s in sections() if s.name == name)
    bare = [(m.start(), prose(section.text)[max(0, m.start() - 30): m.end() + 30])
            for m in re.finditer(r"\d", prose(section.text))]
    assert not bare, f"{name}.md states numbers outside placeholders: {bare[:5]}"


def test_prose_filter_finds_a_bare_number() -> None:
    text = "We used {n} samples, `x_0`, Figure 2, ![a](results/x-1.png) and 256 more."
    assert re.findall(r"\d+", prose(text)) == ["256"]


def _tracked_results(tmp_path: Path) -> Path:
    """The results git tracks (what a clean clone has), copied without the figures."""
    files = subprocess.run(["git", "ls-files", "paper/results"], cwd=write_paper.ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    out = tmp_path / "results"
    for name in files:
        if name.endswith(".json"):
            target = out / Path(name).relative_to("paper/results")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(write_paper.ROOT / name, target)
    return out


def test_committed_results_render_without_missing_placeholders(tmp_path: Path) -> None:
    out = _tracked_results(tmp_path)
    text = render(dataclasses.replace(FULL, out_dir=out))  # TemplateError if one is missing
    assert text.startswith("# Accelerating TarFlow sampling")
    assert "## Model `digits` (T = 16)" in text
    run = json.loads((out / "run.json").read_text())
    assert f"{run['wall_clock_s'] / 60:.1f} minutes" in text


def test_a_missing_placeholder_names_the_section() -> None:
    section = Section("demo", "Batch {batch}, {nowhere:.2f} ms.")
    with pytest.raises(TemplateError, match="demo: no value for nowhere"):
        render_section(section, {"batch": 8})
    assert render_section(section, {"batch": 8, "nowhere": 1.234}) == "Batch 8, 1.23 ms.\n"


def test_header_is_parsed_and_checked(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("<!-- paper: order=7 results=x-{model}.json per=model -->\n"
                                   "## A {model}\n")
    s = Section.read(tmp_path / "a.md")
    assert (s.order, s.results, s.per_model, s.text) == (7, ("x-{model}.json",), True,
                                                         "## A {model}\n")
    (tmp_path / "b.md").write_text("<!-- paper: colour=red -->\ntext\n")
    with pytest.raises(TemplateError, match="bad header item"):
        Section.read(tmp_path / "b.md")
    (tmp_path / "c.md").write_text("no header\n")
    assert not Section.read(tmp_path / "c.md").has_header


def test_sections_follow_their_results(tmp_path: Path) -> None:
    """A section whose results are missing is left out; ``values`` files add placeholders;
    the prose states the sample count the results were made with (fast mode: not 256)."""
    out = _tracked_results(tmp_path)
    speed = sorted(out.glob("speedup-*.json"))
    assert speed, "no committed TarFlow results"
    for path in speed:
        payload = json.loads(path.read_text())
        payload["eval_batch"] = 17
        path.write_text(json.dumps(payload))
    sec = tmp_path / "sections"
    shutil.copytree(write_paper.SECTIONS, sec)
    (sec / "zz_extra.md").write_text("<!-- paper: order=99 results=extra.json "
                                     "values=extra.json -->\n## Extra: {extra_n} things\n")
    mode = dataclasses.replace(FULL, out_dir=out, name="fast")
    without = render(mode, sec)
    assert "## Extra" not in without
    assert "on 17 samples" in without and "on 256 samples" not in without
    (out / "extra.json").write_text(json.dumps({"section_values": {"extra_n": 5}}))
    assert "## Extra: 5 things" in render(mode, sec)


def test_braces_that_are_no_placeholder_stay_literal() -> None:
    section = Section("math", "`A_{n+1} sum_{m <= n}` at {rate:.1f} per {{unit}}")
    assert section.placeholders() == {"rate"}
    assert render_section(section, {"rate": 2.25}) == "`A_{n+1} sum_{m <= n}` at 2.2 per {unit}\n"
