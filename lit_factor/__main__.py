"""``python -m lit_factor ...``: the same door as ``lit-factor`` and ``python cli.py``."""

from lit_factor.cli import main

if __name__ == "__main__":
    main()
