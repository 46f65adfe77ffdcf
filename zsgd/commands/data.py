"""``zsgd data``: download, list and inspect data sets.

Thin wrappers: the work is in ``downloader.py`` and ``datasets.py``. numpy,
rich and Pillow are imported inside the commands so that registering this
group costs ``zsgd --help`` nothing.
"""

from __future__ import annotations

from pathlib import Path

import click

DOWNLOAD_NAMES = ("mnist", "fashion-mnist")


@click.group("data")
def data_group() -> None:
    """Download, list and inspect data sets (Fashion-MNIST, MNIST, embedded, image folders)."""


@data_group.command("download")
@click.argument("name", metavar="NAME", type=click.Choice(DOWNLOAD_NAMES, case_sensitive=False))
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the files (default: the zsgd cache, where loaders look).")
@click.option("--mirror", "mirrors", multiple=True, metavar="URL",
              help="Base URL to try, in order; repeatable. Default: the public mirrors, "
                   "or $ZSGD_MIRROR_MNIST / $ZSGD_MIRROR_FASHION_MNIST (comma-separated).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def download_cmd(name: str, dest: Path | None, mirrors: tuple[str, ...], quiet: bool) -> None:
    """Download NAME (mnist or fashion-mnist), resuming partial files and verifying SHA-256."""
    from zsgd.data.downloader import download

    where = download(name.lower(), dest=dest, mirrors=list(mirrors) or None, progress=not quiet)
    click.echo(f"{name.lower()}: verified files in {where}")


def _bytes(n: int) -> str:
    """Human-readable size in decimal units (what ``ls -h --si`` and download pages show)."""
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _status_rows() -> list[tuple[str, bool, str, str]]:
    """(name, available, where, size) for each known data set."""
    from zsgd.data.datasets import find_idx_files, idx_search_dirs, locate_idx_dataset
    from zsgd.data.embedded import EMBEDDED_PATH
    from zsgd.data.imagefolder import imagefolder_cache_dir

    rows: list[tuple[str, bool, str, str]] = []
    for name in ("fashion-mnist", "mnist"):
        directory = locate_idx_dataset(name)
        if directory is None:
            places = ", ".join(str(d) for d in idx_search_dirs(name))
            rows.append((name, False, f"not found in {places}; run: zsgd data download {name}",
                         "60,000 / 10,000 images"))
            continue
        found, _ = find_idx_files(directory)
        on_disk = sum(p.stat().st_size for p in found.values())
        rows.append((name, True, str(directory), f"60,000 / 10,000 images, {_bytes(on_disk)}"))
    fashion = locate_idx_dataset("fashion-mnist")
    rows.append(("default", True, f"-> {'fashion-mnist' if fashion else 'embedded'}", ""))
    embedded_ok = EMBEDDED_PATH.is_file()
    size = f"10,000 / 2,000 images, {_bytes(EMBEDDED_PATH.stat().st_size)}" if embedded_ok else ""
    rows.append(("embedded", embedded_ok, str(EMBEDDED_PATH), size))
    cache = imagefolder_cache_dir()
    cached = list(cache.glob("*.npz")) if cache.is_dir() else []
    cached_size = f"{len(cached)} cached decode(s), {_bytes(sum(p.stat().st_size for p in cached))}" if cached else ""
    rows.append(("imagefolder:PATH", True, "any folder with one subfolder per class", cached_size))
    from zsgd.data.text import EMBEDDED_TEXT_PATH

    text_ok = EMBEDDED_TEXT_PATH.is_file()
    rows.append(("text[:FILE]", text_ok, f"{EMBEDDED_TEXT_PATH} (or any UTF-8 FILE)",
                 f"KJV Genesis-Ruth, {_bytes(EMBEDDED_TEXT_PATH.stat().st_size)}" if text_ok else ""))
    return rows


@data_group.command("list")
def list_cmd() -> None:
    """Show each known data set, whether it is available locally, where, and its size."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="zsgd data sets")
    for column in ("name", "available", "where", "size"):
        table.add_column(column, overflow="fold")
    for name, ok, where, size in _status_rows():
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", where, size)
    Console().print(table)


@data_group.command("info")
@click.argument("name", default="default")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Directory with the IDX files (or the image folder for 'imagefolder').")
@click.option("--image-size", type=click.IntRange(8, 1024), default=64, show_default=True,
              help="Side length images are resized to (image folders only).")
@click.option("--grayscale", is_flag=True, help="Decode image folders as one channel.")
@click.option("--tokens", type=click.Choice(("chars", "bytes", "words")), default="chars", show_default=True,
              help="What one token is (text data only).")
def info_cmd(name: str, data_dir: Path | None, image_size: int, grayscale: bool, tokens: str) -> None:
    """Shapes, per-class counts and source of data set NAME (default: 'default')."""
    from rich.console import Console
    from rich.table import Table

    from zsgd.data.datasets import load_dataset

    ds = load_dataset(name, data_dir=str(data_dir) if data_dir else None, image_size=image_size,
                      grayscale=grayscale, tokens=tokens)
    console = Console()
    if getattr(ds, "is_text", False):
        _text_info(console, ds)
        return
    console.print(f"[bold]{ds.name}[/]  from {ds.source}")
    console.print(
        f"train {tuple(ds.x_train.shape)} {ds.x_train.dtype}, test {tuple(ds.x_test.shape)} {ds.x_test.dtype}, "
        f"input {ds.input_shape}, {ds.n_classes} classes"
    )
    if ds.skipped:
        console.print(f"[yellow]skipped {len(ds.skipped)} unreadable image(s)[/], e.g. {ds.skipped[0]}")
    table = Table()
    for column, justify in (("#", "right"), ("class", "left"), ("train", "right"), ("test", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    train, test = ds.class_counts("train"), ds.class_counts("test")
    for i, cls in enumerate(ds.classes):
        table.add_row(str(i), cls, f"{int(train[i]):,}", f"{int(test[i]):,}")
    table.add_row("", "[bold]total[/]", f"{len(ds.y_train):,}", f"{len(ds.y_test):,}")
    console.print(table)


def _text_info(console, ds) -> None:
    """A text data set: its streams, vocabulary, unigram baseline and most frequent tokens."""
    import numpy as np
    from rich.table import Table

    console.print(f"[bold]{ds.name}[/]  from {ds.source}")
    console.print(f"{ds.tokens}: {len(ds.train):,} train / {len(ds.test):,} test tokens, vocabulary {ds.n_classes}, "
                  f"unigram test perplexity {ds.unigram_perplexity():.2f} (the baseline a language model must beat)")
    counts = np.bincount(ds.train, minlength=ds.n_classes)
    table = Table(title="most frequent tokens (train)")
    for column in ("token", "count", "share"):
        table.add_column(column, justify="left" if column == "token" else "right")
    for i in np.argsort(-counts, kind="stable")[:15]:
        table.add_row(repr(ds.vocab[i]), f"{int(counts[i]):,}", f"{counts[i] / len(ds.train):.1%}")
    console.print(table)
