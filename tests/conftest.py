"""Shared test fixtures."""

import pytest


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir with the `digits` dataset prepared (offline, ~1 s), shared per session."""
    import tensorflow_datasets as tfds

    import vit_jax.tfds_builders  # noqa: F401  (registers `digits`)

    tfds.disable_progress_bar()
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digits", data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> str:
    """A config file for a 11k-parameter ViT on digits (3 steps, checkpoints at 2 and 3)."""
    from helpers import tiny_config_source

    path = tmp_path_factory.mktemp("config") / "tiny_train.py"
    path.write_text(tiny_config_source(eval_batch_size=360, total_steps=3, checkpoint_every=2))
    return str(path)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, tiny_config_path, digits_data_dir) -> str:
    """One tiny trained workdir (checkpoints at steps 2 and 3), trained in-process once per
    session; tests copy it (`shutil.copytree`) before changing anything in it."""
    from helpers import load_config

    from vit_jax import trainer

    config = load_config(tiny_config_path)
    config.data_dir = digits_data_dir
    workdir = str(tmp_path_factory.mktemp("tiny_run") / "workdir")
    trainer.train_and_evaluate(config, workdir)
    return workdir
