"""``fixedpoint demo``: every method on synthetic systems, for any sequence length."""

from __future__ import annotations

import pytest
import torch

from fixedpoint import demo
from fixedpoint.cli import main


def table_rows(out: str) -> list[list[str]]:
    """The body rows of the markdown tables: [method, status, ..., max error]."""
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0] not in ("method", "---")]


@pytest.mark.parametrize("length", [1, 2, pytest.param(6, marks=pytest.mark.slow)])
def test_short_sequences_run_every_method_to_the_solution(
    length: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # Lengths under 7 used to fail: the 7-module GS-Jacobi exceeded T.
    assert main(["demo", "--length", str(length), "--batch", "1", "--repeats", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    ours = [r for r in rows if not r[0].startswith("scipy")]
    assert len(ours) >= 3 * 5  # three systems, at least five distinct methods each
    for row in ours:
        assert row[1] == "SUCCESS", row
        assert float(row[-1]) < 1e-6, row  # float64, stopping at atol 1e-8


def test_gs_jacobi_modules_are_capped_by_the_length() -> None:
    assert [m.modules for m in demo.demo_methods(5) if hasattr(m, "modules")] == [4, 5]
    assert [m.modules for m in demo.demo_methods(64) if hasattr(m, "modules")] == [4, 7]
    assert [m.modules for m in demo.demo_methods(3) if hasattr(m, "modules")] == [3]


@pytest.mark.parametrize("argv", [["--length", "0"], ["--batch", "0"], ["--repeats", "0"],
                                  ["--length", "-3"], ["--batch", "two"],
                                  ["--threads", "0"]])
def test_bad_values_are_one_line_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"fixedpoint demo: error: {argv[0]} must be ")


def test_library_call_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="length must be a positive integer, got 0"):
        demo.run(length=0)
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        demo.run(repeats=2.5)  # type: ignore[arg-type]


def test_threads_option_is_used_and_restored(capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    assert main(["demo", "--length", "1", "--batch", "1", "--repeats", "1",
                 "--threads", str(wanted)]) == 0
    assert f"{wanted} threads" in capsys.readouterr().out.splitlines()[0]
    assert torch.get_num_threads() == before
