"""Named public checkpoints: table → URL → download once into the cache → verify → load.

The whole path runs against a local HTTP server (127.0.0.1, a free port, shut down after) that
serves a small fixture under the same bucket path as a table entry, with the base URL overridden.
"""

import functools
import hashlib
import http.server
import os
import pathlib
import shutil
import threading

import pytest
import tqdm
from helpers import FIXTURES, assert_finished, assert_params_identical, fake_terminal, final_lines

import vit_jax
from vit_jax.interop import pretrained
from vit_jax.tools import pretrained as pretrained_cli

FIXTURE = FIXTURES / "vit_jax_gap" / "params.npz"


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A test entry in the table, its file served over http, and an empty cache."""
    root = tmp_path / "bucket_root"
    (root / "vit_models" / "test").mkdir(parents=True)
    shutil.copy(FIXTURE, root / "vit_models" / "test" / "gap.npz")
    data = FIXTURE.read_bytes()
    entry = pretrained.Pretrained(
        "ViT-Test/4", "gap-fixture", "vit_models/test/gap.npz", "a parity fixture", 10, 16,
        "tests/fixtures", variant="", sha256=hashlib.sha256(data).hexdigest(), size=len(data),
    )  # fmt: skip
    monkeypatch.setattr(pretrained, "TABLE", [*pretrained.TABLE, entry])
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("VIT_JAX_PRETRAINED_URL", f"http://127.0.0.1:{server.server_port}")
    try:
        yield entry, server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_named_checkpoint_is_downloaded_once_verified_and_cached(served, monkeypatch):
    entry, server = served
    model, params = vit_jax.load_pretrained("ViT-Test/4", pretrained="gap-fixture")
    expected_model, expected = vit_jax.load_pretrained(str(FIXTURE))
    assert model.config == expected_model.config
    assert_params_identical(params, expected)
    cached = pretrained.cache_path(entry)
    assert pathlib.Path(cached).read_bytes() == FIXTURE.read_bytes()
    assert not list(os.scandir(os.path.dirname(cached)))[1:]  # no .partial
    server.shutdown()  # offline from here on: the cache answers
    monkeypatch.setenv("VIT_JAX_PRETRAINED_URL", "http://127.0.0.1:9")
    _, again = vit_jax.load_pretrained("Test/4", pretrained="gap-fixture")
    assert_params_identical(again, expected)


def test_a_download_that_fails_verification_is_not_kept(served, monkeypatch):
    entry, _ = served
    bad = pretrained.Pretrained(**{**entry.__dict__, "name": "bad-sum", "sha256": "0" * 64})
    monkeypatch.setattr(pretrained, "TABLE", [*pretrained.TABLE, bad])
    with pytest.raises(ValueError, match="sha256 differs"):
        vit_jax.load_pretrained("ViT-Test/4", pretrained="bad-sum")
    assert not os.path.exists(pretrained.cache_path(bad))
    assert not os.path.exists(pretrained.cache_path(bad) + ".partial")


def test_a_corrupt_cached_copy_is_fetched_again(served):
    entry, _ = served
    cached = pretrained.cache_path(entry)
    os.makedirs(os.path.dirname(cached))
    pathlib.Path(cached).write_bytes(FIXTURE.read_bytes()[:-500])  # truncated
    assert pretrained.fetch(entry) == cached
    assert pathlib.Path(cached).read_bytes() == FIXTURE.read_bytes()


def test_offline_error_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VIT_JAX_PRETRAINED_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(FileNotFoundError) as error:
        vit_jax.load_pretrained("ViT-B/16", pretrained="augreg-i21k-ft-i1k")
    message = str(error.value)
    entry = pretrained.find("ViT-B/16", "augreg-i21k-ft-i1k")
    assert f"curl -o {pretrained.cache_path(entry)} {entry.url()}" in message
    assert entry.url().startswith("http://127.0.0.1:9/vit_models/augreg/")  # the base in use
    assert "gs://vit_models/augreg/B_16-i21k-300ep" in message
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_unknown_names_list_what_exists():
    with pytest.raises(ValueError, match="allowed: .*'augreg-i21k-ft-i1k'"):
        vit_jax.load_pretrained("ViT-B/16", pretrained="augreg-i21k-ft-i2k")
    with pytest.raises(ValueError, match="no public checkpoints of 'ViT-Z/16'"):
        vit_jax.load_pretrained("ViT-Z/16", pretrained="i21k")


def test_list_pretrained_shows_models_inputs_and_urls():
    rows = vit_jax.list_pretrained()
    names = {(r["model"], r["pretrained"]) for r in rows}
    assert ("ViT-B/16", "augreg-i21k-ft-i1k") in names and ("ViT-S/16", "i1k-90ep") in names
    for row in rows:
        assert row["url"].startswith("https://storage.googleapis.com/")
        assert row["url"].endswith(".npz")
        assert row["inputs"] == "(x - 127.5) / 127.5, RGB"
        assert "top1" in row and row["num_classes"] in (1000, 21843)
        vit_jax.get_config(row["model"])  # every model name is a variant we can build
    assert all(r["model"] == "ViT-L/16" for r in vit_jax.list_pretrained("L/16"))


# The figure stated for exactly that file and who states it (see the comments beside TABLE); no
# other entry may claim one.
README_TOP1 = {  # google-research/vision_transformer README, recommended fine-tunes at 384
    "Ti/16": 78.22, "S/32": 79.58, "S/16": 83.73, "B/32": 83.59, "B/16": 85.49, "L/16": 85.59,
}  # fmt: skip
TIMM_TOP1 = {  # timm results-imagenet.csv, vit_*.augreg_in21k_ft_in1k
    ("Ti/16", ""): 75.454, ("S/32", ""): 75.994, ("S/16", ""): 81.384, ("B/32", ""): 80.716,
    ("B/16", ""): 84.532, ("B/16", "-384"): 85.996, ("B/8", ""): 85.798, ("L/16", ""): 85.834,
    ("L/16", "-384"): 87.084,
}  # fmt: skip
HYBRID_TOP1 = {  # timm results-imagenet.csv (commit 0173a13), the hybrids timm loads these files as
    ("R+ViT-Ti/16", "augreg-i21k-ft-i1k"): 71.798,  # vit_tiny_r_s16_p8_224.augreg_in21k_ft_in1k
    ("R+ViT-Ti/16", "augreg-i21k-ft-i1k-384"): 75.962,
    ("R26+ViT-S/32", "augreg-i21k-ft-i1k"): 81.864,  # vit_small_r26_s32_224
    ("R26+ViT-S/32", "augreg-i21k-ft-i1k-384"): 84.048,
    ("R50+ViT-L/32", "augreg-i21k-ft-i1k"): 84.422,  # vit_large_r50_s32_224
    ("R50+ViT-L/32", "augreg-i21k-ft-i1k-384"): 86.182,
    ("R50+ViT-B/16", "i21k-ft-i1k-384"): 84.976,  # vit_base_r50_s16_384.orig_in21k_ft_in1k
}
STATED_TOP1 = {
    **HYBRID_TOP1,
    **{(f"ViT-{m}", "augreg-i21k-ft-i1k-384-recommended"): t for m, t in README_TOP1.items()},
    **{(f"ViT-{m}", f"augreg-i21k-ft-i1k{res}"): t for (m, res), t in TIMM_TOP1.items()},
    ("ViT-S/16", "i1k-90ep"): 76.5,  # big_vision configs/vit_s16_i1k.py
    ("ViT-S/16", "i1k-300ep"): 80.0,  # arXiv 2205.01580 abstract
}


def test_list_pretrained_carries_top1_only_where_a_source_states_it():
    rows = {(r["model"], r["pretrained"]): r for r in vit_jax.list_pretrained()}
    assert {k: r["top1"] for k, r in rows.items() if r["top1"] is not None} == STATED_TOP1
    for row in rows.values():
        assert (row["top1"] is None) == (row["top1_source"] is None), row
        if row["num_classes"] != 1000:  # an ImageNet-21k head has no ImageNet-1k top-1
            assert row["top1"] is None, row
    # The README's figure belongs to its fine-tuned file: lr 0.03 at 384, not timm's lr 0.01 one.
    recommended = rows[("ViT-B/16", "augreg-i21k-ft-i1k-384-recommended")]
    assert recommended["url"].endswith(
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
        "--imagenet2012-steps_20k-lr_0.03-res_384.npz"
    )
    assert recommended["image_size"] == 384 and "README" in recommended["top1_source"]
    timm_chosen = rows[("ViT-B/16", "augreg-i21k-ft-i1k-384")]
    assert timm_chosen["url"].endswith("--imagenet2012-steps_20k-lr_0.01-res_384.npz")
    assert "results-imagenet.csv" in timm_chosen["top1_source"]
    assert rows[("ViT-S/16", "i1k-150ep")]["top1"] is None


def test_command_line_prints_the_table_with_top1(capsys):
    assert pretrained_cli.main(["B/16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "pretrained", "image_size", "num_classes", "top1", "data"]
    rows = {
        tuple(line.split()[:2]): line.split()[4] for line in lines[1:] if line.startswith("ViT")
    }
    assert rows[("ViT-B/16", "augreg-i21k-ft-i1k-384-recommended")] == "85.49"
    assert rows[("ViT-B/16", "augreg-i21k-ft-i1k")] == "84.532"
    assert rows[("ViT-B/16", "i21k")] == "-"
    assert len(rows) == len(vit_jax.list_pretrained("B/16"))
    assert pretrained_cli.main(["Z/16"]) == 1
    assert capsys.readouterr().err.startswith("FATAL ValueError: no public checkpoints of 'Z/16'")


def test_download_shows_a_bar_that_reaches_the_file_size(served):
    entry, _ = served
    with fake_terminal() as terminal:
        pretrained.fetch(entry)
    size = tqdm.tqdm.format_sizeof(FIXTURE.stat().st_size, divisor=1024)  # as the bar shows it
    assert_finished(final_lines(terminal.getvalue()), "download ViT-Test/4 gap-fixture", size)
