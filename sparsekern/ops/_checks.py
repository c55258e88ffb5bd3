"""Argument checks shared by every backend, run before any work so bad input changes nothing.

Type and dtype errors raise TypeError, shape and range errors ValueError; each names the argument.
`count`, `number` and `flag` check the plain arguments of every floor above (modules, algorithms), in one place.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import reference
from .reference import active_counts, check_swap, swap_names

SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STRIDED = torch.strided
# More torch CPU threads than this makes OpenMP fail to create them and abort the process (measured: 4096
# here). Here, below both commands that set a thread count (`sparsekern train`, `sparsekern bench`), so that
# they share one cap without the benchmarks importing the CLI.
MAX_THREADS = 1024


def thread_count(value: int, name: str) -> int:
    """`value`, a torch CPU thread count, or ValueError naming `name` unless it is in [1, MAX_THREADS]."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > MAX_THREADS:
        raise ValueError(f"{name} must be at most {MAX_THREADS}, got {value}")
    return value


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    # The kernels address entries by strides; a torch.sparse or mkldnn tensor would reach them and fail
    # in the dispatcher with a message naming no argument.
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if value.is_nested:  # torch.nested's older layout, which is strided: its shape raises an internal error
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    return value


def floating(value, name: str) -> Tensor:
    tensor(value, name)
    if value.dtype not in SCORE_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def integer(value, name: str) -> int:
    # bool is an int subclass, and numpy/torch integer scalars are not ints: accept what indexes like one,
    # but not a bool of any kind, nor an array or tensor of more than a scalar (a 1-element list of counts?).
    dtype = getattr(value, "dtype", None)
    if (isinstance(value, bool) or not hasattr(value, "__index__") or getattr(value, "ndim", 0) != 0
            or dtype in (torch.bool, bool) or str(dtype) == "bool"):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    try:
        return value.__index__()
    except (TypeError, RuntimeError, NotImplementedError) as error:  # a float or meta tensor
        raise TypeError(f"{name} must be an integer, got {_describe(value)}") from error


def count(value, name: str, low: int = 0) -> int:
    """`value` as an int, or TypeError naming `name` unless it is an integer (as `integer` takes it), ValueError
    unless it is at least `low`."""
    value = integer(value, name)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def number(value, name: str, valid: Callable[[float], bool] = lambda value: True, requirement: str = "") -> float:
    """`value` as a float, or TypeError naming `name` unless it is a real number (not a bool), ValueError unless
    it is finite and `valid` holds (`requirement` says which, as in "in [0, 1)")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:   # an int (or Fraction) past float's range: infinite as a float, so refused as one
        raise ValueError(f"{name} must be a finite number{' ' + requirement if requirement else ''}, got a "
                         f"{type(value).__name__} beyond float's range") from None
    if not math.isfinite(value) or not valid(value):
        raise ValueError(f"{name} must be a finite number{' ' + requirement if requirement else ''}, got {value!r}")
    return value


def choice(value, name: str, choices: Sequence[str]) -> str:
    """`value`, one of `choices`, as a plain str; TypeError naming `name` unless it is a str, ValueError unless it
    is one of them. A str subclass (NumPy's str_) is taken as its text: kept as it came, it would go into the states
    that save the setting, which sparsekern.checkpoint (plain types only) could then not load."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    value = str.__str__(value)   # its text: a subclass's own __str__ or __eq__ could say another
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {_shape(value)}{' on the meta device' if value.is_meta else ''}"
    if getattr(value, "ndim", 0):  # a NumPy array
        return f"a {value.dtype} array of shape {tuple(value.shape)}"
    return type(value).__name__


def holds_values(value: Tensor, name: str) -> Tensor:
    """ValueError for a meta tensor: the mask ops read values, which it does not have."""
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds no values")
    return value


def not_fake(value: Tensor, name: str, why: str) -> Tensor:
    """ValueError for a fake tensor (made under FakeTensorMode) where an op's output shapes depend on values (`why`),
    which it does not have: torch raised DynamicOutputShapeException from inside the op, naming no argument."""
    if isinstance(value, FakeTensor):
        raise ValueError(f"{name} is a fake tensor (FakeTensorMode), which holds no values: {why}")
    return value


def writable_in_place(value: Tensor, name: str, mask: Tensor | None = None, mask_name: str = "") -> Tensor:
    """`value`, which an op is about to write in place (where `mask`, which it reads meanwhile, says, if given), or
    ValueError naming `name`, as prune_grow refuses its written tensors: a view whose entries share memory
    (expanded, or as_strided onto itself: which write lands would depend on the kernel's order), one sharing memory
    with the mask, an inference tensor outside inference mode (torch refuses to change one: it has no version
    counter to tell a backward that saved it), and a tensor autograd records (it requires grad with grad mode on:
    the write would be missing from its graph, and the gradient through it wrong)."""
    if value.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor (made under torch.inference_mode), which cannot be written "
                         f"in place outside inference mode; pass a tensor made outside it, or call this under "
                         f"torch.inference_mode()")
    # (The fast paths first: OptG masks every layer's gradient with it at every step.)
    if not value.is_contiguous() and not non_overlapping(value):
        raise ValueError(f"{name} has entries that share memory (an expanded or stride-0 view), so it cannot be "
                         f"written in place; pass a tensor of its own (e.g. .clone())")
    if mask is not None and overlap(value, mask):
        raise _shared_memory(name, mask_name)
    if value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, and autograd would not see it changed in place: call this under "
                         f"torch.no_grad(), or pass a tensor that does not require grad")
    return value


def _shared_memory(name, other_name) -> ValueError:
    """The refusal of a tensor `name` that an op writes in place and that shares memory with `other_name`, another
    tensor it reads or writes meanwhile: what either holds would depend on the kernel's order."""
    return ValueError(f"{name} and {other_name} share memory, and a tensor written in place may share it with "
                      f"nothing else; pass tensors of their own (e.g. .clone())")


def maskable_in_place(value, name: str, mask, mask_name: str) -> Tensor:
    """`value`, which an op is about to set to 0 in place wherever `mask` is False, or TypeError or ValueError
    naming the argument unless `value` is a float16, bfloat16, float32 or float64 tensor holding values (not on
    the meta device), `mask` a bool tensor of its shape on its device, and `value` writable in place
    (`writable_in_place`): `sparsekern.ops.mask_in_place`'s checks, for a caller that checks every tensor before
    it masks any (OptG, at every step)."""
    # Valid arguments pass in one expression, each of whose terms implies one of the checks below, which run
    # only where one fails, to say which (their calls were ~4 us of a ~10 us call on a small gradient).
    if not (isinstance(value, Tensor) and isinstance(mask, Tensor) and value.dtype in SCORE_DTYPES
            and mask.dtype == torch.bool and value.layout is _STRIDED and mask.layout is _STRIDED
            # before any shape: torch.nested's older layout is strided and its shape raises an internal error
            and not (value.is_nested or mask.is_nested) and mask.shape == value.shape
            and mask.device == value.device and not value.is_meta):
        floating(value, name)
        holds_values(value, name)
        bool_mask(mask, mask_name, value, name)
        same_device([(name, value), (mask_name, mask)])
    return writable_in_place(value, name, mask, mask_name)


def in_range(value: int, low: int, high: int, name: str) -> int:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def same_device(tensors: Sequence[tuple[str, Tensor]]) -> torch.device:
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.device


def bool_mask(mask, name: str, like: Tensor, like_name: str) -> Tensor:
    tensor(mask, name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    same_shape(mask, name, like, like_name)
    return mask


def same_shape(t: Tensor, name: str, like: Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {_shape(like)}, got {_shape(t)}")


def scores_list(scores) -> list[Tensor]:
    """A list of score tensors of one float dtype on one device."""
    if isinstance(scores, Tensor) or not isinstance(scores, Sequence):
        raise TypeError(f"scores must be a list of Tensors, got {type(scores).__name__}")
    scores = list(scores)
    for i, s in enumerate(scores):
        floating(s, f"scores[{i}]")
        if s.dtype != scores[0].dtype:
            raise TypeError(f"scores[{i}] has dtype {s.dtype} but scores[0] has {scores[0].dtype}")
    if scores:
        same_device([(f"scores[{i}]", s) for i, s in enumerate(scores)])
        holds_values(scores[0], "scores[0]")
    return scores


def is_count_list(value) -> bool:
    """Whether a count argument (k, n, active) is a list of counts; a string is never one."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def topk_counts(k, scores: list[Tensor]):
    """k as an int (global selection) or a list of ints (one per tensor), each within range."""
    if is_count_list(k):
        k = list(k)
        if len(k) != len(scores):
            raise ValueError(f"k has {len(k)} entries but scores has {len(scores)} tensors")
        return [in_range(integer(ki, f"k[{i}]"), 0, s.numel(), f"k[{i}]")
                for i, (ki, s) in enumerate(zip(k, scores))]
    return in_range(integer(k, "k"), 0, sum(s.numel() for s in scores), "k")


@dataclass(frozen=True)
class PruneGrowArgs:
    """prune_grow's arguments as every backend takes them: lists per layer, one n per segment."""

    weights: list[Tensor]
    masks: list[Tensor]
    prune_scores: list[Tensor]
    grow_scores: list[Tensor]
    n: list[int]                # one per segment: per layer, or one for the whole list
    global_scope: bool
    state: list[list[Tensor]]   # per layer: zeroed like the weight
    masked: list[list[Tensor]]  # per layer: zeroed off the new mask
    active: list[int] | None    # the caller's active count per segment, if it gave one
    prune_abs: bool
    grow_abs: bool
    single: bool                # the one-layer form: the caller gets one mask back

    def backend_args(self) -> tuple:
        return (self.weights, self.masks, self.prune_scores, self.grow_scores, self.n, self.global_scope,
                self.state, self.masked, self.active, self.prune_abs, self.grow_abs)


class _Name:
    """An argument's name in errors, written out only when an error does: `weight`, `state[1]` in
    the one-layer form; `weights[3]`, `state[3][1]` for lists."""

    __slots__ = ("kind", "layer", "index", "single")

    def __init__(self, kind: str, layer: int, index: int | None, single: bool):
        self.kind, self.layer, self.index, self.single = kind, layer, index, single

    def __str__(self) -> str:
        plural = "" if self.kind in ("state", "masked") else "s"
        name = self.kind if self.single else f"{self.kind}{plural}[{self.layer}]"
        return name if self.index is None else f"{name}[{self.index}]"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class _Names:
    """Makes the _Name of an argument of one call."""

    def __init__(self, single: bool):
        self.single = single

    def __call__(self, kind: str, layer: int, index: int | None = None) -> _Name:
        return _Name(kind, layer, index, self.single)


def _tensor_list(value, name: str) -> list:
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of Tensors, got {type(value).__name__}")
    return list(value)


def prune_grow_args(weights, masks, prune_scores, grow_scores, n, state, masked, active,
                    prune_abs, grow_abs) -> PruneGrowArgs:
    """Checks prune_grow's arguments, in the one-layer form (a Tensor mask) or the list form.

    Everything is checked before anything is written: types, shapes, one score dtype, one device,
    the counts, and the memory of the tensors written in place (no overlapping entries, none
    shared with another written tensor or a mask). A score that shares memory with a written
    tensor, other than being that very tensor of its own layer, is copied first.
    """
    # A tensor mask is the one-layer form (whatever is wrong with the weight).
    single = isinstance(masks, Tensor)
    names = _Names(single)
    if single:
        weights, masks, prune_scores, grow_scores = [weights], [masks], [prune_scores], [grow_scores]
        state, masked = [_tensor_list(state, "state")], [_tensor_list(masked, "masked")]
        if is_count_list(n):
            raise TypeError(f"n must be an integer, got {type(n).__name__}")
        n = [n]
        active = None if active is None else [active]
    else:
        weights = _tensor_list(weights, "weights")
        lists = {"masks": masks, "prune_scores": prune_scores, "grow_scores": grow_scores}
        for name, value in lists.items():
            lists[name] = _tensor_list(value, name)
            if len(lists[name]) != len(weights):
                raise ValueError(f"{name} has {len(lists[name])} entries but weights has {len(weights)}")
        masks, prune_scores, grow_scores = lists.values()
        state = _per_layer(state, "state", len(weights))
        masked = _per_layer(masked, "masked", len(weights))
    flag(prune_abs, "prune_abs")
    flag(grow_abs, "grow_abs")
    for layer, weight in enumerate(weights):
        floating(weight, names("weight", layer))
        bool_mask(masks[layer], names("mask", layer), weight, names("weight", layer))
        for kind, score in (("prune_score", prune_scores[layer]), ("grow_score", grow_scores[layer])):
            floating(score, names(kind, layer))
            same_shape(score, names(kind, layer), weight, names("weight", layer))
            if score.dtype != prune_scores[0].dtype:
                raise TypeError(f"{names(kind, layer)} has dtype {score.dtype} but {names('prune_score', 0)} "
                                f"has {prune_scores[0].dtype}: every score must share one dtype")
        for kind, tensors in (("state", state[layer]), ("masked", masked[layer])):
            for i, t in enumerate(tensors):
                floating(t, names(kind, layer, i))
                same_shape(t, names(kind, layer, i), weight, names("weight", layer))
    named = [(names(kind, layer, i), t) for kind, per_layer in (("state", state), ("masked", masked))
             for layer, tensors in enumerate(per_layer) for i, t in enumerate(tensors)]
    for kind, tensors in (("weight", weights), ("mask", masks), ("prune_score", prune_scores),
                          ("grow_score", grow_scores)):
        named += [(names(kind, layer), t) for layer, t in enumerate(tensors)]
    if named:
        named.sort(key=lambda item: item[0].kind != "weight")
        same_device(named)
        holds_values(named[0][1], str(named[0][0]))
    global_scope = not single and not is_count_list(n)
    n, active = _swap_counts(n, active, global_scope, weights, names)
    prune_scores, grow_scores = _check_memory(weights, masks, prune_scores, grow_scores, state, masked, names)
    if active is None and weights and (single or weights[0].device.type != "cpu"):
        # Counting costs a device read on a GPU, where no kernel can raise without one; the CPU
        # kernels count as they go (but name the list form's arguments).
        counts = active_counts(masks)
        for segment, swap in enumerate(n):
            count = sum(counts) if global_scope else counts[segment]
            check_swap(swap, count, None, *swap_names(segment, global_scope, single))
    return PruneGrowArgs(weights, masks, prune_scores, grow_scores, n, global_scope, state, masked, active,
                         prune_abs, grow_abs, single)


def _per_layer(value, name: str, layers: int) -> list[list[Tensor]]:
    """state / masked of the list form: () for none, else one list of tensors per layer."""
    value = _tensor_list(value, name)
    if not value:
        return [[] for _ in range(layers)]
    if len(value) != layers:
        raise ValueError(f"{name} has {len(value)} entries but weights has {layers} (one list of tensors per layer)")
    return [_tensor_list(tensors, f"{name}[{layer}]") for layer, tensors in enumerate(value)]


def _swap_counts(n, active, global_scope: bool, weights: list[Tensor], names) -> tuple[list[int], list[int] | None]:
    """n and active as one int per segment, each in range as far as the host knows without counting."""
    sizes = [w.numel() for w in weights]
    if global_scope:
        n = [in_range(integer(n, "n"), 0, sum(sizes), "n")]
        if active is not None:
            if is_count_list(active):
                raise TypeError(f"active must be an integer with an integer n (global scope), got "
                                f"{type(active).__name__}")
            active = [in_range(integer(active, "active"), 0, sum(sizes), "active")]
            in_range(n[0], 0, active[0], "n")
        return n, active
    where = (lambda name, layer: name) if names.single else (lambda name, layer: f"{name}[{layer}]")
    n = list(n)
    if len(n) != len(weights):
        raise ValueError(f"n has {len(n)} entries but weights has {len(weights)}")
    n = [in_range(integer(swap, where("n", layer)), 0, size, where("n", layer))
         for layer, (swap, size) in enumerate(zip(n, sizes))]
    if active is not None:
        if isinstance(active, Tensor) or not is_count_list(active):
            raise TypeError(f"active must be a list of integers with a list n (layer scope), got "
                            f"{type(active).__name__}")
        active = list(active)
        if len(active) != len(weights):
            raise ValueError(f"active has {len(active)} entries but weights has {len(weights)}")
        active = [in_range(integer(count, where("active", layer)), 0, size, where("active", layer))
                  for layer, (count, size) in enumerate(zip(active, sizes))]
        for layer, (swap, count) in enumerate(zip(n, active)):
            in_range(swap, 0, count, where("n", layer))
    return n, active


def non_overlapping(t: Tensor) -> bool:
    """Whether no two entries of t share memory (False for expanded, stride-0 and other overlapping views)."""
    # Sufficient and, for the strides torch makes, exact: taking dimensions by increasing stride,
    # each stride must step past everything the smaller ones span.
    extent = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride < extent:
            return False
        extent += stride * (size - 1)
    return True


def _byte_range(t: Tensor) -> tuple[int, int, int] | None:
    """(storage, first byte, end byte) of the memory t may touch, or None where it has none to compare."""
    if t.numel() == 0 or t.device.type == "meta" or isinstance(t, FakeTensor):
        return None
    try:
        storage = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # other tensor subclasses without real memory
        return None
    return storage, *_span(t)


def _span(t: Tensor) -> tuple[int, int]:
    """(first byte, end byte) of the memory that t, a tensor holding values, may touch."""
    span = t.numel() if t.is_contiguous() else 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def overlap(a: Tensor, b: Tensor) -> bool:
    """Whether some byte is both in a's memory and in b's (False where either has none: empty, meta, fake tensors).
    One storage is read, a's: b can share memory with a only if it starts inside a's storage (two allocations do
    not overlap)."""
    if isinstance(a, FakeTensor) or isinstance(b, FakeTensor):
        # (FakeTensorMode's) Their data pointers all read 0, with a deprecation warning, rather than raise: two
        # of them would share memory.
        return False
    try:
        storage = a.untyped_storage()
        if not 0 <= b.data_ptr() - storage.data_ptr() < storage.nbytes():
            return False   # the usual case, first: OptG checks every layer's gradient against its mask at every step
    except (RuntimeError, NotImplementedError):  # fake tensors and others without real memory
        return False
    if a.numel() == 0 or b.numel() == 0 or a.is_meta or b.is_meta:
        return False
    (a_first, a_end), (b_first, b_end) = _span(a), _span(b)
    return a_first < b_end and b_first < a_end and _may_share_an_entry(a, b)


def _may_share_an_entry(a: Tensor, b: Tensor) -> bool:
    """Whether a and b, on one storage with overlapping byte ranges, may hold a common byte: exact for slices of one
    layout (column slices w[:, :4] and w[:, 4:], or w[:, ::2] and w[:, 1::2], interleave their ranges but share no
    entry), True where it cannot tell (other element sizes, strides not dividing one another, stride 0).

    Taken in elements from the storage's start, with the strides of both (and 1) sorted, each a multiple of the next
    smaller, every address has one set of digits in that mixed radix. A view whose dimensions each cover a run of
    one digit, or whole lower digits and a run of the next (w[:, :4] over strides 1, 2, 10), holds exactly a box of
    digits; two boxes meet only where every side does."""
    size = a.element_size()
    if b.element_size() != size:
        return True
    strides = sorted({1} | {stride for t in (a, b) for extent, stride in zip(t.shape, t.stride()) if extent > 1})
    if strides[0] == 0 or any(larger % smaller for smaller, larger in zip(strides, strides[1:])):
        return True
    radices = [larger // smaller for smaller, larger in zip(strides, strides[1:])] + [None]   # None: the top digit
    start = a.untyped_storage().data_ptr()
    boxes = []
    for t in (a, b):
        offset, misaligned = divmod(t.data_ptr() - start, size)
        if misaligned:
            return True
        digits = [offset // stride if radix is None else offset // stride % radix
                  for stride, radix in zip(strides, radices)]
        sides = {}
        for extent, stride in zip(t.shape, t.stride()):
            digit = strides.index(stride) if extent > 1 else None
            while digit is not None:
                if digit in sides:
                    return True   # two dimensions on one digit
                radix = radices[digit]
                if radix is None or digits[digit] + extent <= radix:
                    sides[digit] = (digits[digit], digits[digit] + extent)
                    digit = None
                elif digits[digit] == 0 and extent % radix == 0:   # whole digits, and a run of the next
                    sides[digit] = (0, radix)
                    extent //= radix
                    digit += 1
                else:
                    return True   # it carries into the next digit: no box
        boxes.append([sides.get(k, (digits[k], digits[k] + 1)) for k in range(len(strides))])
    return all(low < other_high and other_low < high for (low, high), (other_low, other_high) in zip(*boxes))


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def _check_memory(weights, masks, prune_scores, grow_scores, state, masked, names):
    """Refuses written tensors that overlap themselves, each other or a mask; returns the scores,
    with a copy of each one that may share an entry with a written tensor it is not."""
    written_by_storage: dict[int, list] = {}  # storage -> [(name, layer, tensor, first byte, end byte)]
    read_by_storage: dict[int, list] = {}
    for layer, weight in enumerate(weights):
        tensors = [(names("weight", layer), weight)]
        tensors += [(names(kind, layer, i), t) for kind, per_layer in (("state", state), ("masked", masked))
                    for i, t in enumerate(per_layer[layer])]
        for name, t in tensors:
            # An overlapping view, or an inference tensor: torch refuses such writes (the reference raised its
            # RuntimeError), the compiled and Triton kernels write through raw pointers and would have done it. A
            # tensor autograd records too, in the caller's grad mode (prune_grow runs its kernels under no_grad).
            # Memory shared with another tensor or a mask is found below, all pairs at once.
            writable_in_place(t, name)
            where = _byte_range(t)
            if where is not None:
                written_by_storage.setdefault(where[0], []).append((name, layer, t, where[1], where[2]))
        where = _byte_range(masks[layer])
        if where is not None:
            read_by_storage.setdefault(where[0], []).append((names("mask", layer), layer, masks[layer],
                                                             where[1], where[2]))
    # Only tensors on one storage can share memory; sorted by first byte, a tensor can only overlap
    # those that start before it ends.
    for storage, written in written_by_storage.items():
        items = sorted(written + read_by_storage.get(storage, []), key=lambda item: item[3])
        for i, (name, _, tensor, _, end) in enumerate(items):
            for other_name, _, other, begin, _ in items[i + 1:]:
                if begin >= end:
                    break
                if _may_share_an_entry(tensor, other):   # interleaved slices of one tensor share no entry
                    raise _shared_memory(name, other_name)

    def own(score: Tensor, layer: int) -> Tensor:
        where = _byte_range(score)
        for _, written_layer, t, begin, end in written_by_storage.get(where[0], []) if where else ():
            if begin < where[2] and where[1] < end and not (written_layer == layer and _same_view(score, t)):
                # As for the refusal above: a score whose range interleaves a written tensor's without sharing an
                # entry (column slices of one tensor) is not written under the kernel, and is read in place.
                if _may_share_an_entry(score, t):
                    return score.clone()
        return score

    if not written_by_storage:
        return prune_scores, grow_scores
    return ([own(s, layer) for layer, s in enumerate(prune_scores)],
            [own(s, layer) for layer, s in enumerate(grow_scores)])


def flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        kind = type(value)
        # numpy's bool is named "bool" too: "must be a bool, got bool" would say nothing
        owner = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
        raise TypeError(f"{name} must be a bool, got {owner}{kind.__name__}")
    return value


def callable_as(value, name: str, form: str, *args, **kwargs) -> None:
    """TypeError naming `name` unless `value` is callable with `args` and `kwargs` (`form`: the call, as the message
    says it), checked on its signature where the call comes later (at a training step, deep inside another call),
    where the error would name no argument. A callable without a signature (some builtins) passes: called as it is."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        raise TypeError(f"{name} must be callable as {form}, got {value!r} with signature {signature}") from None


def users_call(function, shown: str, when: str, *args, **kwargs):
    """`function(*args, **kwargs)`, a function of a user's own given as an argument (`shown`: that argument as messages
    say it, "schedule=step_decay"), called where what it raises would name nothing of the call (at a training step,
    deep inside another call): an exception it raises is raised again as RuntimeError saying `shown`, `when` (" at
    step 3", or "") and the error, which is chained to it. torch.OutOfMemoryError passes as it is, for the handlers
    that catch it (a retry at a smaller batch), as does what is not an Exception (KeyboardInterrupt)."""
    try:
        return function(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:   # a user's code: any error it raises
        raise RuntimeError(f"{shown} raised {type(error).__name__}{when}: {error}") from error


def qualified_name(function) -> str:
    """The qualified name of a callable of a user's own (`__qualname__`; a functools.partial's function's, a callable
    object's class's), without its module: what messages call it, and what the ranks of a distributed run compare
    (`sparsekern.Criterion.score_name`, a schedule of one's own), one program having one name for it on every rank."""
    while isinstance(function, functools.partial):
        function = function.func
    return getattr(function, "__qualname__", None) or type(function).__qualname__


def masked_linear_args(x, weight, mask, bias, dense_grad=False, zero_off_mask=False) -> None:
    # Every sparse layer call runs this: valid arguments pass in one expression, each of whose terms
    # implies a check of `_masked_linear_errors`, which runs only when one fails, to say which
    # (2.5 us down to 1.3 us per call).
    if (type(dense_grad) is bool and type(zero_off_mask) is bool and isinstance(x, Tensor)
            and isinstance(weight, Tensor) and isinstance(mask, Tensor) and (bias is None or isinstance(bias, Tensor))
            # before any shape: torch.nested's older layout is strided and its shape raises an internal error
            and not (x.is_nested or weight.is_nested or mask.is_nested or (bias is not None and bias.is_nested))):
        dtype, shape, device = x.dtype, weight.shape, x.device
        if (dtype in SCORE_DTYPES and weight.dtype == dtype and len(shape) == 2 and x.dim() >= 1
                and x.shape[-1] == shape[1] and mask.dtype == torch.bool and mask.shape == shape
                and weight.device == device and mask.device == device
                and x.layout is _STRIDED and weight.layout is _STRIDED and mask.layout is _STRIDED
                and (bias is None or (bias.dtype == dtype and bias.shape == shape[:1] and bias.device == device
                                      and bias.layout is _STRIDED))):
            return
    _masked_linear_errors(x, weight, mask, bias, dense_grad, zero_off_mask)


def _masked_linear_errors(x, weight, mask, bias, dense_grad, zero_off_mask) -> None:
    flag(dense_grad, "dense_grad")
    flag(zero_off_mask, "zero_off_mask")
    floating(x, "x")
    floating(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {_shape(weight)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in in_features={weight.shape[1]}, got shape {_shape(x)}")
    bool_mask(mask, "mask", weight, "weight")
    tensors = [("x", x), ("weight", weight), ("mask", mask)]
    if bias is not None:
        floating(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {_shape(bias)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}")
        tensors.append(("bias", bias))
    same_device(tensors)


def packed_weight(bitmap, values, chunk_offsets, in_features) -> int:
    """Checks that the three tensors of a packed weight are the layout of sparsekern.ops.packing for
    `in_features` columns, contents included: the kernels index `values` and x by them, so a bitmap
    that disagrees with `values` or `chunk_offsets` would make them read out of bounds. Returns
    in_features as an int. Meta tensors have no contents to check.
    Under torch.jit.trace, checked as in eager code but not recorded (`untraced`): its reads of sizes and values as
    Python bools warned (TracerWarning) of branches that no trace records."""
    return untraced(lambda: _packed_weight(bitmap, values, chunk_offsets, in_features))


def _packed_weight(bitmap, values, chunk_offsets, in_features) -> int:
    fields = [("bitmap", bitmap), ("values", values), ("chunk_offsets", chunk_offsets)]
    for name, value in fields:
        tensor(value, name)
    if bitmap.dtype != torch.int32:
        raise TypeError(f"bitmap must be an int32 tensor, got {bitmap.dtype}")
    floating(values, "values")
    if chunk_offsets.dtype != torch.int64:
        raise TypeError(f"chunk_offsets must be an int64 tensor, got {chunk_offsets.dtype}")
    in_features = integer(in_features, "in_features")
    if in_features < 0:
        raise ValueError(f"in_features must be >= 0, got {in_features}")
    words = -(-in_features // reference.BITS_PER_WORD)
    if bitmap.dim() != 2 or bitmap.shape[1] != words:
        raise ValueError(f"bitmap must have shape (out_features, {words}) for in_features={in_features}, "
                         f"got {_shape(bitmap)}")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D, got shape {_shape(values)}")
    chunks = (bitmap.shape[0], -(-words // reference.WORDS_PER_CHUNK))
    if chunk_offsets.shape != chunks:
        raise ValueError(f"chunk_offsets must have shape {chunks} for bitmap {_shape(bitmap)}, "
                         f"got {_shape(chunk_offsets)}")
    same_device(fields)
    for name, value in fields:
        if not value.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if bitmap.device.type != "meta":
        _packed_contents(bitmap, values, chunk_offsets, in_features)
    return in_features


def _packed_contents(bitmap: Tensor, values: Tensor, chunk_offsets: Tensor, in_features: int) -> None:
    """Padding bits clear, chunk_offsets the running counts of the bitmap's bits, one value per bit."""
    spare = in_features % reference.BITS_PER_WORD
    if spare and bitmap.numel() and bool((bitmap[:, -1] >> spare).any()):
        row = int((bitmap[:, -1] >> spare).ne(0).nonzero()[0, 0])
        raise ValueError(f"bitmap marks columns past in_features={in_features} (row {row})")
    expected = reference.chunk_offsets(bitmap)
    if not torch.equal(chunk_offsets, expected):
        row, chunk = (int(i) for i in chunk_offsets.ne(expected).nonzero()[0])
        raise ValueError(f"chunk_offsets disagree with bitmap: chunk_offsets[{row}, {chunk}] is "
                         f"{int(chunk_offsets[row, chunk])} but the bitmap marks {int(expected[row, chunk])} "
                         f"entries before that chunk")
    marked = int(reference.popcount(bitmap).sum())
    if values.numel() != marked:
        raise ValueError(f"values has {values.numel()} entries but bitmap marks {marked}")


def untraced(make: Callable[[], object]):
    """`make()`, with torch.jit.trace's recording paused while a trace runs: the trace holds its result as a constant
    and none of its work (a check's reads of values, a cache filled once)."""
    if not torch.jit.is_tracing():   # the test torch.compile folds to False
        return make()
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return make()
    finally:
        torch._C._set_tracing_state(state)
