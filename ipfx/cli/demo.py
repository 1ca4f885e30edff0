"""``ipfx demo``: IP against SP on scikit-learn's digits, end to end, in a few minutes on a laptop CPU.

A small CNN is pruned at initialisation to high sparsity with several methods, in SP and in IP with the
same seeds and training budget, trained, evaluated, and summarised in a table and a plot. The most
sparse IP model is then lowered (dense and fused) and saved in formats that are safe to open (a state
dict and a ``torch.export`` program each, see :mod:`ipfx.deploy`), with a check that the lowered and
the reloaded outputs match.
"""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import torch

from .. import deploy
from ..api import lower
from ..experiments import ResultStore, RunSpec, load_dataset, markdown_table, plot, run
from ..experiments.outputs import claim, write_text
from ..experiments.sweep import grid

METHODS = ("random", "snip", "synflow")
SPARSITIES = (0.9, 0.95, 0.98, 0.99)
QUICK_SPARSITIES = (0.95, 0.99)


def demo(out: Path, *, quick: bool = False, command: str = "ipfx demo", log=print, epochs: int = 12,
         methods=METHODS, progress: bool = True) -> dict:
    """Run the demo into folder ``out``; ``quick`` runs one seed and two sparsities."""
    started = time.time()
    claim(out, "demo")  # never a folder holding another command's results (ipfx.experiments.outputs)
    dataset = load_dataset("digits")
    base = RunSpec(model="cnn", data="digits", epochs=epochs, batch_size=64, lr=0.05, weight_decay=1e-4, width=16)
    seeds = (0,) if quick else (0, 1)
    specs = grid(base, methods, QUICK_SPARSITIES if quick else SPARSITIES, ("sp", "ip"), seeds)
    log(f"ipfx demo: a small CNN on scikit-learn's digits ({len(dataset.train_y)} train / {len(dataset.test_y)} "
        f"test images), pruned at initialisation with {', '.join(methods)}; {len(specs)} runs (SP and IP, "
        f"seeds {', '.join(map(str, seeds))}, {base.epochs} epochs each)")
    store = ResultStore(out / "results.jsonl")
    store.path.unlink(missing_ok=True)
    deployed = dataclasses.replace(specs[-1], space="ip")  # the sparsest IP model, kept from its run below
    records, model = [], None
    for i, spec in enumerate(specs, 1):
        record = run(spec, dataset, progress=progress, command=command, keep_model=spec == deployed)
        if "_model" in record:
            model, kept = record.pop("_model").eval(), record
        store.append(record)
        records.append(record)
        log(f"  [{i:2d}/{len(specs)}] {spec.method:8s} {spec.space} sparsity {spec.sparsity:<5g} seed {spec.seed}: "
            f"{100 * record['accuracy']:6.2f}%")
    table = markdown_table(records)
    write_text(out / "results.md", f"Command: `{command}`\n\n{table}\n")
    png = plot(records, out / "accuracy.png", title="small CNN on digits: SP (dashed) vs IP (solid)")
    log("\n" + table + "\n")

    # deploy the sparsest IP model (kept from its run): lower it, check the outputs, save it
    spec, record = deployed, kept
    log(f"lowering and saving the IP {spec.method} model at sparsity {spec.sparsity:g} ...")
    x = next(dataset.test_batches(64))[0]
    with torch.no_grad():
        y = model(x)
        dense, fused = lower(model, "dense"), lower(model.eval(), "fused", freeze=True)  # the deployment form
        for name, lowered in (("dense", dense), ("fused", fused)):
            diff = (lowered(x) - y).abs().max().item()
            if diff > 1e-3 * max(1.0, y.abs().max().item()):
                raise RuntimeError(f"lowered ({name}) model differs from the trained one by {diff}")
    files = [path for name, lowered in (("dense", dense), ("fused", fused))
             for path in _save_lowered(lowered, out / f"lowered_{name}", x, y, log)]
    sizes = {name: _state_bytes(m) for name, m in (("dense", dense), ("fused", fused))}
    log(f"lowered the IP {spec.method} model at sparsity {spec.sparsity:g} (accuracy {100 * record['accuracy']:.2f}%): "
        f"dense state {sizes['dense'] / 1024:.1f} KiB, fused (kept coefficients + bases) {sizes['fused'] / 1024:.1f} "
        f"KiB; outputs match")
    log(f"wrote {out / 'results.md'}, {png}, {', '.join(map(str, files))} in {time.time() - started:.0f} s")
    return {"records": records, "table": table, "plot": png, "files": files}


def _save_lowered(model: torch.nn.Module, stem: Path, x: torch.Tensor, y: torch.Tensor, log) -> list[Path]:
    """Save ``model`` as a state dict and as an exported program, and check the program reloads to the
    same outputs ``y`` on ``x``. A model that cannot be exported keeps its state dict, and the log says why."""
    Path(f"{stem}.pt").unlink(missing_ok=True)  # the whole-module pickle earlier versions wrote
    paths = [deploy.save_state_dict(model, stem)]
    try:
        program = deploy.save_program(model, stem, x)
    except Exception as exc:  # export is a separate capture: report it and keep the state dict
        log(f"could not export {stem.name} ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
            f"saved its state dict only")
        return paths
    with torch.no_grad():
        diff = (deploy.load_module(program)(x) - y).abs().max().item()
    if diff > 1e-3 * max(1.0, y.abs().max().item()):
        raise RuntimeError(f"the exported {stem.name} differs from the trained model by {diff}")
    return [*paths, program]


def _state_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
