"""The training recipes (`--config configs/<name>.py` or, installed, `--config <name>`)."""
