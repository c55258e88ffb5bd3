"""Compiles every Triton kernel of sparsekern for Hopper (sm_90) without a GPU, and reports what the
generated PTX uses (wgmma, cp.async pipelining, mma.sync).

The interpreter accepts code the GPU compiler rejects (a plain global read inside a kernel, branches
returning different types), so this is the cheap check between interpreter tests and a GPU run.
Run it without TRITON_INTERPRET: `python benchmarks/triton_compile_check.py`. Exit status 1 if any
kernel fails to compile. It uses the installed Triton, which may be newer than the GPU machine's.
"""
import os
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


def check(kernel, types, constexprs, config=None):
    """Compiles `kernel` (an autotuned or plain JIT function) with pointer `types` and `constexprs`."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    if config is not None:
        constexprs = {**constexprs, **config.kwargs}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
    shown = {k: getattr(v, "name", v) for k, v in constexprs.items()}
    try:
        ptx = triton.compile(source, target=TARGET, options=options).asm["ptx"]
    except Exception as error:  # report every failing kernel, not just the first
        failures.append(fn.__name__)
        print(f"FAIL {fn.__name__} {shown}\n{error}")
        return
    uses = [name for name in ("wgmma", "cp.async", "mma.sync") if name in ptx]
    print(f"ok   {fn.__name__} {shown} ptx: {', '.join(uses) or '-'}")


check(masked_linear._pack_mask_kernel, {"mask_ptr": "*i1", "bits_ptr": "*i32", "tiles_ptr": "*i8"},
      {"WORDS_PER_PROGRAM": 8})
for name, dtype in FLOATS.items():
    pointer = "*" + name
    acc = tl.float64 if name == "fp64" else tl.float32
    for rows_are_p in (True, False):
        for skip, config in ((False, masked_linear._MATMUL_CONFIGS[1]), (True, masked_linear._SPARSE_MATMUL_CONFIGS[1])):
            check(masked_linear._masked_weight_matmul_kernel,
                  {"a_ptr": pointer, "w_ptr": pointer, "bits_ptr": "*i32", "starts_ptr": "*i32", "steps_ptr": "*i32",
                   "bias_ptr": pointer, "c_ptr": pointer},
                  dict(WEIGHT_ROWS_ARE_P=rows_are_p, SKIP_TILES=skip, HAS_BIAS=True, ACC_DTYPE=acc,
                       INPUT_PRECISION="ieee"), config)
    for dense in (False, True):
        check(masked_linear._grad_weight_kernel,
              {"dy_ptr": pointer, "x_ptr": pointer, "bits_ptr": "*i32", "tiles_ptr": "*i8", "dw_ptr": pointer},
              dict(DENSE=dense, ACC_DTYPE=acc, INPUT_PRECISION="ieee"), masked_linear._GRAD_WEIGHT_CONFIGS[1])
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
