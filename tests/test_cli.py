"""The command line and the experiment engine behind it, on tiny budgets."""

import argparse
import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

import ipfx
from helpers import store_record
from ipfx.cli.main import main
from ipfx.errors import IPFXValueError
from ipfx.experiments import ResultStore, RunSpec, load_dataset, markdown_table, run

TINY = ["--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "1", "--batch-size", "256",
        "--sparsities", "0.9", "--seeds", "0", "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["compare", "--help"], ["inspect", "--help"]])
def test_every_subcommand_has_help(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    assert "usage: ipfx" in capsys.readouterr().out


def test_python_dash_m_ipfx():
    out = subprocess.run([sys.executable, "-m", "ipfx", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"ipfx {ipfx.__version__}"


def test_compare_writes_records_table_and_plot_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["compare", *TINY, "--methods", "random,snip", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {(r["method"], r["space"]) for r in records} == {
        ("random", "sp"), ("random", "ip"), ("snip", "sp"), ("snip", "ip")}
    for r in records:
        assert r["versions"]["ipfx"] == ipfx.__version__ and r["versions"]["torch"] == torch.__version__
        assert r["command"].startswith("ipfx compare") and r["seed"] == 0
        assert abs(r["achieved_sparsity"] - 0.9) < 1e-3 and 0 <= r["accuracy"] <= 1
    assert "| cnn | digits | snip | 0.9 |" in (out / "results.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 1000
    capsys.readouterr()
    # rerun with one more method: the four finished runs are skipped
    assert main(["compare", *TINY, "--methods", "random,snip,magnitude", "--out", str(out)]) == 0
    assert "resuming: 4 of 6 runs already" in capsys.readouterr().out
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_a_killed_run_leaves_a_cut_line_that_is_redone(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    store.append(store_record(method="random"))
    with store.path.open("a") as f:
        f.write('{"method": "sni')  # the process died while writing
    with pytest.warns(UserWarning, match="line 2: cut or not JSON"):
        assert len(store.records()) == 1


def test_runs_are_reproducible_and_sp_ip_share_their_start(digits):
    spec = RunSpec(model="cnn", width=4, data="digits", method="snip", sparsity=0.9, epochs=1, batch_size=256)
    a, b = run(spec, digits, progress=False), run(spec, digits, progress=False)
    assert a["accuracy"] == b["accuracy"] and a["final_train_loss"] == b["final_train_loss"]
    import dataclasses

    sp = run(dataclasses.replace(spec, space="sp", sparsity=0.0, epochs=0), digits, progress=False, keep_model=True)
    ip = run(dataclasses.replace(spec, space="ip", sparsity=0.0, epochs=0), digits, progress=False, keep_model=True)
    x = next(digits.test_batches(16))[0]
    with torch.no_grad():  # same seed: the same initial function in both spaces
        assert torch.allclose(sp["_model"].eval()(x), ip["_model"].eval()(x), atol=1e-5)


def test_gradual_methods_run_through_the_engine(digits):
    for method in ("gmp", "rigl", "set"):
        spec = RunSpec(model="cnn", width=4, data="digits", method=method, sparsity=0.8, epochs=2, batch_size=128)
        record = run(spec, digits, progress=False)
        assert record["achieved_sparsity"] == pytest.approx(0.8, abs=2e-3), method


def test_markdown_table_reports_mean_spread_and_gap():
    rows = [dict(model="m", dataset_name="d", method="snip", sparsity=0.9, space=s, accuracy=a)
            for s, a in (("sp", 0.5), ("sp", 0.7), ("ip", 0.8), ("ip", 0.8))]
    table = markdown_table(rows)
    assert "| m | d | snip | 0.9 | 60.00 ± 14.14 | 80.00 ± 0.00 | +20.00 | 2 |" in table


def test_t_interval_is_students():
    from ipfx.experiments.report import t_interval

    mean, half = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3, t(2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / 3 ** 0.5)
    assert t_interval([5.0])[1] != t_interval([5.0])[1]  # nan: one value has no interval


def test_paired_tables_pair_by_seed_and_take_the_seed_as_the_unit():
    from ipfx.experiments import paired_tables
    from ipfx.experiments.report import paired_gaps

    def rec(method, sparsity, seed, space, acc):
        return dict(model="m", dataset_name="d", method=method, sparsity=sparsity, seed=seed, space=space,
                    accuracy=acc)

    rows = [rec("snip", s, seed, space, a) for s, seed, space, a in [
        (0.9, 0, "sp", 0.50), (0.9, 0, "ip", 0.55), (0.9, 1, "sp", 0.40), (0.9, 1, "ip", 0.48),
        (0.99, 0, "sp", 0.30), (0.99, 0, "ip", 0.29), (0.99, 1, "sp", 0.20), (0.99, 1, "ip", 0.27),
        (0.99, 2, "sp", 0.10)]]  # seed 2 has no IP run: not a pair
    gaps = paired_gaps(rows)
    assert gaps[("m", "d", "snip", 0.99)] == pytest.approx({0: -1.0, 1: 7.0})
    table = paired_tables(rows)
    # per setting: 0.9 -> gaps 5 and 8, mean 6.5, half-width 12.706 * 2.1213 / sqrt(2) = 19.06
    assert "| snip | 0.9 | +6.50 | [-12.56, +25.56] | 2/2 | 2 |" in table
    # per method: seed means 2.0 (5, -1) and 7.5 (8, 7); mean 4.75; half-width 12.706 * 3.889 / sqrt(2)
    assert "| snip | +4.75 | [-30.19, +39.69] | 3/4 | 2 |" in table


def test_demo_runs_end_to_end(tmp_path):
    from ipfx.cli.demo import demo

    for stale in ("lowered_dense.pt", "lowered_fused.pt"):  # whole-module pickles of an earlier version
        (tmp_path / stale).write_bytes(b"old")
    (tmp_path / "results.jsonl").write_text(json.dumps({"command": "ipfx demo --quick"}) + "\n")  # its store
    lines = []
    result = demo(tmp_path, quick=True, epochs=1, methods=("random",), progress=False, log=lines.append)
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "results.md").exists()
    assert "gap IP-SP" in result["table"] and any("outputs match" in line for line in lines)
    names = ["lowered_dense.state_dict.pt", "lowered_dense.pt2", "lowered_fused.state_dict.pt", "lowered_fused.pt2"]
    assert sorted(p.name for p in result["files"]) == sorted(names)
    assert not (tmp_path / "lowered_dense.pt").exists() and not (tmp_path / "lowered_fused.pt").exists()
    x = load_dataset("digits").normalise(load_dataset("digits").test_x[:7])
    with torch.no_grad():
        y = torch.export.load(tmp_path / "lowered_dense.pt2").module()(x)
        # the state dicts hold tensors only, and load into plain (dense) and frozen fused modules of the same model
        plain = ipfx.experiments.build_model("cnn", 10, 1, 16).eval()
        plain.load_state_dict(torch.load(tmp_path / "lowered_dense.state_dict.pt", weights_only=True))
        fused = ipfx.lower(ipfx.transform(ipfx.experiments.build_model("cnn", 10, 1, 16)).eval(), "fused", freeze=True)
        fused.load_state_dict(torch.load(tmp_path / "lowered_fused.state_dict.pt", weights_only=True))
        for name, out in (("plain", plain(x)), ("fused", fused(x)),
                          ("fused program", torch.export.load(tmp_path / "lowered_fused.pt2").module()(x))):
            assert torch.allclose(out, y, atol=1e-4), name
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    # a fresh process: the dense program needs torch only; the fused one its ops, registered by `import ipfx`
    script = (
        "import sys, torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
        f"dense = torch.export.load({str(tmp_path / 'lowered_dense.pt2')!r})\n"
        "assert 'ipfx' not in sys.modules\n"
        "assert torch.allclose(dense.module()(io['x']), io['y'], atol=1e-4)\n"
        "import ipfx\n"
        f"fused = torch.export.load({str(tmp_path / 'lowered_fused.pt2')!r})\n"
        "ops = {str(n.target) for n in fused.graph.nodes if n.op == 'call_function'}\n"
        "assert 'ipfx.ip_conv.default' in ops and 'ipfx.sparse_linear.default' in ops, ops\n"
        "with torch.no_grad():\n"
        "    assert torch.allclose(fused.module()(io['x']), io['y'], atol=1e-4)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- bad input -------------------------------------------------------------------------------------------
def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def parse_error(args, capsys) -> tuple[int, str]:
    """Exit status and last stderr line of a command that argparse refuses."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return info.value.code, err.strip().splitlines()[-1]


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "must be a positive integer, got 0"),
    ("--batch-size", "ten", "must be a positive integer, got 'ten'"),
    ("--epochs", "0", "must be a positive integer, got 0"),
    ("--width", "-4", "must be a positive integer, got -4"),
    ("--train-subset", "0", "must be a positive integer, got 0"),
    ("--threads", "0", "must be a positive integer, got 0"),
    ("--workers", "0", "must be a positive integer, got 0"),
    ("--workers", "two", "must be a positive integer, got 'two'"),
    ("--executor", "dask", "unknown executor 'dask'; choose from local, ray"),
    ("--cpus-per-run", "0", "must be a positive number, got 0"),
    ("--gpus-per-run", "-1", "must be a non-negative number, got -1"),
    ("--ray-address", "my cluster", "must be auto, host:port or ray://host:port, got 'my cluster'"),
    ("--lr", "-1", "must be a positive number, got -1"),
    ("--lr", "0", "must be a positive number, got 0"),
    ("--lr", "nan", "must be a positive number, got 'nan'"),
    ("--weight-decay", "-0.1", "must be a non-negative number, got -0.1"),
    ("--momentum", "1", "must be a number in [0, 1), got 1"),
    ("--momentum", "fast", "must be a number in [0, 1), got 'fast'"),
    ("--sparsities", "0.9,1.2", "every value must be in [0, 1), got 1.2"),
    ("--sparsities", ",", "must be a comma-separated list of numbers in [0, 1), got ','"),
    ("--sparsities", "0.9,0.9", "lists 0.9 more than once; give each value once"),
    ("--seeds", "0,-1", "seeds must be integers from 0 to 2**63 - 1 (torch's generators take 64 bits), got -1"),
    ("--seeds", "18446744073709551616", "seeds must be integers from 0 to 2**63 - 1"),
    ("--seeds", "0,x", "must be comma-separated integers >= 0, got '0,x'"),
    ("--methods", "snipp", "unknown snipp; choose from random, magnitude, snip"),
    ("--spaces", "ip,dp", "unknown dp; choose from ip, sp"),
    ("--data", "imagenet", "unknown dataset 'imagenet'; choose from digits, mnist, cifar10"),
    ("--model", "resnet21", "unknown model 'resnet21'; built-in: cnn, resnet20"),
    ("--device", "potato", "must be a torch device such as cpu, cuda or cuda:1, got 'potato'"),
    ("--lr-schedule", "linear", "invalid choice: 'linear'"),
])
def test_compare_refuses_bad_options_before_any_work(option, value, message, capsys):
    code, line = parse_error(["compare", "--data", "digits", option, value], capsys)
    assert code == 2
    assert line.startswith(f"ipfx compare: error: argument {option}: {message}"), line


def test_a_missing_cuda_device_is_refused_up_front(capsys):
    code, line = parse_error(["compare", "--device", "cuda:99"], capsys)
    assert code == 2 and line.startswith("ipfx compare: error: argument --device: 'cuda:99'"), line
    assert "use --device cpu" in line or "this machine has" in line


def test_an_output_folder_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for command in ("compare", "demo"):
        code, line = parse_error([command, "--out", str(tmp_path / "f")], capsys)
        assert code == 2 and line == (f"ipfx {command}: error: argument --out: {str(tmp_path / 'f')!r} is a file, "
                                      "not a folder; name a folder (it is created if missing)")


def test_demo_refuses_a_bad_thread_count(capsys):
    code, line = parse_error(["demo", "--threads", "-2"], capsys)
    assert code == 2 and line == "ipfx demo: error: argument --threads: must be a positive integer, got -2"


def test_inspect_refuses_a_missing_file_and_bad_counts(tmp_path, capsys):
    code, line = parse_error(["inspect", str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and line.endswith(f"argument model: no such file {str(tmp_path / 'nope.pt')!r}; pass an "
                                       "existing file (.pt2, .pt) or a model name")
    code, line = parse_error(["inspect", "resnet21"], capsys)
    assert code == 2 and "argument model: unknown model 'resnet21'" in line
    code, line = parse_error(["inspect", "resnet20", "--num-classes", "0"], capsys)
    assert code == 2 and line.endswith("argument --num-classes: must be a positive integer, got 0")


def test_a_batch_larger_than_the_training_set_is_refused_before_the_first_run(tmp_path, capsys):
    code, err = run_cli(["compare", *TINY, "--train-subset", "100", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "argument --batch-size: must be at most the number of training images (100), got 256" in err
    assert not (tmp_path / "results.jsonl").exists()


def test_missing_data_says_where_to_put_it(tmp_path, capsys):
    code, err = run_cli(["compare", "--data", "cifar10", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--data-root" in err and "never downloads" in err
    code, err = run_cli(["compare", "--data", "cifar10", "--data-root", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err and "download=True" in err
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["compare", "--data", "mnist", "--data-root", str(tmp_path / "empty")], capsys)
    assert code == 2 and "mnist not found" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A cnn pruned to 90% (980 coefficients, 98 kept), saved in every form inspect opens."""
    from ipfx import deploy

    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = ipfx.transform(ipfx.experiments.build_model("cnn", 10, 1, 4))
    ipfx.prune(model, "random", 0.9)
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    for name in ("dense", "fused"):
        lowered = ipfx.lower(model, name)
        deploy.save_state_dict(lowered, folder / name)
        deploy.save_program(lowered, folder / name, x)
    torch.save(model.state_dict(), folder / "transformed.pt")
    torch.save(model, folder / "module.pt")
    return folder


def test_inspect_a_model_name(capsys):
    assert main(["inspect", "resnet20", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "transform would rewrite 20 weights" in out and "layer1.0.conv1.weight" in out


def test_inspect_a_fused_program_shows_the_kept_coefficients(saved, capsys):
    assert main(["inspect", str(saved / "fused.pt2")]) == 0
    out = capsys.readouterr().out
    assert "fused.pt2: torch.export program" in out and "ipfx.ip_conv x3" in out and "ipfx.sparse_linear x1" in out
    assert "conv/linear weights: 98 of 980 stored as nonzeros; sparsity 0.9000" in out


def test_inspect_a_dense_program(saved, capsys):
    assert main(["inspect", str(saved / "dense.pt2")]) == 0
    out = capsys.readouterr().out
    assert "aten.conv2d x3" in out and "aten.linear x1" in out and "ipfx." not in out
    assert "conv1.weight" in out and "of 980 stored as nonzeros" in out


def test_inspect_state_dicts_with_and_without_masks(saved, capsys):
    assert main(["inspect", str(saved / "transformed.pt")]) == 0
    out = capsys.readouterr().out
    assert "conv1.coeff" in out and "4 masks: 98 of 980 coefficients kept; sparsity 0.9000" in out
    assert main(["inspect", str(saved / "fused.state_dict.pt")]) == 0
    out = capsys.readouterr().out
    assert "conv1.values" in out and "conv1.indices" in out and "masks" not in out


def test_inspect_refuses_a_module_pickle_unless_trusted(saved, capsys):
    code, err = run_cli(["inspect", str(saved / "module.pt")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is a pickle that needs more than tensors to load (it names ipfx." in err  # (its graph's loader)
    assert "pass --trust to load it anyway" in err and "only for a file you trust" in err
    assert main(["inspect", str(saved / "module.pt"), "--trust"]) == 0
    out = capsys.readouterr().out
    assert "transformed 4 weights" in out and "sparsity 0.9" in out


class _Opens:
    """Unpickles as ``open(path, "w")``: code that runs on load, as in a hostile file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # --trust runs the payload: it opens a file and drops it
def test_inspect_runs_no_code_from_a_file_without_trust(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"weights": torch.ones(2), "payload": _Opens(marker)}, tmp_path / "hostile.pt")
    code, err = run_cli(["inspect", str(tmp_path / "hostile.pt")], capsys)
    assert code == 2 and "(it names io.open)" in err and "--trust" in err
    assert not marker.exists()
    assert main(["inspect", str(tmp_path / "hostile.pt"), "--trust"]) == 0  # what --trust means: it ran
    assert marker.exists() and "weights" in capsys.readouterr().out


def test_inspect_says_when_a_file_is_not_a_torch_file(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("hello")
    code, err = run_cli(["inspect", str(tmp_path / "notes.pt")], capsys)
    assert code == 2 and "is a file of another kind, not a model file" in err and "saved with torch.save" in err
    (tmp_path / "broken.pt2").write_text("hello")
    code, err = run_cli(["inspect", str(tmp_path / "broken.pt2")], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"ipfx inspect: error: {tmp_path / 'broken.pt2'} is refused: it is not a zip archive")


def test_engine_validates_specs(digits):
    with pytest.raises(IPFXValueError, match="unknown method 'l0'"):
        run(RunSpec(method="l0"), digits)


# -- IMP (lottery ticket with rewinding) in the engine ----------------------------------------------------
def test_imp_splits_the_common_budget_into_equal_rounds():
    from ipfx.experiments.engine import imp_plan

    spec = RunSpec(method="imp", epochs=2, imp_rounds=2, imp_rewind=0.2)
    plan = imp_plan(spec, steps_per_epoch=11)  # a budget of 22 steps
    assert (plan.rewind_step, plan.round_steps) == (1, 6)  # one run = 1 + 6 steps, rewind at 1/7 ~ 0.2 of it
    assert plan.steps == 1 + 3 * 6 <= 22
    # the learning-rate schedule restarts at the rewind point after each round: the run's IMP schedule says so
    from ipfx.experiments.engine import _imp

    model = ipfx.transform(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), space="sp")
    schedule = _imp(dataclasses.replace(spec, sparsity=0.5), model, plan, torch.optim.SGD(model.parameters(), 0.1))
    positions = [schedule.run_position]
    for _ in range(plan.steps - 1):
        schedule.step()
        positions.append(schedule.run_position)
    assert positions == [0, 1, 2, 3, 4, 5, 6] + [1, 2, 3, 4, 5, 6] * 2
    assert schedule.rounds_done == plan.rounds
    assert imp_plan(RunSpec(method="imp", epochs=2, imp_rounds=2, imp_rewind=0.0), 11).rewind_step == 0
    with pytest.raises(IPFXValueError, match="IMP with 30 rounds trains its ticket 31 times, but the budget is only 22"):
        imp_plan(RunSpec(method="imp", epochs=2, imp_rounds=30), 11)


def test_imp_options_belong_to_imp_runs_only():
    assert RunSpec(method="imp").imp_rounds == 3 and RunSpec(method="imp").imp_rewind == 0.05
    snip = RunSpec(method="snip", imp_rounds=5, imp_rewind=0.1)
    assert snip.imp_rounds is None and snip.imp_rewind is None
    # a record written before the IMP options existed still marks its run as done
    store_key = tuple({**dataclasses.asdict(RunSpec()), "imp_rounds": None, "imp_rewind": None}.values())
    assert RunSpec().key() == store_key


def test_imp_records_from_an_older_store_resume(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    old = {k: v for k, v in store_record(method="snip").items() if not k.startswith("imp_")}
    store.append(old)
    assert RunSpec(method="snip").key() in store.done()


@pytest.mark.parametrize("space", ["sp", "ip"])
def test_an_imp_run_ends_at_the_requested_sparsity(space, digits):
    spec = RunSpec(model="cnn", width=4, data="digits", method="imp", sparsity=0.9, space=space, epochs=2,
                   batch_size=128, imp_rounds=2, imp_rewind=0.2)
    record = run(spec, digits, progress=False)
    assert record["achieved_sparsity"] == pytest.approx(0.9, abs=2e-3)
    assert (record["imp_rewind_step"], record["imp_round_steps"]) == (1, 6)
    assert record["steps"] == 1 + 3 * 6 <= record["budget_steps"] == 2 * (len(digits.train_y) // 128)
    assert 0 <= record["accuracy"] <= 1 and math.isfinite(record["final_train_loss"])


def test_compare_runs_imp_with_its_options(tmp_path, capsys):
    out = tmp_path / "imp"
    assert main(["compare", *TINY, "--methods", "imp", "--imp-rounds", "2", "--imp-rewind", "0.1",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["space"] for r in records} == {"sp", "ip"}
    for r in records:
        assert r["method"] == "imp" and (r["imp_rounds"], r["imp_rewind"]) == (2, 0.1)
        assert abs(r["achieved_sparsity"] - 0.9) < 2e-3
    assert "| cnn | digits | imp | 0.9 |" in (out / "results.md").read_text()


def test_compare_refuses_imp_options_that_cannot_apply(tmp_path, capsys):
    code, err = run_cli(["compare", *TINY, "--methods", "snip", "--imp-rounds", "2", "--out", str(tmp_path)], capsys)
    assert code == 2 and "argument --imp-rounds: applies to the imp method only; add imp to --methods" in err
    code, err = run_cli(["compare", *TINY, "--methods", "imp", "--imp-rounds", "9", "--out", str(tmp_path)], capsys)
    assert code == 2 and "IMP with 9 rounds trains its ticket 10 times, but the budget is only 5 steps" in err
    assert "--epochs" in err and not (tmp_path / "results.jsonl").exists()
    code, line = parse_error(["compare", "--imp-rewind", "1"], capsys)
    assert code == 2 and line.endswith("argument --imp-rewind: must be a number in [0, 1), got 1")
    code, line = parse_error(["compare", "--imp-rounds", "0"], capsys)
    assert code == 2 and line.endswith("argument --imp-rounds: must be a positive integer, got 0")


@pytest.mark.parametrize("extra, message", [
    (["--cpus-per-run", "2"], "argument --cpus-per-run: applies to --executor ray only; add --executor ray"),
    (["--ray-address", "auto"], "argument --ray-address: applies to --executor ray only"),
    (["--executor", "ray", "--workers", "2"], "argument --workers: applies to --executor local only"),
    (["--executor", "ray", "--gpus-per-run", "1"], "argument --gpus-per-run: the runs use --device cpu; add --device"),
])
def test_compare_refuses_executor_options_that_cannot_apply(extra, message, tmp_path, capsys):
    code, err = run_cli(["compare", *TINY, "--out", str(tmp_path), *extra], capsys)
    assert code == 2 and err.startswith(f"ipfx compare: error: {message}"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "results.jsonl").exists()


def test_commands_never_write_into_another_commands_folder(tmp_path, capsys):
    """A sweep's folder is refused by the demo before anything is written (the demo used to delete its
    records), the demo's by a sweep, a folder of other files by both; each in one line, exit 2."""
    sweep_out = tmp_path / "sweep"
    assert main(["compare", *TINY, "--methods", "random", "--out", str(sweep_out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in sweep_out.iterdir() if p.is_file()}
    for marker_kept in (True, False):  # also a sweep written before folders were marked
        if not marker_kept:
            (sweep_out / ".ipfx-output.json").unlink()
        code, err = run_cli(["demo", "--quick", "--out", str(sweep_out)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "holds the results of `ipfx compare`" in err
        assert {p.name: p.read_bytes() for p in sweep_out.iterdir() if p.is_file() and p.name in before} == \
            {k: v for k, v in before.items() if k != ".ipfx-output.json" or marker_kept}
    demo_out = tmp_path / "demo"
    demo_out.mkdir()
    (demo_out / ".ipfx-output.json").write_text('{"command": "demo"}')
    code, err = run_cli(["compare", *TINY, "--methods", "random", "--out", str(demo_out)], capsys)
    assert code == 2 and "holds the results of `ipfx demo`" in err and not (demo_out / "results.jsonl").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "results.md").write_text("my own notes")
    for command in (["demo", "--quick"], ["compare", *TINY, "--methods", "random"]):
        code, err = run_cli([*command, "--out", str(other)], capsys)
        assert code == 2 and "files ipfx did not write" in err
    assert (other / "results.md").read_text() == "my own notes"


def test_a_command_claims_its_own_folder_again():
    import tempfile

    from ipfx.experiments.outputs import claim, owner_of

    with tempfile.TemporaryDirectory() as d:
        folder = pathlib.Path(d) / "new" / "out"
        assert owner_of(folder) is None
        claim(folder, "demo")
        claim(folder, "demo")  # its own: used again
        assert owner_of(folder) == "demo"
        with pytest.raises(IPFXValueError, match="holds the results of `ipfx demo`"):
            claim(folder, "compare")


def test_a_thread_count_far_past_the_cores_is_refused(capsys):
    """torch.set_num_threads(100000) crashed the process (a segfault after a misleading message)."""
    for command in (["demo"], ["compare", *TINY]):
        code, line = parse_error([*command, "--threads", "100000"], capsys)
        assert code == 2 and "argument --threads: must be at most" in line and "4 per core" in line


def test_engine_refuses_a_seed_torch_cannot_take(digits):
    for seed in (2**64, -1, 1.5):
        with pytest.raises(IPFXValueError, match="seed must be an integer from 0 to 2\\*\\*63 - 1"):
            run(RunSpec(seed=seed), digits)


@pytest.mark.parametrize("model, message", [("inception_v3", "cannot take the 8x8 images of digits"),
                                            ("googlenet", "cannot take the 8x8 images of digits")])
def test_a_model_that_cannot_take_the_data_is_refused_before_any_run(model, message, tmp_path, capsys):
    code, err = run_cli(["compare", "--model", model, "--data", "digits", "--epochs", "1", "--sparsities", "0.9",
                         "--methods", "random", "--no-progress", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_a_learning_rate_float32_cannot_hold_is_refused(capsys):
    code, err = parse_error(["compare", "--lr", "1e308"], capsys)
    assert code == 2 and "argument --lr: must be at most 3.4e38 (float32), got 1e308" in err
    code, err = parse_error(["compare", "--weight-decay", "1e39"], capsys)
    assert code == 2 and "argument --weight-decay: must be at most 3.4e38" in err


def test_an_argument_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", "--epochs", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.strip() == "ipfx compare: error: argument --epochs: must be a positive integer, got 0"


def test_inspect_says_what_a_file_is(tmp_path, capsys):
    """A sweep's folder or results.jsonl is shown as its table; an image or any other file that is not a
    model is named for what it is, in one line (never "a pickle ... --trust")."""
    out = tmp_path / "out"
    assert main(["compare", "--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "1", "--batch-size",
                 "256", "--sparsities", "0.9", "--methods", "random", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    for target in (out, out / "results.jsonl"):
        assert main(["inspect", str(target)]) == 0
        shown = capsys.readouterr().out
        assert "a result store of 2 run(s) (cnn on digits)" in shown and "| cnn | digits | random |" in shown
    (tmp_path / "notes.txt").write_text("hello")
    for path, kind in ((out / "accuracy.png", "a PNG image"), (tmp_path / "notes.txt", "a file of another kind")):
        code, err = run_cli(["inspect", str(path)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"is {kind}, not a model file" in err, err
    code, line = parse_error(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "is a folder without results.jsonl" in line


def test_every_compare_option_has_help_with_its_default():
    from ipfx.cli.main import build_parser

    parser = build_parser()
    compare = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compare"]
    for action in compare._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.nargs == 0:
            continue
        assert action.help and "default" in action.help, action.option_strings


def test_submodules_are_reachable_after_import_ipfx():
    code = "import ipfx; print(ipfx.deploy.save_program.__name__, ipfx.experiments.RunSpec.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["save_program", "RunSpec"], out.stderr[-2000:]


def test_plots_do_not_zoom_noise_and_say_what_their_bars_are(tmp_path):
    from ipfx.experiments.report import accuracy_range, bars_caption, plot

    bottom, top = accuracy_range([95.1, 96.8])  # 1.7 points of seed noise
    assert top - bottom >= 20 and bottom <= 95.1 and top >= 96.8 and 0 <= bottom and top <= 100
    assert accuracy_range([8.0, 99.0])[0] <= 8.0 and accuracy_range([8.0, 99.0])[1] == 100.0
    assert bars_caption([2, 2]) == "bars: ±1 standard deviation over 2 seeds"
    assert bars_caption([1]) == "one seed per point: no error bars"
    records = [store_record(method="snip", space=space, seed=seed, accuracy=0.95 + 0.01 * seed)
               for space in ("sp", "ip") for seed in (0, 1)]
    assert plot(records, tmp_path / "a.png", title="t").stat().st_size > 1000


def test_a_claim_in_progress_leaves_the_folder_unclaimed(tmp_path):
    """Two sweeps started at once: one saw the other's temporary marker (written, not yet renamed into
    place) and refused the folder as holding files ipfx did not write (a flaky two-sweeps fault test)."""
    from ipfx.atomic import HOST
    from ipfx.experiments.outputs import MARKER, claim, owner_of

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / f".{MARKER}.{HOST}.12345.1.tmp").write_text('{"command": "compare"}\n')  # (write_atomically's name)
    assert owner_of(folder) is None
    claim(folder, "compare")
    assert owner_of(folder) == "compare"
    (folder / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / f".{MARKER}.{HOST}.1.1.tmp").write_text("")
    assert owner_of(other) == "unknown"  # a temporary marker does not hide someone else's files
