"""Packed (compressed) weights for sparse inference: the layout `sparsekern.ops.pack` makes and
`sparsekern.ops.sparse_linear` multiplies.

Layout (a row-wise bitmap plus the kept values), for a weight of shape (out_features, in_features):
  bitmap         int32 (out_features, ceil(in_features / 32)); bit j of bitmap[r, w] is set when
                 entry (r, 32 * w + j) is kept.
  values         (nnz,) in the weight's dtype: the kept entries, row by row in column order.
  chunk_offsets  int64 (out_features, ceil(words / 32)); chunk_offsets[r, c] is the index in
                 `values` of row r's first kept entry in columns [1024 * c, 1024 * (c + 1)), so a
                 GPU warp can start on any 1024-column chunk without scanning the row before it.

Why a bitmap: at small batch a linear layer is limited by the bytes of weight it reads. A dense
fp16/bf16 weight costs 2 bytes per entry; this layout costs 1/8 byte per entry plus 2 bytes per
kept entry, i.e. 0.125 + 2 * density (0.325 at density 0.1: 6.2x fewer bytes; 0.725 at 0.3: 2.8x).
CSR with 16-bit column indices costs 4 * density (0.4 at 0.1, 1.2 at 0.3), so the bitmap reads
fewer bytes at every density above 1/16, which covers the densities sparse training produces
(0.05 to 0.5); below that CSR would win. The chunk offsets add 8 bytes per 1024 entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _checks, reference

_FIELDS = ("bitmap", "values", "chunk_offsets", "in_features")


@dataclass(frozen=True, repr=False)
class PackedWeight:
    """A weight packed by `sparsekern.ops.pack`; survives torch.save / torch.load (weights_only too).

    Every way to make one (the constructor, `.to()`, unpickling by torch.load or copy) checks that the
    tensors are this layout, contents included (`sparsekern.ops._checks.packed_weight`), and raises
    TypeError or ValueError naming the field otherwise: the kernels index `values` and x by the
    bitmap and `chunk_offsets`, and must never see a bitmap that disagrees with them. Fields cannot
    be reassigned afterwards; the compiled kernels check again what they index by (see
    `sparsekern.ops.sparse_linear`), in case a tensor is changed in place.
    """

    bitmap: Tensor
    values: Tensor
    chunk_offsets: Tensor
    in_features: int
    # The unpacked weight, made on the first dense fallback and kept: unpacking costs as much as the
    # dense product itself, so doing it per call would make the fallback slower than dense.
    _dense: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        in_features = _checks.packed_weight(self.bitmap, self.values, self.chunk_offsets, self.in_features)
        object.__setattr__(self, "in_features", in_features)

    @property
    def out_features(self) -> int:
        return self.bitmap.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def density(self) -> float:
        """Kept entries over all entries (1.0 for an empty weight, which costs nothing either way)."""
        entries = self.out_features * self.in_features
        return self.values.numel() / entries if entries else 1.0

    def __repr__(self) -> str:
        # The dataclass's repr would print every tensor: thousands of lines for one layer of a model.
        return (f"PackedWeight(shape={self.shape}, kept={self.values.numel()}, density={self.density:.4g}, "
                f"dtype={self.dtype}, device={self.device})")

    def to(self, device: torch.device | str | int) -> "PackedWeight":
        """The same packed weight on `device` (a device, its name or a CUDA index). Only the device
        changes: the bitmap and offsets must stay integers, and `pack` a weight of another dtype. A name or index
        that torch reads as no device ('nodevice', -1) raises ValueError naming `device`; a device this machine
        lacks fails as Tensor.to fails there."""
        if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
            raise TypeError(f"device must be a torch.device, a device name or an index, got {type(device).__name__}"
                            f"{' (to change the dtype, pack the weight in that dtype)' if isinstance(device, torch.dtype) else ''}")
        try:
            device = torch.device(device)
        except RuntimeError as error:   # an unknown name, a negative index
            raise ValueError(f"device={device!r} names no device: {error}") from None
        return PackedWeight(self.bitmap.to(device), self.values.to(device), self.chunk_offsets.to(device),
                            self.in_features)

    def unpack(self) -> Tensor:
        """The dense weight, zero where nothing was kept (a new tensor each call). The fields are checked again
        first, as the compiled kernels check them: one changed in place since packing (a value too few, a bit more)
        raises TypeError or ValueError naming it, where unpacking would fail naming none, or spread one value over
        every kept entry."""
        _checks.packed_weight(self.bitmap, self.values, self.chunk_offsets, self.in_features)
        return reference.unpack(self.bitmap, self.values, self.in_features)

    def dense(self) -> Tensor:
        """`unpack()`, made once and kept (do not modify it): what sparse_linear's dense fallback multiplies."""
        if self._dense is None:
            # Made outside torch.jit.trace's recording: the trace's check runs the forward again and compares the
            # graphs, and a cache filled while recording would show its making in the first graph and a constant in
            # the next ("Graphs differed across invocations").
            object.__setattr__(self, "_dense", _checks.untraced(self.unpack))
        return self._dense

    def __getstate__(self):
        # The kept dense weight is a cache: saving it would store the weight twice.
        return {**{name: getattr(self, name) for name in _FIELDS}, "_dense": None}

    def __setstate__(self, state):
        # Unpickling (torch.load, even with weights_only=True, and copy) skips __init__: check here
        # too, since a file may hold anything. The saved `_dense` is always None and is not loaded.
        if not isinstance(state, dict) or not set(_FIELDS) <= state.keys() <= {*_FIELDS, "_dense"}:
            shown = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"a saved PackedWeight must hold exactly {', '.join(_FIELDS)}; got {shown}")
        self.__init__(**{name: state[name] for name in _FIELDS})


# torch.load(weights_only=True), which sparsekern.checkpoint.load uses, accepts only listed classes.
torch.serialization.add_safe_globals([PackedWeight])
