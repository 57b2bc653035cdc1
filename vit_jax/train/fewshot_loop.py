"""Few-shot linear evaluation inside the training loop (`config.fewshot`; the ridge regression
itself is `vit_jax.train.fewshot`).

  runner = fewshot_loop.prepare(config, model, mesh, params_shardings)   # None when off
  results = runner.evaluate(params)   # {'digits_1shot': 0.41, 'digits_5shot': 0.83, ...}

`prepare` opens each few-shot dataset (`config.fewshot.datasets`, () = the run's own) and reads its
train and test splits once, whole and un-augmented, through the eval path: padded, masked batches at
the run's image size, each process holding only its rows, so every example counts exactly once on
any topology. The host batches are kept (the splits are meant to be small, e.g. 'train[:5000]'), and
the shots are checked against the smallest class of each train split there, before any step runs.

`evaluate` puts the kept batches on the mesh with evaluation's sharding, computes the pre-logits
features in one jitted function whose output is replicated (so every process receives all
features, gathered once per evaluation), drops the padding, and runs `fewshot.evaluate` on the
host: every process computes the same accuracies; process 0 logs them.

The examples reach `fewshot.evaluate` in the split's own order on any topology: each process reads
a contiguous share of the split (`tfds.even_splits`), so a global batch interleaves the shares, and
the shots a seed draws would depend on the process count. Each row carries its (process, row)
through the gather, and the examples are put back in (process, batch, row) order: the split's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from vit_jax import sharding
from vit_jax.train import fewshot


@dataclasses.dataclass
class _Split:
    batches: list[dict[str, np.ndarray]]  # this process's rows of each padded eval batch
    labels: np.ndarray  # every real example's class index (all processes), in batch order


@dataclasses.dataclass
class _Task:
    name: str  # the prefix of its metric names, e.g. 'digits'
    num_classes: int
    train: _Split
    test: _Split


def metric_name(task: str, shots: int) -> str:
    return f"{task}_{shots}shot"


def _short_name(dataset: str) -> str:
    """'digits' → 'digits'; an image folder '/data/flowers/' → 'flowers'; 'cifar10:3.0.2' → 'cifar10'."""
    name = os.path.basename(str(dataset).rstrip("/")) or str(dataset)
    return name.split(":")[0].replace("/", "_")


def _read_split(config: ml_collections.ConfigDict, dataset: str, split: str):
    """(_Split, num_classes) of `split` read through the eval pipeline of `config`'s run."""
    from vit_jax import data as data_lib  # TensorFlow loads only when few-shot is on

    split_config = ml_collections.ConfigDict(config.to_dict())
    split_config.dataset, split_config.eval_split = dataset, split
    data = data_lib.get_datasets(split_config)
    batches = []
    for batch in data.eval_iter():
        rows = len(batch["image"])
        batches.append(
            {
                "image": np.asarray(batch["image"]),
                "label": np.asarray(batch["label"]).argmax(-1).astype(np.int32),
                "mask": np.asarray(batch["mask"]).astype(np.float32),
                # where the row came from: puts the examples back in the split's order
                "process": np.full((rows,), jax.process_index(), np.int32),
                "row": np.arange(rows, dtype=np.int32),
            }
        )
    return batches, data.num_classes


def _in_split_order(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Per batch (values..., process, row, mask) → each value's real rows, concatenated in
    (process, batch, row) order: the order of the split (the module docstring says why)."""
    values, keys = [], []
    for index, (*arrays, process, row, mask) in enumerate(parts):
        real = np.asarray(mask) > 0
        values.append([np.asarray(a)[real] for a in arrays])
        keys.append(np.stack([process[real], np.full(real.sum(), index), row[real]], -1))
    keys = np.concatenate(keys)
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
    return tuple(np.concatenate(column)[order] for column in zip(*values, strict=True))


def prepare(
    config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh, params_shardings: Any
) -> FewshotRunner | None:
    """The few-shot evaluation of the run, its splits read; None when `fewshot.every_steps` is 0.

    Raises ValueError (naming the field, the dataset and the smallest class) when a shot count is
    larger than a class of a train split, before any training compute.
    """
    settings = config.get("fewshot")
    if settings is None or not settings.every_steps:
        return None
    runner = FewshotRunner(settings, model, mesh, params_shardings)
    shots = tuple(settings.shots)
    for dataset in tuple(settings.datasets) or (config.dataset,):
        splits = {}
        for role, split in (
            ("train", settings.train_split or config.train_split),
            ("test", settings.test_split or config.eval_split),
        ):
            batches, num_classes = _read_split(config, dataset, split)
            labels = runner.gather_labels(batches)
            splits[role] = _Split(batches, labels)
        smallest = fewshot.min_class_size(splits["train"].labels, num_classes)
        if max(shots) > smallest:
            raise ValueError(
                f"config.fewshot.shots={shots} is invalid: {dataset!r} "
                f"{settings.train_split or config.train_split} has a class of only {smallest} "
                f"examples; allowed: shots up to {smallest}"
            )
        runner.tasks.append(_Task(_short_name(dataset), num_classes, **splits))
    return runner


class FewshotRunner:
    """The few-shot tasks of a run and the jitted feature function over its mesh."""

    def __init__(self, settings, model, mesh, params_shardings):
        self.every_steps = int(settings.every_steps)
        self.shots = tuple(int(k) for k in settings.shots)
        self.seeds = tuple(int(s) for s in settings.seeds)
        self.mesh = mesh
        self.tasks: list[_Task] = []
        replicated = sharding.replicated(mesh)
        batch_sharding = sharding.batch_sharding(mesh)

        def where(batch):
            return batch["process"], batch["row"], batch["mask"]

        def features(params, batch):
            _, aux = model.apply({"params": params}, batch["image"], return_intermediates=True)
            return aux["pre_logits"], *where(batch)

        self._features = jax.jit(
            features, in_shardings=(params_shardings, batch_sharding), out_shardings=replicated
        )
        self._gather = jax.jit(
            lambda batch: (batch["label"], *where(batch)),
            in_shardings=(batch_sharding,),
            out_shardings=replicated,
        )

    def gather_labels(self, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The real examples' labels of every process's rows, in the split's order."""
        parts = [self._gather(sharding.make_global_batch(b, self.mesh)) for b in batches]
        (labels,) = _in_split_order([tuple(map(np.asarray, p)) for p in parts])
        return labels

    def _features_of(self, params, split: _Split) -> np.ndarray:
        parts = [
            self._features(params, sharding.make_global_batch(b, self.mesh)) for b in split.batches
        ]
        (features,) = _in_split_order([tuple(map(np.asarray, p)) for p in parts])
        return features.astype(np.float64)

    def evaluate(self, params) -> tuple[dict[str, float], list[str]]:
        """({'<dataset>_<k>shot': accuracy (mean over seeds)}, one text part per dataset)."""
        results, parts = {}, []
        for task in self.tasks:
            train_x = self._features_of(params, task.train)
            test_x = self._features_of(params, task.test)
            shot_results = fewshot.evaluate(
                train_x,
                task.train.labels,
                test_x,
                task.test.labels,
                shots=self.shots,
                seeds=self.seeds,
                num_classes=task.num_classes,
            )
            shown = []
            for r in shot_results:
                results[metric_name(task.name, r.shots)] = r.accuracy
                shown.append(f"{r.shots}-shot {100 * r.accuracy:.2f}%")
            parts.append(f"{task.name} " + " | ".join(shown))
        return results, parts


def format_fewshot(step: int, parts: list[str], seeds: tuple[int, ...]) -> str:
    """`few-shot at step S: digits 1-shot A% | 5-shot B% (mean of seeds (0,); ridge)`."""
    return (
        f"few-shot at step {step}: {'; '.join(parts)} (linear ridge on frozen features, mean of "
        f"{len(seeds)} draw(s) of the shots)"
    )
