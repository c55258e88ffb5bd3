"""Backend choice: for each op and device, the compiled extension, then Triton, then the reference.

`SPARSEKERN_BACKEND=reference|triton|compiled|auto` overrides the automatic choice (read at every call,
so tests and users can switch it at run time). `compiled` names the compiled extension `sparsekern._C`:
its CUDA kernels for CUDA tensors and its C++ kernels for CPU tensors, reported as `compiled/cuda` and
`compiled/cpu` (`label`). `cuda` and `cpp`, the names of earlier releases, are accepted as aliases.
An automatic choice falls back quietly; a backend asked for by name that cannot run raises.
A backend is refused not only where it cannot run but where it would compute wrongly: the Triton
interpreter (TRITON_INTERPRET=1) gets bfloat16 silently wrong, so Triton is refused for bfloat16
tensors there, with that reason, and the automatic choice takes the next backend. Likewise Triton's
masked_linear, whose loops run to bounds loaded from memory, under an interpreter that cannot run such
loops (Triton before 3.7 with NumPy 2.4 or later).
A backend asked for by name that does not implement an op at all (the compiled extension has no
masked_linear) hands that op to the automatic choice among the backends after it, so naming a backend
never breaks a model; `backends()` reports the fallback.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension

ENV_VAR = "SPARSEKERN_BACKEND"
AUTO_ORDER = ("compiled", "triton", "reference")
ALIASES = {"cuda": "compiled", "cpp": "compiled"}
_REPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Implementation:
    run: Callable
    # Why this implementation cannot run (or not run right) on a device type for tensors of the
    # given dtypes, or None when it can: missing(device_type, dtypes).
    missing: Callable[[str, tuple], str | None]
    # Whether the automatic choice may take it on a device type (Triton on CPU is the slow interpreter).
    automatic: Callable[[str], bool] = lambda device_type: True
    # Whether the automatic choice gives it one call, judged from the call's leading tensor arguments
    # (Triton's masked_linear takes only masks it can skip work on); None takes every call. A backend
    # named in SPARSEKERN_BACKEND takes every call.
    takes: Callable[..., bool] | None = None
    # A line for `backends()` on what this implementation does beyond the plain choice.
    note: str | None = None


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, implementation: Implementation) -> None:
    _REGISTRY.setdefault(op, {})[backend] = implementation


def requested() -> str:
    """The backend named by SPARSEKERN_BACKEND, or 'auto'."""
    global _last_request
    if torch.compiler.is_compiling():
        return _request_named(_environment_value())
    # Every sparse layer call reads it: os.environ's own dict, directly, and the name remembered for
    # the value last read (os.environ.get, which encodes the key and decodes the value, and the
    # parse cost ~1.5 us per call).
    try:
        raw = os.environ._data.get(_ENVIRON_KEY)
    except AttributeError:  # a plain mapping in os.environ's place (a test's mock.patch("os.environ", {...}))
        return _request_named(_environment_value())
    if raw is None:
        return "auto"
    if raw != _last_request[0]:
        _last_request = (raw, _request_named(os.environ.decodevalue(raw)))
    return _last_request[1]


# The key os.environ stores the variable under in its dict (on every platform), and the last value
# read there with the name it gives (a value that names no backend raises at every read).
_ENVIRON_KEY = os.environ.encodekey(ENV_VAR)
_last_request: tuple = (None, "auto")


def _request_named(value: str) -> str:
    name = value.strip().lower() or "auto"
    name = ALIASES.get(name, name)
    if name != "auto" and name not in AUTO_ORDER:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(AUTO_ORDER)} "
                         f"(or an alias: {', '.join(ALIASES)}), got {name!r}")
    return name


def _environment_value() -> str:
    """SPARSEKERN_BACKEND's value, or 'auto' where it is not set.

    Under torch.compile the read must leave a guard, so that a compiled model follows a change of the
    variable as an eager one does: Dynamo guards the value of a variable that is set, but not the
    absence of one that is not (seen with torch 2.13), and a model compiled with it unset kept its
    backend after it was set. A membership test on the environment's own dict leaves that guard,
    with the key computed here (`encodekey` is how os.environ keys it, on every platform): Dynamo
    guards a constant key's absence alone, but the absence of a key read from a global
    (`_ENVIRON_KEY`) as the match of the dict's whole key set, so that setting any variable
    recompiled every compiled sparse model, and each call checked ~45 guards more.
    """
    if torch.compiler.is_compiling() and os.environ.encodekey(ENV_VAR) not in os.environ._data:
        return "auto"
    return os.environ.get(ENV_VAR, "auto")


def label(backend: str, device_type: str) -> str:
    """How reports name a backend on a device: the compiled extension says which of its kernels ran."""
    return f"{backend}/{device_type}" if backend == "compiled" else backend


def _reasons(op: str, device_type: str, dtypes: tuple = ()) -> dict[str, str | None]:
    implementations = _REGISTRY[op]
    return {
        name: (implementations[name].missing(device_type, dtypes) if name in implementations
               else f"no {name} implementation of {op}")
        for name in AUTO_ORDER
    }


def automatic_backends(op: str, device_type: str, dtypes: tuple = ()) -> list[str]:
    """The backends the automatic choice picks `op`'s implementation from on `device_type` for tensors of
    `dtypes`, in its order of preference: those that can run there and that it may take there (not Triton
    on CPU, the interpreter, which checks kernels but says nothing of their speed). Per-call judgements
    (`Implementation.takes`) are not asked. For tools that run each candidate in turn, such as the benchmarks.
    """
    implementations = _REGISTRY[op]
    return [name for name, why in _reasons(op, device_type, dtypes).items()
            if why is None and implementations[name].automatic(device_type)]


def is_forced(op: str) -> bool:
    """Whether SPARSEKERN_BACKEND names a backend that implements `op`, which then runs every call."""
    return requested() in _REGISTRY[op]


def choose(op: str, device_type: str, dtypes: tuple = (), args: tuple | None = None,
           request: str | None = None) -> tuple[str, Implementation]:
    """The backend that runs `op` on tensors of `device_type` and `dtypes`, under SPARSEKERN_BACKEND.

    `args`, the call's leading tensor arguments, let an implementation decline a call it would run
    slowly (`Implementation.takes`); without them every usable implementation is taken. `request`:
    `requested()` as the caller just read it, for a caller that needs it too (reading the
    environment costs ~0.7 us, at every op call); the chosen name equals it exactly when the
    request forces the backend (`is_forced`).
    """
    name = requested() if request is None else request
    implementations = _REGISTRY[op]
    candidates = AUTO_ORDER
    if name != "auto":
        if name in implementations:
            why = implementations[name].missing(device_type, dtypes)
            if why is not None:
                usable = [n for n, reason in _reasons(op, device_type, tuple(dtypes)).items() if reason is None]
                on = f"{device_type} {'/'.join(str(d).removeprefix('torch.') for d in dtypes)}".rstrip()
                raise RuntimeError(f"{ENV_VAR}={name} cannot run {op} on {on}: {why}; "
                                   f"usable backends: {', '.join(usable)}")
            return name, implementations[name]
        candidates = AUTO_ORDER[AUTO_ORDER.index(name) + 1:]
    # Each candidate's reason only when the ones before it were passed over: this runs at every op
    # call (every sparse layer's forward), where the reasons of the rest would be wasted. Whether the
    # automatic choice may take it at all is asked first: it is cheaper (Triton's reason reads
    # TRITON_INTERPRET, and on CPU the automatic choice never takes Triton).
    for candidate in candidates:
        implementation = implementations.get(candidate)
        if (implementation is not None and implementation.automatic(device_type)
                and implementation.missing(device_type, dtypes) is None
                and (args is None or implementation.takes is None or implementation.takes(*args))):
            return candidate, implementation
    raise RuntimeError(f"no backend can run {op} on {device_type}: {_reasons(op, device_type, tuple(dtypes))}")


def static_choice(op: str, device_type: str, request: str) -> str | None:
    """The backend `choose` gives every call of `op` on `device_type` under `request` (a value of
    `requested()`) whatever its dtypes and arguments, where the registry alone decides that; None
    where a call's dtypes or arguments may (an implementation that is missing for some of them, or
    that judges each call). For callers that skip `choose` on their fast path."""
    implementations = _REGISTRY[op]
    candidates = AUTO_ORDER
    if request != "auto":
        if request in implementations:
            return request if implementations[request].missing is never_missing else None
        candidates = AUTO_ORDER[AUTO_ORDER.index(request) + 1:]
    for candidate in candidates:
        implementation = implementations.get(candidate)
        if implementation is None or not implementation.automatic(device_type):
            continue  # passed over whatever the call
        return candidate if implementation.missing is never_missing and implementation.takes is None else None
    return None


# Looked up once, at import (without importing Triton): find_spec searches the import path on every
# call, tens of microseconds that every op call would pay.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (read by Triton when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_missing(device_type: str, dtypes: tuple = ()) -> str | None:
    """Why Triton kernels cannot run, or not run right, on a device type for tensors of `dtypes`,
    or None. Never touches the GPU driver."""
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if torch.bfloat16 in dtypes and triton_interpreted():
        return "the Triton interpreter (TRITON_INTERPRET=1) computes bfloat16 wrongly"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        return None if triton_interpreted() else "CPU tensors need TRITON_INTERPRET=1"
    return f"no Triton support for device type {device_type!r}"


# Triton before 3.7 interprets a loop whose bounds are loaded values through int() of a one-element
# array, which NumPy 2.4 refuses (triton-lang/triton#9171): under TRITON_INTERPRET=1 a kernel with
# such a loop (masked_linear's walk over its list of active tiles) raises there. torch 2.9 and 2.11
# pin Triton 3.5 and 3.6.
_LOOP_FIXED_TRITON = (3, 7)
_LOOP_BREAKING_NUMPY = (2, 4)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1+local'."""
    major, minor = (re.match(r"\d+", part).group() for part in version.split(".")[:2])
    return int(major), int(minor)


def interpreter_loop_bug(triton_version: str, numpy_version: str) -> str | None:
    """Why these releases' Triton interpreter cannot run a loop with loaded bounds, or None."""
    if _release(triton_version) >= _LOOP_FIXED_TRITON or _release(numpy_version) < _LOOP_BREAKING_NUMPY:
        return None
    return (f"the interpreter of Triton {triton_version} cannot run loops with loaded bounds under NumPy "
            f"{numpy_version} (triton-lang/triton#9171): use triton>=3.7 or numpy<2.4")


# Constant to torch.compile, which would otherwise trace the version checks when it traces an op.
@torch.compiler.assume_constant_result
def _installed_interpreter_loop_bug() -> str | None:
    import numpy
    import triton  # imported already where the interpreter runs kernels; torch imports NumPy
    return interpreter_loop_bug(triton.__version__, numpy.__version__)


def triton_missing_with_loaded_loops(device_type: str, dtypes: tuple = ()) -> str | None:
    """triton_missing, for kernels whose loops run to bounds loaded from memory."""
    reason = triton_missing(device_type, dtypes)
    if reason is None and triton_interpreted():
        reason = _installed_interpreter_loop_bug()
    return reason


def compiled_missing(op: str) -> Callable[[str, tuple], str | None]:
    def missing(device_type: str, dtypes: tuple = ()) -> str | None:
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return _extension.kernel_missing(op, device_type)
    return missing


def never_missing(device_type: str, dtypes: tuple = ()) -> None:
    return None


def only_on_gpu(device_type: str) -> bool:
    return device_type == "cuda"


class BackendReport(dict):
    """`backends()`'s nested dict, which prints as an indented summary (the dict itself is one long line):
    per op and device type the chosen backend, then each one passed over with its reason."""

    def __repr__(self) -> str:
        lines = [f"{ENV_VAR}={self['requested']}; compiled extension: {self['extension']}"]
        for op, devices in self["ops"].items():
            lines.append(op)
            for device_type, entry in devices.items():
                lines.append(f"  {device_type:<5} {entry['chosen'] or 'none: ' + entry.get('error', '')}")
                lines += [f"        not {name}: {why}" for name, why in entry.items()
                          if name in AUTO_ORDER and why is not None]
                lines += [f"        not {name} for {dtype}: {why}" for dtype, refused in entry["dtypes"].items()
                          for name, why in refused.items()]
                lines += [f"        {field}: {entry[field]}" for field in ("fallback", "note") if field in entry]
        return "\n".join(lines)

    __str__ = __repr__


def backends() -> BackendReport:
    """Which backend each op uses on each device type now, and why the others are passed over.

    Returns {"requested": ..., "extension": load status, "ops": {op: {device: {"chosen": name,
    "<backend>": None if usable else reason, "dtypes": {dtype name: {"<backend>": reason}}, and where
    they apply "fallback" (the named backend lacks the op) and "note" (a per-call rule of the chosen
    implementation)}}}}: "chosen" and the plain reasons hold for float32 tensors; "dtypes" lists the
    dtypes for which a backend is refused although it runs float32 (bfloat16 under the Triton interpreter).
    A dict (a `BackendReport`), which prints as a readable summary.
    """
    report = BackendReport({
        "requested": requested(),
        "extension": "loaded" if _extension.LOAD_ERROR is None else _extension.LOAD_ERROR,
        "ops": {},
    })
    for op in sorted(_REGISTRY):
        report["ops"][op] = {}
        for device_type in ("cpu", "cuda"):
            entry = dict(_reasons(op, device_type))
            try:
                entry["chosen"] = choose(op, device_type)[0]
            except RuntimeError as error:
                entry["chosen"] = None
                entry["error"] = str(error)
            entry["dtypes"] = {}
            for dtype in _REPORTED_DTYPES:
                refused = {name: why for name, why in _reasons(op, device_type, (dtype,)).items()
                           if why is not None and entry[name] is None}
                if refused:
                    entry["dtypes"][str(dtype).removeprefix("torch.")] = refused
            if report["requested"] != "auto" and not is_forced(op) and entry["chosen"] is not None:
                entry["fallback"] = (f"{ENV_VAR}={report['requested']} does not implement {op}: "
                                     f"{entry['chosen']} runs it")
            note = _REGISTRY[op][entry["chosen"]].note if entry["chosen"] is not None else None
            if note is not None:
                entry["note"] = note
            report["ops"][op][device_type] = entry
    return report
