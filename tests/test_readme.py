"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_a_main_command_and_a_test_command():
    main, tests = readme_commands()[:2]
    assert main.endswith("python -m studies.reproduce --mode full")
    assert tests.endswith("python -m pytest")
    for command in (main, tests):
        assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in command


def test_ci_runs_the_readme_test_command_verbatim():
    tests = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def readme_method_namespace() -> dict:
    """Execute the README's "Writing a method" example; return its namespace."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Writing a method", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(code, "README.md (Writing a method)", "exec"), namespace)
    return namespace


def test_readme_method_written_outside_the_package_matches_sequential():
    import torch

    import fixedpoint as fp
    from fixedpoint import testing as fpt
    from fixedpoint.testing import systems

    method = readme_method_namespace()["DampedJacobi"](damping=0.7)
    assert isinstance(method, fp.Method)
    for seed in range(3):
        linear = systems.LinearSystem.random(3, 12, 2, seed=seed, toughness=0.5)
        affine = systems.AffineAutoregressive.random(2, 10, 3, seed=seed, toughness=0.5)
        for system in (linear, affine):
            res = fpt.assert_matches_sequential(system, system.noise_guess(seed=seed), method)
            assert res.status is fp.Status.SUCCESS and res.iterations > 1
    # Its failures follow the same contract: NONFINITE, last finite iterate kept.
    base = systems.AffineAutoregressive.random(2, 8, 2, seed=1, toughness=0.5)
    poisoned = systems.PoisonedSystem(base, sample=1, position=3)
    res = fp.solve(poisoned, poisoned.empty(), method)
    assert res.sample_status == (fp.Status.SUCCESS, fp.Status.NONFINITE)
    assert torch.isfinite(res.x).all()
    fpt.assert_close(res.x[:1], base.solution()[:1])
