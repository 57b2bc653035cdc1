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
