"""Masked linear layer in Triton: y = x @ where(mask, W, 0).T + b, and both backward products.

Contract: `sparsekern.ops.masked_linear`. x: (..., K); weight W: (N, K); mask: bool (N, K); bias: (N,)
or None. Entries off the mask contribute nothing even when they hold inf or NaN, because the mask is
applied with a select, never a multiply.

Design
------
The mask is never expanded into a masked weight. Once per mask version, `mask_layout` reads the bool
mask in one pass (`_pack_mask_kernel`) and keeps small tensors:

* `bits`: int32 (N, ceil(K/32)); bit j of word w in row n is mask[n, 32w + j]. Kernels read the mask
  at one bit per weight (1/16 of a bf16 weight's bytes, against 1/2 for the bool mask): one int32
  load per 32 weights, expanded in registers and applied with a select as each weight tile loads.
* `tiles`: int8 (ceil(N/32), ceil(K/32)), 1 where a 32x32 block of the mask holds any active entry.
* when at least a fifth of those blocks are empty (`skip_tiles`), step lists (CSR) for the two
  matmuls: per strip of 64 output features, the 32-deep reduction steps whose weight tile has an
  active entry. The kernel's block-sparse path loops over that list only, so skipped tiles cost
  nothing (no loads, no dot, no branch in the loop body: the loads stay software-pipelined, which a
  branch around them prevents). Masks with few empty blocks take the plain loop over every step.
Block-structured masks therefore get faster as they get sparser, in all three products: the weight
gradient tests its tile's flags once and writes zeros for an empty tile without reading dy or x.
A mask whose 32x32 blocks (aligned at 0) are all-or-nothing is skipped exactly; nothing else is
needed from the caller (DST passes its block mask as a plain bool mask).

The layouts are cached by mask identity and `mask._version`, so an in-place update of the mask
(`mask.copy_(...)`, `mask[...] = ...`) is seen; a mask changed behind the version counter
(through `.data`, or by another library) needs `forget_mask_layouts()`. Building a layout reads the
mask once and synchronises with the host once (to count active blocks and build the step lists).

Kernels:
* `_masked_weight_matmul_kernel`: C[M, P] = A[M, R] @ B[R, P] (+ bias), B the masked weight read
  transposed (forward: A = x, P = N, R = K) or as stored (dx = dy @ Wm: A = dy, P = K, R = N). It
  computes the transposed tile C^T = Wm_tile @ A_tile^T so that the masked weight, which passes
  through registers for the select anyway, is the left dot operand (the one a Hopper wgmma can
  take from registers) and the activations stream in as the right one. Two autotuned launchers
  share it: every-step configs, and block-sparse configs whose weight tile is the lists' 64x32.
* `_grad_weight_kernel`: dW[N, K] = dy^T @ x, reduced over all M rows. Masked: a tile with no active
  block stores zeros without reading dy or x; other tiles are zeroed off the mask at the store.
  `dense_grad=True` computes every tile.
All accumulate in fp32 (fp64 for fp64 inputs); fp32 inputs use tf32 exactly when torch does
(`torch.backends.cuda.matmul.allow_tf32`). Compiled for sm_90 without a GPU
(benchmarks/triton_compile_check.py), both matmul paths use wgmma with cp.async pipelining for
fp16/bf16.

Expected cost on a GPU (to be measured by sparsekern/bench/cases/triton_masked_linear.py; not
measured yet, there was no GPU when this was written). For M tokens, a dense matmul moves about
2(MK + NK + MN) bytes in bf16 and does 2MNK flops, so at M = 4096, N = K = 4096 it is compute bound
(137 GFLOP, ~0.2 ms at ~700 TFLOP/s). The mask adds: the packed bits, NK/8 bytes read once per M
tile (2 MB for 4096^2, 1/16 of the weight traffic, mostly from L2); and, per weight element per M
tile, a shift, an and and a select on the CUDA cores against BLOCK_M = 128 tensor-core
multiply-adds, work that can overlap the asynchronous wgmma. The layout pass reads NK bytes once
per mask version (16 MB, ~10 us, amortised over the steps between mask updates). The target is
<= 1.05x of a dense torch.matmul for unstructured masks at any density: no tile can be skipped there
(a 32x32 block of a 5%-dense random mask is essentially never empty), so the kernel must match
cuBLAS on dense tiles, which autotuning over the configs below is for. Block masks at block density d
run a fraction of about 1 - (1 - d)^2 of the 64x32 steps (0.19 at d = 0.1, ~5x fewer than dense),
and the weight gradient skips whole output tiles: with its 32x32-tile configs (which autotuning
can pick for such masks, keyed on the active fraction) a fraction 1 - d of them.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._autotune import autotune

# Side of the square mask blocks summarised by one tile flag; kernel tiles are multiples of it.
FLAG_BLOCK = 32
_FLAG = tl.constexpr(FLAG_BLOCK)  # the same, as kernels may read it


# Weight-plane tile of the matmuls' block-sparse path: SPARSE_TILE_P along the output features of
# the product (rows of W forward, columns of W in dx), SPARSE_TILE_R along its reduction.
SPARSE_TILE_P, SPARSE_TILE_R = 64, 32
_SPARSE_P, _SPARSE_R = tl.constexpr(SPARSE_TILE_P), tl.constexpr(SPARSE_TILE_R)


@dataclass(frozen=True)
class Steps:
    """For each strip of SPARSE_TILE_P output features, the reduction steps (of SPARSE_TILE_R) whose
    weight tile holds any active entry, in CSR form: strip i runs steps[starts[i]:starts[i + 1]]."""
    starts: Tensor
    steps: Tensor


@dataclass(frozen=True)
class MaskLayout:
    """What the kernels read instead of the bool mask (see the module docstring)."""
    bits: Tensor
    tiles: Tensor
    # Fraction of 32x32 blocks with any active entry, in eighths: an autotuning key, so block-sparse
    # and dense-ish masks can pick different tile shapes.
    active_eighths: int
    # The active steps of the forward (x @ Wm^T) and dx (dy @ Wm) products, for masks whose blocks are
    # empty often enough to visit only the active ones (`skip_tiles`); None otherwise.
    forward_steps: Steps | None = None
    grad_input_steps: Steps | None = None

    @property
    def skip_tiles(self) -> bool:
        return self.forward_steps is not None


def _steps(flags: Tensor) -> Steps:
    """CSR of a 2-D bool (strips, steps) map."""
    counts = flags.sum(1, dtype=torch.int32)
    starts = torch.zeros(flags.shape[0] + 1, dtype=torch.int32, device=flags.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return Steps(starts, flags.nonzero()[:, 1].to(torch.int32))


def _any_in_pairs(flags: Tensor, dim: int) -> Tensor:
    """flags OR-ed over consecutive pairs along `dim` (odd sizes padded with False)."""
    if flags.shape[dim] % 2:
        flags = torch.cat([flags, flags.new_zeros((1, flags.shape[1]) if dim == 0 else (flags.shape[0], 1))], dim)
    shape = (flags.shape[0] // 2, 2, flags.shape[1]) if dim == 0 else (flags.shape[0], flags.shape[1] // 2, 2)
    return flags.reshape(shape).any(dim + 1)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _pack_mask_kernel(mask_ptr, bits_ptr, tiles_ptr, N, K, WORDS,
                      stride_mn, stride_mk, stride_bits, stride_tiles,
                      WORDS_PER_PROGRAM: tl.constexpr):
    row_block = tl.program_id(0)
    rows = row_block * _FLAG + tl.arange(0, _FLAG)
    words = tl.program_id(1) * WORDS_PER_PROGRAM + tl.arange(0, WORDS_PER_PROGRAM)
    lanes = tl.arange(0, 32)
    cols = words[:, None] * 32 + lanes[None, :]
    in_bounds = (rows[:, None, None] < N) & (cols[None, :, :] < K)
    active = tl.load(mask_ptr + rows[:, None, None] * stride_mn + cols[None, :, :] * stride_mk,
                     mask=in_bounds, other=0).to(tl.int32)
    # OR of distinct bits: exact for bit 31 too, where an integer sum would rely on wrap-around.
    bits = tl.reduce(active << lanes[None, None, :], 2, _or)
    tl.store(bits_ptr + rows[:, None] * stride_bits + words[None, :], bits,
             mask=(rows[:, None] < N) & (words[None, :] < WORDS))
    any_active = tl.max((bits != 0).to(tl.int8), axis=0)
    tl.store(tiles_ptr + row_block * stride_tiles + words, any_active, mask=words < WORDS)


def pack_mask(mask: Tensor) -> MaskLayout:
    """The packed bits and tile flags of a 2-D bool mask (one kernel, one pass over the mask)."""
    n, k = mask.shape
    words = triton.cdiv(k, 32)
    bits = torch.empty((n, words), dtype=torch.int32, device=mask.device)
    tiles = torch.empty((triton.cdiv(n, FLAG_BLOCK), words), dtype=torch.int8, device=mask.device)
    if mask.numel():
        words_per_program = 8
        grid = (tiles.shape[0], triton.cdiv(words, words_per_program))
        _pack_mask_kernel[grid](mask, bits, tiles, n, k, words, mask.stride(0), mask.stride(1),
                                bits.stride(0), tiles.stride(0), WORDS_PER_PROGRAM=words_per_program)
    active = int(tiles.sum()) / tiles.numel() if tiles.numel() else 1.0
    if active >= 0.8:
        # Few empty blocks: a plain loop over every step (no indirection) is faster.
        return MaskLayout(bits, tiles, round(8 * active))
    flags = tiles != 0  # (row blocks of W, column blocks of W), 32x32 each
    # Forward: strips of 64 rows of W, steps of 32 columns. dx: strips of 64 columns, steps of 32 rows.
    return MaskLayout(bits, tiles, round(8 * active), forward_steps=_steps(_any_in_pairs(flags, 0)),
                      grad_input_steps=_steps(_any_in_pairs(flags, 1).T))


_LAYOUTS: dict[int, tuple] = {}


def mask_layout(mask: Tensor) -> MaskLayout:
    """`pack_mask(mask)`, cached while the same mask object keeps the same version."""
    if mask.is_inference():
        return pack_mask(mask)  # inference tensors have no version counter to key a cache on
    key = id(mask)
    cached = _LAYOUTS.get(key)
    if cached is not None and cached[0]() is mask and cached[1] == mask._version:
        return cached[2]
    layout = pack_mask(mask)
    _LAYOUTS[key] = (weakref.ref(mask, lambda _, key=key: _LAYOUTS.pop(key, None)), mask._version, layout)
    return layout


def forget_mask_layouts() -> None:
    """Drops every cached layout (for masks changed without bumping their version counter)."""
    _LAYOUTS.clear()


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_P": p, "BLOCK_R": r, "GROUP": 8}, num_warps=w, num_stages=s)
            for m, p, r, w, s in shapes]


# First entry of each list: what the interpreter runs (large tiles keep its Python-level work small).
_MATMUL_CONFIGS = _configs([
    (64, 64, 64, 4, 2),
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 64, 32, 4, 4), (256, 64, 32, 8, 3),
])
# The block-sparse path: every config has the weight-plane tile of the step lists.
_SPARSE_MATMUL_CONFIGS = _configs([
    (64, SPARSE_TILE_P, SPARSE_TILE_R, 4, 3),
    (128, SPARSE_TILE_P, SPARSE_TILE_R, 4, 3), (128, SPARSE_TILE_P, SPARSE_TILE_R, 4, 5),
    (256, SPARSE_TILE_P, SPARSE_TILE_R, 4, 3), (256, SPARSE_TILE_P, SPARSE_TILE_R, 8, 4),
])
_GRAD_WEIGHT_CONFIGS = _configs([
    (64, 64, 64, 4, 2),
    (64, 128, 128, 8, 3), (64, 256, 128, 8, 3), (64, 128, 256, 8, 3), (32, 128, 128, 4, 4),
    (64, 32, 32, 4, 4), (128, 32, 32, 4, 4), (64, 64, 32, 4, 4), (64, 32, 64, 4, 4),
])


@triton.jit
def _grouped_tile(M, P, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, GROUP: tl.constexpr):
    """(m tile, p tile) of this program, walking GROUP m tiles per p tile so neighbours share L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_p = tl.cdiv(P, BLOCK_P)
    per_group = GROUP * tiles_p
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(tiles_m - first_m, GROUP)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _any_active(tiles_ptr, stride_tiles, rows0, cols0, flag_rows, flag_cols,
                ROWS: tl.constexpr, COLS: tl.constexpr):
    """Whether the weight-plane tile at (rows0, cols0) of ROWS x COLS has any active 32x32 block."""
    row_flags = rows0 // _FLAG + tl.arange(0, ROWS // _FLAG)
    col_flags = cols0 // _FLAG + tl.arange(0, COLS // _FLAG)
    flags = tl.load(tiles_ptr + row_flags[:, None] * stride_tiles + col_flags[None, :],
                    mask=(row_flags[:, None] < flag_rows) & (col_flags[None, :] < flag_cols), other=0)
    return tl.max(tl.max(flags, axis=1), axis=0) > 0


@triton.jit
def _mask_bits(bits_ptr, stride_bits, row0, col0, rows_total, cols_total,
               ROWS: tl.constexpr, COLS: tl.constexpr):
    """The mask on the ROWS x COLS weight tile at (row0, col0), col0 a multiple of 32, as a bool tile.

    One int32 load per 32 weights, expanded in registers (bits past the last column are 0)."""
    rows = row0 + tl.arange(0, ROWS)
    words = col0 // 32 + tl.arange(0, COLS // 32)
    packed = tl.load(bits_ptr + rows[:, None] * stride_bits + words[None, :],
                     mask=(rows[:, None] < rows_total) & (words[None, :] < tl.cdiv(cols_total, 32)), other=0)
    bits = (packed[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, COLS)) != 0


@triton.jit
def _masked_weight_step(acc, a_ptr, w_ptr, bits_ptr, offs_m, p0, r0, M, P, R,
                        stride_am, stride_ar, stride_wp, stride_wr, stride_bits,
                        WEIGHT_ROWS_ARE_P: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + Wm[p0:p0+BLOCK_P, r0:r0+BLOCK_R] @ A[:, r0:r0+BLOCK_R]^T, the mask applied as W loads."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    w = tl.load(w_ptr + offs_p[:, None] * stride_wp + offs_r[None, :] * stride_wr,
                mask=(offs_p[:, None] < P) & (offs_r[None, :] < R), other=0)
    # The weight's rows are P in the forward product (W^T is read) and R in dx (W as stored).
    if WEIGHT_ROWS_ARE_P:
        keep = _mask_bits(bits_ptr, stride_bits, p0, r0, P, R, BLOCK_P, BLOCK_R)
    else:
        keep = tl.trans(_mask_bits(bits_ptr, stride_bits, r0, p0, R, P, BLOCK_R, BLOCK_P))
    w = tl.where(keep, w, tl.zeros_like(w))
    a_t = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_m[None, :] * stride_am,
                  mask=(offs_r[:, None] < R) & (offs_m[None, :] < M), other=0)
    return tl.dot(w, a_t, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _masked_weight_matmul_kernel(
        a_ptr, w_ptr, bits_ptr, starts_ptr, steps_ptr, bias_ptr, c_ptr,
        M, P, R, ACTIVE_EIGHTHS,
        stride_am, stride_ar, stride_wp, stride_wr, stride_bits, stride_cm, stride_cp,
        WEIGHT_ROWS_ARE_P: tl.constexpr, SKIP_TILES: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    tile_m, tile_p = _grouped_tile(M, P, BLOCK_M, BLOCK_P, GROUP)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p0 = tile_p * BLOCK_P
    offs_p = p0 + tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=ACC_DTYPE)
    if SKIP_TILES:
        # Only the steps whose weight tile has an active entry, from the layout's lists. Loop bodies
        # without a branch let Triton software-pipeline the loads (the step index is a load too).
        tl.static_assert((BLOCK_P == _SPARSE_P) & (BLOCK_R == _SPARSE_R))
        for i in range(tl.load(starts_ptr + tile_p), tl.load(starts_ptr + tile_p + 1)):
            r0 = tl.load(steps_ptr + i) * BLOCK_R
            acc = _masked_weight_step(acc, a_ptr, w_ptr, bits_ptr, offs_m, p0, r0, M, P, R, stride_am,
                                      stride_ar, stride_wp, stride_wr, stride_bits, WEIGHT_ROWS_ARE_P,
                                      ACC_DTYPE, INPUT_PRECISION, BLOCK_P, BLOCK_R)
    else:
        for r0 in range(0, R, BLOCK_R):
            acc = _masked_weight_step(acc, a_ptr, w_ptr, bits_ptr, offs_m, p0, r0, M, P, R, stride_am,
                                      stride_ar, stride_wp, stride_wr, stride_bits, WEIGHT_ROWS_ARE_P,
                                      ACC_DTYPE, INPUT_PRECISION, BLOCK_P, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0).to(ACC_DTYPE)[:, None]
    tl.store(c_ptr + offs_m[None, :] * stride_cm + offs_p[:, None] * stride_cp,
             acc.to(c_ptr.dtype.element_ty), mask=(offs_p[:, None] < P) & (offs_m[None, :] < M))


_MATMUL_KEY = ["M", "P", "R", "ACTIVE_EIGHTHS", "WEIGHT_ROWS_ARE_P"]
_dense_steps_matmul = autotune(_MATMUL_CONFIGS, key=_MATMUL_KEY)(_masked_weight_matmul_kernel)
_sparse_steps_matmul = autotune(_SPARSE_MATMUL_CONFIGS, key=_MATMUL_KEY)(_masked_weight_matmul_kernel)


@triton.jit
def _product_over_m(dy_ptr, x_ptr, offs_n, offs_k, M, N, K, stride_dym, stride_dyn, stride_xm, stride_xk,
                    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dy_t = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                       mask=(offs_n[:, None] < N) & (offs_m[None, :] < M), other=0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        acc = tl.dot(dy_t, x, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@autotune(_GRAD_WEIGHT_CONFIGS, key=["N", "K", "M", "ACTIVE_EIGHTHS", "DENSE"])
@triton.jit
def _grad_weight_kernel(
        dy_ptr, x_ptr, bits_ptr, tiles_ptr, dw_ptr,
        N, K, M, ACTIVE_EIGHTHS,
        stride_dym, stride_dyn, stride_xm, stride_xk, stride_bits, stride_tiles, stride_wn, stride_wk,
        DENSE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    # Output tiles are BLOCK_P (rows of W, N) x BLOCK_R (columns of W, K); the reduction runs over M.
    tile_n, tile_k = _grouped_tile(N, K, BLOCK_P, BLOCK_R, GROUP)
    offs_n = tile_n * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tile_k * BLOCK_R + tl.arange(0, BLOCK_R)
    in_bounds = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if DENSE:
        acc = _product_over_m(dy_ptr, x_ptr, offs_n, offs_k, M, N, K, stride_dym, stride_dyn, stride_xm,
                              stride_xk, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_P, BLOCK_R)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=ACC_DTYPE)
        if _any_active(tiles_ptr, stride_tiles, tile_n * BLOCK_P, tile_k * BLOCK_R,
                       tl.cdiv(N, _FLAG), tl.cdiv(K, _FLAG), BLOCK_P, BLOCK_R):
            acc = _product_over_m(dy_ptr, x_ptr, offs_n, offs_k, M, N, K, stride_dym, stride_dyn, stride_xm,
                                  stride_xk, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_P, BLOCK_R)
            keep = _mask_bits(bits_ptr, stride_bits, tile_n * BLOCK_P, tile_k * BLOCK_R, N, K, BLOCK_P, BLOCK_R)
            acc = tl.where(keep, acc, tl.zeros_like(acc))
    tl.store(dw_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=in_bounds)


def _precision(dtype: torch.dtype, device: torch.device) -> tuple:
    """(accumulator dtype, tl.dot input precision) for inputs of `dtype`."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return tl.float32, "tf32"
    return tl.float32, "ieee"


def _masked_weight_matmul(a: Tensor, weight: Tensor, layout: MaskLayout, bias: Tensor | None,
                          weight_rows_are_p: bool) -> Tensor:
    """C = a @ Wm.T (weight_rows_are_p) or a @ Wm, for a 2-D `a`."""
    m, r = a.shape
    p = weight.shape[0] if weight_rows_are_p else weight.shape[1]
    c = torch.empty((m, p), dtype=a.dtype, device=a.device)
    if m == 0 or p == 0:
        return c
    if r == 0:
        return c.copy_(bias.expand(m, p)) if bias is not None else c.zero_()
    # (stride along P, stride along R) of the weight.
    stride_wp, stride_wr = (weight.stride(0), weight.stride(1)) if weight_rows_are_p else \
        (weight.stride(1), weight.stride(0))
    bias = bias.contiguous() if bias is not None else None  # read with unit stride
    acc_dtype, precision = _precision(a.dtype, a.device)
    steps = layout.forward_steps if weight_rows_are_p else layout.grad_input_steps
    kernel = _sparse_steps_matmul if steps is not None else _dense_steps_matmul
    # Without step lists the kernel never reads them: any int32 tensor fills the arguments.
    starts, step_list = (steps.starts, steps.steps) if steps is not None else (layout.bits, layout.bits)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"]),)  # noqa: E731
    kernel[grid](
        a, weight, layout.bits, starts, step_list, bias if bias is not None else c, c,
        m, p, r, layout.active_eighths,
        a.stride(0), a.stride(1), stride_wp, stride_wr, layout.bits.stride(0), c.stride(0), c.stride(1),
        WEIGHT_ROWS_ARE_P=weight_rows_are_p, SKIP_TILES=steps is not None, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype,
        INPUT_PRECISION=precision)
    return c


def _rows(t: Tensor) -> Tensor:
    """t as a 2-D (rows, last dim) tensor; reshape(-1, 0) would be ambiguous for empty last dims."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None,
                  layout: MaskLayout | None = None) -> Tensor:
    """y = x @ where(mask, weight, 0).T + bias over the leading dims of x; `layout` defaults to
    the cached `mask_layout(mask)`."""
    layout = layout if layout is not None else mask_layout(mask)
    out = _masked_weight_matmul(_rows(x), weight, layout, bias, weight_rows_are_p=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor,
                             layout: MaskLayout | None = None) -> Tensor:
    """dx = grad_out @ where(mask, weight, 0) over the leading dims of grad_out."""
    layout = layout if layout is not None else mask_layout(mask)
    out = _masked_weight_matmul(_rows(grad_out), weight, layout, None,
                                weight_rows_are_p=False)
    return out.view(*grad_out.shape[:-1], weight.shape[1])


def masked_linear_grad_weight(grad_out: Tensor, x: Tensor, mask: Tensor, dense_grad: bool,
                              layout: MaskLayout | None = None) -> Tensor:
    """dW = grad_out^T @ x over all leading rows, zero off the mask unless `dense_grad`."""
    dy = _rows(grad_out)
    x2 = _rows(x)
    n, k = mask.shape
    m = dy.shape[0]
    dw = torch.empty((n, k), dtype=dy.dtype, device=dy.device)
    if n == 0 or k == 0:
        return dw
    if m == 0:
        return dw.zero_()
    layout = layout if layout is not None else mask_layout(mask)
    acc_dtype, precision = _precision(dy.dtype, dy.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_P"]) * triton.cdiv(k, meta["BLOCK_R"]),)  # noqa: E731
    _grad_weight_kernel[grid](
        dy, x2, layout.bits, layout.tiles, dw, n, k, m, layout.active_eighths,
        dy.stride(0), dy.stride(1), x2.stride(0), x2.stride(1), layout.bits.stride(0), layout.tiles.stride(0),
        dw.stride(0), dw.stride(1),
        DENSE=dense_grad, ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision)
    return dw
