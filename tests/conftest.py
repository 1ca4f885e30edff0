"""Test set-up: strategies importable as a module, hypothesis profiles, and the error ledger.

Property tests record every comparison they make through ``helpers.assert_close`` so the session
ends with the number of compared examples and the worst relative error seen (printed in the terminal
summary); the issue notes quote these figures.
"""

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

import helpers  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(1)  # tiny tensors: threading costs more than it gains


def pytest_terminal_summary(terminalreporter):
    ledger = helpers.LEDGER
    if ledger.count:
        terminalreporter.write_sep("-", "ipfx equivalence ledger")
        for kind, (count, worst) in sorted(ledger.by_kind.items()):
            terminalreporter.write_line(f"{kind:40s} {count:6d} comparisons, worst relative error {worst:.3g}")
        terminalreporter.write_line(f"{'all':40s} {ledger.count:6d} comparisons, worst relative error {ledger.worst:.3g}")
    faults = getattr(sys.modules.get("test_faults"), "INJECTED", None)
    if faults and any(faults.values()):
        terminalreporter.write_line(f"fault suite: {faults['kills']} SIGKILLs and {faults['corrupt files']} corrupt "
                                    "files injected (each test asserts its store ended as an uninterrupted sweep's)")


@pytest.fixture(autouse=True)
def _torch_fx_registry_left_clean():
    """After each test, torch.fx's leaf-function registry holds nothing a trace cannot honour: loading a
    pickled guarded graph leaves such an entry (torch 2.14), which ipfx's own tracing drops
    (ipfx.capture.tracing) but a test calling torch.fx.symbolic_trace directly would trip over."""
    yield
    from ipfx.capture.tracing import _drop_unpatchable_wraps

    _drop_unpatchable_wraps()
