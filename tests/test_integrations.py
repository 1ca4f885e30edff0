"""The trainer integrations on a tiny CNN on CPU: PyTorch Lightning and the Hugging Face Trainer.

Each test skips when its framework is not installed (extras ``lightning`` and ``hf``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ipfx

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRUNABLE = {"0.weight", "2.weight", "6.weight"}  # conv, conv, linear of tiny_cnn()


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    )


def random_digits(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def coefficients(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(coeff, mask) per rewritten weight, detached copies."""
    modules = dict(model.named_modules())
    return {w.name: (modules[w.prefix].coeff.detach().clone(), modules[w.prefix].mask.detach().clone())
            for w in ipfx.rewritten_weights(model)}


def assert_trained_and_masked(before, after):
    assert before.keys() == after.keys() == PRUNABLE
    changed = 0
    for name in PRUNABLE:
        (c0, _), (c1, m1) = before[name], after[name]
        assert torch.all(c1[m1 == 0] == 0), f"{name}: a masked coefficient is nonzero after training"
        changed += int(not torch.equal(c0[m1 != 0], c1[m1 != 0]))
    assert changed == len(PRUNABLE), "training did not change the kept coefficients of every weight"


def assert_lowered_matches(trained: nn.Module, lowered: nn.Module, x: torch.Tensor):
    assert lowered is not None
    assert not any(isinstance(m, ipfx.BasisWeight) for m in lowered.modules())
    trained.eval(), lowered.eval()
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), trained(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# PyTorch Lightning
# ------------------------------------------------------------------------------------------------------
def lightning_module(record: dict):
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_cnn()

        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx == 0 and "rewritten" not in record:  # what the network looks like during training
                record["rewritten"] = {w.name for w in ipfx.rewritten_weights(self.model)}
                record["before"] = coefficients(self.model)
                record["sparsity_at_start"] = ipfx.sparsity(self.model)
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.2)
            record["optimized"] = {id(p) for g in opt.param_groups for p in g["params"]}
            return opt

    return pl, Classifier()


def fit_lightning(callback, steps: int = 12, tmp_path=None):
    record: dict = {}
    pl, module = lightning_module(record)
    x, y = random_digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    from lightning.pytorch.loggers import CSVLogger

    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), callbacks=[callback],
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, loader)
    return trainer, module, record, x


@pytest.mark.parametrize("space", ["ip", "sp"])
def test_lightning_prune_at_init(tmp_path, space):
    pytest.importorskip("lightning")
    from ipfx.integrations.lightning import IPFXCallback

    cb = IPFXCallback("model", space=space, prune="snip", sparsity=0.8, loss_fn=F.cross_entropy, lower="dense")
    trainer, module, record, x = fit_lightning(cb, tmp_path=tmp_path)
    assert record["rewritten"] == PRUNABLE  # every conv/linear weight in coefficient form during training
    assert {id(p) for n, p in module.model.named_parameters() if n.endswith(".coeff")} <= record["optimized"]
    assert record["sparsity_at_start"] == pytest.approx(0.8, abs=1e-3)
    assert ipfx.sparsity(module.model) == pytest.approx(0.8, abs=1e-3)
    assert_trained_and_masked(record["before"], coefficients(module.model))
    assert trainer.logged_metrics["ipfx/sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert_lowered_matches(module.model, cb.lowered, x)


def test_lightning_gmp(tmp_path):
    pytest.importorskip("lightning")
    from ipfx.integrations.lightning import IPFXCallback

    cb = IPFXCallback(schedule="gmp", sparsity=0.7, schedule_kwargs={"frequency": 2, "end_step": 8},
                      lower="fused")
    trainer, module, record, x = fit_lightning(cb, steps=12, tmp_path=tmp_path)
    assert record["sparsity_at_start"] == 0.0
    assert ipfx.sparsity(module.model) == pytest.approx(0.7, abs=1e-3)
    assert cb.schedule.t == trainer.global_step == 12
    assert_trained_and_masked(record["before"], coefficients(module.model))
    logged = trainer.logged_metrics["ipfx/sparsity"]
    assert float(logged) == pytest.approx(0.7, abs=1e-3)
    assert_lowered_matches(module.model, cb.lowered, x)


def test_lightning_errors(tmp_path):
    pytest.importorskip("lightning")
    from ipfx.integrations.lightning import IPFXCallback

    with pytest.raises(ipfx.IPFXError, match="needs sparsity"):
        IPFXCallback(prune="snip")
    with pytest.raises(ipfx.IPFXError, match="unknown schedule"):
        IPFXCallback(schedule="cubic")
    with pytest.raises(ipfx.IPFXError, match="has no attribute 'net'.*child modules: model"):
        fit_lightning(IPFXCallback("net", prune="random", sparsity=0.5), tmp_path=tmp_path)
