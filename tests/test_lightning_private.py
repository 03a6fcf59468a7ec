"""Lightning's private internals used by lit-factor (lit_factor/train/lightning_private.py): fail loudly on an
upgrade, before a resumed fit silently replays batches (Lightning issue #20550)."""

from __future__ import annotations

import lightning

from lit_factor.train import lightning_private
from tests.conftest import quiet_trainer


def test_lightning_is_a_verified_version():
    minor = ".".join(lightning.__version__.split(".")[:2])
    assert minor in lightning_private.VERIFIED, (
        f"lightning {lightning.__version__} is not a version lit_factor/train/lightning_private.py was verified on "
        f"({', '.join(lightning_private.VERIFIED)}): check Lightning issue #20550 (fixed? then drop the workaround), "
        "run tests/test_resume.py, then add the version to VERIFIED and to pyproject.toml's pin")


def test_the_private_names_used_exist():
    assert lightning_private.missing_privates(quiet_trainer()) == []


def test_a_missing_private_name_is_reported(monkeypatch):
    monkeypatch.setattr(lightning_private, "FIT_LOOP_ATTRIBUTES", ("_combined_loader", "_renamed_upstream"))
    assert lightning_private.missing_privates(quiet_trainer()) == ["FitLoop._renamed_upstream"]
