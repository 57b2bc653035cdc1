"""`fractaldb`: formula-driven fractal images (FractalDB-style IFS), generated offline, any size.

    import vit_jax.data.builders  # registers the builder
    ds = tfds.load('fractaldb/c100_i100_r32', split='train', data_dir=...)
    python train.py ... --config.dataset=fractaldb/c1000_i1000_r224 --config.data_dir=DIR

Categories and instances follow Kataoka et al. 2020 (`fractal_ifs.py` describes the rule: random
IFS of 2-8 affine maps kept when their filling rate reaches 0.2; instances by weighting one
parameter, random colours, flip and patch). Config names are `c<classes>_i<instances>_r<resolution>`
with optional `_t<test instances per class>` (default instances // 10, within 1..10), `_s<seed>`
(default 0) and `_tfrecord` (store TFRecords; default ArrayRecord, which the input pipeline reads
by index in one global order). Any such name works, e.g. `fractaldb/c37_i20_r48_s3`; the listed
`BUILDER_CONFIGS` are the toy (`c100_i100_r32`, the default), FractalDB-1k and -10k and a 21k-class
set. Splits: `train` (instances 0..I-1 of each class) and `test` (T further instances, drawn
independently). `info.metadata['candidates']` holds, per label, the index of the candidate IFS
that became it (its maps are `fractal_ifs.candidate(seed, index)`).

Deterministic: every image is a function of (seed, label, split, instance number) alone, so the
same name gives the same bytes whatever the number of worker processes (`workers=`, default one
per core available); the stored order is TFDS's fixed shuffle of the keys. (Across installations
the pixels stay the same as long as NumPy's random streams do; the PNG bytes also depend on the
zlib that Pillow uses.)
Preparation draws a bar per split and logs the speed at the end.

Prepare one ahead of training (e.g. once into a pod's shared data dir; the trainer otherwise
prepares it on first use, with one worker per core)::

    python -c "import vit_jax.data.builders, tensorflow_datasets as tfds; tfds.builder(
        'fractaldb/c1000_i1000_r224', data_dir='DIR', workers=16).download_and_prepare()"

Speed, measured here as CPU time inside the workers (render + PNG: the "per core" figure of the
printed line) on this project's 2-core machine: 32 px 1,296 images/s per core idle (2026-12-03,
`c100_i300_r32`: 30,000 train images in 12.7 s wall with 2 workers), 224 px 48 idle
(`c10_i2500_r224`: 25,000 images in 269 s, ~13 KB of PNG each); under load (~7, 2026-12-02)
32 px 370-560, 64 px ~195 and 224 px ~23 (one core, `fractal_ifs.instance` + `png` alone).
Finding the categories costs ~7 ms per candidate IFS, ~4.5 candidates per kept category.

Disk: before generating, the data dir must hold images x resolution^2 x 3 bytes (raw pixels: an
upper bound on the PNGs, measured at 9-27 % of raw, plus TFDS's temporary copy while it
shuffles); else a clear error names the bytes needed. An interrupted preparation leaves only a
TFDS `incomplete.*` directory, never read; a rerun starts over in a fresh one (a warning names the
leftovers to delete once no other process is preparing).
"""

import dataclasses
import math
import multiprocessing
import os
import re
import shutil
import signal
import time
import warnings

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from vit_jax import progress
from vit_jax.data.builders import fractal_ifs
from vit_jax.data.builders.own_progress import OwnProgress

MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024
MAX_TEST_INSTANCES = 10
FILE_FORMATS = ("array_record", "tfrecord")
_NAME = re.compile(r"c(\d+)_i(\d+)_r(\d+)(?:_t(\d+))?(?:_s(\d+))?(_tfrecord)?")
_GRAMMAR = (
    "c<classes>_i<instances per class>_r<resolution>[_t<test instances per class>][_s<seed>]"
    "[_tfrecord], e.g. 'c100_i100_r32' or 'c1000_i1000_r224_s1'"
)
_TASK_IMAGES = 64  # Images per task handed to a worker.
_ACCEPTANCE_GUESS = 0.15  # Share of candidates kept (measured ~0.22), for sizing search rounds.


@dataclasses.dataclass(eq=False)
class FractalConfig(tfds.core.BuilderConfig):
    """One fractal dataset: its size, resolution, seed and file format."""

    num_classes: int = 100
    instances: int = 100
    resolution: int = 32
    test_instances: int = 10
    seed: int = 0
    file_format: str = "array_record"

    @property
    def num_images(self) -> int:
        return self.num_classes * (self.instances + self.test_instances)

    def bytes_needed(self) -> int:
        """Free space asked for before generating (the module docstring says why)."""
        return self.num_images * self.resolution**2 * 3


def default_test_instances(instances) -> int:
    """Test images per class when the name does not say: instances // 10, within 1..10."""
    return int(np.clip(instances // 10, 1, MAX_TEST_INSTANCES)) if isinstance(instances, int) else 1


def make_config(
    num_classes: int,
    instances: int,
    resolution: int,
    test_instances: int | None = None,
    seed: int = 0,
    file_format: str = "array_record",
) -> FractalConfig:
    """A checked `FractalConfig` named by the grammar (so `fractaldb/<name>` finds it again)."""
    if test_instances is None:
        test_instances = default_test_instances(instances)
    checks = [
        ("classes", num_classes, 2, None, "classification needs at least 2 classes"),
        ("instances", instances, 1, None, "each class needs at least one train image"),
        ("test instances", test_instances, 1, None, "the test split needs one image per class"),
        ("resolution", resolution, MIN_RESOLUTION, MAX_RESOLUTION, "pixels per side"),
        ("seed", seed, 0, None, "a non-negative integer"),
    ]
    for what, value, low, high, meaning in checks:
        ok = (
            isinstance(value, int | np.integer) and value >= low and (high is None or value <= high)
        )
        if not ok:
            allowed = f"{low}..{high}" if high else f">= {low}"
            raise ValueError(
                f"fractaldb: {what}={value!r} is invalid: allowed {allowed} ({meaning})."
            )
    if file_format not in FILE_FORMATS:
        raise ValueError(f"fractaldb: file_format={file_format!r}; allowed: {list(FILE_FORMATS)}.")
    name = f"c{num_classes}_i{instances}_r{resolution}"
    name += f"_t{test_instances}" if test_instances != default_test_instances(instances) else ""
    name += f"_s{seed}" if seed else ""
    name += "_tfrecord" if file_format == "tfrecord" else ""
    return FractalConfig(
        name=name,
        description=(
            f"{num_classes} fractal classes x ({instances} train + {test_instances} test) images "
            f"of {resolution} px, seed {seed}, {file_format}."
        ),
        num_classes=int(num_classes),
        instances=int(instances),
        resolution=int(resolution),
        test_instances=int(test_instances),
        seed=int(seed),
        file_format=file_format,
    )


def parse_name(name: str) -> FractalConfig:
    """The config a name of the grammar stands for; ValueError naming the grammar otherwise."""
    match = _NAME.fullmatch(name)
    if not match:
        raise ValueError(f"fractaldb config name {name!r} is invalid; the grammar is {_GRAMMAR}.")
    classes, instances, resolution, test, seed, tfrecord = match.groups()
    return make_config(
        int(classes),
        int(instances),
        int(resolution),
        None if test is None else int(test),
        int(seed or 0),
        "tfrecord" if tfrecord else "array_record",
    )


def resolution_of(dataset: str) -> int | None:
    """The resolution in a `config.dataset` value 'fractaldb/<name>' (None for other datasets)."""
    head, _, name = dataset.partition("/")
    return parse_name(name.split(":")[0]).resolution if head == "fractaldb" and name else None


class FractalDB(OwnProgress, tfds.core.GeneratorBasedBuilder):
    """FractalDB-style fractal categories (the module docstring has the details)."""

    name = "fractaldb"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        make_config(100, 100, 32),  # the toy: 10,000 train images, ~25 CPU seconds
        make_config(1000, 100, 32),
        make_config(1000, 1000, 224),  # FractalDB-1k
        make_config(10000, 1000, 224),  # FractalDB-10k
        make_config(21000, 1000, 224),  # 21k classes, as ExFractalDB-21k
    ]

    @classmethod
    def get_builder_config(cls, name, version=None):
        # Any name of the grammar, not only the listed ones.
        return super().get_builder_config(name, version) or parse_name(name)

    def __init__(self, *, workers: int | None = None, **kwargs):
        config = kwargs.get("config")
        if isinstance(config, FractalConfig):
            kwargs["config"] = config = config.name  # a listed or parsed name: found again
        name = (config or self.BUILDER_CONFIGS[0].name).split(":")[0]
        file_format = self.get_builder_config(name).file_format
        asked = kwargs.get("file_format")
        if asked is not None and tfds.core.FileFormat.from_value(asked).value != file_format:
            raise ValueError(
                f"fractaldb/{name} is stored as {file_format}; for the other format use the name "
                f"{'without' if file_format == 'tfrecord' else 'with'} the '_tfrecord' suffix."
            )
        kwargs["file_format"] = file_format
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"fractaldb: workers={workers!r} is invalid: allowed >= 1.")
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self._workers = workers or (len(cores) if cores else os.cpu_count() or 1)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(c.resolution, c.resolution, 3), encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=c.num_classes),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://hirokatsukataoka16.github.io/Pretraining-without-Natural-Images/",
            citation="Kataoka et al., Pre-training without Natural Images, ACCV 2020.",
            metadata=tfds.core.MetadataDict(),
        )

    def download_and_prepare(self, *args, **kwargs):
        if not self.is_prepared():
            check_space(self.builder_config, os.fspath(self.data_path))
            _warn_leftovers(os.fspath(self.data_path))
        return super().download_and_prepare(*args, **kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the images come from formulas.
        c = self.builder_config
        categories = find_categories(c.seed, c.num_classes, self._workers)
        self.info.metadata["candidates"] = [index for index, _ in categories]
        maps = [m for _, m in categories]
        return {
            "train": self._generate_examples(maps, 0, c.instances, "train"),
            "test": self._generate_examples(maps, 1, c.test_instances, "test"),
        }

    def _generate_examples(self, maps, split, per_class, split_name):
        c = self.builder_config
        tasks = [
            (c.seed, c.resolution, split, label, m, start, min(start + _TASK_IMAGES, per_class))
            for label, m in enumerate(maps)
            for start in range(0, per_class, _TASK_IMAGES)
        ]
        total, cpu_seconds, began = len(maps) * per_class, 0.0, time.perf_counter()
        with (
            progress.bar(total, f"fractaldb {split_name}", unit="image", leave=True) as bar,
            _pool(self._workers) as pool,
        ):
            for (_, _, _, label, _, start, _), (images, seconds) in zip(
                tasks, _bounded_imap(pool, render_task, tasks, self._workers), strict=True
            ):
                cpu_seconds += seconds
                for offset, image in enumerate(images):
                    number = start + offset
                    yield label * per_class + number, {"image": image, "label": label}
                bar.update(len(images))
        wall = time.perf_counter() - began
        progress.log(
            f"fractaldb/{c.name} {split_name}: {total:,} images in {wall:.1f} s with "
            f"{self._workers} worker(s): {total / wall:.0f} images/s, "
            f"{total / max(cpu_seconds, 1e-9):.0f} images/s per core (CPU time)"
        )


def render_task(task) -> tuple[list[bytes], float]:
    """A worker's task: PNGs of instances start..stop-1 of one class, and the CPU seconds spent."""
    seed, resolution, split, label, maps, start, stop = task
    began = time.process_time()
    images = [
        fractal_ifs.png(fractal_ifs.instance(maps, seed, label, split, n, resolution))
        for n in range(start, stop)
    ]
    return images, time.process_time() - began


def _search_task(task):
    return fractal_ifs.find_categories(*task)


def find_categories(seed: int, count: int, workers: int = 1) -> list[tuple[int, np.ndarray]]:
    """The first `count` accepted candidate IFS of `seed`, as (candidate index, maps), in index
    order: the same whatever `workers` is (rounds of contiguous candidate ranges)."""
    found, start, chunk = [], 0, 32
    with (
        progress.bar(count, "fractaldb categories", unit="class", leave=True) as bar,
        _pool(workers) as pool,
    ):
        while len(found) < count:
            wanted = math.ceil((count - len(found)) / _ACCEPTANCE_GUESS)
            stop = start + max(wanted, workers * chunk)
            ranges = [(seed, a, min(a + chunk, stop)) for a in range(start, stop, chunk)]
            for accepted in pool.imap(_search_task, ranges):
                kept = accepted[: count - len(found)]
                found += kept
                bar.update(len(kept))
            start = stop
    return found


def _bounded_imap(pool, fn, tasks, workers):
    """`pool.imap(fn, tasks)`, in order, with at most ~16 tasks per worker in flight: results
    never pile up in memory when the writer is slower than the workers."""
    window = 16 * workers
    for start in range(0, len(tasks), window):
        yield from pool.imap(fn, tasks[start : start + window])


class _InProcess:
    """`multiprocessing.Pool`'s imap for one worker, without a process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, iterable):
        return map(fn, iterable)


def _pool(workers: int):
    if workers <= 1:
        return _InProcess()
    # fork: workers start at once (spawn would import TensorFlow again in each, ~10 s). They run
    # numpy and PIL only, never JAX or TF, so JAX's warning about forking a threaded process does
    # not apply to them.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
        return context.Pool(workers, initializer=_worker_signals)


def _worker_signals():
    # The parent's handlers (the trainer saves on SIGTERM / Ctrl-C) are not the workers': they
    # die on SIGTERM (pool.terminate) and leave Ctrl-C to the parent.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_space(config: FractalConfig, directory: str) -> None:
    """OSError naming the bytes needed when the file system of `directory` has fewer free."""
    if "://" in directory:
        return  # Cloud storage: no free-space figure to check.
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free, needed = shutil.disk_usage(existing).free, config.bytes_needed()
    if free < needed:
        raise OSError(
            f"fractaldb/{config.name}: not enough free space in {existing!r} to generate it: "
            f"{needed:,} bytes needed ({config.num_images:,} images x {config.resolution}^2 x 3), "
            f"{free:,} free. Free space there or set config.data_dir to a larger disk."
        )


def _warn_leftovers(version_dir: str) -> None:
    parent = os.path.dirname(version_dir.rstrip("/"))
    if "://" in parent or not os.path.isdir(parent):
        return
    leftovers = [os.path.join(parent, d) for d in os.listdir(parent) if d.startswith("incomplete.")]
    if leftovers:
        logging.warning(
            "fractaldb: %d directory(ies) of interrupted preparations are never read and can be "
            "deleted once no other process is preparing this dataset: %s",
            len(leftovers),
            leftovers,
        )
