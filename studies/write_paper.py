"""Write ``paper.md`` from the study outputs: every number comes from a JSON file.

    python -m studies.write_paper --mode full   # paper/paper.md from paper/results/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import FULL, MODES, ROOT, Mode, atomic_write_bytes
from .paper_text import render

PAPER = ROOT / "paper" / "paper.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    args = parser.parse_args(argv)
    write(MODES[args.mode])


def write(mode: Mode) -> Path:
    """Render the write-up; in full mode it is paper/paper.md, else beside the results."""
    target = PAPER if mode.out_dir == FULL.out_dir else mode.out_dir / "paper.md"
    atomic_write_bytes(target, render(mode).encode())
    print(f"wrote {target}")
    return target


if __name__ == "__main__":
    main()
