"""Train a small CNN on scikit-learn's digits with PyTorch Lightning, pruned in interspace form.

    pip install -e ".[lightning,demo]" && python examples/lightning_digits.py [--space sp] [--schedule]

The IPFXCallback transforms `Classifier.model` in setup() (before configure_optimizers), prunes it with
SNIP at initialisation to 90% sparsity (or, with --schedule, gradually with GMP), logs `ipfx/sparsity`
and keeps the network lowered to plain convolutions. CPU, well under a minute.
"""

import argparse

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import ipfx
from ipfx.integrations.lightning import IPFXCallback


def digits(split: float = 0.8):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    n = int(split * len(x))
    return (x[:n], y[:n]), (x[n:], y[n:])


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):  # runs after IPFXCallback.setup: self.parameters() are the coefficients
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=("ip", "sp"), default="ip")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--schedule", action="store_true", help="GMP during training instead of SNIP at init")
    args = parser.parse_args()
    torch.manual_seed(0)
    (xt, yt), (xv, yv) = digits()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=256)
    if args.schedule:
        callback = IPFXCallback("model", space=args.space, schedule="gmp", sparsity=args.sparsity,
                                schedule_kwargs={"frequency": 10}, lower="dense")
    else:
        callback = IPFXCallback("model", space=args.space, prune="snip", sparsity=args.sparsity,
                                loss_fn=F.cross_entropy, lower="dense")
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    module = Classifier()
    trainer.fit(module, train, val)
    metrics = trainer.callback_metrics
    print(f"space={args.space} sparsity={ipfx.sparsity(module.model):.3f} (logged "
          f"{float(metrics['ipfx/sparsity']):.3f}) val_acc={float(metrics['val_acc']):.3f}")
    deploy = callback.lowered.eval()
    module.model.eval()
    with torch.no_grad():
        gap = (deploy(xv) - module.model(xv)).abs().max().item()
    print(f"lowered to {type(deploy).__name__} with plain convolutions; max output difference {gap:.2e}")


if __name__ == "__main__":
    main()
