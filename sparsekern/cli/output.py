"""What the command line writes: files written atomically (every destination checked before the data is loaded,
`check_outputs`), errors on one line."""
from __future__ import annotations

import csv
import io
import os

from .. import checkpoint


def check_outputs(out: str, files: list[str]) -> None:
    """ValueError (one line, naming the option and the path) unless a command could write each of `files` (paths
    relative to its --out folder `out`) atomically, a regular file already there replaced: `out` and the folders of
    `files` must be folders or missing, and each file missing or a regular file (`checkpoint.check_destination`).
    Every command calls it before it loads its data, so that a name clash costs no training its results at the end.
    Creates nothing: `make_output_folders` does, once every input is checked."""
    for folder in _folders(out, files):
        checkpoint.check_destination(folder, _folder_argument(out, folder), folder=True)
    for name in files:
        checkpoint.check_destination(os.path.join(out, name), "--out's file")


def make_output_folders(out: str, files: list[str]) -> None:
    """Creates `out` and the folders of `files` (as `check_outputs` takes them) and makes sure each can be written
    in (`checkpoint.check_writable_folder`); ValueError (one line) if not. Last of a command's checks: a refused
    input leaves no folder behind."""
    for folder in _folders(out, files):
        checkpoint.check_writable_folder(folder, _folder_argument(out, folder))


def _folders(out: str, files: list[str]) -> list[str]:
    """`out`, then every folder under it holding one of `files`, each once."""
    return list(dict.fromkeys([out, *(os.path.join(out, os.path.dirname(name)) for name in files
                                      if os.path.dirname(name))]))


def _folder_argument(out: str, folder: str) -> str:
    return "--out" if folder == out else f"--out's {os.path.relpath(folder, out)} folder"


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically (`sparsekern.checkpoint.write_atomically`)."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    checkpoint.write_atomically(path, lambda file: file.write(data))


def save_figure(figure, path: str, metadata: dict | None = None) -> None:
    """A matplotlib figure as a PNG at `path`, written atomically; closes the figure. Laid out tight, and cropped to
    what it draws (a legend beside the axes included): at matplotlib's default margins the axes' labels were cut
    off."""
    from matplotlib import pyplot

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata=metadata, bbox_inches="tight")
    pyplot.close(figure)
    write_bytes(path, buffer.getvalue())


DENSITY_LABEL = "density (fraction of weights kept)"   # every plot's density axis, so that none lacks the unit


def density_axis(axes, densities, label: str = DENSITY_LABEL) -> None:
    """A log density axis, sparser to the right, ticked at `densities`, with room on both sides: the limits
    matplotlib picks hug the points, so at a single density the lines' small sideways nudges filled the axis
    and drew them far apart."""
    densities = sorted(densities)
    axes.set_xscale("log")
    axes.set_xticks(densities, [f"{density:g}" for density in densities])
    axes.minorticks_off()
    axes.set_xlim(densities[-1] * 1.25, densities[0] / 1.25)   # left > right: sparser to the right
    axes.set_xlabel(label)


def csv_text(fieldnames: list[str], rows: list[dict]) -> str:
    """`rows` as CSV with a header of `fieldnames` (other keys are left out)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """'1 seed', '3 seeds', '2 densities': a count with its noun, plural unless it is one."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def flops_cell(row: dict) -> str:
    """A table's cell of a line's FLOPs as fractions of the dense model's, "inference / training" (3 significant
    digits), from a row of `sparsekern.cli.training.cost_means`; "–" for either where the row has none."""
    return " / ".join("–" if row[name] is None else f"{row[name]:.3g}"
                      for name in ("inference_flops_fraction_mean", "training_flops_fraction_mean"))
