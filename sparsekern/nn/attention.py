"""SparseMultiheadAttention: nn.MultiheadAttention whose projections are SparseLinear layers.

F.multi_head_attention_forward multiplies by the projection weights itself, so nn.MultiheadAttention
cannot hold a sparse layer in place of its weights. Here each projection is a SparseLinear of its own
(`in_proj`, or `q_proj`/`k_proj`/`v_proj` when kdim or vdim differ from embed_dim, and `out_proj`), and
forward hands F.multi_head_attention_forward the weight each of them would multiply by
(`weight_for_dense_kernel`): the output is the dense attention's on the masked weights, and the weight
gradients are masked (whole with a projection's `dense_grad`). The algorithms, sparsify's densities,
the sparsity-aware init and checkpoints therefore see ordinary sparse layers.

The input-projection bias (`in_proj_bias`), `bias_k` and `bias_v` are Parameters of the attention
module itself, as in nn.MultiheadAttention (the projections have no bias but out_proj's), so that a
plain nn.MultiheadAttention state dict loads with only its projection weights renamed.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ..ops import _checks, _masked_linear_op
from .modules import (DenseClass, SparseLinear, SparseModule, _check_dtype, _copy_masked_into, _rename_dense_entries,
                      _translate_pruned, is_computed, weight_is_computed)

# nn.MultiheadAttention's keys of the input-projection weights -> this module's.
_DENSE_WEIGHT_KEYS = {"in_proj_weight": "in_proj.weight", "q_proj_weight": "q_proj.weight",
                      "k_proj_weight": "k_proj.weight", "v_proj_weight": "v_proj.weight"}
# The attention module's own Parameters (the projections hold the weights, out_proj its bias).
_OWN_BIASES = ("in_proj_bias", "bias_k", "bias_v")
# What nn.MultiheadAttention holds of its own (None where unused): anything else is a user's.
DENSE_ENTRIES = (*_DENSE_WEIGHT_KEYS, *_OWN_BIASES, "out_proj")


class SparseMultiheadAttention(nn.Module):
    """A drop-in for nn.MultiheadAttention (same arguments, forward and outputs) with sparse projections.

    Submodules: `in_proj` (SparseLinear(embed_dim, 3 * embed_dim), no bias) when kdim and vdim equal
    embed_dim, else `q_proj`, `k_proj`, `v_proj` (SparseLinear from embed_dim, kdim, vdim to embed_dim);
    and `out_proj` (SparseLinear(embed_dim, embed_dim)). `in_proj_weight`, `q_proj_weight`,
    `k_proj_weight` and `v_proj_weight` read the projections' weights (None where nn.MultiheadAttention
    has none), for code that reads them from an nn.MultiheadAttention: nn.TransformerEncoderLayer's fused
    eval-mode kernel does, and multiplies by them directly. That is exact while each projection keeps
    `zero_off_mask`; a projection that holds values off its mask carries a forward pre-hook, which keeps
    the layer off that kernel (see `SparseModule.zero_off_mask`).

    Forward multiplies by the projections' weights without running the projections' forwards, as
    nn.MultiheadAttention's does with its out_proj: their hooks do not fire, and a projection weight that a
    forward pre-hook computes (torch.nn.utils.prune, the older weight_norm and spectral_norm) raises ValueError
    naming the projection; a parametrization (torch.nn.utils.parametrize) is computed as forward reads it. So does
    one in inference mode (`SparseLinear.to_inference`), whose packed weight it would not read.

    Each projection carries its own `mask` and `zero_off_mask` promise (see SparseLinear): `sparsekern.sparsify`
    counts each as one layer of the distribution, and the algorithms update their masks like any other layer's.
    `from_dense(mha)` shares an nn.MultiheadAttention's Parameters; `to_dense()` returns a plain one holding the
    masked weights (`sparsekern.densify(model)` turns a whole model back). A plain or torch-pruned
    nn.MultiheadAttention's state dict loads into it. More: the docstring of `sparsekern.nn.attention` and the
    README's Python API section.
    """

    dense_class = DenseClass(nn.MultiheadAttention)
    # nn.MultiheadAttention's, which reads num_heads only: nn.TransformerEncoderLayer's fused path calls it.
    merge_masks = nn.MultiheadAttention.merge_masks

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None):
        embed_dim = _checks.count(embed_dim, "embed_dim", 1)
        num_heads = _checks.count(num_heads, "num_heads", 1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        kdim = embed_dim if kdim is None else _checks.count(kdim, "kdim", 1)
        vdim = embed_dim if vdim is None else _checks.count(vdim, "vdim", 1)
        dropout = _checks.number(dropout, "dropout", lambda value: 0 <= value <= 1, "in [0, 1]")
        for value, name in ((bias, "bias"), (add_bias_kv, "add_bias_kv"), (add_zero_attn, "add_zero_attn"),
                            (batch_first, "batch_first")):
            _checks.flag(value, name)
        _check_dtype(dtype)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.kdim, self.vdim = embed_dim, kdim, vdim
        self._qkv_same_embed_dim = kdim == embed_dim and vdim == embed_dim
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        if self._qkv_same_embed_dim:
            self.in_proj = SparseLinear(embed_dim, 3 * embed_dim, bias=False, **factory)
        else:
            self.q_proj = SparseLinear(embed_dim, embed_dim, bias=False, **factory)
            self.k_proj = SparseLinear(kdim, embed_dim, bias=False, **factory)
            self.v_proj = SparseLinear(vdim, embed_dim, bias=False, **factory)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = SparseLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation (its _reset_parameters, on this module's tensors), the input
        projections' weights then zeroed off their masks (unchanged), as a sparse layer's reset_parameters does."""
        if any(parameter.is_meta for parameter in self.parameters()):
            return   # from_dense builds on the meta device and adopts the dense module's Parameters
        for projection in self.input_projections():
            nn.init.xavier_uniform_(projection.weight)
            if not weight_is_computed(projection):   # a computed weight is masked by forward
                projection.zero_weights_off_mask()
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def input_projections(self) -> list[SparseLinear]:
        """[in_proj] or [q_proj, k_proj, v_proj]."""
        return [self.in_proj] if self._qkv_same_embed_dim else [self.q_proj, self.k_proj, self.v_proj]

    def named_projections(self) -> list[tuple[str, SparseLinear]]:
        """(name, layer) of every projection: "in_proj" (or "q_proj", "k_proj", "v_proj") and "out_proj"; not the
        other submodules a user may have attached."""
        names = ("in_proj",) if self._qkv_same_embed_dim else ("q_proj", "k_proj", "v_proj")
        return [(name, getattr(self, name)) for name in (*names, "out_proj")]

    @property
    def in_proj_weight(self) -> Tensor | None:
        return self.in_proj.weight if self._qkv_same_embed_dim else None

    @property
    def q_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """nn.MultiheadAttention's forward (its general path; its fast path for a NestedTensor) on the masked
        projection weights."""
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights)
        if self.batch_first and is_batched:
            # Transposed together where they are one tensor: F.multi_head_attention_forward takes the
            # self-attention path (one projection) only when query is key is value.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        *projections, out_proj_weight = [_weight_for_dense_kernel(name, layer, self)
                                         for name, layer in self.named_projections()]
        separate = {} if self._qkv_same_embed_dim else dict(
            use_separate_proj_weight=True, q_proj_weight=projections[0], k_proj_weight=projections[1],
            v_proj_weight=projections[2])
        attn_output, attn_output_weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            projections[0] if self._qkv_same_embed_dim else None, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            out_proj_weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal, **separate)
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_output_weights
        return attn_output, attn_output_weights

    def _nested_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                        need_weights: bool, attn_mask: Tensor | None,
                        average_attn_weights: bool) -> tuple[Tensor, Tensor | None]:
        """nn.MultiheadAttention's fast path, torch's fused attention, on the weights the projections multiply
        by: the only one that takes a NestedTensor. nn.TransformerEncoder hands its layers one in eval mode
        when given a src_key_padding_mask, and a layer kept off its own fused kernel (by a forward hook: a sparse
        layer holding values off its mask carries one) passes it to its attention. ValueError where
        nn.MultiheadAttention's fast path does not run (it raises AssertionError)."""
        tensors = (query, *self.parameters())
        if not (query is key is value and self._qkv_same_embed_dim and self.batch_first and not self.training
                and self.in_proj_bias is not None and self.bias_k is None and not self.add_zero_attn
                and attn_mask is None and key_padding_mask is None and not torch.is_autocast_enabled()
                and not (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors))):
            raise ValueError("query is a NestedTensor, which SparseMultiheadAttention takes only where "
                             "nn.MultiheadAttention's fast path does: self-attention (query is key is value), "
                             "batch_first, eval mode, in_proj_bias, no bias_k/bias_v, add_zero_attn, masks or "
                             "autocast, and no gradient")
        merged_mask, mask_type = self.merge_masks(attn_mask, key_padding_mask, query)
        return torch._native_multi_head_attention(
            query, key, value, self.embed_dim, self.num_heads,
            _weight_for_dense_kernel("in_proj", self.in_proj, self), self.in_proj_bias,
            _weight_for_dense_kernel("out_proj", self.out_proj, self), self.out_proj.bias, merged_mask, need_weights,
            average_attn_weights, mask_type)

    @classmethod
    def from_dense(cls, attention: nn.MultiheadAttention) -> "SparseMultiheadAttention":
        """A SparseMultiheadAttention (masks all True) sharing `attention`'s Parameters (see
        SparseLinear.from_dense): the input-projection weights become its projections' weights, and
        out_proj's weight and bias its out_proj's."""
        if not isinstance(attention, nn.MultiheadAttention):
            raise TypeError(f"{cls.__name__}.from_dense takes an nn.MultiheadAttention, "
                            f"got {type(attention).__name__}")
        weights = [attention.in_proj_weight] if attention._qkv_same_embed_dim else [
            attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight]
        for weight in [*weights, attention.out_proj.weight]:
            if not isinstance(weight, nn.Parameter):
                raise TypeError(f"{cls.__name__}.from_dense takes an nn.MultiheadAttention whose projection "
                                f"weights are Parameters, got a {type(weight).__name__} (a parametrization or "
                                f"a weight hook computes it)")
        for name in computed_biases(attention):
            raise TypeError(f"{cls.__name__}.from_dense takes an nn.MultiheadAttention whose {name} is a Parameter "
                            f"(or None), got one computed from other parameters (a parametrization or "
                            f"torch.nn.utils.prune)")
        sparse = cls(attention.embed_dim, attention.num_heads, dropout=attention.dropout,
                     bias=attention.in_proj_bias is not None, add_bias_kv=attention.bias_k is not None,
                     add_zero_attn=attention.add_zero_attn, kdim=attention.kdim, vdim=attention.vdim,
                     batch_first=attention.batch_first, device="meta", dtype=weights[0].dtype)
        for projection, weight in zip(sparse.input_projections(), weights):
            projection.weight = weight
            projection.mask = torch.ones_like(weight, dtype=torch.bool)
        sparse.out_proj = SparseLinear.from_dense(attention.out_proj)
        sparse.in_proj_bias, sparse.bias_k, sparse.bias_v = attention.in_proj_bias, attention.bias_k, attention.bias_v
        sparse.train(attention.training)
        return sparse

    def to_dense(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention with copies of the masked projection weights and the biases."""
        weight = (self.in_proj if self._qkv_same_embed_dim else self.q_proj).weight
        dense = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                      bias=self.in_proj_bias is not None, add_bias_kv=self.bias_k is not None,
                                      add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
                                      batch_first=self.batch_first, device="meta", dtype=weight.dtype)
        with torch.no_grad():
            for name, projection in zip(("in_proj",) if self._qkv_same_embed_dim else ("q_proj", "k_proj", "v_proj"),
                                        self.input_projections()):
                setattr(dense, f"{name}_weight", nn.Parameter(projection.masked_weight(),
                                                              requires_grad=projection.weight.requires_grad))
            for name in ("in_proj_bias", "bias_k", "bias_v"):
                parameter = getattr(self, name)
                if parameter is not None:
                    setattr(dense, name, nn.Parameter(parameter.detach().clone(),
                                                      requires_grad=parameter.requires_grad))
        _copy_masked_into(dense.out_proj, self.out_proj)   # keeps nn.MultiheadAttention's own out_proj class
        dense.train(self.training)
        return dense

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain nn.MultiheadAttention's state dict: its input-projection weights are this module's
        # projections' weights (their missing masks load as all True, SparseModule's rule). Renamed here,
        # before load_state_dict hands the children their entries; so are torch.nn.utils.prune's
        # `<weight>_orig` and `<weight>_mask` of a pruned one, which the projection then loads as its mask
        # and pruned values (SparseModule's rule too). A pruned bias of the attention's own loads as its
        # pruned values, as a sparse layer's pruned bias does.
        _translate_pruned(state_dict, prefix, _OWN_BIASES)
        _rename_dense_entries(state_dict, prefix, _DENSE_WEIGHT_KEYS)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")


def computed_biases(attention: nn.MultiheadAttention) -> list[str]:
    """The names of `attention`'s biases ("in_proj_bias", "bias_k", "bias_v", "out_proj.bias") that are computed
    from other parameters (`modules.is_computed`), which the sparse attention cannot share."""
    owners = {**{name: (attention, name) for name in _OWN_BIASES}, "out_proj.bias": (attention.out_proj, "bias")}
    return [label for label, (owner, name) in owners.items() if is_computed(owner, name)]


def _weight_for_dense_kernel(name: str, layer: SparseModule, owner: nn.Module) -> Tensor:
    """The weight the child `name` of `owner` would multiply by (SparseConvNd.forward's), for a kernel that
    multiplies by it. ValueError for a weight that a forward pre-hook computes (torch.nn.utils.prune, the older
    weight_norm and spectral_norm): the child's forward, and its hooks, do not run here (nor do those of
    nn.MultiheadAttention's out_proj), so the hook would never compute it again. A parametrization computes it as it
    is read. ValueError too for a child in inference mode (SparseLinear.to_inference), whose packed weight only its
    own forward reads."""
    if "weight" not in layer._parameters and not parametrize.is_parametrized(layer, "weight"):
        dense = owner.dense_class.__name__
        raise ValueError(f"{name}'s weight is computed by a forward pre-hook (torch.nn.utils.prune, weight_norm or "
                         f"spectral_norm), which {type(owner).__name__} does not run: it hands the weight to a "
                         f"fused op of torch, as nn.{dense} does its own; use torch.nn.utils.parametrize "
                         f"(torch.nn.utils.parametrizations), or prune the dense nn.{dense} and load its state dict")
    if layer._in_inference_mode:
        # Its packed weight would go unread, silently: the fused op multiplies by the weight.
        raise ValueError(f"{name} is in inference mode (to_inference()), which {type(owner).__name__} does not run: "
                         f"it hands {name}'s weight to a fused op of torch, as nn.{owner.dense_class.__name__} does "
                         f"its own; call {name}.to_training() (sparsekern.nn.to_inference(model) leaves such "
                         f"projections in training mode)")
    weight, mask, _, zero_off_mask = layer._forward_arguments()
    return _masked_linear_op.weight_for_dense_kernel(weight, mask, zero_off_mask, layer.dense_grad)
