"""Shared test fixtures."""

import os

import jax
import pytest

# No test probes public hosts: an unprepared TFDS dataset's network check (data/sources.py) tries
# this closed local port instead, in this process and every process a test starts.
os.environ["VIT_JAX_NETWORK_PROBES"] = "127.0.0.1:9"


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
    """JAX's persistent compilation cache for every test of the session (the processes they start
    get it through helpers.subprocess_env): many tests compile the same tiny steps, and a repeat is
    then a load. The previous settings come back at the end of the session."""
    from helpers import COMPILE_CACHE

    settings = {
        "jax_compilation_cache_dir": COMPILE_CACHE,
        "jax_persistent_cache_min_compile_time_secs": 0,
    }
    before = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.fixture(scope="session")
def digits_array_record_dir(tmp_path_factory) -> str:
    """`digits` prepared as ArrayRecord (the random-access layout of large splits): with
    `in_memory_max_bytes=0` its train split goes through the by-index path."""
    import tensorflow_datasets as tfds

    import vit_jax.data.builders  # noqa: F401  (registers `digits`)

    tfds.disable_progress_bar()
    data_dir = str(tmp_path_factory.mktemp("tfds_array_record"))
    tfds.builder("digits", data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir with the `digits` dataset prepared (offline, ~1 s), shared per session."""
    import tensorflow_datasets as tfds

    import vit_jax.data.builders  # noqa: F401  (registers `digits`)

    tfds.disable_progress_bar()
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digits", data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="session")
def tiny_config_path() -> str:
    """The tiny recipe as a `--config` value: `<repo>/configs/digits.py:tiny` (helpers.TINY_CONFIG:
    an 11k-parameter ViT on digits, 3 steps, checkpoints at 2 and 3)."""
    from helpers import TINY_CONFIG

    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, digits_data_dir) -> str:
    """One run of the tiny recipe (checkpoints at steps 2 and 3), trained in-process once per
    session; tests copy it (`shutil.copytree`) before changing anything in it."""
    from helpers import tiny_recipe

    from vit_jax.train import trainer

    config = tiny_recipe()
    config.data_dir = digits_data_dir
    workdir = str(tmp_path_factory.mktemp("tiny_run") / "workdir")
    trainer.train_and_evaluate(config, workdir)
    return workdir
