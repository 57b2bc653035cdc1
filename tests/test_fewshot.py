"""Few-shot linear evaluation (`vit_jax.train.fewshot`, `python -m vit_jax.tools.fewshot`).

The ridge regression is checked against scikit-learn's `Ridge` on the same standardized features;
the regularizer's cross-validation against a brute-force reference; bad input is refused before
any feature is computed; the command line runs on a trained workdir.
"""

import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from vit_jax.train import fewshot


def _features(seed=0, classes=4, per_class=12, dim=6, noise=1.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 2
    labels = np.repeat(np.arange(classes), per_class)
    return centers[labels] + noise * rng.normal(size=(len(labels), dim)), labels


def _sklearn_predict(x, y, x_test, classes, l2):
    mean, std = x.mean(0), x.std(0) + 1e-6
    ridge = Ridge(alpha=l2).fit((x - mean) / std, 2.0 * np.eye(classes)[y] - 1.0)
    return ridge.predict((x_test - mean) / std).argmax(1)


@pytest.mark.parametrize("l2", [1e-3, 1.0, 64.0])
def test_ridge_fit_predicts_what_sklearn_ridge_predicts(l2):
    x, y = _features()
    x_test, _ = _features(seed=1)
    ours = fewshot.ridge_fit(x, y, 4, l2)(x_test)
    np.testing.assert_array_equal(ours, _sklearn_predict(x, y, x_test, 4, l2))


def test_evaluate_is_the_accuracy_of_the_reference_on_the_drawn_shots():
    x, y = _features(per_class=20)
    x_test, y_test = _features(seed=1, per_class=30)
    (result,) = fewshot.evaluate(x, y, x_test, y_test, shots=[5], seeds=[3])
    by_class = fewshot.sample_shots(y, 5, 4, seed=3)
    picked = by_class.reshape(-1)
    assert np.bincount(y[picked]).tolist() == [5, 5, 5, 5]  # 5 of every class
    # λ: the best mean held-out accuracy over folds that each hold out one shot per class
    scores = {}
    for l2 in fewshot.L2_GRID:
        correct = 0
        for fold in range(5):
            kept = np.delete(by_class, fold, axis=1).reshape(-1)
            held = by_class[:, fold]
            correct += (_sklearn_predict(x[kept], y[kept], x[held], 4, l2) == y[held]).sum()
        scores[l2] = correct
    best = max(l2 for l2, s in scores.items() if s == max(scores.values()))
    assert result.l2 == [best] and result.l2_chosen_by == "cross-validation on the shots"
    expected = np.mean(_sklearn_predict(x[picked], y[picked], x_test, 4, best) == y_test)
    assert result.accuracy == pytest.approx(expected)
    assert 0.25 < result.accuracy <= 1.0  # separable classes: far above chance


def test_one_shot_uses_the_stated_default_regularizer():
    x, y = _features()
    (result,) = fewshot.evaluate(x, y, x, y, shots=[1], seeds=[0, 1])
    assert result.l2 == [fewshot.DEFAULT_L2] * 2 and "nothing to hold out" in result.l2_chosen_by
    assert len(result.accuracies) == 2 and result.accuracy == pytest.approx(
        np.mean(result.accuracies)
    )


@pytest.mark.parametrize(
    "shots, message",
    [
        ([13], "shots=13 is larger than the smallest class .*12 examples"),
        ([0], "positive integers"),
    ],
)
def test_impossible_shots_are_refused_before_any_fit(shots, message):
    x, y = _features()
    with pytest.raises(ValueError, match=message):
        fewshot.evaluate(x, y, x, y, shots=shots)


def test_the_command_line_evaluates_a_workdir(tiny_workdir, digits_data_dir, tmp_path, capsys):
    from vit_jax.tools import fewshot as fewshot_cli

    out = tmp_path / "fewshot.json"
    argv = ["--checkpoint", tiny_workdir, "--dataset", "digits", "--data_dir", digits_data_dir]
    code = fewshot_cli.main([*argv, "--shots", "1,5", "--seeds", "0,1", "--json_out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "1437 train / 360 test examples, 10 classes" in printed
    assert "  5-shot: " in printed and "cross-validation on the shots" in printed
    results = json.loads(out.read_text())
    assert [r["shots"] for r in results] == [1, 5]
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["accuracies"]) == 2 for r in results)
    # digits' smallest training class has fewer than 1000 examples: refused, nothing computed
    assert fewshot_cli.main([*argv, "--shots", "1000"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("FATAL ") and "larger than the smallest class" in err
    assert len(err.splitlines()) == 1


def test_random_init_evaluates_the_architecture_with_fresh_weights(
    tiny_workdir, digits_data_dir, tmp_path, capsys
):
    """`--random_init SEED`: the baseline is the checkpoint's model with `init_params(key(SEED))`,
    evaluated exactly as the trained weights are."""
    import jax

    from vit_jax.interop import load
    from vit_jax.model.vit import VisionTransformer, init_params
    from vit_jax.tools import fewshot as fewshot_cli

    out = tmp_path / "random.json"
    argv = ["--checkpoint", tiny_workdir, "--dataset", "digits", "--data_dir", digits_data_dir]
    argv += ["--shots", "2", "--seeds", "0", "--random_init", "3", "--json_out", str(out)]
    assert fewshot_cli.main(argv) == 0
    assert "(its architecture, random weights of seed 3)" in capsys.readouterr().out

    loaded = load.load_checkpoint(tiny_workdir)
    model = VisionTransformer(loaded.config)
    params = init_params(model, jax.random.key(3))
    splits = [
        fewshot_cli.read_split("digits", split, loaded.config, digits_data_dir, 256)
        for split in ("train", "test")
    ]
    x_train, x_test = (
        fewshot.extract_features(
            model, params, fewshot_cli.to_convention(s[0], loaded.preprocessing)
        )
        for s in splits
    )
    (expected,) = fewshot.evaluate(
        x_train, splits[0][1], x_test, splits[1][1], shots=[2], seeds=[0], num_classes=10
    )
    assert json.loads(out.read_text())[0]["accuracy"] == expected.accuracy
    trained = fewshot.extract_features(
        model, loaded.params, fewshot_cli.to_convention(splits[1][0][:8], loaded.preprocessing)
    )
    assert not np.allclose(trained, x_test[:8])  # the trained weights were not used
