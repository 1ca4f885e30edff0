"""The command line as a careless or hostile user meets it: option values drawn from valid and invalid
spellings, combined. Every command ends with exit 0, or exit 2 and one line that says what is wrong;
never a traceback, another exit status, or a signal."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ipfx.cli.main import main

#: Per option, spellings a user may type: valid ones (small, so that a valid draw trains in seconds) and
#: invalid ones (wrong type, out of range, repeated, empty, absurd).
OPTIONS = {
    "--epochs": ["1", "0", "-1", "x", "1.5", ""],
    "--batch-size": ["32", "0", "100000", "x", "-8"],
    "--train-subset": ["128", "0", "-5", "abc", "1"],
    "--lr": ["0.05", "0", "-1", "nan", "inf", "1e308", "1e-300", "x"],
    "--momentum": ["0.9", "0", "1", "-0.1", "nan"],
    "--weight-decay": ["0", "1e-4", "-1", "1e39", "inf"],
    "--sparsities": ["0.9", "0.5,0.9", "1", "0.9,0.90", "-0.1", "", "0.99999", "0.9,,0.5"],
    "--seeds": ["0", "0,1", "-1", "1,01", "18446744073709551616", "a", "9223372036854775807"],
    "--threads": ["1", "0", "100000", "-1", "two"],
    "--device": ["cpu", "cuda", "cuda:7", "tpu", "", "cpu:0"],
    "--precision": ["fp32", "auto", "fp8", "bf16x"],
    "--methods": ["random", "snip,synflow", "foo", "", "random,random", "magnitude"],
    "--spaces": ["ip", "sp,ip", "xp", "ip,ip"],
    "--imp-rounds": ["1", "0", "x"],
    "--width": ["4", "0", "-2", "x"],
    "--workers": ["1", "0", "-1", "x"],
    "--model": ["cnn", "resnet20", "nope", "inception_v3", ""],
    "--data": ["digits", "imagenet", ""],
    "--lr-schedule": ["cosine", "step", "sometimes"],
    "--executor": ["local", "spark"],
    "--cpus-per-run": ["1", "0", "-1"],
}

BASE = ["compare", "--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "1", "--batch-size", "64",
        "--train-subset", "128", "--sparsities", "0.9", "--seeds", "0", "--methods", "random", "--spaces", "ip",
        "--no-progress", "--threads", "1"]


def _command(drawn: dict[str, str], out: Path) -> list[str]:
    argv = list(BASE)
    for option, value in drawn.items():
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    return [*argv, "--out", str(out)]


@settings(max_examples=int(__import__("os").environ.get("FUZZ_N", 40)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), min_size=1, max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.sampled_from(OPTIONS[k]) for k in keys})))
def test_any_option_values_end_in_success_or_one_line_of_error(drawn):
    with tempfile.TemporaryDirectory() as tmp:
        argv = _command(drawn, Path(tmp) / "out")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code
        lines = [line for line in err.getvalue().splitlines() if line.strip() and "warning" not in line]
        event(f"exit {code}")
        assert code in (0, 2), (argv, code, err.getvalue()[-2000:])
        if code == 2:
            assert len(lines) == 1 and ": error: " in lines[0], (argv, err.getvalue()[-2000:])
        assert "Traceback" not in err.getvalue(), (argv, err.getvalue()[-2000:])
