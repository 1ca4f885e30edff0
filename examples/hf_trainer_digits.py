"""Train a small CNN on scikit-learn's digits with the Hugging Face Trainer, pruned in interspace form.

    pip install -e ".[hf,demo]" && python examples/hf_trainer_digits.py [--space sp] [--method gmp|rigl|snip]

`prepare(trainer, ...)` transforms `trainer.model` before `trainer.train()` builds the optimizer, so the
optimizer trains the coefficients (and the IP bases); the callback prunes (GMP by default, stepped after
every optimizer step), logs `sparsity` with the Trainer's other logs and keeps the trained network lowered
to plain convolutions. CPU, no network, well under a minute.
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import Trainer, TrainingArguments

import ipfx
from ipfx.integrations.transformers import prepare


class DigitsCNN(nn.Module):
    """Called by the Trainer as model(pixel_values=..., labels=...); returns the loss and the logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, pixel_values, labels):
        logits = self.head(self.features(pixel_values))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=("ip", "sp"), default="ip")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--method", choices=("gmp", "rigl", "snip"), default="gmp")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    n = int(0.8 * len(x))
    train = [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]
    xv, yv = x[n:], y[n:]

    out = tempfile.mkdtemp(prefix="ipfx-hf-")
    trainer = Trainer(
        model=DigitsCNN(), train_dataset=train,
        args=TrainingArguments(output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=64,
                               learning_rate=0.05, optim="sgd", lr_scheduler_type="cosine", logging_steps=20,
                               save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
                               disable_tqdm=True))
    # with the Trainer's keyword call as the example, the model is captured by torch.export
    example = {"example_inputs": (x[:8],), "example_kwargs": {"labels": y[:8]}}
    batches = [((x[:256], y[:256]), y[:256])]  # (the model's positional inputs, targets), for SNIP and RigL
    own_loss = lambda outputs, targets: outputs["loss"]  # noqa: E731 - the model computes its loss itself
    if args.method == "gmp":
        callback = prepare(trainer, space=args.space, schedule="gmp", sparsity=args.sparsity,
                           schedule_kwargs={"frequency": 10}, lower="dense", **example)
    elif args.method == "rigl":
        callback = prepare(trainer, space=args.space, schedule="rigl", sparsity=args.sparsity, data=batches,
                           loss_fn=own_loss, schedule_kwargs={"frequency": 10}, lower="dense", **example)
    else:
        callback = prepare(trainer, space=args.space, prune="snip", sparsity=args.sparsity, data=batches,
                           loss_fn=own_loss, lower="dense", **example)
    trainer.train()

    model = trainer.model.eval()
    logged = [e["sparsity"] for e in trainer.state.log_history if "sparsity" in e]
    with torch.no_grad():
        logits = model(pixel_values=xv, labels=yv)["logits"]
        lowered = callback.lowered.eval()(pixel_values=xv, labels=yv)["logits"]
    acc = (logits.argmax(1) == yv).float().mean().item()
    print(f"space={args.space} method={args.method} sparsity={ipfx.sparsity(model):.3f} "
          f"(logged {logged[0]:.3f} -> {logged[-1]:.3f}) val_acc={acc:.3f}")
    print(f"lowered: max output difference {(lowered - logits).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
