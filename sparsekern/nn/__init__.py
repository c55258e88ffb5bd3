"""Floor 2, the modules: sparse layers (linear, convolutions and transposed convolutions, multi-head
attention, RNN/LSTM/GRU), `sparsify(model)` and its inverse `densify(model)`, `to_inference(model)` and
`to_training(model)` (SparseLinear's inference mode for a whole model), sparsity-aware init, layer
densities and masks, metrics (summary, flops, gradient_flow) and `SparseAveragedModel` (EMA, SWA).

Imports only `sparsekern.ops` below it; the algorithms above drive these modules' masks.
"""
from . import distributions, init
from .attention import SparseMultiheadAttention
from .averaging import SparseAveragedModel
from .metrics import flops, gradient_flow, summary
from .convolutions import (SparseConv1d, SparseConv2d, SparseConv3d, SparseConvNd, SparseConvTranspose1d,
                           SparseConvTranspose2d, SparseConvTranspose3d, SparseConvTransposeNd)
from .modules import SparseLinear, SparseModule, sparse_modules
from .recurrent import SparseGRU, SparseLSTM, SparseRNN, SparseRNNBase
from .densify import densify
from .inference import to_inference, to_training
from .sparsify import densities, masks, sparsify

__all__ = ["SparseModule", "SparseLinear", "SparseConvNd", "SparseConv1d", "SparseConv2d", "SparseConv3d",
           "SparseConvTransposeNd", "SparseConvTranspose1d", "SparseConvTranspose2d", "SparseConvTranspose3d",
           "SparseMultiheadAttention", "SparseRNNBase", "SparseLSTM", "SparseGRU", "SparseRNN",
           "SparseAveragedModel", "sparse_modules", "sparsify", "densify", "to_inference", "to_training",
           "distributions", "init", "gradient_flow", "summary", "flops", "densities", "masks"]
