"""Measure the inference latency of the model being trained next to its dense equivalent (after fit / test).

In a LightningCLI config::

    trainer:
      callbacks:
        - class_path: lit_factor.callbacks.LatencyCallback
          init_args: {batch_sizes: [8, 32], seq_lens: [128], repeats: 10, when: [fit_end, test_end]}

A :class:`~lightning.pytorch.callbacks.Callback` rather than a ``Profiler``: a profiler times the *training* hooks
as they run, while this needs its own controlled inference runs (eval mode, fixed shapes, a dense baseline) at a
well-defined moment. The measured "factorized" model is what would be exported now: staged layers that have not
switched yet count as dense. The dense baseline is the same model with every factorized layer multiplied back
into an ``nn.Linear``. Both are copies: the trained model is never touched.

Under DDP only global rank 0 measures (on its own device; the table says ``rank 0``) while the other ranks wait
at a barrier, so the numbers are not disturbed by sibling processes competing for the same device.
"""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl

from lit_factor.compress.switchable import dense_equivalent, live_copy
from lit_factor.deploy.latency import LatencyRow, LatencySettings, compare_latency, format_table
from lit_factor.train.callbacks.summary import SummarySection

WHEN = ("fit_end", "test_end")


class LatencyCallback(pl.Callback, SummarySection):
    """Time the trained model's forward against its dense equivalent; print a table, log to the loggers."""

    def __init__(self, batch_sizes: list[int] = (8,), seq_lens: list[int] = (128,), repeats: int = 10,
                 warmup: int = 2, mode: str = "eager", dtype: str | None = None, device: str | None = None,
                 threads: int | None = None, when: list[str] = ("fit_end",), part: str = "model") -> None:
        """
        Args:
            batch_sizes: batch sizes to sweep.
            seq_lens: sequence lengths to sweep (every batch size at every length).
            repeats: timed rounds per shape; the table shows the median and the 90th percentile.
            warmup: untimed calls per model and shape before timing.
            mode: ``eager``, ``compile`` (torch.compile), ``cudagraph`` or ``compile-cudagraph`` (CUDA only).
            dtype: ``float32``, ``bfloat16``, ``float16`` for the measured copies; ``null`` keeps the model's.
            device: where to measure; ``null`` = the device the model is trained on (``trainer.strategy.root_device``,
                rank 0's under DDP).
            threads: CPU threads during the measurement; ``null`` leaves the setting alone.
            when: ``fit_end`` and/or ``test_end``.
            part: ``model`` (the whole forward) or ``encoder`` (the encoder stack on precomputed embeddings).
        """
        super().__init__()
        bad = [w for w in when if w not in WHEN]
        if bad or not when:
            raise ValueError(f"when={list(when)} must be a non-empty list of {', '.join(WHEN)}")
        self.settings = LatencySettings(batch_sizes=list(batch_sizes), seq_lens=list(seq_lens), repeats=repeats,
                                        warmup=warmup, mode=mode, dtype=dtype, device=device, threads=threads,
                                        part=part)
        self.settings.check()
        self.when = list(when)
        #: rows of the last measurement (rank 0 only)
        self.rows: list[LatencyRow] = []
        #: whether the last measurement was of a dense run (no factorization plan)
        self.dense_run = False

    summary_key = "latency"

    def summary_section(self) -> dict | None:
        """The first row measured at ``fit_end`` for ``summary.json`` (rank 0 holds the rows)."""
        if not self.rows or "fit_end" not in self.when:
            return None
        row = self.rows[0]
        if self.dense_run:  # the model is dense: its latency, no speedup against an identical copy
            return {"batch_size": row.batch_size, "seq_len": row.seq_len, "dense_ms": row.factorized_ms,
                    "factorized_ms": None, "speedup": None, "device": row.device}
        return {"batch_size": row.batch_size, "seq_len": row.seq_len, "dense_ms": row.dense_ms,
                "factorized_ms": row.factorized_ms, "speedup": row.speedup, "device": row.device}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "fit_end" in self.when:
            self.measure(trainer, pl_module, "fit_end")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test_end" in self.when:
            self.measure(trainer, pl_module, "test_end")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> list[LatencyRow]:
        if trainer.global_rank == 0:
            factorized = live_copy(pl_module.factorized_model)  # the module interface (lit_factor.train.module)
            dense = dense_equivalent(factorized)
            plan = pl_module.plan
            meta = {"budget": plan.budget, "kept_fraction": plan.kept_fraction} if plan is not None else {}
            settings = self.settings
            if settings.device is None:
                # Lightning's teardown moves the module to the CPU *before* on_fit_end: measure where it trained.
                settings = dataclasses.replace(settings, device=str(trainer.strategy.root_device))
            self.rows = compare_latency(dense, {"factorized": factorized}, settings, {"factorized": meta})
            self.dense_run = plan is None
            ranks = f"rank 0 of {trainer.world_size}" if trainer.world_size > 1 else "single process"
            print(self.table(title=f"inference latency at {stage} ({ranks})"), flush=True)
            self._log(trainer, stage)
        trainer.strategy.barrier("latency_callback")
        return self.rows

    def table(self, title: str = "") -> str:
        """The measurement as text: the dense-vs-factorized table, or for a dense run (no plan: the "factorized"
        model is the dense one) its latency alone -- a speedup against an identical copy would be noise."""
        if not self.dense_run:
            return format_table(self.rows, title=title)
        lines = [title] if title else []
        lines += [f"dense model (no factorization): {r.factorized_ms:.2f} ms per batch of {r.batch_size} x "
                  f"{r.seq_len} tokens (median of {r.repeats}, p90 {r.factorized_p90_ms:.2f} ms, {r.device})"
                  for r in self.rows]
        return "\n".join(lines)

    def _log(self, trainer: pl.Trainer, stage: str) -> None:
        # A text table, logged once; no one-point scalar charts (lit_factor.train.callbacks.board).
        table = self.table()
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard: the table itself, monospaced
                experiment.add_text(f"latency/{stage}", "```\n" + table + "\n```", trainer.global_step)
                logger.save()
