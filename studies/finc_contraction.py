"""How contractive the trained FInC units are: why Jacobi stops before the wavefront bound.

For each FInC unit of the flows trained by ``studies.finc_scaling`` the Jacobi iteration
matrix ``J`` (``x <- F(x)`` is affine, ``e_{j} = J^j e_0``) is built explicitly on an 8x8
image (float64) and ``||J^j||_2`` reported for ``j = 1, 4, 8``.  ``J`` is nilpotent (index
``2n - 1``), so Jacobi is exact after ``2n - 1`` iterations whatever the weights; but when
``||J||_2`` is small its error reaches float32 rounding far earlier, after a number of
iterations that does not grow with the image size.

    python -m studies.finc_contraction --mode full     # after studies.finc_scaling
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from fixedpoint.finc.checkpoint import load_model

from .common import MODES, read_json, write_json

POWERS = (1, 4, 8)


def unit_norms(unit: torch.nn.Module, n: int = 8) -> list[float]:
    """``||J^j||_2`` for ``j`` in POWERS, J the unit's pixel-layout Jacobi matrix."""
    unit = unit.double()
    channels = sum(c.channels for c in unit.convs)
    size = n * n * channels
    system = unit.system(torch.zeros(size, channels, n, n, dtype=torch.float64))
    basis = torch.eye(size, dtype=torch.float64).reshape(size, system.length, system.dim)
    J = (system(basis) - system(torch.zeros_like(basis))).reshape(size, size).T
    return [float(torch.linalg.matrix_norm(torch.linalg.matrix_power(J, j), ord=2))
            for j in POWERS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    args = parser.parse_args(argv)
    out_dir = Path(MODES[args.mode].out_dir)
    scaling = read_json(out_dir / "finc_scaling.json")
    checkpoints: dict[str, str] = {name: info["checkpoint"]
                                   for name, info in scaling["unit"]["models"].items()}
    for name, flow in scaling["flows"].items():
        checkpoints[name] = flow["model"]["checkpoint"]
    models: dict[str, Any] = {}
    for name, path in checkpoints.items():
        model = load_model(path)
        norms = [unit_norms(u) for u in model.finc_units()]
        models[name] = {"checkpoint": path, "powers": list(POWERS), "norms": norms,
                        "max_norm": max(v[0] for v in norms),
                        "min_norm": min(v[0] for v in norms)}
        print(f"{name}: ||J||_2 in [{models[name]['min_norm']:.3f}, "
              f"{models[name]['max_norm']:.3f}] over {len(norms)} units")
    text = "; ".join(f"{name} {m['min_norm']:.2f} to {m['max_norm']:.2f}"
                     for name, m in models.items())
    write_json(out_dir / "finc_contraction.json",
               {"image_size": 8, "models": models, "section_values": {"contraction": text}})


if __name__ == "__main__":
    main()
