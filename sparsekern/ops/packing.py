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

from . import reference


@dataclass
class PackedWeight:
    """A weight packed by `sparsekern.ops.pack`; survives torch.save / torch.load (weights_only too)."""

    bitmap: Tensor
    values: Tensor
    chunk_offsets: Tensor
    in_features: int
    # The unpacked weight, made on the first dense fallback and kept: unpacking costs as much as the
    # dense product itself, so doing it per call would make the fallback slower than dense.
    _dense: Tensor | None = field(default=None, init=False, repr=False, compare=False)

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

    def to(self, device: torch.device | str) -> "PackedWeight":
        return PackedWeight(self.bitmap.to(device), self.values.to(device), self.chunk_offsets.to(device),
                            self.in_features)

    def unpack(self) -> Tensor:
        """The dense weight, zero where nothing was kept (a new tensor each call)."""
        return reference.unpack(self.bitmap, self.values, self.in_features)

    def dense(self) -> Tensor:
        """`unpack()`, made once and kept (do not modify it): what sparse_linear's dense fallback multiplies."""
        if self._dense is None:
            self._dense = self.unpack()
        return self._dense

    def __getstate__(self):
        # The kept dense weight is a cache: saving it would store the weight twice.
        return {**self.__dict__, "_dense": None}


# torch.load(weights_only=True), which sparsekern.checkpoint.load uses, accepts only listed classes.
torch.serialization.add_safe_globals([PackedWeight])
