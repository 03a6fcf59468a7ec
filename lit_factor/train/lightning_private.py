"""Every use of Lightning's private internals in lit-factor, in one place (the project rule: only where Lightning
offers no public way, each with the upstream issue and a test that fails loudly on an upgrade --
tests/test_lightning_private.py).

* :func:`reload_train_loader_state` -- Lightning issue #20550 (open in 2.6): a train loader that is set up before
  the checkpoint's loop state is restored (``configure_optimizers`` asking ``trainer.estimated_stepping_batches``
  sets it up early) never receives its saved position, so a resumed fit would replay the epoch's first batches.
  Uses ``FitLoop._combined_loader``, ``FitLoop._combined_loader_states_to_load``, ``FitLoop._data_fetcher``,
  ``CombinedLoader._load_state_dicts`` and ``lightning.fabric.utilities.data._set_sampler_epoch``.

:data:`VERIFIED` is the Lightning range these were checked against (pyproject.toml pins ``lightning`` to it); the
test fails on another minor version, or when one of the names is gone, so an upgrade re-checks the issue first.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.loops import _FitLoop
from lightning.pytorch.utilities.combined_loader import CombinedLoader

#: the Lightning minor versions the workarounds below were verified on (``major.minor``)
VERIFIED = ("2.6",)
#: the private names used here: (owner, attribute); checked by the upgrade test
FIT_LOOP_ATTRIBUTES = ("_combined_loader", "_combined_loader_states_to_load", "_data_fetcher")
COMBINED_LOADER_METHODS = ("_load_state_dicts",)


def reload_train_loader_state(trainer: pl.Trainer) -> None:
    """Load the checkpoint's pending train-loader states and re-create the fetcher's iterator, as Lightning's own
    resume path would (Lightning issue #20550); a no-op where Lightning already loaded them."""
    loop = trainer.fit_loop
    pending = list(getattr(loop, "_combined_loader_states_to_load", None) or [])
    if not pending or loop._combined_loader is None:
        return
    # Not loop._load_combined_loader_states(): it skips a checkpoint written after validation at an epoch's end
    # (Lightning does not count that as "restarting"), whose loader must still start the next epoch's shuffle.
    loop._combined_loader._load_state_dicts(pending)
    loop._combined_loader_states_to_load = []
    for dl in loop._combined_loader.flattened:
        # The epoch Lightning sets only at the next epoch start: a DistributedSampler draws its order from it now.
        _set_sampler_epoch(dl, loop.epoch_progress.current.processed)
    stateful = [dl for dl in loop._combined_loader.flattened if hasattr(dl, "load_state_dict")]
    for loader, state in zip(stateful, pending, strict=False):
        if state.get("_num_yielded", 0) >= trainer.num_training_batches:
            # Saved after the epoch's last batch: Lightning counts that epoch as done, so the loader must start
            # the next one (else Lightning runs an empty epoch and the run ends one epoch short).
            for _ in loader:
                pass
    iter(loop._data_fetcher)


def missing_privates(trainer: pl.Trainer) -> list[str]:
    """The private names this module uses that this Lightning lacks (empty when all are there)."""
    missing = [f"FitLoop.{a}" for a in FIT_LOOP_ATTRIBUTES if not hasattr(trainer.fit_loop, a)]
    missing += [f"CombinedLoader.{m}" for m in COMBINED_LOADER_METHODS
                if not callable(getattr(CombinedLoader, m, None))]
    if not isinstance(trainer.fit_loop, _FitLoop):
        missing.append("lightning.pytorch.loops._FitLoop")
    return missing
