r"""The README's digits tables, measured by running `train.py` and `vit_jax.tools.fewshot`.

  python benchmarks/digits_tables.py transfer   # fractal pre-training -> digits (issue 23)
  python benchmarks/digits_tables.py distill    # distilled student vs scratch, few-shot (issue 22)
  python benchmarks/digits_tables.py grid       # the main job, seeds 0-4 x cpu_devices 1, 2, 4

Each run is a real `train.py` command of `configs/digits.py` (its docstring names the arguments),
one after the other, in `--root` (default workdirs/tables; `--data_dir` default <root>/tfds, where
the fractals are generated on first use and the digits prepared). A run whose log already ends
with its final accuracy is read back, not rerun, so an interrupted table continues where it
stopped. Prints a Markdown table and writes it with every run's command and figures to
`benchmarks/results/digits_<table>.json`.

transfer: `digits.py:fractal` once (seed 0), then for each seed and label fraction (10 %: the
first 10 % of the stored train split, 144 images, 10x the epochs so both see the same number of
steps) `digits.py:finetune` from that checkpoint and the same command with `init_from=''` (from
scratch, the same RGB input); plus few-shot accuracy of the pre-trained features on digits.
distill: `digits.py:teacher` (seed 0), then per seed the student distilled from it
(`digits.py:distill`) and from scratch (`digits.py:plain`, the same plain ViT); plus few-shot accuracy of each scratch model
and of the same architecture randomly initialized (`--random_init`).
grid: the main job (`configs/digits.py`) for seeds 0-4 (`--seeds` does not apply) on 1, 2 and 4
CPU devices (`--config.cpu_devices`): every run's test accuracy and training time (compiling
included), and the minimum and mean; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
FINAL = re.compile(r"Final \w+ accuracy: ([\d.]+)%")
TRAINING_TIME = re.compile(r"Training time: (\S+) for (\d+) steps")
SHOTS = "1,5,10,25"


def run_train(root: pathlib.Path, name: str, config: str, *flags: str) -> dict:
    """One train.py run (or its finished log read back): final accuracy, training time."""
    workdir, log = root / name, root / f"{name}.log"
    command = [sys.executable, "train.py", "--config", config, "--workdir", str(workdir), *flags]
    text = log.read_text() if log.exists() else ""
    if not FINAL.search(text) or f"# {' '.join(command[1:])}\n" not in text:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command[1:])}", flush=True)
        with open(log, "w") as f:
            f.write(f"# {' '.join(command[1:])}\n")
            f.flush()
            subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
        text = log.read_text()
    final, timing = FINAL.findall(text), TRAINING_TIME.findall(text)
    if not final:
        raise RuntimeError(f"{log}: no final accuracy line")
    result = {"name": name, "command": " ".join(command[1:]), "accuracy": float(final[-1])}
    if timing:
        result["training_time"], result["steps"] = timing[-1][0], int(timing[-1][1])
    print(f"  {name}: {result['accuracy']:.2f}%", flush=True)
    return result


def run_fewshot(root: pathlib.Path, name: str, checkpoint: str, data_dir: str, *flags) -> dict:
    """`vit_jax.tools.fewshot` on digits: mean accuracy per shot count over seeds 0-2."""
    out = root / f"{name}.fewshot.json"
    command = [
        sys.executable, "-m", "vit_jax.tools.fewshot", "--checkpoint", checkpoint,
        "--dataset", "digits", "--data_dir", data_dir, "--shots", SHOTS, "--seeds", "0,1,2",
        "--json_out", str(out), *flags,
    ]  # fmt: skip
    if not out.exists():
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    shots = {str(r["shots"]): 100 * r["accuracy"] for r in json.loads(out.read_text())}
    return {"name": name, "command": " ".join(command[1:]), "accuracy_by_shots": shots}


def summary(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.2f} (min {min(values):.2f}, "
        + ", ".join(f"{v:.2f}" for v in values)
        + ")"
    )


def fewshot_row(label: str, results: list[dict]) -> str:
    cells = []
    for k in SHOTS.split(","):
        values = [r["accuracy_by_shots"][k] for r in results]
        cells.append(f"{statistics.mean(values):.1f}")
    return f"| {label} | " + " | ".join(cells) + " |"


def fewshot_header(first: str) -> list[str]:
    shots = SHOTS.split(",")
    return [
        f"| {first} | " + " | ".join(f"{k}-shot" for k in shots) + " |",
        "|---|" + "---|" * len(shots),
    ]


def transfer(root: pathlib.Path, data_dir: str, seeds: list[int]) -> tuple[list[str], dict]:
    common = [f"--config.data_dir={data_dir}"]
    pretrain = run_train(root, "pretrain", "configs/digits.py:fractal", *common)
    init = f"--config.init_from={root / 'pretrain'}"
    runs = {}
    tenth = ["--config.train_split=train[:10%]", "--config.total_epochs=400"]  # the same steps
    for fraction in (10, 100):
        for start in ("scratch", "fractal"):
            for seed in seeds:
                name = f"{start}-{fraction}pct-seed{seed}"
                flags = [*common, f"--config.seed={seed}", *(tenth if fraction == 10 else [])]
                flags.append(init if start == "fractal" else "--config.init_from=")
                runs[name] = run_train(root, name, "configs/digits.py:finetune", *flags)
    fewshot = run_fewshot(root, "pretrain", str(root / "pretrain"), data_dir)
    lines = [
        "| digits test accuracy % (seeds " + ", ".join(map(str, seeds)) + ") | 10 % of the "
        "labels (144) | 100 % (1,437) |",
        "|---|---|---|",
    ]
    for start, label in (("scratch", "from scratch"), ("fractal", "fine-tuned from fractals")):
        cells = [
            summary([runs[f"{start}-{f}pct-seed{s}"]["accuracy"] for s in seeds]) for f in (10, 100)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *fewshot_header("few-shot on digits (mean of 3 draws)")]
    lines.append(fewshot_row("fractal-pretrained features", [fewshot]))
    lines.append(f"\nfractal pre-training: {pretrain['accuracy']:.2f}% top-1 on its test split")
    return lines, {"pretrain": pretrain, "runs": runs, "fewshot": fewshot}


def distill(root: pathlib.Path, data_dir: str, seeds: list[int]) -> tuple[list[str], dict]:
    common = [f"--config.data_dir={data_dir}"]
    teacher = run_train(root, "teacher", "configs/digits.py:teacher", *common)
    runs, fewshots, randoms = {}, [], []
    for seed in seeds:
        flags = [*common, f"--config.seed={seed}"]
        name = f"distilled-seed{seed}"
        runs[name] = run_train(
            root, name, "configs/digits.py:distill", *flags,
            f"--config.distill.teacher={root / 'teacher'}",
        )  # fmt: skip
        runs[f"scratch-seed{seed}"] = run_train(
            root, f"scratch-seed{seed}", "configs/digits.py:plain", *flags
        )
        scratch = str(root / f"scratch-seed{seed}")
        fewshots.append(run_fewshot(root, f"scratch-seed{seed}", scratch, data_dir))
        randoms.append(
            run_fewshot(root, f"random-seed{seed}", scratch, data_dir, "--random_init", str(seed))
        )
    lines = [
        "| digits test accuracy % (seeds " + ", ".join(map(str, seeds)) + ") | mean (min, runs) |",
        "|---|---|",
        f"| teacher (`digits.py:teacher`, seed 0) | {teacher['accuracy']:.2f} |",
        "| student from scratch (`digits.py:plain`) | "
        + summary([runs[f"scratch-seed{s}"]["accuracy"] for s in seeds]) + " |",
        "| student distilled (`digits.py:distill`) | "
        + summary([runs[f"distilled-seed{s}"]["accuracy"] for s in seeds]) + " |",
        "",
        *fewshot_header("few-shot on digits (mean over the seeds' models x 3 draws)"),
        fewshot_row("trained digits model (`digits.py:plain`)", fewshots),
        fewshot_row("same architecture, random init", randoms),
    ]  # fmt: skip
    return lines, {"teacher": teacher, "runs": runs, "fewshot": fewshots, "random": randoms}


def grid(root: pathlib.Path, data_dir: str, seeds: list[int]) -> tuple[list[str], dict]:
    del seeds  # the grid is the issue's: seeds 0-4
    runs, devices = {}, (1, 2, 4)
    for d in devices:
        for seed in range(5):
            name = f"main-seed{seed}-devices{d}"
            flags = [f"--config.data_dir={data_dir}", f"--config.seed={seed}"]
            runs[name] = run_train(
                root, name, "configs/digits.py", *flags, f"--config.cpu_devices={d}"
            )
    lines = [
        "| cpu_devices | " + " | ".join(f"seed {s}" for s in range(5)) + " | min | mean |",
        "|---|" + "---|" * 7,
    ]
    for d in devices:
        values = [runs[f"main-seed{s}-devices{d}"]["accuracy"] for s in range(5)]
        cells = [f"{v:.2f}" for v in values] + [
            f"{min(values):.2f}",
            f"{statistics.mean(values):.2f}",
        ]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    every = [r["accuracy"] for r in runs.values()]
    times = sorted(r.get("training_time", "?") for r in runs.values())
    lines.append(
        f"\nall {len(every)} runs: min {min(every):.2f}, mean {statistics.mean(every):.2f}; "
        f"training time {times[0]} - {times[-1]}"
    )
    return lines, {"runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("table", choices=("transfer", "distill", "grid"))
    parser.add_argument("--root", default="workdirs/tables")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default <root>/tfds)")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    root = pathlib.Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data_dir = os.path.abspath(args.data_dir or root / "tfds")
    seeds = [int(s) for s in args.seeds.split(",")]
    lines, results = {"transfer": transfer, "distill": distill, "grid": grid}[args.table](
        root, data_dir, seeds
    )
    print("\n".join(lines))
    out = REPO / "benchmarks" / "results" / f"digits_{args.table}.json"
    out.write_text(json.dumps({"table": lines, **results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
