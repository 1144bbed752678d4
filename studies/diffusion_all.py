"""All diffusion studies in order, then the paper section rendered from their results.

    python -m studies.diffusion_all --mode fast|full

Runs :mod:`studies.diffusion_dimension` (mixtures, no training), then trains (or loads)
the digits model and runs :mod:`studies.diffusion_paradigms`,
:mod:`studies.diffusion_convergence` and :mod:`studies.diffusion_window`.  The section
``studies/sections/diffusion.md`` is filled from the ``section_values`` of the JSON files
and written to ``diffusion.md`` in the results directory; ``studies.write_paper`` puts the
same section into ``paper.md``.
"""

from __future__ import annotations

import argparse
import json

from . import diffusion_convergence, diffusion_dimension, diffusion_paradigms, diffusion_window
from .common import MODES, ROOT, atomic_write_bytes, timed


def render(mode) -> str:
    from .write_paper import Section, render_section

    section = Section.read(ROOT / "studies" / "sections" / "diffusion.md")
    values = {}
    for name in section.values:
        values.update(json.loads((mode.out_dir / name).read_text())["section_values"])
    return render_section(section, values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument(
        "--render-only", action="store_true", help="only fill the section from existing results"
    )
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    flags = ["--mode", args.mode]
    if not args.render_only:
        for study in (
            diffusion_dimension,
            diffusion_paradigms,
            diffusion_convergence,
            diffusion_window,
        ):
            with timed(study.__name__):
                study.run(flags)
    text = render(mode)
    atomic_write_bytes(mode.out_dir / "diffusion.md", text.encode())
    print(f"wrote {mode.out_dir / 'diffusion.md'}")


if __name__ == "__main__":
    main()
