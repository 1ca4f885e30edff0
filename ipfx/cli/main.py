"""The ``ipfx`` command: ``demo``, ``compare`` and ``inspect``, a thin layer over :mod:`ipfx.experiments`."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .. import __version__
from . import args as arg
from ..config import SPACES
from ..errors import IPFXError


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints its usage, up to 14 lines, first), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"ipfx: warning: {message}\n"


def build_parser() -> argparse.ArgumentParser:
    from ..experiments import DATASETS, METHODS
    from ..experiments.accel import PRECISIONS
    from ..experiments.engine import IMP_REWIND, IMP_ROUNDS

    parser = Parser(prog="ipfx", description="Interspace pruning for PyTorch.")
    parser.add_argument("--version", action="version", version=f"ipfx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,compare,inspect,build-native}")

    demo = sub.add_parser("demo", help="IP vs SP on scikit-learn's digits in a few minutes, no network",
                          description="Train a small CNN pruned to high sparsity in SP and in IP (same seeds and "
                                      "budget) on the digits data that ships with scikit-learn; print a table, "
                                      "write a plot and the lowered model.")
    demo.add_argument("--out", type=arg.output_folder, default="ipfx-demo",
                      help="output folder (default: ./ipfx-demo)")
    demo.add_argument("--quick", action="store_true",
                      help="a smaller sweep: one seed, two sparsities (about 50 s on one core; the whole demo "
                           "about 3 minutes)")
    demo.add_argument("--threads", type=arg.thread_count, default=1,
                      help="torch threads (default: 1; the demo's small convolutions gain little from more, and "
                           "on a machine whose cores are busy more threads slow it down many times over)")

    cmp_ = sub.add_parser("compare", help="SP vs IP sweep over methods, sparsities and seeds (resumable)",
                          description="Run every (method, sparsity, space, seed) combination, append one record per "
                                      "finished run to OUT/results.jsonl (a rerun resumes), then write "
                                      "OUT/results.md and OUT/accuracy.png.")
    cmp_.add_argument("--model", type=arg.model_name, default="resnet20",
                      help="resnet20, resnet32, resnet56, vgg16, cnn, or a torchvision model name (default: resnet20)")
    cmp_.add_argument("--width", type=arg.positive_int, default=None,
                      help="base width of the built-in models (default: cnn 32, CIFAR ResNets 16)")
    cmp_.add_argument("--data", type=arg.one_of(DATASETS, "dataset"), default="cifar10",
                      help=f"one of {', '.join(DATASETS)} (default: cifar10)")
    cmp_.add_argument("--data-root", default=None,
                      help="where the data is; ipfx never downloads (default: none, which only digits needs)")
    cmp_.add_argument("--train-subset", type=arg.positive_int, default=None,
                      help="use only this many training images (default: all)")
    cmp_.add_argument("--methods", type=arg.name_list(METHODS), default=["random", "snip", "synflow"],
                      help=f"comma-separated, from {', '.join(METHODS)} (default: random,snip,synflow)")
    cmp_.add_argument("--sparsities", type=arg.fraction_list, default=[0.9, 0.95, 0.98, 0.99],
                      help="comma-separated, each in [0, 1) (default: 0.9,0.95,0.98,0.99)")
    cmp_.add_argument("--spaces", type=arg.name_list(SPACES), default=["sp", "ip"],
                      help="comma-separated: sp (spatial basis, fixed: ordinary unstructured pruning), ip (adaptive "
                           "DCT-initialised basis) (default: sp,ip)")
    cmp_.add_argument("--seeds", type=arg.seed_list, default=[0], help="comma-separated integers >= 0 (default: 0)")
    cmp_.add_argument("--epochs", type=arg.positive_int, default=10,
                      help="training epochs of every run; every method gets the same number of steps (default: 10)")
    cmp_.add_argument("--batch-size", type=arg.positive_int, default=128,
                      help="training batch (the global batch under torchrun) (default: 128)")
    cmp_.add_argument("--lr", type=arg.rate, default=0.1, help="SGD learning rate at the start (default: 0.1)")
    cmp_.add_argument("--momentum", type=arg.fraction, default=0.9, help="SGD momentum, in [0, 1) (default: 0.9)")
    cmp_.add_argument("--weight-decay", type=arg.non_negative_float, default=5e-4,
                      help="SGD weight decay, on the coefficients and bases (default: 5e-4)")
    cmp_.add_argument("--lr-schedule", choices=("cosine", "step", "constant"), default="cosine",
                      help="learning-rate schedule over the run (default: cosine)")
    cmp_.add_argument("--imp-rounds", type=arg.positive_int, default=None,
                      help=f"imp: prune-and-rewind rounds (default {IMP_ROUNDS}); the same fraction of the remaining "
                           "coefficients is pruned each round, so the last round reaches the sparsity")
    cmp_.add_argument("--imp-rewind", type=arg.fraction, default=None,
                      help=f"imp: rewind point as a fraction of one training run, in [0, 1) (default {IMP_REWIND}; "
                           "0 rewinds to the initialisation, the original lottery ticket). IMP spends the same "
                           "--epochs budget as every method: one run is rewind + round steps, trained rounds + 1 "
                           "times after the rewind point")
    cmp_.add_argument("--device", type=arg.device, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    cmp_.add_argument("--threads", type=arg.thread_count, default=None, help="torch threads (default: torch's choice)")
    cmp_.add_argument("--precision", type=arg.one_of(PRECISIONS, "precision"), default="auto",
                      help="fp32, or bf16 (autocast of the forward pass; weights and optimizer stay fp32); default "
                           "auto: bf16 on a CUDA device that has it, else fp32")
    cmp_.add_argument("--compile", nargs="?", const="inductor", default=None, type=arg.compile_backend,
                      metavar="BACKEND", help="train through torch.compile (default backend: inductor)")
    cmp_.add_argument("--out", type=arg.output_folder, default="ipfx-compare",
                      help="output folder (default: ./ipfx-compare)")
    cmp_.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmp_.add_argument("--workers", type=arg.positive_int, default=1,
                      help="run the runs of the sweep in this many worker processes on this machine (default 1: "
                           "one after another in this process); each worker gets --threads torch threads, by "
                           "default an equal share of the cores")
    cmp_.add_argument("--executor", type=arg.one_of(("local", "ray"), "executor"), default="local",
                      help="local (this machine: one process, or --workers processes) or ray (Ray tasks on a local "
                           "Ray or the cluster at --ray-address; needs the ray extra: pip install 'ipfx[ray]') "
                           "(default: local)")
    cmp_.add_argument("--cpus-per-run", type=arg.positive_float, default=None,
                      help="ray: CPUs each run asks for (default 1; also its torch threads unless --threads)")
    cmp_.add_argument("--gpus-per-run", type=arg.non_negative_count, default=None,
                      help="ray: GPUs each run asks for (default 0; a fraction shares a GPU); use with --device cuda")
    cmp_.add_argument("--ray-address", type=arg.ray_address, default=None,
                      help="ray: an existing cluster (auto, host:port or ray://host:port; default: start a local Ray "
                           "for this sweep). Its nodes must see --out and have ipfx installed")
    cmp_.add_argument("--keep-checkpoints", action="store_true",
                      help="keep each finished run's checkpoint in OUT/checkpoints (every run checkpoints at epoch "
                           "ends, so that a killed run resumes from its last epoch; by default a finished run's "
                           "checkpoint is deleted)")
    cmp_.add_argument("--_stop-after-epoch", dest="stop_after_epoch", type=arg.positive_int, default=None,
                      help=argparse.SUPPRESS)  # test hook: stop every run after this epoch, as a kill would

    sub.add_parser("build-native", help="build the native CPU kernel of the fused ops now (else at first use)",
                   description="Compile the native CPU kernel that ipfx.lower(model, 'fused') models call (30-90 s, "
                               "once per CPU kind, torch build and compiler), so that the first fused call does not "
                               "wait for it. Needs a C++ compiler and ninja (pip install 'ipfx[native]').")

    ins = sub.add_parser("inspect", help="what transform rewrites, per-layer sparsity and parameter counts",
                         description="MODEL is a model name (built-in or torchvision), a torch.export program "
                                     "(.pt2, opened with torch.export.load) or a file saved with torch.save, "
                                     "opened with torch.load(weights_only=True): tensors only, no code runs. "
                                     "A pickle that needs more (a whole module) is refused unless --trust.")
    ins.add_argument("model", type=arg.file_or_model, help="a model name or a saved file (.pt2, .pt)")
    ins.add_argument("--space", choices=SPACES, default="ip",
                     help="the space transform uses to show a model that is not transformed")
    ins.add_argument("--num-classes", type=arg.positive_int, default=1000, help="for a model name")
    ins.add_argument("--trust", action="store_true",
                     help="load a pickle in full (torch.load(weights_only=False)); unpickling runs the code the "
                          "file names, so use it only for files you trust")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..experiments.engine import StopRequested

    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    command_line = "ipfx " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning  # one line, as errors are
    try:
        if args.command == "demo":
            from .demo import demo

            demo(Path(args.out), quick=args.quick, command=command_line)
        elif args.command == "compare":
            compare(args, command_line)
        elif args.command == "build-native":
            build_native()
        else:
            inspect_model(args)
    except IPFXError as exc:
        from ..experiments.parallel import launched_rank

        if launched_rank() == 0:  # under torchrun, one line from rank 0 rather than one per process
            print(f"ipfx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except StopRequested as exc:  # the --_stop-after-epoch test hook: a kill, simulated
        print(f"ipfx {args.command}: {exc}; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    return 0


def compare(args, command_line: str) -> None:
    from ..experiments import parallel

    started = time.time()
    _check_imp_options(args)
    _check_executor_options(args)
    _check_parallel_options(args)
    args.device = parallel.init_from_env(args.device)
    try:
        _compare(args, command_line, started)
        parallel.barrier()  # the other ranks wait for rank 0's table and plot
    finally:
        parallel.shutdown()


def _compare(args, command_line: str, started: float) -> None:
    from ..experiments import (ResultStore, RunSpec, load_dataset, markdown_table, paired_tables, parallel, plot,
                              sweep)
    from ..experiments.accel import Engine
    from ..experiments.engine import imp_plan
    from ..experiments.outputs import claim, write_text
    from ..experiments.sweep import grid

    say = print if parallel.is_main() else (lambda *a, **k: None)
    engine = Engine.for_device(args.device, args.precision, args.compile)
    dataset = load_dataset(args.data, args.data_root)
    used = min(len(dataset.train_y), args.train_subset or len(dataset.train_y))
    if args.batch_size > used:  # the engine would find out only inside the first run
        raise _error(f"argument --batch-size: must be at most the number of training images ({used}), "
                     f"got {args.batch_size}")
    _check_model_on_data(args.model, args.width, dataset)  # before the first run, not inside it
    base = RunSpec(model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   momentum=args.momentum, weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
                   train_subset=args.train_subset, width=args.width)
    specs = grid(base, args.methods, args.sparsities, args.spaces, args.seeds, imp_rounds=args.imp_rounds,
                 imp_rewind=args.imp_rewind)
    for spec in specs:  # IMP's rounds must fit in the budget: find out now, not after the other runs
        if spec.method == "imp":
            imp_plan(spec, used // args.batch_size)
            break
    out = Path(args.out)
    claim(out, "compare")  # never a folder holding the demo's or other files (ipfx.experiments.outputs)
    store = ResultStore(out / "results.jsonl")
    say(f"{len(specs)} runs of {args.model} on {dataset.name} ({used} of {len(dataset.train_y)} training images, "
          f"{len(dataset.test_y)} test); results in {store.path}")
    records = sweep(specs, dataset, store, device=args.device, progress=not args.no_progress, command=command_line,
                    checkpoints=out / "checkpoints", keep_checkpoints=args.keep_checkpoints,
                    stop_after_epoch=args.stop_after_epoch, workers=args.workers, threads=args.threads,
                    executor=args.executor, ray_address=args.ray_address,
                    cpus_per_run=args.cpus_per_run or 1.0, gpus_per_run=args.gpus_per_run or 0.0, engine=engine)
    if not parallel.is_main():
        return
    table = markdown_table(records)
    paired = paired_tables(records) if len({r["seed"] for r in records}) > 1 else ""
    if paired:
        table += "\n\nPaired by seed (IP minus SP of the same seed), 95% Student-t intervals:\n\n" + paired
    write_text(out / "results.md", f"Command: `{command_line}`\n\n{table}\n")
    plot(records, out / "accuracy.png", title=f"{args.model} on {dataset.name}")
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'accuracy.png'} ({time.time() - started:.0f} s)")


def _check_model_on_data(name: str, width: int | None, dataset) -> None:
    """The model takes two of the dataset's images and returns one row of class scores for each, in
    training and in evaluation mode (a model for larger images fails on digits' 8x8; one that returns
    auxiliary outputs when training cannot be trained by the engine)."""
    import torch

    from ..errors import first_line
    from ..experiments.models import build_model

    model = build_model(name, dataset.num_classes, dataset.in_channels, width)
    x = dataset.normalise(dataset.test_x[:2])
    h, w = x.shape[2:]
    for training in (True, False):
        try:
            with torch.no_grad():
                out = model.train(training)(x)
        except Exception as exc:  # noqa: BLE001 - any failure here is the model not fitting the data
            raise _error(f"argument --model: {name} cannot take the {h}x{w} images of {dataset.name} "
                         f"({first_line(exc, 150)}); use a model for images of that size (cnn, resnet20)") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, dataset.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _error(f"argument --model: {name} returns {got} in {'training' if training else 'evaluation'} "
                         f"mode, not one row of {dataset.num_classes} class scores per image; use a plain "
                         "classifier")


def _check_imp_options(args) -> None:
    """IMP's options without IMP among the methods are a mistake (they would change nothing)."""
    given = [name for name, value in (("--imp-rounds", args.imp_rounds), ("--imp-rewind", args.imp_rewind))
             if value is not None]
    if given and "imp" not in args.methods:
        raise _error(f"argument {given[0]}: applies to the imp method only; add imp to --methods "
                     f"(now {','.join(args.methods)})")


def _check_parallel_options(args) -> None:
    """Under torchrun (WORLD_SIZE > 1) every run is data-parallel over all the processes: the global
    --batch-size must split into equal shards, and the runs of the sweep go one after another."""
    from ..experiments.parallel import launched_world

    n = launched_world()
    if n <= 1:
        return
    if args.workers != 1 or args.executor != "local":
        option = "--workers" if args.workers != 1 else "--executor"
        raise _error(f"argument {option}: not with torchrun ({n} processes train each run together); drop {option}")
    if args.batch_size % n:
        raise _error(f"argument --batch-size: the global batch must be divisible by the {n} processes, "
                     f"got {args.batch_size}")
    if args.device.startswith("cuda:"):
        raise _error(f"argument --device: under torchrun use --device cuda (each process takes cuda:LOCAL_RANK), "
                     f"got {args.device}")


def _check_executor_options(args) -> None:
    """Options of the other executor are a mistake (they would change nothing), and so is a GPU per
    run that the runs would not use; Ray must be importable before the data is loaded."""
    ray_given = [name for name, value in (("--cpus-per-run", args.cpus_per_run), ("--gpus-per-run", args.gpus_per_run),
                                          ("--ray-address", args.ray_address)) if value is not None]
    if args.executor != "ray":
        if ray_given:
            raise _error(f"argument {ray_given[0]}: applies to --executor ray only; add --executor ray")
        return
    if args.workers != 1:
        raise _error("argument --workers: applies to --executor local only; with ray, set --cpus-per-run "
                     "(Ray runs as many runs at once as the resources allow)")
    if (args.gpus_per_run or 0) > 0 and not args.device.startswith("cuda"):
        raise _error(f"argument --gpus-per-run: the runs use --device {args.device}; add --device cuda")
    if args.device.startswith("cuda") and not args.gpus_per_run:
        raise _error("argument --device: Ray hides the GPUs from a run that asks for none; add --gpus-per-run "
                     "(e.g. 1, or 0.5 to share a GPU between two runs)")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise _error("--executor ray needs Ray, which is not installed; pip install 'ipfx[ray]' "
                     "(or pip install ray)") from None


def build_native() -> None:
    """Build (or find) the native kernel and say where it is; a failed build is a one-line error."""
    import warnings

    from ..ops import native

    if native.disabled():
        raise _error("IPFX_NATIVE=0 turns the native kernel off; unset it to build")
    started = time.time()
    cached = native.library_path() is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason comes as the error below
        ok = native.available()
    if not ok:
        raise _error(f"the native kernel could not be built ({native._state.get('error')}); install a C++ compiler "
                     "and ninja (pip install 'ipfx[native]')")
    print(f"native kernel {'found' if cached else 'built'} in {time.time() - started:.1f} s: {native.library_path()}")


def inspect_model(args) -> None:
    """A model name is built and shown as transform would rewrite it; a file is opened without running
    code from it (:func:`ipfx.deploy.load`) and shown by what it holds."""
    import torch

    from . import inspect as describe
    from ..deploy import load

    path = Path(args.model).expanduser()
    if path.is_dir() or (path.is_file() and _kind_of_file(path) == "results"):
        lines = describe.describe_store(path / "results.jsonl" if path.is_dir() else path)
    elif not path.is_file():
        from ..experiments.models import build_model

        lines = describe.describe_module(build_model(args.model, args.num_classes, 3), args.space)
    elif path.suffix != ".pt2" and _kind_of_file(path) != "torch":  # a .pt2 archive's check says what is wrong
        raise _error(f"{path} is {_kind_of_file(path)}, not a model file: pass a torch.export program (.pt2), a "
                     "file saved with torch.save, a model name, or a folder or results.jsonl of ipfx compare")
    else:
        loaded = load(path, trust=args.trust)
        if isinstance(loaded, torch.export.ExportedProgram):
            lines = describe.describe_program(path.name, loaded)
        elif isinstance(loaded, torch.nn.Module):
            lines = describe.describe_module(loaded, args.space)
        else:
            lines = describe.describe_state(path.name, loaded)
    print("\n".join(lines))


#: What a file is, by its first bytes (``ipfx inspect`` says so rather than calling every file a pickle).
_MAGIC = ((b"PK\x03\x04", "torch"), (b"\x80", "torch"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"%PDF", "a PDF document"), (b"{", "results"))


def _kind_of_file(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    kind = next((what for magic, what in _MAGIC if head.startswith(magic)), "a file of another kind")
    return "a JSON file" if kind == "results" and path.suffix == ".json" else kind


def _error(message: str) -> IPFXError:
    from ..errors import IPFXValueError

    return IPFXValueError(message)


if __name__ == "__main__":
    sys.exit(main())
