"""What our builders show while they prepare: one bar per split (ours), nothing else on stdout.

TFDS would draw its own bars beside ours (totals unknown at the first preparation, so "?") and print
two bold lines to stdout ("Downloading and preparing dataset Unknown size ..."), even off a
terminal. Our builders know their example counts, so they replace all of it; the lines become
log records.
"""

from absl import logging

from vit_jax import progress


class OwnProgress:
    """Mixin for a `tfds.core.GeneratorBasedBuilder` whose `_generate_examples` draws the bars."""

    def download_and_prepare(self, *args, **kwargs):
        with progress.tfds_bars(False):
            return super().download_and_prepare(*args, **kwargs)

    def _log_download_bytes(self) -> None:
        logging.info("Preparing dataset %s into %s.", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("Prepared dataset %s in %s.", self.name, self.data_dir)
