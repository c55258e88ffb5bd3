"""Block-sparse masked linear in Triton: y = x @ where(mask, W, 0).T + b, and both backward products.

Contract: `sparsekern.ops.masked_linear`. x: (..., K); weight W: (N, K); mask: bool (N, K); bias: (N,)
or None. Entries off the mask contribute nothing even when they hold inf or NaN, because the mask is
applied with a select, never a multiply.

What it is for
--------------
Masks with block structure (`DST(block=...)`): the kernels visit only the weight tiles that hold an
active entry, so a 32x32-block mask at density 0.1 costs about a tenth of a dense product. A mask
with no empty tile gains nothing here: every tile would pay for the mask and the smaller tiles
against the vendor GEMM, so `sparsekern.ops` sends such masks to the dense kernel (cuBLAS) and
gives this one only masks that `skips_tiles` (its automatic choice; a backend named in
SPARSEKERN_BACKEND runs every mask, which the tests use).

Layout
------
Once per mask version, `mask_layout` reads the bool mask in one pass (`_pack_mask_kernel`) and keeps:

* `bits`: int32 (N, ceil(K/32)); bit j of word w in row n is mask[n, 32w + j] (one int32 load per 32
  weights where a tile needs its select).
* the weight-plane tile (TILE_N rows x TILE_K columns of W): the largest of 64x64, 64x32, 32x64 and
  32x32 that covers no more weight than the 32x32 tiles do, so tiles match the mask's blocks (32x32
  blocks run 32x32 tiles: at density 0.1 a tenth of the tiles are active, not the 19% of a 64x32 tile).
* per tile a flag: empty, partial (some entries active) or full (every entry active).
* step lists (CSR) of the active tiles, for the forward (per strip of TILE_N rows of W, its column
  tiles) and for dx (per strip of TILE_K columns, its row tiles), full tiles first: a strip runs
  steps[starts[i]:split[i]] with the weight tile as loaded and steps[split[i]:starts[i + 1]] through
  the select. Full tiles, and every tile when the caller promises `zero_off_mask` (weights already 0
  off the mask), skip the select, so the weight tile goes from memory to the tensor cores untouched.
* the list of active tiles for the weight gradient, whose other tiles are zero.

The layouts are cached by mask identity and `mask._version`, so an in-place update of the mask
(`mask.copy_(...)`, `mask[...] = ...`) is seen; a mask changed behind the version counter
(through `.data`, or by another library) needs `forget_mask_layouts()`. Building a layout reads the
mask once and synchronises with the host a few times (to choose the tiles and size the lists).

Kernels
-------
* `_block_matmul_kernel`: C[M, P] = A[M, R] @ B[R, P] (+ bias), B the weight read transposed
  (forward: A = x, P = N, R = K) or as stored (dx = dy @ W: A = dy, P = K, R = N). The activations
  are the left dot operand and the weight tile the right one, both loaded straight from memory: on
  Hopper both wgmma operands then come from shared memory, where the earlier kernel routed a
  selected weight tile through registers and serialized the tensor cores.
* `_block_grad_weight_kernel`: one program per active tile of dW = dy^T @ x, reduced over all M rows,
  zeroed off the mask at the store on partial tiles; the rest of dW is a memset. The dense gradient
  (`dense_grad`) is a plain GEMM and runs as torch.mm (cuBLAS).
Compiled for sm_90a by Triton 3.6 (the GPU machine's) with a real launch's divisibility hints, every
fp16/bf16 forward and dx config, select or not, is wgmma with cp.async pipelining and ptxas reports
no C7515 (serialized wgmma), which it reported for every forward config of the earlier kernel.
All accumulate in fp32 (fp64 for fp64 inputs); fp32 inputs use tf32 exactly when torch does
(`torch.backends.cuda.matmul.allow_tf32`). Offsets are int64 wherever a row index meets a stride, so
tensors past 2^31 entries are addressed right. Autotuning keys on the problem's shape and a power-of-two
bucket of the row count, not the row count itself, so a new batch or sequence length does not re-time.

Expected cost on a GPU (not measured yet: there was no GPU when this was written). At block density
d the forward and dx run a fraction d of the dense product's tile steps and dW a fraction d of its
tiles, each at the efficiency of BLOCK_M x TILE tiles (32 or 64 wide), below cuBLAS's 128-256 wide
ones; the mask costs nothing on full tiles. The layout pass reads NK bytes once per mask version.
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

# Side of the square mask blocks the pack kernel flags; every tile side is this or twice it.
FLAG_BLOCK = 32
_FLAG = tl.constexpr(FLAG_BLOCK)
# Candidate weight-plane tiles (rows of W, columns of W), largest first.
TILE_SHAPES = ((64, 64), (64, 32), (32, 64), (32, 32))
# The automatic choice takes a mask when at most this fraction of its tiles is active: above it the
# smaller tiles and the lists cost more than the skipped work saves against cuBLAS (an estimate
# from the review's 2-3x at 19% active; to be measured on a GPU).
SKIP_THRESHOLD = 0.4

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class Steps:
    """Per strip i of the output, the active weight tiles along the reduction: full tiles
    steps[starts[i]:split[i]], partial ones steps[split[i]:starts[i + 1]] (int32 tile indices)."""
    starts: Tensor
    split: Tensor
    steps: Tensor


@dataclass(frozen=True)
class MaskLayout:
    """What the kernels read instead of the bool mask (see the module docstring)."""
    bits: Tensor
    tile_n: int
    tile_k: int
    flags: Tensor              # int8 (tiles along N, tiles along K): EMPTY, PARTIAL or FULL
    active_fraction: float     # of the tiles
    forward_steps: Steps       # strips of tile_n rows of W, steps of tile_k columns
    grad_input_steps: Steps    # strips of tile_k columns of W, steps of tile_n rows
    grad_weight_tiles: Tensor  # int32 (active tiles, 2): (tile row, tile column), partial tiles flagged by sign

    @property
    def skips_tiles(self) -> bool:
        return self.active_fraction <= SKIP_THRESHOLD


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _pack_mask_kernel(mask_ptr, bits_ptr, flags_ptr, N, K, WORDS,
                      stride_mn, stride_mk, stride_bits, stride_flags,
                      WORDS_PER_PROGRAM: tl.constexpr):
    """Bits of a 32-row block of the mask, and each 32x32 block's flag (EMPTY, PARTIAL, FULL)."""
    row_block = tl.program_id(0)
    rows = row_block * _FLAG + tl.arange(0, _FLAG)
    words = tl.program_id(1) * WORDS_PER_PROGRAM + tl.arange(0, WORDS_PER_PROGRAM)
    lanes = tl.arange(0, 32)
    cols = words[:, None] * 32 + lanes[None, :]
    rows_in = rows < N
    cols_in = cols < K
    in_bounds = rows_in[:, None, None] & cols_in[None, :, :]
    active = tl.load(mask_ptr + rows.to(tl.int64)[:, None, None] * stride_mn + cols.to(tl.int64)[None, :, :] * stride_mk,
                     mask=in_bounds, other=0).to(tl.int32)
    # OR of distinct bits: exact for bit 31 too, where an integer sum would rely on wrap-around.
    bits = tl.reduce(active << lanes[None, None, :], 2, _or)
    tl.store(bits_ptr + rows.to(tl.int64)[:, None] * stride_bits + words[None, :], bits,
             mask=rows_in[:, None] & (words[None, :] < WORDS))
    # A block is full when every in-bounds row holds every in-bounds column's bit.
    in_bounds_bits = tl.reduce(cols_in.to(tl.int32) << lanes[None, :], 1, _or)
    row_full = (bits == in_bounds_bits[None, :]) | (~rows_in[:, None])
    any_active = tl.max((bits != 0).to(tl.int8), axis=0)
    full = tl.min(row_full.to(tl.int8), axis=0)
    tl.store(flags_ptr + row_block * stride_flags + words, any_active * (1 + full), mask=words < WORDS)


def _merge(flags: Tensor, rows: int, cols: int) -> Tensor:
    """Flags of rows x cols groups of 32x32 blocks: EMPTY if all are, FULL if all are, else PARTIAL."""
    r, c = flags.shape
    if flags.numel() == 0:  # no weights (and torch 2.9's pad refuses a dimension of size 0)
        return flags.new_full((-(-r // rows), -(-c // cols)), EMPTY)
    padded = torch.nn.functional.pad(flags, (0, -c % cols, 0, -r % rows), value=EMPTY)
    groups = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    any_active = groups.amax((1, 3)) > EMPTY
    # Padding past the edge holds no weights: it must not make a group partial.
    real = torch.nn.functional.pad(torch.ones_like(flags, dtype=torch.bool), (0, -c % cols, 0, -r % rows))
    all_full = ((groups == FULL) | ~real.view(groups.shape)).all(3).all(1)
    return torch.where(all_full, FULL, torch.where(any_active, PARTIAL, EMPTY)).to(torch.int8)


def _covered(flags: Tensor, tile_n: int, tile_k: int, n: int, k: int) -> Tensor:
    """Entries of the n x k weight inside the active tiles (edge tiles clipped to the weight)."""
    rows = (n - tile_n * torch.arange(flags.shape[0], device=flags.device)).clamp(max=tile_n)
    cols = (k - tile_k * torch.arange(flags.shape[1], device=flags.device)).clamp(max=tile_k)
    return rows @ (flags > EMPTY).to(torch.int64) @ cols


def _steps(flags: Tensor) -> Steps:
    """CSR of the active entries of each row of a 2-D flag map, full ones first."""
    # A stable sort on (FULL first, then PARTIAL, then EMPTY) keeps each group in column order.
    order = torch.sort(FULL - flags.to(torch.int32), dim=1, stable=True).indices
    active = (flags > EMPTY).sum(1, dtype=torch.int32)
    starts = torch.zeros(flags.shape[0] + 1, dtype=torch.int32, device=flags.device)
    torch.cumsum(active, 0, out=starts[1:])
    split = starts[:-1] + (flags == FULL).sum(1, dtype=torch.int32)
    keep = torch.arange(flags.shape[1], device=flags.device)[None, :] < active[:, None]
    return Steps(starts, split, order[keep].to(torch.int32))


def pack_mask(mask: Tensor) -> MaskLayout:
    """The layout of a 2-D bool mask (one kernel over the mask, then small torch ops on its flags)."""
    n, k = mask.shape
    words = triton.cdiv(k, 32)
    bits = torch.empty((n, words), dtype=torch.int32, device=mask.device)
    flags32 = torch.zeros((triton.cdiv(n, FLAG_BLOCK), words), dtype=torch.int8, device=mask.device)
    if mask.numel():
        words_per_program = 8
        grid = (flags32.shape[0], triton.cdiv(words, words_per_program))
        _pack_mask_kernel[grid](mask, bits, flags32, n, k, words, mask.stride(0), mask.stride(1),
                                bits.stride(0), flags32.stride(0), WORDS_PER_PROGRAM=words_per_program)
    # One host sync: the weight each candidate tile shape would cover, to pick the tiles.
    candidates = [_merge(flags32, tn // FLAG_BLOCK, tk // FLAG_BLOCK) for tn, tk in TILE_SHAPES]
    areas = torch.stack([_covered(f, tn, tk, n, k) for f, (tn, tk) in zip(candidates, TILE_SHAPES)]).tolist()
    # The largest tile that covers no more weight than 32x32 tiles do (a 64-wide tile over a
    # 32-block mask would double the work of every half-active tile).
    choice = next(i for i, area in enumerate(areas) if area == areas[-1])
    (tile_n, tile_k), flags = TILE_SHAPES[choice], candidates[choice]
    active = (flags > EMPTY)
    tiles = active.nonzero().to(torch.int32)
    partial = flags[active] == PARTIAL
    # Tile row r of a partial tile is stored as -(r + 1): the sign says whether to select.
    tiles[:, 0] = torch.where(partial, -tiles[:, 0] - 1, tiles[:, 0])
    return MaskLayout(bits, tile_n, tile_k, flags, tiles.shape[0] / max(flags.numel(), 1),
                      forward_steps=_steps(flags), grad_input_steps=_steps(flags.T),
                      grad_weight_tiles=tiles.contiguous())


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


def skips_tiles(mask: Tensor) -> bool:
    """Whether the mask's structure lets the kernels skip enough tiles to beat the dense kernel."""
    return mask.dim() == 2 and mask.numel() > 0 and mask_layout(mask).skips_tiles


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "GROUP": 8}, num_warps=w, num_stages=s) for m, w, s in shapes]


# First entry of each list: what the interpreter runs. The weight-plane tile is the layout's, so
# configs choose only the row block, warps and pipeline depth.
_MATMUL_CONFIGS = _configs([(64, 4, 3), (128, 4, 4), (128, 8, 3), (256, 8, 3)])
_GRAD_WEIGHT_CONFIGS = _configs([(64, 4, 3), (128, 4, 4), (128, 8, 3), (256, 8, 3)])
_KEY = ["P", "R", "M_BUCKET", "TILE_P", "TILE_R", "WEIGHT_ROWS_ARE_P"]


def _row_bucket(m: int) -> int:
    """The autotuning key's row count: a power of two in [16, 4096], so tunings are reused across batches."""
    return min(4096, max(16, triton.next_power_of_2(m)))


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
def _mask_tile(bits_ptr, stride_bits, row0, col0, rows_total, cols_total,
               ROWS: tl.constexpr, COLS: tl.constexpr):
    """The mask on the ROWS x COLS weight tile at (row0, col0), col0 a multiple of 32, as a bool tile.

    One int32 load per 32 weights, expanded in registers (bits past the last column are 0)."""
    rows = row0 + tl.arange(0, ROWS)
    words = col0 // 32 + tl.arange(0, COLS // 32)
    packed = tl.load(bits_ptr + rows.to(tl.int64)[:, None] * stride_bits + words[None, :],
                     mask=(rows[:, None] < rows_total) & (words[None, :] < tl.cdiv(cols_total, 32)), other=0)
    bits = (packed[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, COLS)) != 0


@triton.jit
def _block_step(acc, a_ptr, w_ptr, bits_ptr, offs_m, p0, r0, M, P, R,
                stride_am, stride_ar, stride_wp, stride_wr, stride_bits,
                SELECT: tl.constexpr, WEIGHT_ROWS_ARE_P: tl.constexpr, ACC_DTYPE: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, TILE_P: tl.constexpr, TILE_R: tl.constexpr):
    """acc + A[:, r0:r0+TILE_R] @ W-tile (TILE_R x TILE_P), the mask applied only if SELECT."""
    offs_p = p0 + tl.arange(0, TILE_P)
    offs_r = r0 + tl.arange(0, TILE_R)
    a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_r.to(tl.int64)[None, :] * stride_ar,
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0)
    w = tl.load(w_ptr + offs_r.to(tl.int64)[:, None] * stride_wr + offs_p.to(tl.int64)[None, :] * stride_wp,
                mask=(offs_r[:, None] < R) & (offs_p[None, :] < P), other=0)
    if SELECT:
        # The weight's rows are P in the forward product (W^T is read) and R in dx (W as stored).
        if WEIGHT_ROWS_ARE_P:
            keep = tl.trans(_mask_tile(bits_ptr, stride_bits, p0, r0, P, R, TILE_P, TILE_R))
        else:
            keep = _mask_tile(bits_ptr, stride_bits, r0, p0, R, P, TILE_R, TILE_P)
        w = tl.where(keep, w, tl.zeros_like(w))
    return tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _block_steps(acc, first, last, a_ptr, w_ptr, bits_ptr, steps_ptr, offs_m, p0, M, P, R,
                 stride_am, stride_ar, stride_wp, stride_wr, stride_bits,
                 SELECT: tl.constexpr, WEIGHT_ROWS_ARE_P: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, TILE_P: tl.constexpr, TILE_R: tl.constexpr):
    """acc plus the steps steps[first:last] of one strip. The loop body has no branch, so Triton can
    software-pipeline its loads (the step index is a load too)."""
    for i in range(first, last):
        r0 = tl.load(steps_ptr + i) * TILE_R
        acc = _block_step(acc, a_ptr, w_ptr, bits_ptr, offs_m, p0, r0, M, P, R, stride_am, stride_ar,
                          stride_wp, stride_wr, stride_bits, SELECT, WEIGHT_ROWS_ARE_P, ACC_DTYPE,
                          INPUT_PRECISION, TILE_P, TILE_R)
    return acc


@triton.jit
def _block_matmul_kernel(
        a_ptr, w_ptr, bits_ptr, starts_ptr, split_ptr, steps_ptr, bias_ptr, c_ptr,
        M, P, R, M_BUCKET,
        stride_am, stride_ar, stride_wp, stride_wr, stride_bits, stride_cm, stride_cp,
        WEIGHT_ROWS_ARE_P: tl.constexpr, SELECT_PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        TILE_P: tl.constexpr, TILE_R: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    tile_m, strip = _grouped_tile(M, P, BLOCK_M, TILE_P, GROUP)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p0 = strip * TILE_P
    offs_p = p0 + tl.arange(0, TILE_P)
    acc = tl.zeros((BLOCK_M, TILE_P), dtype=ACC_DTYPE)
    start = tl.load(starts_ptr + strip)
    end = tl.load(starts_ptr + strip + 1)
    plain_end = tl.load(split_ptr + strip) if SELECT_PARTIAL else end
    acc = _block_steps(acc, start, plain_end, a_ptr, w_ptr, bits_ptr, steps_ptr, offs_m, p0, M, P, R,
                       stride_am, stride_ar, stride_wp, stride_wr, stride_bits, False, WEIGHT_ROWS_ARE_P,
                       ACC_DTYPE, INPUT_PRECISION, TILE_P, TILE_R)
    if SELECT_PARTIAL:
        acc = _block_steps(acc, plain_end, end, a_ptr, w_ptr, bits_ptr, steps_ptr, offs_m, p0, M, P, R,
                           stride_am, stride_ar, stride_wp, stride_wr, stride_bits, True, WEIGHT_ROWS_ARE_P,
                           ACC_DTYPE, INPUT_PRECISION, TILE_P, TILE_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0).to(ACC_DTYPE)[None, :]
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_p.to(tl.int64)[None, :] * stride_cp,
             acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_p[None, :] < P))


_block_matmul = autotune(_MATMUL_CONFIGS, key=_KEY)(_block_matmul_kernel)


@triton.jit
def _block_grad_weight_kernel(
        dy_ptr, x_ptr, bits_ptr, tiles_ptr, dw_ptr,
        N, K, M, M_BUCKET,
        stride_dym, stride_dyn, stride_xm, stride_xk, stride_bits, stride_wn, stride_wk,
        ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """One active TILE_N x TILE_K tile of dW = dy^T @ x, reduced over all M rows."""
    tile = tl.program_id(0)
    tile_row = tl.load(tiles_ptr + 2 * tile)
    partial = tile_row < 0
    tile_row = tl.where(partial, -tile_row - 1, tile_row)
    n0 = tile_row * TILE_N
    k0 = tl.load(tiles_ptr + 2 * tile + 1) * TILE_K
    offs_n = n0 + tl.arange(0, TILE_N)
    offs_k = k0 + tl.arange(0, TILE_K)
    acc = tl.zeros((TILE_N, TILE_K), dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        dy_t = tl.load(dy_ptr + offs_n.to(tl.int64)[:, None] * stride_dyn + rows[None, :] * stride_dym,
                       mask=(offs_n[:, None] < N) & (offs_m[None, :] < M), other=0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        acc = tl.dot(dy_t, x, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    keep = _mask_tile(bits_ptr, stride_bits, n0, k0, N, K, TILE_N, TILE_K) | (~partial)
    acc = tl.where(keep, acc, tl.zeros_like(acc))
    tl.store(dw_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


_block_grad_weight = autotune(_GRAD_WEIGHT_CONFIGS, key=["N", "K", "M_BUCKET", "TILE_N", "TILE_K"])(
    _block_grad_weight_kernel)


def _precision(dtype: torch.dtype, device: torch.device) -> tuple:
    """(accumulator dtype, tl.dot input precision) for inputs of `dtype`."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return tl.float32, "tf32"
    return tl.float32, "ieee"


def _block_product(a: Tensor, weight: Tensor, layout: MaskLayout, bias: Tensor | None,
                   weight_rows_are_p: bool, zero_off_mask: bool) -> Tensor:
    """C = a @ Wm.T (weight_rows_are_p) or a @ Wm, for a 2-D `a`."""
    m, r = a.shape
    p = weight.shape[0] if weight_rows_are_p else weight.shape[1]
    c = torch.empty((m, p), dtype=a.dtype, device=a.device)
    if m == 0 or p == 0:
        return c
    if r == 0:
        return c.copy_(bias.expand(m, p)) if bias is not None else c.zero_()
    # (stride along P, stride along R) of the weight; the weight-plane tile along P and R.
    if weight_rows_are_p:
        stride_wp, stride_wr, tile_p, tile_r = weight.stride(0), weight.stride(1), layout.tile_n, layout.tile_k
        steps = layout.forward_steps
    else:
        stride_wp, stride_wr, tile_p, tile_r = weight.stride(1), weight.stride(0), layout.tile_k, layout.tile_n
        steps = layout.grad_input_steps
    bias = bias.contiguous() if bias is not None else None  # read with unit stride
    acc_dtype, precision = _precision(a.dtype, a.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, tile_p),)  # noqa: E731
    _block_matmul[grid](
        a, weight, layout.bits, steps.starts, steps.split, steps.steps, bias if bias is not None else c, c,
        m, p, r, _row_bucket(m),
        a.stride(0), a.stride(1), stride_wp, stride_wr, layout.bits.stride(0), c.stride(0), c.stride(1),
        WEIGHT_ROWS_ARE_P=weight_rows_are_p, SELECT_PARTIAL=not zero_off_mask, HAS_BIAS=bias is not None,
        ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision, TILE_P=tile_p, TILE_R=tile_r)
    return c


def _rows(t: Tensor) -> Tensor:
    """t as a 2-D (rows, last dim) tensor; reshape(-1, 0) would be ambiguous for empty last dims."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None,
                  zero_off_mask: bool = False, layout: MaskLayout | None = None) -> Tensor:
    """y = x @ where(mask, weight, 0).T + bias over the leading dims of x; `layout` defaults to the
    cached `mask_layout(mask)`. `zero_off_mask`: weight is 0 off the mask, so no tile needs the select."""
    layout = layout if layout is not None else mask_layout(mask)
    out = _block_product(_rows(x), weight, layout, bias, True, zero_off_mask)
    return out.view(*x.shape[:-1], weight.shape[0])


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor, zero_off_mask: bool = False,
                             layout: MaskLayout | None = None) -> Tensor:
    """dx = grad_out @ where(mask, weight, 0) over the leading dims of grad_out."""
    layout = layout if layout is not None else mask_layout(mask)
    out = _block_product(_rows(grad_out), weight, layout, None, False, zero_off_mask)
    return out.view(*grad_out.shape[:-1], weight.shape[1])


def masked_linear_grad_weight(grad_out: Tensor, x: Tensor, mask: Tensor, dense_grad: bool,
                              layout: MaskLayout | None = None) -> Tensor:
    """dW = grad_out^T @ x over all leading rows, zero off the mask unless `dense_grad`."""
    dy = _rows(grad_out)
    x2 = _rows(x)
    if dense_grad:
        return dy.T @ x2  # a plain GEMM: the vendor's kernel
    n, k = mask.shape
    m = dy.shape[0]
    dw = torch.zeros((n, k), dtype=dy.dtype, device=dy.device)
    if dw.numel() == 0 or m == 0:
        return dw
    layout = layout if layout is not None else mask_layout(mask)
    tiles = layout.grad_weight_tiles
    if tiles.shape[0] == 0:
        return dw
    acc_dtype, precision = _precision(dy.dtype, dy.device)
    _block_grad_weight[(tiles.shape[0],)](
        dy, x2, layout.bits, tiles, dw, n, k, m, _row_bucket(m),
        dy.stride(0), dy.stride(1), x2.stride(0), x2.stride(1), layout.bits.stride(0), dw.stride(0), dw.stride(1),
        ACC_DTYPE=acc_dtype, INPUT_PRECISION=precision, TILE_N=layout.tile_n, TILE_K=layout.tile_k)
    return dw
