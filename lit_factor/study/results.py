"""What one finished ``fit`` left in its run directory, as one flat dict (stored with the trial).

The run directory is described in docs/studies/README.md: ``summary.json`` when the fit wrote one, else the TensorBoard
event files (``val/<metric>`` per epoch, ``train/loss`` per step, ``params/*``, ``factorize/kept_fraction``,
``latency/*``), plus ``stability.json`` when a StabilityMonitor ran. Everything a report needs is copied into the
result (the loss curve downsampled), so that a report works from the study database alone, on any machine.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

#: points kept of the training-loss curve
CURVE_POINTS = 200


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """TensorBoard scalars of a run: tag -> [(step, value, wall_time)] (empty without event files)."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    # a run carried on from a checkpoint (study/carry_on.py) logs again from that step: the reader purges the dead
    # try's later events as meant, and warns about a "TensorFlow restart" in the study's output unless told not to
    quiet = logging.getLogger("tensorboard")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        acc.Reload()
    finally:
        quiet.setLevel(level)
    return {tag: [(e.step, float(e.value), e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The result of one run (keys documented in docs/studies/README.md); ``{}`` when the directory holds nothing.

    The dev metric that counts is the one the fit's checkpointing monitored (``checkpoint.monitor`` in its
    ``config.yaml``, linked by the CLI to the task's main metric).
    """
    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir)
    summary = read_json(run_dir / "summary.json")
    config = read_config(run_dir)
    result = _from_summary(summary) if summary else _from_scalars(scalars, config.pop("monitor", None))
    stability = read_json(run_dir / "stability.json") or (summary or {}).get("stability")
    if stability is not None:
        result["stability"] = stability
        result["succeeded"] = bool(stability.get("succeeded"))
        result["diverged"] = bool(stability.get("diverged"))
    config.pop("monitor", None)
    result["config"] = config or None
    loss = scalars.get("train/loss_step") or scalars.get("train/loss") or []
    if loss:
        result["train_loss"] = downsample([(s, v) for s, v, _ in loss], CURVE_POINTS)
    return {k: v for k, v in result.items() if v is not None}


#: summary.json keys read into named results; any other number (or {"value": number}) becomes an extra column
_SUMMARY_KEYS = {"status", "reasons", "task", "monitor", "best", "final", "best_checkpoint", "train_time_s", "params",
                 "stability", "latency", "resumed_from"}


def _extras(summary: dict) -> dict[str, float]:
    """Numbers a newer fit adds to summary.json (e.g. a dev metric measured right after projection)."""
    out = {}
    for key, value in summary.items():
        value = value.get("value") if isinstance(value, dict) else value
        if key not in _SUMMARY_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
    return out


def _from_summary(summary: dict) -> dict[str, Any]:
    params = summary.get("params") or {}
    latency = summary.get("latency") or {}
    best, final = summary.get("best") or {}, summary.get("final") or {}
    return {
        "monitor": summary.get("monitor"), "final": final.get("value"), "best": best.get("value"),
        "best_epoch": best.get("epoch"), "final_metrics": final.get("metrics"),
        "params_dense_model": params.get("dense_model"), "params_factorized_model": params.get("factorized_model"),
        "params_targeted_dense": params.get("targeted_dense"),
        "params_targeted_factorized": params.get("targeted_factorized"),
        "kept_fraction": params.get("kept_fraction"), "model_kept_fraction": params.get("model_kept_fraction"),
        "train_time_s": summary.get("train_time_s"), "latency_speedup": latency.get("speedup"),
        "latency_setting": (f"{latency.get('device', '?')}, batch {latency.get('batch_size')} x "
                            f"{latency.get('seq_len')} tokens") if latency else None,
        "succeeded": summary.get("status") == "succeeded" if summary.get("status") else None,
        "extra": _extras(summary) or None,
    }


def _last(scalars: dict, tag: str) -> float | None:
    points = scalars.get(tag)
    return points[-1][1] if points else None


def _from_scalars(scalars: dict, monitor: str | None) -> dict[str, Any]:
    if not scalars:
        return {}
    result: dict[str, Any] = {"monitor": monitor}
    result["final_metrics"] = {tag: pts[-1][1] for tag, pts in scalars.items() if tag.startswith("val/")}
    curve = scalars.get(monitor or "", [])
    if curve:
        pick = min if monitor.endswith("loss") else max
        best_i = pick(range(len(curve)), key=lambda i: _finite_or(curve[i][1], pick is max))
        result.update(final=curve[-1][1], best=curve[best_i][1], best_epoch=best_i)
    for name in ("dense_model", "factorized_model", "targeted_dense", "targeted_factorized"):
        result[f"params_{name}"] = _last(scalars, f"params/{name}")
    result["kept_fraction"] = _last(scalars, "factorize/kept_fraction")
    dense, factorized = result["params_dense_model"], result["params_factorized_model"]
    result["model_kept_fraction"] = factorized / dense if dense and factorized else None
    speedups = [pts[-1][1] for tag, pts in scalars.items() if tag.startswith("latency/") and tag.endswith("speedup")]
    result["latency_speedup"] = speedups[0] if speedups else None
    times = [t for pts in scalars.values() for _, _, t in pts]
    result["train_time_s"] = max(times) - min(times) if times else None
    return result


def _finite_or(value: float, for_max: bool) -> float:
    return value if math.isfinite(value) else (-math.inf if for_max else math.inf)


def downsample(points: list[tuple[int, float]], n: int) -> list[list[float]]:
    """At most ``n`` evenly spaced points of a curve (first and last kept), as JSON-friendly pairs."""
    if len(points) <= n:
        return [[s, v] for s, v in points]
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [[points[i][0], points[i][1]] for i in idx]


#: StagingCallback arguments that make up a staging schedule's label
_SCHEDULE = ("granularity", "order", "every_n_steps", "every_n_epochs", "spread", "offset")


def config_facts(config: dict) -> dict[str, Any]:
    """The settings a report groups by, from a run's ``config.yaml`` (whatever the grid axes were called)."""
    model, data, trainer = config.get("model") or {}, config.get("data") or {}, config.get("trainer") or {}
    monitor = (config.get("checkpoint") or {}).get("monitor")
    factorization = model.get("factorization") or {}
    method = factorization.get("method") or "none"
    teacher = (model.get("distillation") or {}).get("teacher")
    staging = [cb for cb in trainer.get("callbacks") or []
               if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("StagingCallback")]
    schedule = staging[0].get("init_args") or {} if staging else {}
    return {
        "task": data.get("task"), "model": model.get("model_name_or_path"), "method": method,
        "budget": factorization.get("budget") if method != "none" else None,
        "staged": bool(staging),
        "schedule": ", ".join(f"{k}={schedule[k]}" for k in _SCHEDULE if schedule.get(k) is not None) or None,
        "learning_rate": model.get("learning_rate"), "max_train_samples": data.get("max_train_samples"),
        "max_seq_length": data.get("max_seq_length"), "max_epochs": trainer.get("max_epochs"),
        "max_steps": trainer.get("max_steps"), "monitor": monitor,
        "teacher": str(teacher) if teacher else None,  # distillation's teacher ("self", a checkpoint, a model)
    }


def read_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        return config_facts(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
    except (OSError, ValueError):
        return {}
