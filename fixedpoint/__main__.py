"""``python -m fixedpoint``: see :mod:`fixedpoint.cli`."""

from fixedpoint.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
