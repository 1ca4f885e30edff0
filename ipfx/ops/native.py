"""The native CPU kernel of the fused ops (``csrc/ip_conv.cpp``): built on first use, cached, optional.

The kernel computes order (a) of :mod:`ipfx.ops.kernels` tile by tile, never materialising whole-image
basis maps: for ``TP`` consecutive output positions it gathers every input channel's ``K x TP`` patch,
multiplies it by the basis (``K x K``; skipped for the identity basis, SP, which is then a direct sparse
convolution on the patch), keeps these ``c_in*K*TP`` basis responses in cache, and accumulates each output
channel's CSR row of kept coefficients ``A[o, i*K + j]`` into registers before writing the tile once. What
each tap of each tile reads is described once per call as runs of input numbers (a few row segments per
tap), which expresses every geometry: 1-3 spatial dims, stride, dilation, padding, groups (through the
block-diagonal ``A``), transposed convs (``off = (p + pad - t*dil) / stride`` where exact) and output
padding. ``sparse_linear`` is the same contraction with ``R = x^T``. float32 and float64;
other dtypes and devices take the pure-torch orders.

Work per batch: ``used*K*P_out`` basis MACs (``used`` = rows ``i*K + j`` some kept coefficient reads,
at most ``c_in*K``; none for SP) + ``c_in*K*P_out`` gathered numbers + ``nnz*P_out`` sparse MACs.
Every output element sums its CSR row in one thread in a fixed order (storage order dealt round a few
independent accumulator chains, which keep the FMA units busy, then added pairwise): results do not depend
on the thread count or the tiling, and equal the torch orders up to float rounding.

Build: ``torch.utils.cpp_extension.load`` (JIT, as a Python module: pybind11 calls cost a third of
``torch.ops``'s; needs a C++ compiler, Python's headers and ``ninja``, ``pip install ninja`` or ``pip install
"ipfx[native]"``) with ``-O3 -march=native -fopenmp``, compiled once (30-90 s,
with one line on stderr saying so) and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``). The cache key (:func:`library_name`) holds what the library depends on:
the kind of CPU, the torch build and where it is installed, the compiler, and the source and where it is,
so environments sharing the directory (virtual environments, clones) keep their own builds instead of
rebuilding each other's on every load. A file lock makes
processes that start at once build it once (the others wait, then load it). Later processes load the
cached library (~1 s); ``ipfx build-native`` builds it ahead of time. Where the build fails the
pure-torch path runs and one warning says how to get the fast path. ``IPFX_NATIVE=0`` turns the native
kernel off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import sysconfig
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "ip_conv.cpp")
_HEADERS = [os.path.join(os.path.dirname(__file__), "csrc", h) for h in ("blocked.h", "program.h")]  # (included by _SOURCE)
_FLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_flags() -> str:
    """The CPU's feature flags line of ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on ARM), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cpu_tag() -> str:
    """A short hash of the CPU's feature flags: ``-march=native`` builds are kept apart per kind of CPU, so a
    cache directory shared between machines never hands an AVX-512 build to an AVX2-only CPU."""
    return hashlib.sha1((platform.machine() + cpu_flags()).encode()).hexdigest()[:8]


def _compiler() -> str:
    """The C++ compiler's version line (``CXX``, default ``c++``), or "" where there is none."""
    import subprocess

    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build_key() -> str:
    """What the built library depends on besides the CPU (module docstring): hashed into its name."""
    source = b""
    for path in (_SOURCE, *_HEADERS):
        with open(path, "rb") as f:
            source += f.read()
    # where torch and the source are: the build file cpp_extension writes names both (include paths, the
    # source path), so an environment elsewhere, even with the same torch build, would rebuild this one's
    # library on every load, and the other way round; each environment keeps its own build instead
    where = [os.path.realpath(os.path.dirname(torch.__file__)), os.path.realpath(_SOURCE),
             sysconfig.get_paths()["include"]]
    parts = [torch.__version__, str(torch.version.git_version), str(torch.version.cuda), _compiler(),
             " ".join(_FLAGS), hashlib.sha1(source).hexdigest(), *where]
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def library_name() -> str:
    """The built library's name, which is its cache key (module docstring); computed at the first build."""
    return f"ipfx_native_v1_{_cpu_tag()}_{_build_key()}"

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once tried; "error": str; "module": the built library as a Python module


def disabled() -> bool:
    """``IPFX_NATIVE=0`` (or false/no/off): never build or use the native kernel."""
    return os.environ.get("IPFX_NATIVE", "").strip().lower() in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the native kernel is usable in this process; builds (or loads the cached build) on first call."""
    if disabled():
        return False
    ok = _state.get("ok")
    if ok is not None:
        return ok
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
    return _state["ok"]


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" log on CPU machines."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _build() -> bool:
    limit = _recycle_limit()  # (a bad setting raises here, not as a failed build)
    try:
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)  # it logs "No CUDA runtime is found" on CPU-only machines
        cpp_extension = _cpp_extension()

        try:
            name = library_name()
            folder = cpp_extension._get_build_directory(name, verbose=False)
            with warnings.catch_warnings(), _build_lock(folder):
                warnings.simplefilter("ignore")
                if not os.path.exists(os.path.join(folder, f"{name}.so")):
                    print(f"ipfx: compiling the native CPU kernel once (30-90 s) into {folder}; later processes "
                          "load it (`ipfx build-native` builds it ahead of time)", file=sys.stderr, flush=True)
                module = cpp_extension.load(name=name, sources=[_SOURCE], extra_cflags=_FLAGS,
                                            extra_ldflags=["-fopenmp"], is_python_module=True, verbose=False)
        finally:
            log.setLevel(level)
        torch.ops.ipfx_native.conv  # noqa: B018  (raises if the library did not register)
        module.set_recycled_limit(limit)
        _state["module"] = module
        return True
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path runs
        _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        warnings.warn(
            "ipfx: the native CPU kernel of torch.ops.ipfx.ip_conv / sparse_linear could not be built "
            f"({_state['error']}); the slower pure-torch evaluation orders run instead. For the fast path "
            "install a C++ compiler, Python's headers and ninja (e.g. `apt-get install g++ python3-dev` and "
            "`pip install ninja`, or "
            "`pip install \"ipfx[native]\"`), then restart Python; set IPFX_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def _recycle_limit() -> int:
    """``IPFX_NATIVE_RECYCLE_MB`` in bytes (default 1024 MiB; module docstring)."""
    text = os.environ.get("IPFX_NATIVE_RECYCLE_MB", "").strip()
    try:
        mb = float(text) if text else 1024.0
    except ValueError:
        mb = -1.0
    if not mb >= 0 or mb == float("inf"):  # (NaN fails the first test)
        from ..errors import IPFXValueError

        raise IPFXValueError(f"IPFX_NATIVE_RECYCLE_MB must be a number of MiB >= 0 (e.g. 512, or 0 to keep no "
                             f"memory between calls), got {text!r}")
    return int(mb * 2**20)


def recycled_bytes() -> int:
    """Bytes the native kernel keeps for reuse (module docstring); 0 where it is not loaded."""
    return int(_state["module"].recycled_bytes()) if _state.get("module") is not None else 0


def release_memory() -> None:
    """Give the blocks the native kernel keeps for reuse back (blocks still in use are freed by their last
    user); later calls allocate and keep again, up to ``IPFX_NATIVE_RECYCLE_MB``."""
    if _state.get("module") is not None:
        _state["module"].release_recycled()


@contextlib.contextmanager
def _build_lock(folder: str):
    """An exclusive lock on ``folder``'s ``.ipfx-build.lock`` (where ``fcntl`` exists): one process builds,
    the ones started at the same time wait for it and then load its library."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".ipfx-build.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def library_path() -> str | None:
    """Where the built library is (None before a build)."""
    cpp_extension = _cpp_extension()
    name = library_name()
    path = os.path.join(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so")
    return path if os.path.exists(path) else None


#: How a bound conv (``BoundConv``, csrc/ip_conv.cpp) begins the ValueError it raises for an input of another
#: size or element size than it was bound for.
_BINDING_MISMATCH = "ipfx native: this conv was bound for inputs of size "


def binding_mismatch(error: BaseException) -> bool:
    """``error`` is a bound conv's refusal of an input it was not bound for (its plan was made for other
    shapes): the caller's plan or program is stale, not the model wrong."""
    return isinstance(error, ValueError) and str(error).startswith(_BINDING_MISMATCH)


def supports(x: Tensor) -> bool:
    """The native kernel handles this input (CPU, float32/float64) and is available."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and available()


def tile_for(c_in: int, K: int, itemsize: int) -> int:
    """Positions per tile: the largest of 64/32/16 whose basis responses (c_in*K*tile numbers) fit 512 KiB."""
    for tile in (64, 32):
        if c_in * K * tile * itemsize <= 512 * 1024:
            return tile
    return 16


#: The direct sparse convolution (SP: every kept coefficient one vector load of the padded input, no gather)
#: against the tiled gather, per layer at 2 threads, batch 1, on an Intel Xeon with AVX-512 (ratio of times,
#: direct / gather): 0.6 on 3x3 maps of 56x56 and 1x1 of 56x56, 0.7-0.85 on 28x28. Small maps, refitted once
#: the read offsets were worked out per input shape instead of per call (in-process interleaved rounds, median
#: of 7 rounds' min of 15 calls): 3x3 512@7 0.76 / 0.85 / 0.88 / 1.01 at 5 / 10 / 20 / 30% kept, 3x3 256@14
#: 0.76 / 0.89 / 1.03 at 5 / 10 / 20%; 1x1 1024->256 @14 1.13 / 1.39 at 2 / 5%, 2048->512 @7 0.60 / 0.96,
#: 256->1024 @14 2.0 / 1.9, 512->2048 @7 1.70 at 5%. So, stride 1: ungrouped, and a map of at least
#: DIRECT_MIN_POSITIONS output positions, or a kernel of at least DIRECT_MIN_TAPS taps with at most
#: DIRECT_MAX_DENSITY_TAPS of its coefficients kept, or at most DIRECT_MAX_DENSITY kept and no more output
#: channels than input channels.
DIRECT_MIN_POSITIONS = 784
#: On CPUs whose vectors are 32 bytes (AVX2; the kernel computes in the machine's width), a 1x1 conv with more
#: output channels than input channels runs faster through the gather at every map size and batch. Measured on
#: an AMD EPYC (AVX2), 2 threads, in-process interleaved rounds (direct / gather): resnet50 at 95%, batch 1,
#: 64->256 @56 1.7-1.9, 128->512 @28 1.9-2.0, 256->1024 @14 1.9-2.0, 512->2048 @7 1.5-1.6 (batch 32: 1.03-1.15);
#: mobilenet_v3_large at 95%, batch 1 (32): 16->64 @112 1.75 (1.13), 24->72 @56 1.4-1.6 (1.27), 40->240 @28 2.65
#: (3.0), 112->672 @14 3.1-3.2 (2.7). The rows above were measured with AVX-512, where the direct path won on
#: 1x1 maps of 56x56. So such a conv runs directly only where the vectors are at least
#: DIRECT_EXPANSION_MIN_VECTOR_BYTES wide.
DIRECT_EXPANSION_MIN_VECTOR_BYTES = 64
DIRECT_MIN_TAPS = 9
DIRECT_MAX_DENSITY_TAPS = 0.2
DIRECT_MAX_DENSITY = 0.03
#: The gather copies each input channel's K rows once per tile and each copy is then read by the kept
#: coefficients of that column: nnz / (c_in K) of them on average. Where that is small the copy is a large part
#: of the work, and the direct path, which reads the input in place, wins on small maps too. Measured on an AMD
#: EPYC (AVX2), 2 threads, in-process interleaved rounds (direct / gather), 1x1 at 95%, batch 1 (32), by reads
#: per copied row: mobilenet_v3_large 672->112 @14 5.6: 0.80 (0.65), 480->112 @14 5.6: 0.83 (0.74), 672->160
#: @7 8.0: 0.70 (0.86), 960->160 @7 8.0: 0.66 (0.83); resnet50 1024->256 @14 12.8: 1.04-1.07 (0.88),
#: 1024->512 @14 25.6: 1.28 (1.07), 2048->512 @7 25.6: 0.98-1.03 (1.18). So also direct (c_out <= c_in)
#: where each copied row would be read by at most DIRECT_MAX_READS_PER_ROW kept coefficients on average, on
#: CPUs whose vectors are narrower than DIRECT_READS_MAX_VECTOR_BYTES: with AVX-512 the gather won 1024->256
#: @14 at 98% (5.1 reads a row; the rows above DIRECT_MIN_POSITIONS).
DIRECT_MAX_READS_PER_ROW = 10
DIRECT_READS_MAX_VECTOR_BYTES = 32
#: Strided: the direct path first lays the padded input out as its stride phases (one copy of the input), the
#: gather copies every tap's strided positions one number at a time (c_in*K*P_out numbers, about K/phases
#: times the input). Measured (resnet50 at 95%, batch 1, 2 threads, direct / gather): 0.31 on the 7x7/2
#: stem (3 channels, K/phases = 12), 1.0-1.1 on 3x3/2 (2.25), 2.8 on 1x1/2 (0.25). So direct where each
#: input number is read by at least DIRECT_MIN_TAPS_PER_PHASE taps on average (K / phases).
DIRECT_MIN_TAPS_PER_PHASE = 4


#: Grouped (depthwise above all): the direct path takes a (sample, group) at a time and lays the group's
#: input channels out padded in a buffer of the thread's own, read from cache by each of the group's output
#: channels. mobilenet_v3_large's depthwise layers at 95%, batch 1, 2 threads (interleaved, min of 300 calls;
#: direct / F.conv2d, gather / F.conv2d): 672@14 3x3 0.54 / 0.90, 960@7 5x5 0.57 / 1.43, 672@14 5x5/2
#: 0.70 / 1.05, 72@56 3x3 0.31 / 0.36; but 16@112 3x3 0.59 / 0.42 and 64@112 3x3/2 0.45 / 0.44, where a
#: channel's padded plane (13k numbers) no longer fits L1. So direct for every grouped SP conv whose group
#: buffer (its input channels' padded planes) holds at most DIRECT_GROUP_MAX_NUMBERS numbers (32 KiB of
#: float32); larger groups take the gather.
DIRECT_GROUP_MAX_NUMBERS = 8192
#: A grouped conv with a basis runs as its folded kernel (:func:`ipfx.ops.kernels.folds_in_native`: ``K`` taps
#: for each kept channel pair) on the direct grouped path, whatever the group's size, where a group has at
#: most FOLD_MAX_GROUP_CHANNELS input channels. Measured with a DCT basis, 2 threads, batch 1 (min of 21 calls,
#: time / the dense conv's at 50 / 90 / 95 / 99%): folded and direct, against order (a) in the native kernel
#: and the folded kernel through the gather: depthwise 3x3 16@112 0.08-0.32 (order (a) 0.30-1.05, gather
#: 0.26-1.00), 3x3/2 64@112 0.60 / 0.39 / 0.37 / 0.18 (1.65 / 0.85 / 0.77 / 0.38; gather 1.32 / 0.84 / 0.73 /
#: 0.36), 3x3 32@112 0.40 / 0.35 / 0.23 / 0.12 (1.87 / 1.08 / 0.73 / 0.36); groups of 4 channels 128@56
#: 0.14 / 0.11 / 0.16 / 0.04 (0.35 / 0.30 / 0.41 / 0.09), of 8 3x3/2 256@56 0.89 / 0.72 / 0.63 / 0.29 (1.69 /
#: 1.53 / 1.22 / 0.64), of 16 64@56 0.94 / 0.74 / 0.68 / 0.22 (1.28 / 0.96 / 0.80 / 0.57); but of 64 256@14
#: 1.85 / 1.42 / 0.58 / 0.25 (1.51 / 0.85 / 0.59 / 0.62): with many channels a group, most pairs keep a
#: coefficient and order (a)'s basis work is shared by the group's output channels.
FOLD_MAX_GROUP_CHANNELS = 16


def vector_bytes() -> int:
    """The width of the native kernel's vectors in bytes: the CPU's own, as ``-march=native`` built it (64 with
    AVX-512, 32 with AVX2); 64 where the kernel is not built."""
    module = _state.get("module")
    return int(module.vector_bytes()) if module is not None else 64


def direct_applies(g: dict, nnz: int, basis: Optional[Tensor], out_spatial) -> bool:
    """Whether the native kernel runs ``g`` as a direct sparse convolution (:data:`DIRECT_MIN_POSITIONS`,
    :data:`DIRECT_EXPANSION_MIN_VECTOR_BYTES`, :data:`DIRECT_MIN_TAPS_PER_PHASE`, :data:`DIRECT_MAX_READS_PER_ROW`,
    :data:`DIRECT_GROUP_MAX_NUMBERS`; the measurements beside them)."""
    if basis is not None or g["transposed"]:
        return False
    if g["groups"] != 1:
        padded = 1  # the padded input plane, from the output's size (up to stride - 1 more per dim)
        for out, k, s, d in zip(out_spatial, g["kernel"], g["stride"], g["dilation"]):
            padded *= int(out) * int(s) + int(d) * (int(k) - 1)
        return g["c_in"] // g["groups"] * padded <= DIRECT_GROUP_MAX_NUMBERS
    phases = 1
    for s in g["stride"]:
        phases *= int(s)
    if phases > 1:
        return g["K"] >= DIRECT_MIN_TAPS_PER_PHASE * phases
    if g["K"] == 1 and g["c_out"] > g["c_in"] and vector_bytes() < DIRECT_EXPANSION_MIN_VECTOR_BYTES:
        return False
    positions = 1
    for s in out_spatial:
        positions *= int(s)
    density = nnz / max(1, g["c_out"] * g["c_in"] * g["K"])
    few_reads = (nnz <= DIRECT_MAX_READS_PER_ROW * g["c_in"] * g["K"]
                 and vector_bytes() <= DIRECT_READS_MAX_VECTOR_BYTES)
    return (positions >= DIRECT_MIN_POSITIONS or (g["K"] >= DIRECT_MIN_TAPS and density <= DIRECT_MAX_DENSITY_TAPS)
            or (g["c_out"] <= g["c_in"] and (density <= DIRECT_MAX_DENSITY or few_reads)))


def bind_conv(crow: Tensor, col: Tensor, vals: Tensor, basis: Optional[Tensor], bias: Optional[Tensor],
              used: Tensor, g: dict, out_spatial, itemsize: int, in_spatial=None, direct: Optional[bool] = None):
    """The native conv for one geometry and storage with every argument but the input worked out once:
    ``run(x, residual, activation) -> y`` (``x`` batched and contiguous, ``itemsize`` its element size; CSR of
    ``A[o, i*K + j]``, see the module docstring), ending in the epilogue ``act(y + residual)``
    (:mod:`ipfx.ops.epilogue`; ``residual`` contiguous, y's shape, or None; ``activation`` its number).
    A deployed module's plan keeps this (a C++ object holding every other argument: a call converts three
    arguments, not twenty, 2-3 us less per call), so a call costs little more than the arithmetic. Given the
    input's spatial size (``in_spatial``), the direct path's per-coefficient read offsets are worked out here
    once (``direct_sources``: a pass over the kept coefficients per call otherwise, 10-25% of a small map's
    layer at 95%); then every call must have that size, as a plan's inputs do (another one raises
    :func:`binding_mismatch`: the output size was worked out for this one). ``direct``: the path, where the
    caller has chosen it (a folded grouped kernel: :func:`ipfx.ops.kernels.folds_in_native`); None: the size
    rule (:func:`direct_applies`)."""
    module = _state["module"]
    if direct is None:
        direct = direct_applies(g, vals.numel(), basis, out_spatial)
    sources = None
    if direct and in_spatial is not None:
        sources = module.direct_sources(col, g["c_in"], g["groups"], list(in_spatial), list(out_spatial),
                                        list(g["kernel"]), list(g["stride"]), list(g["padding"]),
                                        list(g["dilation"]), itemsize)
    # (the only input size out_spatial, and the offsets, are right for: a bound conv given another one raises
    # binding_mismatch instead of computing a map of the size it was bound for from it)
    size = None if in_spatial is None else list(in_spatial)
    return module.bind_conv(crow, col, vals, basis, bias, used, g["c_out"], list(g["kernel"]), list(g["stride"]),
                            list(g["padding"]), list(g["dilation"]), g["transposed"], list(out_spatial),
                            tile_for(g["c_in"], g["K"], itemsize), direct, g["groups"], sources, size, itemsize)


def conv(x: Tensor, crow: Tensor, col: Tensor, vals: Tensor, basis: Optional[Tensor], bias: Optional[Tensor],
         used: Tensor, g: dict, out_spatial, residual: Optional[Tensor] = None, activation: int = 0,
         direct: Optional[bool] = None) -> Tensor:
    """Run the native conv once (:func:`bind_conv`, whose arguments these are, then the call)."""
    return bind_conv(crow, col, vals, basis, bias, used, g, out_spatial, x.element_size(),
                     direct=direct)(x, residual, activation)


def linear(x: Tensor, crow: Tensor, col: Tensor, vals: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y = x @ W^T + bias`` for a 2-d ``x`` and ``W`` as CSR (int64 crow/col, values of x's dtype)."""
    return _state["module"].linear(x, crow, col, vals, bias)


def max_pool2d(x: Tensor, kernel, stride, padding, dilation, out_spatial) -> Tensor:
    """``F.max_pool2d`` without indices for a contiguous 4-d float CPU ``x``; every argument a pair, checked by
    the caller (:func:`ipfx.ops.pooling.native_geometry`)."""
    return _state["module"].max_pool2d(x, list(kernel), list(stride), list(padding), list(dilation), list(out_spatial))


def channel_mean(x: Tensor) -> Tensor:
    """``F.adaptive_avg_pool2d(x, 1)`` for a contiguous 4-d float CPU ``x``: each plane's mean, summed in a fixed
    order by one thread (not aten's order: the last bits may differ from aten's)."""
    return _state["module"].channel_mean(x)


def new_program(slots: int, inputs: int):
    """An empty native program (``csrc/program.h``; built by :mod:`ipfx.ops.program`) of ``slots`` values, the
    first ``inputs`` of them its inputs."""
    return _state["module"].Program(slots, inputs)


def runs_blocked(bound) -> bool:
    """Whether a bound conv (:func:`bind_conv`) runs on the batch-blocked layout (:mod:`ipfx.ops.blocked`): an SP
    2-d conv bound for one input size, on maps of more than one position."""
    return bool(_state["module"].runs_blocked(bound))


def pointwise_feeds_grouped(a, b) -> bool:
    """Whether two bound convs (:func:`bind_conv`) run as one native call, ``b`` reading ``a``'s output made one
    channel at a time (``pointwise_grouped``, csrc/ip_conv.cpp: ``a`` an SP 1x1 conv, ``b`` an SP grouped conv
    such as a depthwise one, with the numbers the two compute one after the other)."""
    return bool(_state["module"].pointwise_feeds_grouped(a, b))
