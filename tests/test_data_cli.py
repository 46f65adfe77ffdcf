"""``zsgd data list|info|download`` through click's CliRunner and the real entry point."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import cli as run, run_zsgd


@pytest.fixture(autouse=True)
def isolated(isolated_data, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the table's "where" cell holds the test's ZSGD_HOME path: never wrapped


def test_list_shows_every_data_set():
    result = run("data", "list")
    assert result.exit_code == 0, result.output
    for name in ("fashion-mnist", "mnist", "default", "embedded", "imagefolder:PATH"):
        assert name in result.output
    assert "-> embedded" in result.output  # no full Fashion-MNIST in the isolated environment
    assert "zsgd data download mnist" in result.output


def test_info_embedded_counts_per_class():
    result = run("data", "info", "embedded")
    assert result.exit_code == 0, result.output
    assert "embedded subset shipped with zsgd" in result.output
    assert "(10000, 1, 28, 28)" in result.output and "Ankle boot" in result.output
    assert result.output.count("1,000") == 10 and "10,000" in result.output


def test_info_default_says_which_set_was_used():
    result = run("data", "info")
    assert result.exit_code == 0 and result.output.startswith("embedded")


def test_info_imagefolder_reports_skipped(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((9, 9, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "a" / "bad.png").write_bytes(b"junk")
    result = run("data", "info", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "8", "--grayscale")
    assert result.exit_code == 0, result.output
    assert "(1, 8, 8)" in result.output and "skipped 1 unreadable" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("data", "info", "cifar10"), "unknown data set 'cifar10'"),
        (("data", "info", "mnist"), "zsgd data download mnist"),
        (("data", "info", "fashion-mnist", "--data-dir", "/nonexistent/dir"), "/nonexistent/dir lacks"),
        (("data", "download", "cifar10"), "'cifar10' is not one of"),
        (("data", "download", "mnist", "--mirror", "gopher://x/"), "mirror 'gopher://x/' is not an http"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("zsgd: error:")


@pytest.mark.slow  # starts zsgd
def test_real_entry_point_exit_code(tmp_path):
    env = {"ZSGD_HOME": str(tmp_path / "h"), "PATH": "/usr/bin:/bin"}
    proc = run_zsgd("data", "info", "nope", env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "zsgd: error: unknown data set 'nope': choose one of default, fashion-mnist, mnist, embedded, imagefolder:PATH, text[:FILE]"
    ]
