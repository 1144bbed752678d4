"""Write ``paper.md`` from the study outputs: every number comes from a JSON file.

    python -m studies.write_paper --mode full   # paper/paper.md from paper/results/
"""

from __future__ import annotations

import argparse

from .common import MODES
from .paper_text import render


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    text = render(mode)
    target = (mode.out_dir.parent / "paper.md") if mode.name == "full" else (
        mode.out_dir / "paper.md")
    target.write_text(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
