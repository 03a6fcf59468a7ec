"""``python cli.py ...``: the door of a checkout; the same as ``python -m lit_factor`` and ``lit-factor``
(the commands live in :mod:`lit_factor.cli`)."""

from lit_factor.cli import main

if __name__ == "__main__":
    main()
