"""ipfx's deployment form against peer CPU inference engines, on the same pruned network.

    python benchmarks/peers.py [--models resnet50,mobilenet_v3_large] [--sparsities 0.9,0.95,0.98,0.99]
                               [--batches 1,32] [--rounds 9] [--calls N] [--threads 2] [--max-load 0.5]
                               [--space sp|ip] [--quick] [--out benchmarks/peers.md]

For each torchvision model (random weights, never downloaded, each conv/linear weight rescaled to unit std
so that global magnitude pruning leaves every layer at about the same density; batch-norm statistics
calibrated on random batches so activations neither blow up nor vanish), each sparsity and each batch
size, one network is built
(``ipfx.transform(model, space=..., example_inputs=(x,))``, global ``ipfx.prune(t, "magnitude", s)``, batch
norms calibrated again on the pruned weights) and timed, at ``--threads`` threads each, as:

- torch eager dense: ``ipfx.lower(t, target="dense")`` in eval mode under ``torch.inference_mode()``;
- ONNX Runtime: the ONNX export of that dense model (opset 17, TorchScript exporter, falling back to the
  dynamo exporter), ``ORT_ENABLE_ALL``, ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``;
- OpenVINO: the same ONNX file, CPU, ``INFERENCE_NUM_THREADS=threads``, ``PERFORMANCE_HINT=LATENCY`` and
  ``INFERENCE_PRECISION_HINT=f32`` (on CPUs with AVX512-BF16/AMX OpenVINO otherwise runs in bf16);
- DeepSparse (which exploits unstructured weight sparsity): the same ONNX file with
  ``deepsparse.compile_model(num_cores=threads)``, in a worker process of its own virtual environment
  (``--deepsparse-python``, default ``$IPFX_DEEPSPARSE_PYTHON`` or ``.deepsparse-venv/bin/python`` beside the
  checkout), since it wants ``numpy<2``;
  HardSwish/HardSigmoid are written as Mul/Add/Clip in its copy of the file (it runs neither natively)::

      python3 -m venv .deepsparse-venv
      .deepsparse-venv/bin/pip install deepsparse==1.8.0 "numpy<2" onnx

- ipfx fused: the deployment form as the README deploys it, ``ipfx.lower(t, target="fused", freeze=True)``
  written by ``ipfx.deploy.save_program`` and opened by ``ipfx.deploy.load_module`` (plain ``target="fused"``
  where this ipfx has no ``freeze`` option, the lowered module where it has no ``load_module``; the table says
  which), eval mode, ``torch.inference_mode()``; with ``--compile``
  also ``torch.compile`` of it (Inductor keeps the ``ipfx::ip_conv`` calls and compiles what lies between).

onnxruntime, openvino and DeepSparse are optional: a missing one is skipped with a note. Every engine's
output on the timed input is checked against torch eager dense: max |y - y_ref| / max |y_ref| (flagged
above 1e-3). After one warm-up, rounds run each engine ``--calls`` calls in turn, the order rotated each
round; an engine's time in a round is its mean per call, after ``--round-warmup`` untimed calls of its own at
the start of its turn (the first call after another engine has run meets that engine's thread pool still
spinning or waking: measured on 2 cores, one step of ipfx's first call stalled 4-12 ms, a scheduler tick or
three, in 4 of 5 rounds, and the peers' first calls ran 10-40% slow; a deployed engine has the machine to
itself). Before each round ``wait_for_quiet`` waits (up to
``--quiet-timeout`` s) for the 1-minute load average to fall below ``--max-load``; a round that starts
above it is marked loaded. The load average counts this benchmark's own recent work as well, so with a
low threshold it also makes each round wait for the previous one to cool off; the CPU time that other
processes took in the half second before the round ("others' CPU") is recorded too. Reported per engine: the
median (and min) time over rounds and the median of its per-round ratios to the fastest dense engine
(torch eager, ONNX Runtime, OpenVINO) of that round. ``--out`` gets the markdown tables, the ``.json``
beside it the machine and every round.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ipfx

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402

import ipfx  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)

try:
    import onnxruntime as ort
except ImportError:  # optional peer (CI never installs it)
    ort = None
try:
    import openvino as ov
except ImportError:  # optional peer
    ov = None

TORCH, ORT, OV, DS, FUSED = "torch eager dense", "onnxruntime", "openvino f32", "deepsparse", "ipfx fused"
COMPILED = "ipfx fused, torch.compile"  # with --compile: Inductor compiles around the fused ops
ENGINES = (TORCH, ORT, OV, DS, FUSED, COMPILED)
DENSE = (TORCH, ORT, OV)  # the per-round reference is the fastest of these
TOLERANCE = 1e-3
DEEPSPARSE_PYTHON = os.environ.get("IPFX_DEEPSPARSE_PYTHON") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".deepsparse-venv", "bin", "python")

# the DeepSparse worker: run in DeepSparse's own venv, one JSON command a line on stdin, one JSON reply a
# line on a private copy of stdout (the engine's own prints go to stderr)
WORKER = r'''
import json, os, sys, time
reply_to = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

def reply(**kw):
    reply_to.write(json.dumps(kw) + "\n")

try:
    import numpy as np
    import deepsparse
    from deepsparse import compile_model
except Exception as e:
    reply(error=f"{type(e).__name__}: {e}")
    sys.exit(0)
reply(version=deepsparse.__version__, numpy=np.__version__)
engine = inputs = None
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "load":
            engine = inputs = None
            engine = compile_model(cmd["onnx"], batch_size=cmd["batch"], num_cores=cmd["cores"])
            inputs = [np.load(cmd["input"])]
            reply(ok=True, supported=getattr(engine, "fraction_of_supported_ops", None))
        elif cmd["op"] == "output":
            np.save(cmd["path"], engine.run(inputs)[0])
            reply(ok=True)
        elif cmd["op"] == "time":
            times = []
            for _ in range(cmd["calls"]):
                start = time.perf_counter()
                engine.run(inputs)
                times.append(time.perf_counter() - start)
            reply(times=times)
        elif cmd["op"] == "quit":
            reply(ok=True)
            break
    except Exception as e:
        reply(error=f"{type(e).__name__}: {e}")
'''


# -- load ------------------------------------------------------------------------------------------
def _cpu_busy() -> tuple[float, float]:
    """(busy seconds of all CPUs, this process's CPU seconds) now."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def others_cpu(window: float = 1.0) -> float | None:
    """Cores kept busy by other processes over the next ``window`` seconds (this process sleeps)."""
    try:
        b0, s0 = _cpu_busy()
        time.sleep(window)
        b1, s1 = _cpu_busy()
    except OSError:
        return None
    return max(0.0, ((b1 - b0) - (s1 - s0)) / window)


def wait_for_quiet(threshold: float, timeout: float, poll: float = 5.0) -> tuple[float, bool]:
    """Wait until the 1-minute load average is below ``threshold``, polling every ``poll`` s; after
    ``timeout`` s go on anyway. Returns (the load average when the wait ended, whether it was still above)."""
    deadline = time.monotonic() + timeout
    while True:
        load = os.getloadavg()[0]
        if load < threshold:
            return load, False
        if time.monotonic() >= deadline:
            return load, True
        time.sleep(min(poll, max(0.1, deadline - time.monotonic())))


# -- the network ------------------------------------------------------------------------------------
@torch.no_grad()
def unit_scale(model: nn.Module) -> None:
    """Rescale every conv/linear weight to unit std, so that global magnitude pruning leaves every layer at
    about the same density. At random init the layers' init scales, not any importance, would set the
    densities: at torchvision's init or He scale, 98% empties mobilenet_v3's classifier (an all-zero output).
    Convolutions followed by batch norm compute the same at any scale (the statistics are recalibrated)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.div_(m.weight.std().clamp_min(1e-12))


@torch.no_grad()
def calibrate_bn(model: nn.Module, size: int, seed: int, batches: int = 4, batch: int = 8) -> None:
    """Give random-weight batch norms the statistics of random inputs (cumulative average, momentum=None)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(batches):
        model(torch.randn(batch, 3, size, size, generator=gen))
    model.eval()
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


@torch.no_grad()
def recalibrate(t: nn.Module, model: nn.Module, size: int, seed: int) -> nn.Module:
    """Calibrate the batch norms of the pruned network: a copy of ``model`` with ``t``'s pruned dense weights
    gets new statistics, which are written into ``t``'s buffers. Returns that copy (eval mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = ipfx.lower(t, target="dense")
    pruned = copy.deepcopy(model)
    pruned.load_state_dict(folded.state_dict())
    calibrate_bn(pruned, size, seed)
    buffers = dict(t.named_buffers(remove_duplicate=False))
    missing = [n for n, _ in pruned.named_buffers() if n not in buffers]
    if missing:
        raise RuntimeError(f"the transformed model has no buffer(s) {missing[:4]}: cannot recalibrate its batch norms")
    for name, b in pruned.named_buffers():
        buffers[name].copy_(b)
    return pruned


def lower_fused(t: nn.Module, workdir: str, size: int) -> tuple[nn.Module, str, list[str]]:
    """ipfx's deployment form, as the README deploys it: ``ipfx.lower(t, target="fused", freeze=True)``, saved
    by ``ipfx.deploy.save_program`` (an example batch of 2) and opened by ``ipfx.deploy.load_module``. Where
    this ipfx lacks ``freeze``, plain ``target="fused"``; where it lacks ``load_module``, the lowered module."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fused, form = ipfx.lower(t, target="fused", freeze=True), 'lower(target="fused", freeze=True)'
        except TypeError as e:
            if "freeze" not in str(e):
                raise
            fused, form = ipfx.lower(t, target="fused"), 'lower(target="fused") (this ipfx has no freeze=)'
        notes = [str(w.message) for w in caught if "fused" in str(w.message)]
        fused.eval()
        if hasattr(ipfx.deploy, "load_module"):  # (a program's module keeps the mode it was saved in)
            stem = os.path.join(workdir, "ipfx-fused")
            ipfx.deploy.save_program(fused, stem, torch.randn(2, 3, size, size))
            fused, form = ipfx.deploy.load_module(stem + ".pt2"), form + ", save_program, load_module"
    return fused, form, notes


def export_onnx(model: nn.Module, x: torch.Tensor, path: str) -> str:
    """Export with the TorchScript exporter at opset 17, else the dynamo exporter; returns which worked."""
    errors = []
    for dynamo, opset in ((False, 17), (True, 18)):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), path, dynamo=dynamo, opset_version=opset,
                                  input_names=["input"], output_names=["output"])
            return f"torch.onnx.export(dynamo={dynamo}, opset_version={opset})"
        except Exception as e:  # noqa: BLE001 - either exporter may fail on a given torch
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {str(e)[:300]}")
    raise RuntimeError("ONNX export failed: " + "; ".join(errors))


def deepsparse_onnx(src: str, dst: str) -> str | None:
    """A copy of ``src`` for DeepSparse with HardSwish and HardSigmoid written as Mul/Add/Clip (the same
    function): DeepSparse 1.8 runs none of mobilenet_v3's graph natively otherwise (its
    ``fraction_of_supported_ops`` is 0). Returns what was rewritten, None when nothing was (use ``src``)."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        return None
    model = onnx.load(src)
    nodes, counts = [], {}

    def hard_sigmoid(x: str, out: str, alpha: float, beta: float) -> list:
        for suffix, value in (("alpha", alpha), ("beta", beta), ("zero", 0.0), ("one", 1.0)):
            model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), f"{out}__{suffix}"))
        return [helper.make_node("Mul", [x, f"{out}__alpha"], [f"{out}__scaled"]),
                helper.make_node("Add", [f"{out}__scaled", f"{out}__beta"], [f"{out}__shifted"]),
                helper.make_node("Clip", [f"{out}__shifted", f"{out}__zero", f"{out}__one"], [out])]

    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "HardSwish":  # x * HardSigmoid(x; 1/6, 0.5)
            gate = node.output[0] + "__gate"
            nodes += hard_sigmoid(node.input[0], gate, 1 / 6, 0.5)
            nodes.append(helper.make_node("Mul", [node.input[0], gate], [node.output[0]]))
        elif node.op_type == "HardSigmoid":
            nodes += hard_sigmoid(node.input[0], node.output[0], attrs.get("alpha", 0.2), attrs.get("beta", 0.5))
        else:
            nodes.append(node)
            continue
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts:
        return None
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, dst)
    return "decomposed for DeepSparse: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


# -- engines ----------------------------------------------------------------------------------------
def timed(fn, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class InProcess:
    """An engine called in this process: ``fn()`` runs one inference, ``result(out)`` makes it numpy."""

    def __init__(self, fn, result=lambda out: out, torch_mode: bool = False):
        self.fn, self.result = fn, result
        self.context = torch.inference_mode if torch_mode else contextlib.nullcontext

    def output(self) -> np.ndarray:
        with self.context():
            return np.array(self.result(self.fn()), dtype=np.float32, copy=True)

    def time(self, calls: int) -> list[float]:
        with self.context():
            return timed(self.fn, calls)

    def close(self) -> None:
        self.fn = self.result = None


def torch_engine(model: nn.Module, x: torch.Tensor) -> InProcess:
    return InProcess(lambda: model(x), lambda out: out.numpy(), torch_mode=True)


def ort_engine(path: str, x: np.ndarray, threads: int) -> InProcess:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    return InProcess(lambda: sess.run(None, feed), lambda out: out[0])


def ov_engine(path: str, x: np.ndarray, threads: int) -> InProcess:
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return InProcess(lambda: request.infer({0: x}, share_inputs=True, share_outputs=True), lambda out: out[0])


class DeepSparseWorker:
    """DeepSparse in a subprocess of its own venv; ``error`` says why it is not there."""

    def __init__(self, python: str, workdir: str):
        self.proc, self.version, self.error, self.workdir = None, None, None, workdir
        if not os.path.exists(python):
            self.error = (f"{python} not found (python3 -m venv .deepsparse-venv; "
                          ".deepsparse-venv/bin/pip install deepsparse==1.8.0 'numpy<2' onnx)")
            return
        script = os.path.join(workdir, "deepsparse_worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        env = dict(os.environ, NM_DISABLE_ANALYTICS="1", PYTHONPATH="")
        self.proc = subprocess.Popen([python, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, stderr=subprocess.DEVNULL)
        hello = self._read()
        if "error" in hello:
            self.error = f"deepsparse does not import in {python}: {hello['error']}"
            self.close()
        else:
            self.version = hello["version"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.poll()
            return dict(error=f"the DeepSparse worker exited (code {code})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        if self.proc is None:
            return dict(error=self.error)
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out and self.proc.poll() is not None:
            self.error, self.proc = out["error"], None
        return out

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.ask(op="quit")
                self.proc.wait(timeout=30)
            self.proc = None


class DeepSparseEngine:
    def __init__(self, worker: DeepSparseWorker, path: str, x: np.ndarray, threads: int):
        self.worker = worker
        inputs = os.path.join(worker.workdir, "input.npy")
        np.save(inputs, x)
        loaded = self._check(worker.ask(op="load", onnx=path, batch=int(x.shape[0]), cores=threads, input=inputs))
        self.supported = loaded.get("supported")  # DeepSparse's fraction_of_supported_ops

    @staticmethod
    def _check(reply: dict) -> dict:
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def output(self) -> np.ndarray:
        path = os.path.join(self.worker.workdir, "output.npy")
        self._check(self.worker.ask(op="output", path=path))
        return np.load(path)

    def time(self, calls: int) -> list[float]:
        return self._check(self.worker.ask(op="time", calls=calls))["times"]

    def close(self) -> None:
        pass


def rel_diff(y: np.ndarray, ref: np.ndarray) -> float:
    if y.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(y.astype(np.float64) - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


# -- one case ---------------------------------------------------------------------------------------
def run_case(dense: nn.Module, fused: nn.Module, x: torch.Tensor, args, workdir: str, worker: DeepSparseWorker,
             notes: list[str], label: str) -> dict:
    """Build every engine on ``x``, check them against torch eager dense and time them in rotated rounds."""
    x_np = np.ascontiguousarray(x.numpy())
    case = dict(batch=int(x.shape[0]), skipped={}, checks={})
    engines = {TORCH: torch_engine(dense, x)}
    onnx_path = os.path.join(workdir, "model.onnx")
    try:
        case["onnx_export"] = export_onnx(dense, x, onnx_path)
    except RuntimeError as e:
        onnx_path = None
        for name in (ORT, OV, DS):
            case["skipped"][name] = str(e)
    ds_path = onnx_path
    if onnx_path is not None and worker.proc is not None:
        ds_path = os.path.join(workdir, "model-deepsparse.onnx")
        case["deepsparse_onnx"] = deepsparse_onnx(onnx_path, ds_path)
        ds_path = ds_path if case["deepsparse_onnx"] else onnx_path
    peers = ((ORT, ort, "onnxruntime is not installed", lambda: ort_engine(onnx_path, x_np, args.threads)),
             (OV, ov, "openvino is not installed", lambda: ov_engine(onnx_path, x_np, args.threads)),
             (DS, worker.proc, worker.error, lambda: DeepSparseEngine(worker, ds_path, x_np, args.threads)))
    for name, present, why, build in peers:
        if onnx_path is None:
            continue
        if present is None:
            case["skipped"][name] = why
            continue
        try:
            engines[name] = build()
        except Exception as e:  # noqa: BLE001 - a peer that cannot load this model is skipped, not fatal
            case["skipped"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    engines[FUSED] = torch_engine(fused, x)
    if args.compile:
        started = time.perf_counter()
        engines[COMPILED] = torch_engine(torch.compile(fused), x)
        engines[COMPILED].output()  # compiles
        case["compile_seconds"] = round(time.perf_counter() - started, 1)
    if DS in engines:
        case["deepsparse_supported_ops"] = engines[DS].supported
    for name, why in case["skipped"].items():
        print(f"  {name} skipped: {why}", flush=True)
        notes.append(f"{label}: {name} skipped: {why}")

    # warm-up (once) and the output check on the timed input
    ref = None
    for name, engine in list(engines.items()):
        try:
            y = engine.output()
            engine.time(args.warmup)
        except Exception as e:  # noqa: BLE001
            if name == TORCH:  # the reference: nothing to compare with
                raise
            case["skipped"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  {name} failed, skipped: {case['skipped'][name]}", flush=True)
            notes.append(f"{label}: {name} failed on its first calls, skipped: {case['skipped'][name]}")
            engines.pop(name).close()
            continue
        if ref is None:
            ref = y.astype(np.float64)
            case["output_scale"] = float(np.max(np.abs(ref)))
            case["output_std"] = float(np.std(ref))
            if case["output_std"] < 1e-6 * max(case["output_scale"], 1e-30) or case["output_scale"] < 1e-12:
                notes.append(f"{label}: the reference output is constant (max abs "
                             f"{case['output_scale']:.3g}): the agreement check of this case says nothing")
        case["checks"][name] = rel_diff(y, ref)
    print("  check: " + ", ".join(f"{k} {v:.1e}{' !' if v > TOLERANCE else ''}" for k, v in case["checks"].items()),
          flush=True)

    names, rounds = list(engines), []
    calls = args.calls or (10 if x.shape[0] == 1 else 2)
    case["calls"] = calls
    for r in range(args.rounds):
        load, loaded = wait_for_quiet(args.max_load, args.quiet_timeout)
        others = others_cpu(0.5)
        order = names[r % len(names):] + names[:r % len(names)]
        times = {}
        for name in order:
            time.sleep(0.05)  # let the previous engine's spinning threads go idle
            try:
                if args.round_warmup > 0:
                    engines[name].time(args.round_warmup)
                times[name] = engines[name].time(calls)
            except Exception as e:  # noqa: BLE001 - a peer that fails mid-run (a crashed worker) drops out
                if name == TORCH:
                    raise
                case["skipped"][name] = f"round {r}: {type(e).__name__}: {str(e)[:300]}"
                notes.append(f"{label}: {name} failed in round {r}, dropped: {case['skipped'][name]}")
                engines.pop(name).close()
                names.remove(name)
        mean = {k: sum(v) / len(v) for k, v in times.items()}
        fastest = min(mean[k] for k in DENSE if k in mean)
        rounds.append(dict(round=r, order=order, load=load, loaded=loaded, others_cpu=others, times=times,
                           mean=mean, ratio={k: v / fastest for k, v in mean.items()}))
        print(f"  round {r} load {load:.2f}{' (loaded)' if loaded else ''}: "
              + ", ".join(f"{k} {mean[k] * 1e3:.1f} ms" for k in order if k in mean), flush=True)
    case["rounds"] = rounds
    case["summary"] = {}
    for k in dict.fromkeys(k for rr in rounds for k in rr["mean"]):  # an engine dropped mid-run: its rounds
        mine = [rr for rr in rounds if k in rr["mean"]]
        case["summary"][k] = dict(median_s=statistics.median(rr["mean"][k] for rr in mine),
                                  min_s=min(rr["mean"][k] for rr in mine),
                                  ratio=statistics.median(rr["ratio"][k] for rr in mine), rounds=len(mine))
    for engine in engines.values():
        engine.close()
    return case


def torchvision_model(name: str) -> nn.Module:
    return getattr(torchvision.models, name)(weights=None)


def run(args, worker: DeepSparseWorker, workdir: str, notes: list[str]) -> list[dict]:
    cases = []
    for mname in args.models:
        torch.manual_seed(args.seed)
        model = torchvision_model(mname)
        unit_scale(model)
        calibrate_bn(model, args.size, args.seed)
        gen = torch.Generator().manual_seed(args.seed + 1)
        example = torch.randn(1, 3, args.size, args.size, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = ipfx.transform(model, space=args.space, example_inputs=(example,))
        # global magnitude pruning ranks fixed coefficients, so pruning further in ascending order gives the
        # masks a fresh prune to each sparsity would (no masked coefficient returns)
        for s in sorted(args.sparsities):
            print(f"{mname} sparsity {s} ({args.space})", flush=True)
            ipfx.prune(t, "magnitude", s)
            reference = recalibrate(t, model, args.size, args.seed + 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dense = ipfx.lower(t, target="dense").eval()
            fused, form, fused_notes = lower_fused(t, workdir, args.size)
            for batch in args.batches:
                gen = torch.Generator().manual_seed(args.seed + batch)
                x = torch.randn(batch, 3, args.size, args.size, generator=gen)
                with torch.inference_mode():
                    recal = rel_diff(dense(x).numpy(), reference(x).numpy().astype(np.float64))
                if recal > TOLERANCE:
                    notes.append(f"{mname} {s} b{batch}: the lowered dense model differs from the recalibrated "
                                 f"reference by {recal:.1e} (batch-norm statistics not taken?)")
                print(f" batch {batch}", flush=True)
                case = run_case(dense, fused, x, args, workdir, worker, notes, f"{mname} {s:.0%} b{batch}")
                case.update(model=mname, sparsity=s, space=args.space, measured_sparsity=ipfx.sparsity(t),
                            fused_form=form, fused_notes=fused_notes, recalibration_check=recal)
                cases.append(case)
                gc.collect()
            dense = fused = reference = None
            gc.collect()
        t = model = None
        gc.collect()
    return cases


# -- report -----------------------------------------------------------------------------------------
def machine(args, worker: DeepSparseWorker) -> dict:
    return dict(cpu=cpu_name(), machine=platform.machine(), cores=os.cpu_count(),
                affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                threads=args.threads, python=platform.python_version(), torch=torch.__version__,
                torchvision=torchvision.__version__, numpy=np.__version__,
                onnxruntime=ort.__version__ if ort else None, openvino=ov.__version__ if ov else None,
                deepsparse=worker.version, deepsparse_error=worker.error)


def _table(lines: list[str], cases: list[dict], rows: list[tuple[str, object]]) -> None:
    """One table per model: a column per (sparsity, batch), a row per (label, cell(case) -> str)."""
    for model in dict.fromkeys(c["model"] for c in cases):
        cols = [c for c in cases if c["model"] == model]
        lines += [f"### {model}", "",
                  "| engine | " + " | ".join(f"{c['sparsity']:.0%} b{c['batch']}" for c in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        lines += [f"| {label} | " + " | ".join(cell(c) for c in cols) + " |" for label, cell in rows
                  if label in ENGINES or any(cell(c) != "n/a" for c in cols)]  # engines even where skipped
        lines.append("")


def _summary(engine: str, fmt):
    return lambda c: fmt(c["summary"][engine]) if engine in c["summary"] else "n/a"


def _check(engine: str):
    def cell(c):
        if engine not in c["checks"]:
            return "n/a"
        return f"{c['checks'][engine]:.1e}" + (" !" if c["checks"][engine] > TOLERANCE else "")
    return cell


def _loads(c: dict) -> str:
    return _span([r["load"] for r in c["rounds"]])


def write(path: str, info: dict, cases: list[dict], notes: list[str], args, seconds: float, command: str) -> None:
    ds = (f"deepsparse {info['deepsparse']}" if info["deepsparse"]
          else f"deepsparse skipped ({info['deepsparse_error']})")
    forms = "`, `".join(sorted({c["fused_form"] for c in cases}))
    exports = "`, `".join(sorted({c.get("onnx_export", "none") for c in cases}))
    lines = ["# ipfx fused against peer CPU engines on the same pruned network", "",
             f"Command: `{command}`, {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min. "
             f"Machine: {info['cpu']} ({info['machine']}), {info['cores']} cores ({info['affinity']} usable), "
             f"{info['threads']} threads per engine; torch {info['torch']}, "
             f"onnxruntime {info['onnxruntime'] or 'absent'}, openvino {info['openvino'] or 'absent'}, {ds}.", "",
             f"Network: torchvision models, random weights, {args.size}x{args.size} inputs, "
             f"`ipfx.transform(space=\"{args.space}\")`, conv/linear weights at unit std (about one density per "
             "layer), global magnitude pruning, batch norms calibrated on random batches after pruning. "
             f"ipfx fused: `{forms}`. ONNX: `{exports}`. {args.rounds} rounds per column, engine order rotated, "
             f"an engine's time in a round = its mean per call after {getattr(args, 'round_warmup', 0)} untimed "
             "call(s) of its own at the start of its turn.", ""]
    rewrites = sorted({c["deepsparse_onnx"] for c in cases if c.get("deepsparse_onnx")})
    if rewrites:
        lines += [f"DeepSparse ran a copy of the ONNX file with HardSwish/HardSigmoid written as Mul/Add/Clip "
                  f"({'; '.join(rewrites)}): it runs no part of a graph holding them natively.", ""]
    if args.quick:
        lines += ["**A `--quick` run: few rounds, the ratios are noise.**", ""]
    lines += ["## Time / fastest dense engine of the same round (median over rounds; below 1 is faster)", ""]
    _table(lines, cases, [(e, _summary(e, lambda v: f"{v['ratio']:.2f}x")) for e in ENGINES] + [
        ("fastest dense, median ms", lambda c: f"{_fastest_dense(c) * 1e3:.1f}"),
        ("load at round starts", _loads),
        ("others' CPU (cores)", lambda c: _span([r["others_cpu"] for r in c["rounds"]])),
        ("rounds loaded", lambda c: f"{sum(r['loaded'] for r in c['rounds'])}/{len(c['rounds'])}")])
    lines += ["## Median (min) ms per call", ""]
    _table(lines, cases, [(e, _summary(e, lambda v: f"{v['median_s'] * 1e3:.1f} ({v['min_s'] * 1e3:.1f})"))
                          for e in ENGINES])
    lines += [f"## Agreement with torch eager dense: max abs difference / max abs output (! above {TOLERANCE:g})", ""]
    _table(lines, cases, [(e, _check(e)) for e in ENGINES[1:]] + [
        ("output max abs (std)", lambda c: f"{c['output_scale']:.3g} ({c['output_std']:.3g})"),
        ("measured sparsity", lambda c: f"{c['measured_sparsity']:.4f}"),
        ("deepsparse supported ops", lambda c: "n/a" if c.get("deepsparse_supported_ops") is None
         else f"{c['deepsparse_supported_ops']:.2f}")])
    notes = notes + [f"{c['model']} {c['sparsity']:.0%}: {n}" for c in cases for n in c["fused_notes"]]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in dict.fromkeys(notes)], ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(command=command, machine=info, args=vars(args), seconds=seconds, notes=notes, cases=cases),
                  f, indent=1)


def _fastest_dense(case: dict) -> float:
    return min(case["summary"][d]["median_s"] for d in DENSE if d in case["summary"])


def _span(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


def _numbers(text: str, kind) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="torchvision model names (default resnet50,mobilenet_v3_large)")
    parser.add_argument("--sparsities", default=None, help="fractions or percents (default 0.9,0.95,0.98,0.99)")
    parser.add_argument("--batches", default=None, help="batch sizes (default 1,32)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per column (default 9)")
    parser.add_argument("--calls", type=int, default=0,
                        help="calls per engine per round (default 10 at batch 1, else 2)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per engine, once before the rounds")
    parser.add_argument("--round-warmup", type=int, default=1,
                        help="untimed calls per engine at the start of its turn in each round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--space", choices=("sp", "ip"), default="sp")
    parser.add_argument("--max-load", type=float, default=0.5, help="wait for a 1-minute load average below this")
    parser.add_argument("--quiet-timeout", type=float, default=120.0, help="seconds to wait for it before a round")
    parser.add_argument("--quick", action="store_true", help="one sparsity (95%%), batch 1, 3 rounds")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of ipfx's deployment form (minutes of compiling per case)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deepsparse-python", default=DEEPSPARSE_PYTHON)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.md"))
    parser.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)  # smaller: smoke runs only
    args = parser.parse_args(argv)
    args.models = (args.models or "resnet50,mobilenet_v3_large").split(",")
    sparsities = _numbers(args.sparsities or ("0.95" if args.quick else "0.9,0.95,0.98,0.99"), float)
    args.sparsities = [v / 100 if v > 1 else v for v in sparsities]  # percents or fractions
    args.batches = _numbers(args.batches or ("1" if args.quick else "1,32"), int)
    args.rounds = args.rounds or (3 if args.quick else 9)
    command = "python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)

    torch.set_num_threads(args.threads)
    start = time.time()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ipfx-peers-") as workdir:
        worker = DeepSparseWorker(args.deepsparse_python, workdir)
        if worker.error:
            print(f"DeepSparse skipped: {worker.error}", flush=True)
        for name, mod in (("onnxruntime", ort), ("openvino", ov)):
            if mod is None:
                print(f"{name} skipped: not installed", flush=True)
        info = machine(args, worker)
        try:
            cases = run(args, worker, workdir, notes)
        finally:
            worker.close()
    write(args.out, info, cases, notes, args, time.time() - start, command.strip())
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.json", flush=True)


if __name__ == "__main__":
    main()
