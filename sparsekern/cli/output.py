"""What the command line writes: files written atomically (output folders are checked before training with
`sparsekern.checkpoint.check_writable_folder`), errors on one line."""
from __future__ import annotations

import csv
import io

from .. import checkpoint


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
