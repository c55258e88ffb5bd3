"""Compiles every Triton kernel of sparsekern for Hopper (sm_90) without a GPU, and reports what the
generated PTX uses (wgmma, cp.async pipelining and the bytes of each asynchronous copy, mma.sync).

The interpreter accepts code the GPU compiler rejects (a plain global read inside a kernel, branches
returning different types), so this is the cheap check between interpreter tests and a GPU run.
Run it without TRITON_INTERPRET: `python benchmarks/triton_compile_check.py`. Exit status 1 if any
kernel fails to compile. It uses the installed Triton, which may be newer than the GPU machine's.

Each kernel is compiled as a real launch specializes it, so that the verdict describes what runs:
Triton marks a pointer argument 16-byte aligned and an integer argument divisible by 16
(`tt.divisibility`) when the launch's values are, and compiles an integer argument equal to 1 (a unit
stride) as a constant. Without those attributes nothing is vectorized or software-pipelined, and even
Triton's tutorial matmul comes out unpipelined. Pointers are taken as torch allocates them (aligned);
integers take the values of the launch a check names (`ints`, the goal shapes of issue 16: 4096 x 4096
bf16 layers, 4096 tokens); an integer given no value gets no attribute, as an odd size would not,
and is listed as such.
"""
import os
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")

from sparsekern.triton_kernels import masked_linear, prune_grow, topk_mask  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32, "fp64": tl.float64}
failures = []


def _divisibility_attribute():
    """What Triton attaches to an argument whose launch value is a multiple of 16 (or a 16-byte-aligned
    pointer), asked of the CUDA backend itself where this Triton has the question."""
    from triton.compiler.compiler import make_backend
    backend = make_backend(TARGET)
    return backend.parse_attr("D") if hasattr(backend, "parse_attr") else [["tt.divisibility", 16]]


DIVISIBLE = _divisibility_attribute()


def launch_specialization(fn, types, constexprs, ints):
    """(signature, constexprs, attrs, unknown ints) as a launch with these integer values specializes
    `fn`: pointers aligned, integers equal to 1 constant, multiples of 16 divisible."""
    constexprs = dict(constexprs)
    signature, attrs, unknown = {}, {}, []
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:  # a pointer: torch's allocations are aligned
            signature[name] = types[name]
            attrs[(index,)] = DIVISIBLE
        elif name in ints and ints[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if name not in ints:
                unknown.append(name)
            elif ints[name] % 16 == 0:
                attrs[(index,)] = DIVISIBLE
    return signature, constexprs, attrs, unknown


def check(kernel, types, constexprs, config=None, ints=None):
    """Compiles `kernel` (an autotuned or plain JIT function) with pointer `types`, `constexprs`, and
    the integer arguments' launch values `ints`."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    if config is not None:
        constexprs = {**constexprs, **config.kwargs}
    signature, constexprs, attrs, unknown = launch_specialization(fn, types, constexprs, ints or {})
    source = ASTSource(fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
    shown = {k: getattr(v, "name", v) for k, v in constexprs.items()}
    try:
        ptx = triton.compile(source, target=TARGET, options=options).asm["ptx"]
    except Exception as error:  # report every failing kernel, not just the first
        failures.append(fn.__name__)
        print(f"FAIL {fn.__name__} {shown}\n{error}")
        return
    uses = [name for name in ("wgmma", "cp.async", "mma.sync") if name in ptx]
    # The bytes per asynchronous copy: 16 where the alignment lets loads vectorize, 2-4 where not.
    copy_bytes = sorted({int(size, 0) for size in re.findall(
        r"cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)", ptx)})
    if copy_bytes:
        uses[uses.index("cp.async")] = f"cp.async {'/'.join(map(str, copy_bytes))}B"
    print(f"ok   {fn.__name__} {shown} ptx: {', '.join(uses) or '-'}"
          + (f" (no launch value, no attribute: {', '.join(unknown)})" if unknown else ""))


# The launches of the goal shapes: a 4096 x 4096 weight, 4096 tokens, contiguous tensors (unit
# strides last), mask bits of 128 words per row.
SIZE = 4096
WORDS = SIZE // 32
FORWARD = dict(M=SIZE, P=SIZE, R=SIZE, M_BUCKET=SIZE, stride_am=SIZE, stride_ar=1, stride_wp=SIZE,
               stride_wr=1, stride_bits=WORDS, stride_cm=SIZE, stride_cp=1)
GRAD_INPUT = {**FORWARD, "stride_wp": 1, "stride_wr": SIZE}  # dx = dy @ Wm reads W transposed
GRAD_WEIGHT = dict(N=SIZE, K=SIZE, M=SIZE, M_BUCKET=SIZE, stride_dym=SIZE, stride_dyn=1, stride_xm=SIZE,
                   stride_xk=1, stride_bits=WORDS, stride_wn=SIZE, stride_wk=1)
PACK_MASK = dict(N=SIZE, K=SIZE, WORDS=WORDS, stride_mn=SIZE, stride_mk=1, stride_bits=WORDS, stride_flags=SIZE // 32)


check(masked_linear._pack_mask_kernel, {"mask_ptr": "*i1", "bits_ptr": "*i32", "flags_ptr": "*i8"},
      {"WORDS_PER_PROGRAM": 8}, ints=PACK_MASK)
for name, dtype in FLOATS.items():
    pointer = "*" + name
    acc = tl.float64 if name == "fp64" else tl.float32
    for rows_are_p in (True, False):
        # Weights 0 off the mask (no select), a block mask's partial tiles (select), 64x64 tiles.
        for select, tile in ((False, 32), (True, 32), (False, 64)):
            check(masked_linear._block_matmul_kernel,
                  {"a_ptr": pointer, "w_ptr": pointer, "bits_ptr": "*i32", "starts_ptr": "*i32", "split_ptr": "*i32",
                   "steps_ptr": "*i32", "bias_ptr": pointer, "c_ptr": pointer},
                  dict(WEIGHT_ROWS_ARE_P=rows_are_p, SELECT_PARTIAL=select, HAS_BIAS=True, ACC_DTYPE=acc,
                       INPUT_PRECISION="ieee", TILE_P=tile, TILE_R=tile), masked_linear._MATMUL_CONFIGS[1],
                  ints=FORWARD if rows_are_p else GRAD_INPUT)
    for tile in (32, 64):
        check(masked_linear._block_grad_weight_kernel,
              {"dy_ptr": pointer, "x_ptr": pointer, "bits_ptr": "*i32", "tiles_ptr": "*i32", "dw_ptr": pointer},
              dict(ACC_DTYPE=acc, INPUT_PRECISION="ieee", TILE_N=tile, TILE_K=tile),
              masked_linear._GRAD_WEIGHT_CONFIGS[1], ints=GRAD_WEIGHT)
    key_bits = {"fp16": 16, "bf16": 16, "fp32": 32, "fp64": 64}[name]
    tables = {"block_tensor_ptr": "*i64", "block_start_ptr": "*i64", "score_ptrs": "*i64", "numel_ptr": "*i64",
              "segment_ptr": "*i64", "eligible_ptrs": "*i64", "prefix_ptr": "*i64", "hist_ptr": "*i32",
              "remaining_ptr": "*i64", "ties_ptr": "*i64", "ties_before_ptr": "*i64",
              "segment_first_block_ptr": "*i64", "out_ptrs": "*i64"}
    for mode in (topk_mask.ALL_NUMBERS, topk_mask.WHERE_TRUE, topk_mask.WHERE_FALSE):
        for absolute in (False, True):
            meta = dict(SCORE_DTYPE=dtype, KEY_BITS=key_bits, ELIGIBLE=mode, BLOCK=topk_mask.BLOCK, ABS=absolute)
            for shift in (key_bits - 8, 0):
                check(topk_mask._histogram_kernel, tables, dict(SHIFT=shift, BINS=topk_mask.BINS, **meta))
            check(topk_mask._count_ties_kernel, tables, meta)
            check(topk_mask._write_mask_kernel, tables, meta)
list_tables = {name: "*i64" for name in ("block_target_ptr", "block_start_ptr", "numel_ptr", "kept_ptrs", "grown_ptrs",
                                         "new_ptrs", "data_ptrs", "old_ptrs", "mode_ptr")}
check(prune_grow._new_mask_kernel, list_tables, {"BLOCK": prune_grow.BLOCK})
for bits in (tl.int16, tl.int32, tl.int64):
    check(prune_grow._zero_kernel, list_tables, {"BITS": bits, "BLOCK": prune_grow.BLOCK})
for complement in (False, True):
    check(topk_mask._choose_digit_kernel, {"hist_ptr": "*i32", "prefix_ptr": "*i64", "remaining_ptr": "*i64"},
          {"SHIFT": 8, "BINS": topk_mask.BINS, "COMPLEMENT": complement})
print(f"{len(failures)} kernel(s) failed to compile" if failures else "every kernel compiled for sm_90")
sys.exit(1 if failures else 0)
