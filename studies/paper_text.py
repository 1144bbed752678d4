"""The text of the write-up, filled with numbers read from the study outputs."""

from __future__ import annotations

from .common import Mode, read_json


def render(mode: Mode) -> str:
    out = ["# Accelerating TarFlow sampling with GS-Jacobi iteration: a CPU reproduction", ""]
    for preset in mode.models:
        path = mode.out_dir / f"speedup-{preset}.json"
        if path.exists():
            from .speedup import markdown

            out += [f"## {preset}", "", markdown(read_json(path)), ""]
    return "\n".join(out) + "\n"
