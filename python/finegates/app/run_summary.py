"""The end of every run, on the main process: what ``metrics.json`` holds (training results,
compression report, the compact model's metrics and latency), the per-layer plot and the
compact model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from torch import nn

from .distributed import engine
from .latency import latency_ratio, measure_latency
from ..report import compression_report

__all__ = ["finish_run"]


def _training_metrics(result: Dict[str, Any], accelerator) -> Dict[str, Any]:
    m: Dict[str, Any] = dict(result["metrics"])
    m["steps"] = result["steps"]
    m["train_time_s"] = round(result["train_time_s"], 3)
    if result.get("eval_time_s") is not None:
        m["eval_time_s"] = round(result["eval_time_s"], 3)
    m["trainable_params"] = result["trainable_params"]
    m["num_processes"] = accelerator.num_processes
    m["engine"] = engine(accelerator)
    m["device"] = accelerator.device.type
    if result.get("rank_divergence") is not None:
        m["rank_divergence"] = result["rank_divergence"]
    last = result.get("last_log") or {}
    if last:
        m["final_lambda"] = last.get("lambda")
        if last.get("keep_fraction", "") != "":
            m["final_keep_fraction"] = last.get("keep_fraction")
    return m


def _compression_metrics(model: nn.Module, out_dir: Path) -> Dict[str, Any]:
    """The compression report's totals (from the compaction plan: what the compact model has); its
    per-layer list goes to layers.json and the plot."""
    from ..files import write_json
    from .outputs import plot_layers

    rep = compression_report(model)
    plot_layers(out_dir / "sparsity_per_layer.png", rep["layers"],
                title=f"kept rows/columns/parameters per layer ({100 * rep['removed_fraction_of_gated']:.1f}% of "
                      "gated params removed in the compact model)")
    write_json(out_dir / "layers.json", rep["layers"])
    return {k: rep[k] for k in ("removed_fraction", "removed_fraction_of_gated", "params_total", "params_gated",
                                "params_removable", "params_removed_ungated", "params_compact")}


def _compact_metrics(model: nn.Module, lat_batch, eval_compact: Optional[Callable], tokenizer, out_dir: Path,
                     accelerator) -> Dict[str, Any]:
    """Compacts ``model`` in place, evaluates and times it against the dense model (the same weights
    without gates, :func:`~finegates.sparsify.dense_view`), saves it. The
    compact model is evaluated under the run's autocast, as the gated model was, so that the two
    metrics compare (``--mixed-precision bf16``)."""
    from ..compaction.compact import compact
    from ..compaction.serialize import save_compact
    from ..sparsify import dense_view

    dense_model = dense_view(model).eval()
    t = time.perf_counter()
    model_c = compact(model.eval(), progress=True).eval()
    m: Dict[str, Any] = {"compact_time_s": round(time.perf_counter() - t, 3),
                         "compact_model_params": sum(p.numel() for p in model_c.parameters())}
    if eval_compact is not None:
        t = time.perf_counter()
        with accelerator.autocast():
            m.update({f"compact_{k}": v for k, v in eval_compact(model_c).items()})
        m["compact_eval_time_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    lat = latency_ratio(*measure_latency([dense_model, model_c], lat_batch))
    m["latency_time_s"] = round(time.perf_counter() - t, 3)
    m.update(latency_batch=list(lat_batch["input_ids"].shape), latency_dense_ms=round(1e3 * lat["base_s"], 3),
             latency_compact_ms=round(1e3 * lat["other_s"], 3), latency_ratio=lat["ratio"],
             latency_ratio_quartiles=[lat["ratio_q1"], lat["ratio_q3"]], latency_reps=lat["reps"],
             latency_noisy=lat["noisy"], speedup=1.0 / lat["ratio"])
    save_compact(model_c, out_dir / "compact", tokenizer=tokenizer)
    return m


def finish_run(args, accelerator, raw_model, result, *, gated, tokenizer, lat_batch,
               eval_compact, extra: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """Main process: compression report, plot, compaction, latency, compact model, metrics.json."""
    from ..files import write_json

    metrics: Dict[str, Any] = dict(extra)
    metrics.update(_training_metrics(result, accelerator))
    if gated:
        metrics.update(_compression_metrics(raw_model, out_dir))
    if gated and not args.no_compact:
        metrics.update(_compact_metrics(raw_model, lat_batch, eval_compact, tokenizer, out_dir, accelerator))
    else:
        metrics["latency_ratio"] = None
    write_json(out_dir / "metrics.json", metrics)
    return metrics
