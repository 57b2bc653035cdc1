"""`input_benchmark --reader_stages`: each stage of the by-index (ArrayRecord) train path, timed.

Rows, all in examples (images) per second, medians of `--rounds` interleaved rounds (on a shared
machine single runs vary by tens of percent, so every variant is timed once per round):
  read, in this process   whole steps of undecoded examples by index (`StepReader`): what one
                          Python thread reads, i.e. the `reader='tf'` path's ceiling (its reads
                          run inside `tf.numpy_function`, under the GIL)
  read, N Grain worker(s) the same steps from `grain_reader.step_stream` with N worker processes
  pipeline, ...           `Data.train_iter()` (read, decode, augment, batch) with reader 'tf',
                          'grain' and 1 / 2 workers, and the same split as TFRecord, streamed
The projection: the tf reader stays at one thread's rate on any host; Grain's read ceiling is
workers x one worker's rate, here with half of `--host_cores` reading. Also here, for
input_benchmark: `images_per_second` (the timing loop) and `prepare` (a dataset in a file format).
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import time

import numpy as np


def images_per_second(iterator, num_batches: int, warmup: int) -> float:
    for _ in range(warmup):  # Fills prefetch buffers and the shuffle buffer.
        next(iterator)
    start = time.perf_counter()
    num_images = sum(len(next(iterator)["image"]) for _ in range(num_batches))
    return num_images / (time.perf_counter() - start)


def prepare(config, file_format: str) -> None:
    """Prepares the dataset in `file_format` (before `get_datasets` opens it as prepared)."""
    from vit_jax.data import sources
    from vit_jax.data.builders import image_folder

    if sources.dataset_kind(config.dataset) == "folder":
        image_folder.image_folder_builder(config.dataset, config.data_dir, file_format=file_format)
    else:
        import tensorflow_datasets as tfds

        builder = tfds.builder(config.dataset, data_dir=config.data_dir, file_format=file_format)
        if not builder.is_prepared():
            builder.download_and_prepare()


def _read_in_process(reader, steps: int, warmup: int) -> float:
    for step in range(warmup):
        reader(step)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        reader(step)
    return steps * len(reader.rows) / (time.perf_counter() - start)


def _read_with_workers(reader, workers: int, steps: int, warmup: int) -> float:
    from vit_jax.data import grain_reader

    stream = grain_reader.step_stream(reader, 0, workers)
    try:
        for _ in range(warmup + 1):  # + 1: the workers' start is not timed
            next(stream)
        start = time.perf_counter()
        for _ in range(steps):
            next(stream)
        return steps * len(reader.rows) / (time.perf_counter() - start)
    finally:
        getattr(stream, "close", lambda: None)()


def _pipeline(config, steps: int, warmup: int, **fields) -> float:
    from vit_jax.data import pipeline

    config = config.copy_and_resolve_references()
    config.update(fields)
    with contextlib.redirect_stdout(io.StringIO()):  # its start-up lines, once per round
        data = pipeline.get_datasets(config, process_index=0, process_count=1)
    return images_per_second(data.train_iter(), steps, warmup)


def report(data, config, args) -> str:
    """The stage table and the projection for `data` (an ArrayRecord train split read by index)."""
    reader = data.step_reader(np.arange(config.batch_size))
    streamed = config.copy_and_resolve_references()
    streamed.data_dir = os.path.join(os.path.dirname(config.data_dir.rstrip("/")), "tfrecord")
    prepare(streamed, "tfrecord")
    steps, warmup = args.num_batches, args.warmup
    stages = {
        "read, in this process": lambda: _read_in_process(reader, steps, warmup),
        "read, 1 Grain worker": lambda: _read_with_workers(reader, 1, steps, warmup),
        "read, 2 Grain workers": lambda: _read_with_workers(reader, 2, steps, warmup),
        "pipeline, reader='tf'": lambda: _pipeline(config, steps, warmup, reader="tf"),
        "pipeline, reader='grain', 1 worker": lambda: _pipeline(
            config, steps, warmup, reader="grain", grain_workers=1
        ),
        "pipeline, reader='grain', 2 workers": lambda: _pipeline(
            config, steps, warmup, reader="grain", grain_workers=2
        ),
        "pipeline, TFRecord streamed": lambda: _pipeline(streamed, steps, warmup),
    }
    rates = {name: [] for name in stages}
    for _ in range(args.rounds):
        for name, measure in stages.items():
            rates[name].append(measure())
    median = {name: statistics.median(r) for name, r in rates.items()}
    lines = [
        f"{config.dataset}: {data.num_train_examples} train examples, image_size "
        f"{config.image_size}, batch {config.batch_size}, {os.cpu_count()} CPUs, "
        f"median of {args.rounds} rounds of {steps} batches"
    ]
    for name, rate in median.items():
        spread = f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}"
        lines.append(f"  {name:<38} {rate:>9,.0f} /s  ({1e6 / rate:,.0f} µs each; {spread})")
    cores = args.host_cores or os.cpu_count()
    workers = max(cores // 2, 1)
    per_worker = median["read, 1 Grain worker"]
    lines.append(
        f"projected read ceiling per host: reader='tf' {median['read, in this process']:,.0f} "
        f"/s (one thread, any core count); reader='grain' with {workers} worker(s) of {cores} "
        f"cores {workers * per_worker:,.0f} /s"
    )
    return "\n".join(lines)
