"""Evaluation: the metrics reported on the eval split (`METRICS`) and one pass over it (`evaluate`).

Every metric is a fraction of the real examples: a per-example value in [0, 1] that
`train_step.make_eval_step` sums over the batch with padding masked out, and `evaluate` divides
once by the number of real examples, so every example counts exactly once on any topology. The
loss (the training loss, `config.loss`) is always reported beside them.

A new metric: one per-example function here and its line in `METRICS`; the eval step, the
eval line, metrics.jsonl / TensorBoard and curves.png pick it up from the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from vit_jax import progress, sharding


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1 where the highest logit is the label's (labels: int class indices)."""
    return jnp.argmax(logits, axis=-1) == labels


def top5_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1 where the label is among the 5 highest logits (all of them with fewer classes)."""
    k = min(5, logits.shape[-1])
    return jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)


@dataclasses.dataclass(frozen=True)
class Metric:
    # (logits (B, K), int labels (B,)) -> (B,) per-example values in [0, 1]
    per_example: Callable[[jax.Array, jax.Array], jax.Array]
    min_classes: int = 1  # reported only for datasets with at least this many classes


METRICS = {
    "top1": Metric(top1_correct),
    "top5": Metric(top5_correct, min_classes=5),  # with fewer classes it would always be 1
}


def get_metrics(names: Iterable[str]) -> dict[str, Metric]:
    """The named entries of `METRICS`; an unknown name is an error naming the allowed ones."""
    names = list(names)
    if unknown := [n for n in names if n not in METRICS]:
        raise ValueError(f"unknown eval metric(s) {unknown}; allowed: {sorted(METRICS)}")
    return {n: METRICS[n] for n in names}


def evaluate(eval_step, params, data, mesh) -> dict[str, float]:
    """loss and each metric of `METRICS` (that the class count allows) over the whole eval split.

    `eval_step` is `train_step.make_eval_step`'s; each example counts once, padding not at all.
    """
    totals = None
    with progress.bar(getattr(data, "num_eval_batches", None), "eval", unit="batch") as bar:
        for batch in sharding.prefetch_to_device(data.eval_iter(), mesh):
            sums = eval_step(params, batch)
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
            bar.update(1)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    if count == 0:
        raise ValueError("the eval split is empty")
    results = {"loss": totals["loss"] / count}
    for name, metric in METRICS.items():
        if name in totals and data.num_classes >= metric.min_classes:
            results[name] = totals[name] / count
    results["count"] = count
    return {k: float(v) for k, v in results.items()}


def format_eval(step: int, results: dict[str, float], ema: dict[str, float] | None = None) -> str:
    """`eval at step S: loss L | top1 A% | top5 B% (N examples)`, and with `ema` (the EMA weights'
    results) `... (N examples); EMA weights: loss L | top1 A% | top5 B%`."""

    def shown(values):
        metrics = "".join(f" | {n} {100 * values[n]:.2f}%" for n in METRICS if n in values)
        return f"loss {values['loss']:.4f}{metrics}"

    line = f"eval at step {step}: {shown(results)} ({int(results['count'])} examples)"
    return line + (f"; EMA weights: {shown(ema)}" if ema else "")
