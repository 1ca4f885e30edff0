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


def fit_lightning(callback, steps: int = 12, tmp_path=None, prepare=None):
    record: dict = {}
    pl, module = lightning_module(record)
    if prepare is not None:
        prepare(module)
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


def test_lightning_optimizer_built_before_the_transform_is_refused_at_the_start(tmp_path):
    pytest.importorskip("lightning")
    from ipfx.integrations.lightning import IPFXCallback

    def stale_optimizer(module):  # built on the parameters the callback's transform replaces
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        module.configure_optimizers = lambda: optimizer

    with pytest.raises(ipfx.IPFXError, match="optimizer does not train the model's coefficients.*configure_optimizers"):
        fit_lightning(IPFXCallback("model", prune="random", sparsity=0.5), steps=2, tmp_path=tmp_path,
                      prepare=stale_optimizer)


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


# ------------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ------------------------------------------------------------------------------------------------------
class HFClassifier(nn.Module):
    """What the Trainer calls: ``model(pixel_values=..., labels=...)`` -> a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, pixel_values, labels):
        logits = self.net(pixel_values)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def hf_trainer(tmp_path, steps: int = 12):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = random_digits()
    # an extra column: the Trainer drops what the forward's signature does not name (remove_unused_columns,
    # its default), so the transformed model must keep the signature, labels included
    dataset = [{"pixel_values": x[i], "labels": y[i], "index": i} for i in range(len(x))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16, learning_rate=0.2,
        optim="sgd", lr_scheduler_type="constant", logging_steps=2, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    return transformers.Trainer(model=HFClassifier(), args=args, train_dataset=dataset), x, y


class RecordFirstStep:
    """A TrainerCallback that records the model's state at the first step."""

    def __new__(cls, record):
        from transformers import TrainerCallback

        class _Record(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
                if "before" not in record:
                    record["rewritten"] = {w.name.removeprefix("net.") for w in ipfx.rewritten_weights(model)}
                    record["before"] = coefficients(model.net if hasattr(model, "net") else model)
                    record["sparsity_at_start"] = ipfx.sparsity(model)
                    record["optimized"] = {id(p) for g in optimizer.param_groups for p in g["params"]}

        return _Record()


def hf_coefficients(model):
    return {k.removeprefix("net."): v for k, v in coefficients(model).items()}


@pytest.mark.parametrize("how", ["prune", "gmp"])
def test_hf_trainer(tmp_path, how):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from ipfx.integrations.transformers import IPFXTrainerCallback, prepare

    trainer, x, y = hf_trainer(tmp_path)
    record: dict = {}
    trainer.add_callback(RecordFirstStep(record))
    example = {"example_inputs": (x[:4],), "example_kwargs": {"labels": y[:4]}}
    if how == "prune":
        # SNIP's batches: (positional inputs of the model, targets); the model computes its own loss
        cb = prepare(trainer, prune="snip", sparsity=0.75, data=[((x[:32], y[:32]), y[:32])],
                     loss_fn=lambda outputs, targets: outputs["loss"], lower="dense", **example)
    else:
        cb = prepare(trainer, schedule="gmp", sparsity=0.75, schedule_kwargs={"frequency": 2, "end_step": 8},
                     lower="fused", **example)
    assert isinstance(cb, IPFXTrainerCallback) and cb in trainer.callback_handler.callbacks
    trainer.train()
    model = trainer.model
    assert record["rewritten"] == PRUNABLE  # every conv/linear weight in coefficient form during training
    assert {id(p) for n, p in model.named_parameters() if n.endswith(".coeff")} <= record["optimized"]
    assert record["sparsity_at_start"] == (pytest.approx(0.75, abs=1e-3) if how == "prune" else 0.0)
    assert ipfx.sparsity(model) == pytest.approx(0.75, abs=1e-3)
    after = hf_coefficients(model)
    before = {k.removeprefix("net."): v for k, v in record["before"].items()}
    assert_trained_and_masked(before, after)
    logged = [entry[cb.log_name] for entry in trainer.state.log_history if cb.log_name in entry]
    assert logged and logged[-1] == pytest.approx(0.75, abs=1e-3)

    def run(m):
        return lambda inputs: m(pixel_values=inputs, labels=y[:16])["logits"]

    assert_lowered_matches_fn(model, cb.lowered, run, x[:16])


def assert_lowered_matches_fn(trained, lowered, run, x):
    assert lowered is not None
    assert not any(isinstance(m, ipfx.BasisWeight) for m in lowered.modules())
    trained.eval(), lowered.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(lowered)(x), run(trained)(x), rtol=1e-5, atol=1e-5)


def test_hf_errors(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from ipfx.integrations.transformers import IPFXTrainerCallback

    trainer, x, y = hf_trainer(tmp_path, steps=1)
    trainer.add_callback(IPFXTrainerCallback(prune="random", sparsity=0.5))  # not attached: nothing transformed
    with pytest.raises(ipfx.IPFXError, match="not attached"):
        trainer.train()
    trainer3, _, _ = hf_trainer(tmp_path, steps=1)
    stale = torch.optim.SGD(trainer3.model.parameters(), lr=0.1)  # the model's parameters before the transform
    IPFXTrainerCallback(prune="random", sparsity=0.5).attach(trainer3)
    trainer3.optimizer = stale
    with pytest.raises(ipfx.IPFXError, match="optimizer does not train the model's coefficients"):
        trainer3.train()
    trainer2, _, _ = hf_trainer(tmp_path, steps=1)
    trainer2.create_optimizer()
    with pytest.raises(ipfx.IPFXError, match="already holds an optimizer"):
        IPFXTrainerCallback().attach(trainer2)


def _plan(schedule: str, **schedule_kwargs):
    from ipfx.integrations._core import Plan

    return Plan(owner="test", space="ip", example_inputs=None, example_kwargs=None, transform_kwargs=None,
                prune=None, sparsity=0.8, data=None, loss_fn=None, prune_kwargs=None, schedule=schedule,
                schedule_kwargs=schedule_kwargs, lower=None)


def test_schedule_defaults_follow_the_run_and_late_schedules_warn():
    """Without frequency or end step, masks change about ten times up to 75% of the run (a 30-step run with
    the fixed default of 100 steps pruned only at its last step); numbers that leave one pruning step, or
    no training after the last, warn."""
    import warnings

    model = ipfx.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
                           example_inputs=(torch.randn(2, 3, 8, 8),))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = _plan("gmp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan.build_schedule(model, optimizer, total_steps=30)
    assert (plan.schedule.end_step, plan.schedule.frequency) == (22, 2)
    with pytest.warns(UserWarning, match="changes masks only at step 22 .* one pruning step"):
        _plan("gmp", frequency=100).build_schedule(model, optimizer, total_steps=30)
    with pytest.warns(UserWarning, match="changes masks until step 30 of a 30-step run, so nothing trains after"):
        _plan("gmp", end_step=30).build_schedule(model, optimizer, total_steps=30)
