"""Pruning and growth criteria of dynamic sparse training, as scores (higher is kept).

A pruning criterion scores the entries of a list of weights; a mask update keeps the active
entries with the highest scores and drops the others (`sparsekern.ops.prune_grow` keeps
`active - n` per layer, the global scope one selection over the whole list). A growth criterion
scores entries for growth; the update grows the highest-scoring entries not kept. Scores at
inactive positions are ignored by pruning and scores at kept positions by growth.

Every built-in criterion has the signature
    criterion(weights, grads, masks, *, generator, gamma, offset, shift) -> list[Tensor]
over lists of one length: `weights` float tensors, `grads` the current batch's dense gradients
shaped like them (None entries allowed for criteria that do not read gradients), `masks` the
current bool masks; `generator` a torch.Generator on the weights' device (random criteria draw
from it, in list order), `gamma` MEST's gradient coefficient, `offset` what Sensitivity and
RSensitivity add to their denominators, `shift` what SNIP adds to its score (each refused, naming it,
where DST would refuse it: `check_parameter`). MEST, SNIP, Sensitivity and
RSensitivity compute in float32 at least (`_wide`), so that a half-precision model is ranked by their formulas.
Every criterion but `set`, `set_fw` and `set_fixed` is elementwise; those three rank weights over the whole list,
so a per-layer update passes one layer. `set_fw` and `set_fixed`, the *Fantastic Weights* repository's two SET
rules, also take `n=`, the swap count, and decide how many entries they drop (`OWN_COUNT`,
`Criterion.decides_count`).
The divisions are guarded by offset = EPSILON = 1e-8 by default; the Fantastic Weights code adds 1 instead
(offset=1.0), which changes the ranking. That code also adds 1e-5 to SNIP's score |θ·g| (shift=1e-5;
0 by default), which changes the ranking too: the shift orders no two scores differently, but in float32 it can
merge scores less than 9e-13 apart (1e-5's spacing there: 1e-13 and 3e-13 both become 1e-5), which then rank by
position instead of by value. Definitions: Nowak et al. 2023 ("Fantastic Weights and How to Find Them"), RigL
(Evci et al. 2020), SET (Mocanu et al. 2018), MEST (Yuan et al. 2021).

A criterion of a user's own is a `Criterion` (`sparsekern.Criterion`): its score function, without gamma, offset
and shift, and whether it reads the gradient, is elementwise and decides its own drop count, which DST needs to
know. DST takes one wherever it takes a built-in criterion's name, and handles the built-in ones as Criterion objects
too (`lookup`), reading those three properties, not names. A pruning criterion drops the n entries DST counts unless
it decides its own count (`Criterion.decides_count`), as set_fw and set_fixed do: a threshold rule ("every active
weight with |θ| < t") of a user's own can too.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor

from ..ops import _checks, reference

EPSILON = 1e-8
# The largest parameter a criterion takes: float32's largest number. The scores are float32 at least, where a larger
# one is inf, and makes every score inf (or NaN, where it multiplies a 0: MEST's γ·|g| of a zero gradient), so that
# they all tie and rank by position, or drop NaN first.
PARAMETER_MAX = torch.finfo(torch.float32).max

ScoreFunction = Callable[..., Sequence[Tensor]]


# The elementwise criteria are computed for the whole list in one batched pass each
# (torch._foreach_*), not one torch call per layer.


def check_parameter(value, name: str, *, positive: bool = False) -> float:
    """`value` as a float: a criterion's parameter (MEST's gamma, SNIP's shift: >= 0; Sensitivity's offset: > 0,
    `positive`), at most PARAMETER_MAX; TypeError or ValueError naming `name` otherwise (a bool, NaN, a tensor)."""
    low = "> 0" if positive else ">= 0"
    return _checks.number(value, name, lambda number: (number > 0 if positive else number >= 0)
                          and number <= PARAMETER_MAX, f"{low} and <= {PARAMETER_MAX:.4g} (float32's largest)")


def _signature(function) -> inspect.Signature | None:
    """`function`'s signature, or None for a callable without one (some builtins)."""
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def _each(function, tensors: list[Tensor], *others) -> list[Tensor]:
    """function (a torch._foreach_* op) over lists, which may be empty."""
    return list(function(tensors, *others)) if tensors else []


def _wide(tensors) -> list[Tensor]:
    """`tensors` in float32 at least. The criteria that combine θ and g compute in it: in float16 the 1e-8 guard
    and products below 6e-8 (SNIP's |θ·g| of 1e-4 and 1e-4) are 0, and in bfloat16 sums 2^-9 apart round
    together near 1, so that scores the formula tells apart would tie and rank by position."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def magnitude(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """|θ|: drops the active weights closest to zero (RigL)."""
    return _each(torch._foreach_abs, list(weights))


def mest(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """|θ| + γ|g| (MEST, γ = 1 by default), in float32 at least."""
    gamma = check_parameter(gamma, "gamma")
    weights, grads = _wide(weights), _wide(grads)
    return _each(torch._foreach_add, magnitude(weights, grads, masks), _each(torch._foreach_mul, gradient(
        weights, grads, masks), gamma))


def snip(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """|θ·g| + shift (SNIP's saliency, shifted as the Fantastic Weights code shifts it by 1e-5), in float32 at
    least."""
    shift = check_parameter(shift, "shift")
    weights, grads = _wide(weights), _wide(grads)
    scores = _each(torch._foreach_abs, _each(torch._foreach_mul, list(weights), list(grads)))
    # Unshifted, no pass over the scores: x + 0.0 is x (|θ·g| is never -0.0), so the ranking is the same.
    return _each(torch._foreach_add, scores, shift) if shift else scores


def sensitivity(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """|g| / (|θ| + offset), in float32 at least."""
    offset = check_parameter(offset, "offset", positive=True)
    weights, grads = _wide(weights), _wide(grads)
    return _each(torch._foreach_div, gradient(weights, grads, masks),
                 _each(torch._foreach_add, magnitude(weights, grads, masks), offset))


def rsensitivity(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """|θ| / (|g| + offset), the reciprocal of sensitivity, in float32 at least."""
    offset = check_parameter(offset, "offset", positive=True)
    weights, grads = _wide(weights), _wide(grads)
    return _each(torch._foreach_div, magnitude(weights, grads, masks),
                 _each(torch._foreach_add, gradient(weights, grads, masks), offset))


def random(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """Uniform random scores: drops (or grows) a uniformly random set of exactly n entries."""
    return [torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32)
            for w in weights]


def set_rule(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """SET (Mocanu et al. 2018): drop the smallest positive weights and the negative weights
    closest to zero, in proportion to their numbers, expressed as one score.

    Of any n dropped, n₊ = round(n·A₊/A) are positive and n₋ = n − n₊ negative, where A₊ and A₋ count
    the active positive and negative weights and A = A₊ + A₋. Mocanu drops the fraction ζ of each sign,
    which this equals up to rounding while keeping n exact. round is Python's, as for the default swap
    count n = round(r·A) and every other count the package rounds: a share of exactly half
    (n·A₊/A = m + ½: 2·n·A₊ an odd multiple of A, as with equal sign counts and an odd n) goes to the
    even neighbour, so the odd weight is the negative one at n = 1 of {0.1, 0.2, −0.1, −0.2} (−0.1) and
    a positive one at n = 3 (0.1, 0.2 and −0.1): neither sign always loses the odd weight, as it would
    with one fixed direction (half up drops one positive weight more at every such update). Since n₊
    and n₋ never decrease as n grows, and each grows by at most 1 per step of n, one ranking serves
    every n: the k-th lowest score (k = 1..A)
    goes to the next positive weight (smallest first) when n₊(k) > n₊(k − 1), else to the next
    negative weight (closest to zero first); among equal weights the higher position (row-major, in list
    order) ranks lower, so that ties keep the lower position, as under every criterion that ranks (DST's
    rule; set_fw and set_fixed drop every weight tied with their threshold).
    n₊(A) = A₊, so a sign never runs out before its share is dropped: with no positive (or no
    negative) weights every drop is of the other sign.

    Zeros carry no sign: they rank first, the highest position first (ties keep the lower one), so they are
    dropped before anything else (Mocanu's code drops every zero weight; here a zero is a grown weight that has
    not moved).
    NaN weights score NaN (prune_grow drops them first). Inactive entries score +inf. Ranks are
    computed over the whole list, so a per-layer update passes one layer. Scores are float32
    while the ranks fit its 24-bit mantissa, float64 beyond.

    The *Fantastic Weights* repository differs: its `SET` option (`MagnitudeAndNegativityPruner`,
    used for the paper's SET runs) keeps the most negative weights and drops #negatives + 1
    weights whatever the drop rate, about half a layer per update; its `SET_fixed` option drops
    2·⌈n/2⌉ weights split evenly between the signs. Neither is Mocanu's proportional rule; both are
    offered, to reproduce that paper, as `set_fw` and `set_fixed`.
    """
    weights, masks = _ranked_lists(weights, masks)
    if not weights:
        return []
    flat_weight = torch.cat([w.detach().reshape(-1) for w in weights])
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    device = flat_weight.device
    dtype = torch.float32 if flat_weight.numel() <= 2 ** 24 else torch.float64
    score = torch.full(flat_weight.shape, float("inf"), dtype=dtype, device=device)
    score[flat_mask & torch.isnan(flat_weight)] = float("nan")
    zeros = (flat_mask & (flat_weight == 0)).nonzero().squeeze(1).flip(0)
    score[zeros] = torch.arange(zeros.numel(), device=device).to(dtype)
    positive = _sorted_positions(flat_weight, flat_mask & (flat_weight > 0), descending=False)
    negative = _sorted_positions(flat_weight, flat_mask & (flat_weight < 0), descending=True)
    signed = positive.numel() + negative.numel()
    if signed:
        k = torch.arange(1, signed + 1, device=device)
        share = k * positive.numel()
        whole, remainder = share // signed, share % signed
        # n₊(k) = round(k·A₊/A), halves to even: up past the half, and at it where the whole part is odd
        positive_share = whole + ((2 * remainder > signed) | ((2 * remainder == signed) & (whole % 2 == 1))).long()
        takes_positive = torch.diff(positive_share, prepend=positive_share.new_zeros(1)) == 1
        rank = torch.arange(zeros.numel(), zeros.numel() + signed, device=device).to(dtype)
        score[positive] = rank[takes_positive]
        score[negative] = rank[~takes_positive]
    return [part.view(w.shape) for part, w in zip(score.split([w.numel() for w in weights]), weights)]


def set_fw(weights, grads, masks, *, n=None, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """SET as the *Fantastic Weights* repository prunes it under its `SET` option (`MagnitudeAndNegativityPruner`,
    which the paper's SET runs used): with h = ⌈n/2⌉, drop the h smallest positive weights and keep only the
    h − 1 most negative ones, dropping every other negative weight. It decides its own drop count (`OWN_COUNT`),
    about half a layer whatever n: #negatives + 1 while both signs hold h weights.

    Exactly: with kp = min(h, A₊) and kn = min(h, A₋) (A₊, A₋ the active positive and negative counts), the
    active weights kept are the positive ones above the kp-th smallest positive weight and the negative ones below
    the kn-th most negative weight; every other active entry is dropped: kp + A₋ − kn + 1 signed weights, more
    where weights tie with a threshold (the code compares with the thresholds' values), and every zero and NaN
    weight, which have no sign. A sign without active weights loses none (the repository's code raises IndexError
    there). n = 0 drops nothing, as under every criterion (the repository's n = ⌈r·A⌉, DST's swap_rounding="ceil",
    is never 0 at a rate above 0; at 0 its code would drop every positive weight). Growth then grows as many as
    were dropped.

    Returns scores, not ranks: DROPPED (0) at the entries dropped, KEPT (1) at the active entries kept, +inf at
    inactive ones (`dropped_counts` counts the 0s). Over a list (scope="global") the thresholds are the whole
    list's, as the repository's global pruners take them (its `SET` option, though, prunes by set_fixed's rule
    when pruning globally: `SETGlobalPruner`).
    """
    return _by_sign_thresholds(weights, masks, n, negatives_closest_to_zero=False)


def set_fixed(weights, grads, masks, *, n=None, generator=None, gamma=1.0, offset=EPSILON,
              shift=0.0) -> list[Tensor]:
    """SET as the *Fantastic Weights* repository's `SET_fixed` prunes it (and its `SET` option when pruning
    globally, `SETGlobalPruner`): with h = ⌈n/2⌉, drop the h smallest positive weights and the h negative weights
    closest to zero, 2h in all, split evenly between the signs whatever their counts. It decides its own drop
    count (`OWN_COUNT`).

    Exactly: with kp = min(h, A₊) and kn = min(h, A₋), the active weights kept are the positive ones above the
    kp-th smallest positive weight and the negative ones below the kn-th negative weight closest to zero; every
    other active entry is dropped: kp + kn signed weights (a sign short of h weights drops all it has, and the
    other sign does not make up for it), more where weights tie with a threshold, and every zero and NaN weight.
    n = 0 drops nothing. Scores as `set_fw`'s.
    """
    return _by_sign_thresholds(weights, masks, n, negatives_closest_to_zero=True)


DROPPED, KEPT = 0.0, 1.0   # the scores of set_fw and set_fixed at the active entries they drop and keep


def _by_sign_thresholds(weights, masks, n, *, negatives_closest_to_zero: bool) -> list[Tensor]:
    """The scores of set_fw (negatives_closest_to_zero=False) and set_fixed (True) over the whole list."""
    n = _checks.integer(n, "n")   # None too: no default count, the rule is n's
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    weights, masks = _ranked_lists(weights, masks)
    if not weights:
        return []
    flat_weight = torch.cat([w.detach().reshape(-1) for w in weights])
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    keep = flat_mask.clone() if n == 0 else torch.zeros_like(flat_mask)
    if n:
        half = -(-n // 2)   # ⌈n/2⌉
        positive = flat_weight[flat_mask & (flat_weight > 0)]
        negative = flat_weight[flat_mask & (flat_weight < 0)]
        if positive.numel():
            # kp-th smallest positive: keep those above it
            threshold = torch.kthvalue(positive, min(half, positive.numel())).values
            keep |= flat_mask & (flat_weight > threshold)
        if negative.numel():
            kn = min(half, negative.numel())
            # kn-th closest to zero (set_fixed) or kn-th most negative (set_fw): keep those below it
            threshold = torch.kthvalue(negative, negative.numel() - kn + 1 if negatives_closest_to_zero else kn).values
            keep |= flat_mask & (flat_weight < threshold)
    score = torch.where(keep, KEPT, DROPPED).masked_fill_(~flat_mask, float("inf"))
    return [part.view(w.shape) for part, w in zip(score.split([w.numel() for w in weights]), weights)]


def _ranked_lists(weights, masks) -> tuple[list[Tensor], list[Tensor]]:
    """(weights, masks) as lists, checked for the criteria that rank the weights over the whole list by the masks
    (set, set_fw, set_fixed): one float weight holding values (not on the meta device) and one bool mask of its shape
    per layer, all on one device; TypeError or ValueError naming the argument otherwise. Flattened and joined, a
    mask of another shape but as many entries would silently mark other weights active, and lists of other lengths
    or a tensor given for a list failed in torch naming nothing."""
    for name, value in (("weights", weights), ("masks", masks)):
        if isinstance(value, Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list of Tensors, got {type(value).__name__}")
    weights, masks = list(weights), list(masks)
    if len(masks) != len(weights):
        raise ValueError(f"masks has {len(masks)} entries but weights has {len(weights)}")
    for layer, (weight, mask) in enumerate(zip(weights, masks)):
        _checks.holds_values(_checks.floating(weight, f"weights[{layer}]"), f"weights[{layer}]")
        _checks.bool_mask(mask, f"masks[{layer}]", weight, f"weights[{layer}]")
    if weights:
        _checks.same_device([(f"{kind}[{layer}]", t) for kind, tensors in (("weights", weights), ("masks", masks))
                             for layer, t in enumerate(tensors)])
    return weights, masks


def dropped_counts(scores: list[Tensor], masks: list[Tensor]) -> list[int]:
    """Per layer, the active entries that the scores of a criterion deciding its own count (`OWN_COUNT`,
    `Criterion.decides_count`) drop: those scored DROPPED (one read of the device)."""
    return reference.active_counts([(score == DROPPED) & mask.bool() for score, mask in zip(scores, masks)])


def _sorted_positions(values: Tensor, selected: Tensor, descending: bool) -> Tensor:
    """Flat positions of `selected` entries in the order set_rule drops them, by value; among ties the higher
    position first, so that the lower one is kept."""
    positions = selected.nonzero().squeeze(1).flip(0)
    return positions[torch.sort(values[positions], descending=descending, stable=True).indices]


def gradient(weights, grads, masks, *, generator=None, gamma=1.0, offset=EPSILON, shift=0.0) -> list[Tensor]:
    """|g| (RigL's growth: the largest dense gradients among inactive entries)."""
    return _each(torch._foreach_abs, list(grads))


PRUNE: dict[str, ScoreFunction] = {
    "magnitude": magnitude, "set": set_rule, "set_fw": set_fw, "set_fixed": set_fixed, "mest": mest, "snip": snip,
    "sensitivity": sensitivity, "rsensitivity": rsensitivity, "random": random,
}
GROW: dict[str, ScoreFunction] = {"gradient": gradient, "random": random}
# Criteria whose score is |x| of an input x, by what x is among (weights, grads): the mask ops can
# rank x by magnitude themselves (prune_grow's prune_abs / grow_abs), so no score tensor is made.
MAGNITUDE_OF: dict[str, Callable[[list[Tensor], list[Tensor]], list[Tensor]]] = {
    "magnitude": lambda weights, grads: list(weights), "gradient": lambda weights, grads: list(grads)}
# Criteria whose score reads the gradient: the update step needs grads for them.
READS_GRADIENT = frozenset({"mest", "snip", "sensitivity", "rsensitivity", "gradient"})
# Pruning criteria that decide how many entries they drop, whatever the swap count n (which they take as `n=`, the
# layer's or, in global scope, the list's): the update drops the entries they score DROPPED and grows as many. The
# built-in ones' `Criterion.decides_count`, which DST reads.
OWN_COUNT = frozenset({"set_fw", "set_fixed"})
# Criteria that score entries one by one: summing their scores per block is meaningful.
ELEMENTWISE = frozenset(PRUNE) - {"set"} - OWN_COUNT


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A pruning or growth criterion of your own, for `sparsekern.DST(prune=...)` or `DST(grow=...)` (in place
    of a built-in's name); one object may serve as both.

    Args:
        name: what identifies the criterion: `DST.state_dict()` saves it with the three flags (`flags`), and
            `load_state_dict()` refuses a state saved under another name or flags (build the resuming DST with the
            same criterion; its score function is not saved: `score_name`). Give a score with other
            parameters another name ("taylor(beta=0.5)"). Not the name of a built-in criterion (`PRUNE`, `GROW`:
            ValueError when DST is built), nor a blank one or one beginning or ending with whitespace (ValueError).
        score: score(weights, grads, masks, *, generator) -> a list of tensors, one per weight, shaped like it, of
            a float dtype (float16, bfloat16, float32 or float64), on its device. Higher is kept: pruning drops
            the active entries with the lowest scores, growth grows the highest-scoring entries not kept; scores
            at inactive entries are ignored by pruning and at kept ones by growth; ±inf rank as numbers, NaN is
            refused. Called under torch.no_grad on each update step, with lists of one length: `weights` the
            layers' weights, `grads` their gradients (dense on an update step; a layer without one gets zeros
            where `reads_gradient`, else its entry may be None), `masks` their bool masks, `generator` DST's
            random stream (a torch.Generator on the weights' device), from which every random number must be
            drawn, in list order: equal seeds then give equal masks. It must not write into its arguments. A callable
            whose signature cannot be called so raises TypeError here, not at the first update step (one without a
            signature, such as a builtin, at its first call, naming the criterion).
        reads_gradient: whether `score` reads `grads`. Then, as for RigL's growth, step() refuses an update step
            at which no trained parameter has a gradient (called before backward), and a layer without a gradient
            keeps its mask at that update. Dense gradients reach every update step whatever the criteria.
        elementwise: whether each entry's score is a quantity of that entry alone (|θ|, |θ·g|), so that scoring
            the whole list at once is scoring each layer, and a block's score (DST's `block=`) is the sum of its
            entries'. Then `score` is called once over every layer. False for a score that ranks entries against
            each other (as "set"): it is called once per layer under scope="layer", once over every layer under
            scope="global", and `block=` is refused.
        decides_count: whether `score` decides how many active entries it drops, as prune "set_fw" and
            "set_fixed" do (default False: it drops the n active entries with the lowest scores, n the swap count
            DST computes from the schedule's fraction and `swap_rounding`). For rules whose count depends on the
            weights, such as a threshold ("every active weight with |θ| < t"). Then:
            `score` also takes that swap count, `score(weights, grads, masks, *, generator, n)`: an int >= 0, the
            layer's under scope="layer", where `score` is called once per layer, the total under scope="global",
            where it is called once over every layer; it may follow n (set_fw drops the ⌈n/2⌉ smallest positive
            weights) or ignore it (a threshold). n is 0 where the fraction rounds to nothing: set_fw and set_fixed
            drop nothing then; a user's rule decides for itself.
            Its scores mark what it drops rather than rank: DROPPED (0, `criteria.DROPPED`) at each active entry it
            drops, above 0 at each active entry it keeps (KEPT, 1) and at every inactive one (+inf, as set_fw's).
            DST drops exactly the active entries scored 0, however many (none, or a whole layer), and grows as many
            by the growth criterion: each layer keeps its active count under scope="layer", and the layers their
            total under scope="global" (where a layer's own may move).
            It is a pruning criterion's property: DST refuses such a criterion as `grow=` (ValueError). It needs
            elementwise=False (True raises ValueError: `score` is called per layer or over the list as the scope
            says, to decide each count where it applies), so `block=` is refused with it, as with set_fw.
            Each update reads the device once for it, whatever host_checks (as for set_fw and set_fixed): the
            counts, which the selection needs on the host, and the checks below, in the same read; so such an update
            cannot be captured in a CUDA graph.

    DST checks every list `score` returns before any mask changes: its length, and each entry's type, shape,
    dtype and device (TypeError or ValueError naming the criterion and the layer) and, unless DST was built with
    host_checks=False (a read of the device), that it holds no NaN (ValueError). The scores of a criterion deciding
    its own count are checked in its read, whatever host_checks (ValueError naming the criterion and the layers):
    none may be NaN, none below 0 (such an entry would be dropped before those scored 0, in their stead), and none 0
    at an inactive entry (a drop of an entry that is not active: a rule that ignored `masks`, whose drops, counted,
    could outnumber the active entries). An error `score` raises is raised as RuntimeError naming the criterion and
    the layers. A step() refused so (or one whose `score` raised) changes nothing: not its
    count, nor the random stream (except under a CUDA graph capture, where the stream's state cannot be read). A
    `score` that wrote into its arguments raises RuntimeError.

    Under DistributedDataParallel every rank calls `score` with the same weights, masks and random stream and
    gradients that DDP has averaged, so a score computed from its arguments alone, deterministically, is the same
    on every rank, and so are the masks, as with the built-in criteria. `DST.step()` itself makes no collective
    (training on uneven inputs under Join relies on that): a score that reads data of its rank's own must
    agree across ranks by itself.
    """

    name: str
    score: ScoreFunction
    reads_gradient: bool
    elementwise: bool
    decides_count: bool = False

    FLAGS: ClassVar[tuple[str, ...]] = ("reads_gradient", "elementwise", "decides_count")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Criterion name must be a str, got {type(self.name).__name__}")
        # A plain str, its text (a subclass's own __str__ or strip could say another): a state saving a subclass's
        # (NumPy's str_) would not load back through sparsekern.checkpoint, which unpickles only plain types.
        object.__setattr__(self, "name", str.__str__(self.name))
        if not self.name.strip():
            raise ValueError(f"Criterion name must not be empty or blank, got {self.name!r}")
        if self.name != self.name.strip():
            # It would read in messages as another criterion's name, a built-in's (" magnitude") included.
            raise ValueError(f"Criterion name must not begin or end with whitespace, got {self.name!r}")
        if not callable(self.score):
            raise TypeError(f"Criterion {self.name!r}: score must be callable, got {type(self.score).__name__}")
        _checks.flag(self.reads_gradient, f"Criterion {self.name!r}: reads_gradient")
        _checks.flag(self.elementwise, f"Criterion {self.name!r}: elementwise")
        _checks.flag(self.decides_count, f"Criterion {self.name!r}: decides_count")
        if self.decides_count and self.elementwise:
            raise ValueError(f"Criterion {self.name!r}: decides_count needs elementwise=False: a criterion deciding "
                             f"its own count is called per layer or over the list as DST's scope says, with that "
                             f"count (n=), and its scores cannot be summed per block")
        signature = _signature(self.score)
        if signature is not None:   # without one (some builtins), called as it is: `checked_scores` names it
            try:   # refused here, not at the first update step, deep inside DST.step()
                signature.bind([], [], [], generator=None, **self._count(0))
            except TypeError as error:
                raise TypeError(f"Criterion {self.name!r}: score must take {self._arguments()}: {error}") from None

    def _count(self, n) -> dict:
        """The keyword arguments that a criterion deciding its own count takes beyond the generator: {"n": n}."""
        return {"n": n} if self.decides_count else {}

    def _arguments(self) -> str:
        """The arguments `score` must take, as messages say them."""
        return f"(weights, grads, masks, *, generator{', n' if self.decides_count else ''})"

    def flags(self) -> dict[str, bool]:
        """reads_gradient, elementwise and decides_count by name: what `DST.state_dict()` saves of a user's criterion
        with its name, and `load_state_dict()` refuses a state saved under others (ValueError naming the criterion and
        the flag): they decide how the update calls `score`, how many entries it drops and which layers it leaves
        alone. (A state saved before decides_count existed lacks it, and loads under either.)"""
        return {flag: getattr(self, flag) for flag in self.FLAGS}

    def score_name(self) -> str:
        """The qualified name of `score`'s function (`__qualname__`; a functools.partial's function's, a callable
        object's class's): what DST's construction compares across the ranks of a DDP run, with the name and flags.

        The ranks of one run run one program at once, so one function has one qualified name on all of them
        (without its module, which is `__main__` in a process started as a script and `__mp_main__` in one that
        torch.multiprocessing spawned from it). A state does not keep it: the function of a resumed run is looked
        up in another process, perhaps another program, where it may sit in another module (`__main__` run as a
        script, its package's name run with -m or imported by a launcher) or under a new name after a refactoring,
        and refusing those would refuse sound resumes; while lambdas, closures and partials of one function, the
        usual way to give a score parameters, share one name whatever they compute. The criterion's name is its
        identity in a state: give a score with other parameters another name."""
        return _checks.qualified_name(self.score)

    def checked_scores(self, weights: list[Tensor], grads: list, masks: list[Tensor], *,
                       generator: torch.Generator, layers: list[str], n: int | None = None) -> list[Tensor]:
        """`score`'s scores of the layers named `layers`, checked as the class says (but for NaN: `refuse_nan`, and
        for what a criterion deciding its own count drops: `drop_counts`). `n`: the swap count, passed to such a
        criterion."""
        inputs = [t for t in (*weights, *grads, *masks) if t is not None]
        versions = [t._version for t in inputs]
        try:   # a user's code: any error it raises, said with the criterion and the layers
            scores = _checks.users_call(self.score, f"criterion {self.name!r}", f" scoring layers {layers}", weights,
                                        grads, masks, generator=generator, **self._count(n))
        except RuntimeError as error:
            refused = error.__cause__
            if isinstance(refused, TypeError) and _signature(self.score) is None:
                # A callable without a signature (a builtin such as max) could not be checked when the Criterion was
                # made: a call it refuses names the criterion here, at the first update (which it leaves undone).
                raise TypeError(f"Criterion {self.name!r}: score must take {self._arguments()}, and the call raised: "
                                f"{refused}") from refused
            raise
        if any(t._version != version for t, version in zip(inputs, versions)):
            raise RuntimeError(f"criterion {self.name!r} wrote into its arguments (weights, gradients or masks) in "
                               f"place: its score must make new tensors")
        if isinstance(scores, Tensor) or not isinstance(scores, Sequence):
            raise TypeError(f"criterion {self.name!r} must return a list of tensors, got {type(scores).__name__}")
        if len(scores) != len(weights):
            raise ValueError(f"criterion {self.name!r} returned {len(scores)} scores for {len(weights)} layers "
                             f"{layers}: one per weight")
        for score, weight, layer in zip(scores, weights, layers):
            where = f"criterion {self.name!r}'s score of layer {layer!r}"
            _checks.floating(score, where)
            _checks.same_shape(score, where, weight, "its weight")
            if score.device != weight.device:
                raise ValueError(f"{where} is on {score.device} but its weight is on {weight.device}")
        return list(scores)

    def refuse_nan(self, scores: list[Tensor], layers: list[str]) -> None:
        """ValueError naming the layers whose score (of this criterion) holds a NaN (one read of the device)."""
        if not scores:
            return
        with_nan = [layer for layer, has_nan in zip(layers, torch.stack([s.isnan().any() for s in scores]).tolist())
                    if has_nan]
        if with_nan:
            raise ValueError(f"criterion {self.name!r} scored NaN in layers {with_nan}: a NaN ranks below every "
                             f"number, so the update would depend on where the NaNs fall")

    def drop_counts(self, scores: list[Tensor], masks: list[Tensor], layers: list[str]) -> list[int]:
        """Per layer, the active entries that this criterion, which decides its own count, drops: those its `scores`
        (of the layers named `layers`) mark DROPPED. One read of the device, in which a user's scores are checked as
        the class says (ValueError naming the criterion and the layers); the built-in ones' are trusted."""
        if is_built_in(self) or not scores:
            return dropped_counts(scores, masks)
        per_layer = []
        for score, mask in zip(scores, masks):
            dropped = (score == DROPPED) & mask.bool()
            # Entries neither dropped nor above DROPPED: NaN, below it, or it at an inactive entry (told apart only
            # where there are some; counted rather than any()'d: count_nonzero is several times faster on a CPU).
            wrong = (score > DROPPED).logical_or_(dropped).logical_not_()
            per_layer.append(torch.stack([torch.count_nonzero(dropped), torch.count_nonzero(wrong)]))
        counts, wrong = zip(*torch.stack(per_layer).tolist())
        if any(wrong):
            self._refuse_marks(*zip(*[(score, mask, layer) for score, mask, layer, count
                                      in zip(scores, masks, layers, wrong) if count]))
        return list(counts)

    def _refuse_marks(self, scores, masks, layers) -> None:
        """ValueError naming the criterion and those of `layers` whose scores hold what a criterion deciding its own
        count may not score: NaN, a score below DROPPED, DROPPED at an inactive entry (one more read)."""
        kinds = torch.stack([torch.stack([score.isnan().any(), (score < DROPPED).any(),
                                          ((score == DROPPED) & ~mask.bool()).any()])
                             for score, mask in zip(scores, masks)]).tolist()
        for kind, (what, why) in enumerate((
                ("NaN", "a NaN is neither"),
                ("below 0", "such an entry would be dropped in the stead of one scored 0"),
                ("0, a drop, at inactive entries", "only active entries can be dropped (does it read masks?)"))):
            where = [layer for layer, found in zip(layers, kinds) if found[kind]]
            if where:
                raise ValueError(f"criterion {self.name!r} scored {what} in layers {where}: a criterion deciding its "
                                 f"own count (decides_count=True) scores 0 (DROPPED) at the active entries it drops "
                                 f"and above 0 everywhere else; {why}")


# The built-in criteria as Criterion objects: DST handles every criterion through one. Their scores are trusted
# (SET's scores NaN weights NaN on purpose), and they take three parameters of DST's (gamma, offset, shift).
_BUILT_IN = {name: Criterion(name, score, reads_gradient=name in READS_GRADIENT,
                             elementwise=name in ELEMENTWISE or name in GROW, decides_count=name in OWN_COUNT)
             for name, score in {**PRUNE, **GROW}.items()}


def is_built_in(criterion: Criterion) -> bool:
    """Whether `criterion` is one of the built-in criteria (`PRUNE`, `GROW`), not a user's."""
    # Equal, not identical: a DST deep-copied or unpickled holds copies of them.
    return _BUILT_IN.get(criterion.name) == criterion


def lookup(criterion, table: dict[str, ScoreFunction], argument: str) -> Criterion:
    """The Criterion of the built-in criterion named `criterion` in `table`, or `criterion` itself (a user's
    Criterion, under a name no built-in criterion has); else a TypeError/ValueError naming `argument`."""
    if isinstance(criterion, Criterion):
        if criterion.name not in _BUILT_IN:
            return criterion
        if not is_built_in(criterion):
            raise ValueError(f"{argument}: Criterion name {criterion.name!r} is a built-in criterion's; give yours "
                             f"another (it identifies the criterion in DST.state_dict())")
        criterion = criterion.name   # a built-in one, looked up in `table` as its name is
    if not isinstance(criterion, str):
        wrap = (": wrap a score function as sparsekern.Criterion(name, score, reads_gradient=..., elementwise=...)"
                if callable(criterion) and not isinstance(criterion, type) else "")
        raise TypeError(f"{argument} must be a str or a sparsekern.Criterion, got {type(criterion).__name__}{wrap}")
    if criterion not in table:
        close = difflib.get_close_matches(criterion.lower(), table, n=1)
        raise ValueError(f"{argument} must be one of {sorted(table)} or a sparsekern.Criterion, got {criterion!r}"
                         + (f": did you mean {close[0]!r}?" if close else ""))
    return _BUILT_IN[criterion]
