"""Few-shot linear evaluation: how well frozen features separate classes from k examples each.

The standard signal during ViT pretraining (big_vision's `evaluators/fewshot_lsr.py`): take the
model's pre-logits features (`aux['pre_logits']`, the pooled representation the head reads), draw k
training examples per class, fit a linear map to ±1 one-hot targets by closed-form ridge regression,
and report the accuracy of its argmax on the test split. The backbone is never trained.

  features = fewshot.extract_features(model, params, images)       # (N, D) float64
  result = fewshot.evaluate(train_x, train_y, test_x, test_y, shots=(1, 5, 10), seeds=(0, 1, 2))

Features are standardized with the k·C training examples' mean and std (as big_vision does), and an
unpenalized bias is fitted beside the weights (scikit-learn's `Ridge(alpha=λ)` is the same model). The ridge regularizer λ is chosen per shot count on a held-out part of the
shots: with k ≥ 2, k-fold cross-validation in which each fold holds out one example of every class;
the λ with the best mean held-out accuracy is refit on all k. With k = 1 nothing can be held out, so
λ = `DEFAULT_L2` is used, and the result says so. Ties go to the larger λ (the simpler model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

L2_GRID = tuple(2.0**e for e in range(-10, 11, 2))  # λ candidates, 2^-10 .. 2^10
DEFAULT_L2 = 1.0


def extract_features(model: Any, params: Any, images: np.ndarray, batch_size: int = 256):
    """`model`'s pre-logits features of `images` (N, H, W, C) in [-1, 1], as (N, D) float64."""

    @jax.jit
    def features(x):
        _, aux = model.apply({"params": params}, x, return_intermediates=True)
        return aux["pre_logits"]

    images = np.asarray(images, np.float32)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pad = batch_size - len(batch) if len(images) > batch_size else 0
        if pad:  # one compiled shape for every batch
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(features(batch), np.float64)[: len(batch) - pad])
    return np.concatenate(out)


def ridge_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float):
    """Closed-form ridge regression of ±1 one-hot targets on standardized features (+ a bias).

    Returns `predict(x_new) -> class indices`.
    """
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    design = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    penalty = np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    gram = design.T @ design + l2 * penalty
    weights = np.linalg.solve(gram, design.T @ targets)

    def predict(x_new: np.ndarray) -> np.ndarray:
        new = np.concatenate([(x_new - mean) / std, np.ones((len(x_new), 1))], axis=1)
        return np.argmax(new @ weights, axis=1)

    return predict


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of every class (shots×classes, class-major), drawn by `seed`."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(
                f"shots={shots}: class {c} has only {len(members)} training example(s); allowed: "
                f"shots up to the smallest class ({min_class_size(labels, num_classes)})"
            )
        picked.append(rng.choice(members, size=shots, replace=False))
    return np.stack(picked)  # (classes, shots)


def min_class_size(labels: np.ndarray, num_classes: int) -> int:
    return int(np.bincount(np.asarray(labels), minlength=num_classes)[:num_classes].min())


def choose_l2(x: np.ndarray, y: np.ndarray, by_class: np.ndarray, num_classes: int) -> float | None:
    """λ by k-fold cross-validation over the shots (fold i holds out shot i of every class);
    None when k = 1 (nothing to hold out)."""
    shots = by_class.shape[1]
    if shots < 2:
        return None
    scores = []
    for l2 in L2_GRID:
        correct = 0
        for fold in range(shots):
            held = by_class[:, fold]
            kept = np.delete(by_class, fold, axis=1).reshape(-1)
            predict = ridge_fit(x[kept], y[kept], num_classes, l2)
            correct += int(np.sum(predict(x[held]) == y[held]))
        scores.append(correct)
    best = max(scores)
    return max(l2 for l2, score in zip(L2_GRID, scores) if score == best)


@dataclasses.dataclass
class ShotResult:
    shots: int
    accuracy: float  # mean over seeds, on the whole test set
    accuracies: list[float]  # per seed
    l2: list[float]  # the λ used per seed
    l2_chosen_by: str  # "cross-validation on the shots" or "default (1 shot: nothing to hold out)"


def evaluate(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    shots: Sequence[int],
    seeds: Sequence[int] = (0,),
    num_classes: int | None = None,
) -> list[ShotResult]:
    """Few-shot accuracy for each shot count (mean over `seeds`); every check before any fit."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    if not shots or any(not isinstance(k, int) or k < 1 for k in shots):
        raise ValueError(f"shots={list(shots)}: expected positive integers, e.g. 1,5,10,25")
    smallest = min_class_size(train_y, num_classes)
    if max(shots) > smallest:
        raise ValueError(
            f"shots={max(shots)} is larger than the smallest class of the training split "
            f"({smallest} examples); allowed: shots up to {smallest}"
        )
    results = []
    for k in shots:
        accuracies, l2s = [], []
        for seed in seeds:
            by_class = sample_shots(train_y, k, num_classes, seed)
            chosen = choose_l2(train_x, train_y, by_class, num_classes)
            l2 = DEFAULT_L2 if chosen is None else chosen
            picked = by_class.reshape(-1)
            predict = ridge_fit(train_x[picked], train_y[picked], num_classes, l2)
            accuracies.append(float(np.mean(predict(test_x) == test_y)))
            l2s.append(l2)
        how = "default (1 shot: nothing to hold out)" if k == 1 else "cross-validation on the shots"
        results.append(ShotResult(k, float(np.mean(accuracies)), accuracies, l2s, how))
    return results
