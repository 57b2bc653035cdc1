"""The pieces behind `python -m vit_jax.tools.benchmark`: one module per side that gets timed.

flops.py        the analytic FLOP count of a ViT (cross-checks XLA's cost analysis)
jax_side.py     our model: jitted train step / inference, compile time, cost and memory analysis
torch_side.py   timm (and HF transformers) eager and torch.compile, when torch is installed
trainer_side.py --trainer: train_and_evaluate against a bare jitted loop of its own step
report.py       the printed tables, and --json_out (checked before the run, written after it)
"""
