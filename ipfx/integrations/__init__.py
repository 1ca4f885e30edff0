"""Trainer integrations: a PyTorch Lightning callback and a Hugging Face ``Trainer`` callback.

Import the one you use; importing this package loads neither Lightning nor transformers::

    from ipfx.integrations.lightning import IPFXCallback            # pip install "ipfx[lightning]"
    from ipfx.integrations.transformers import IPFXTrainerCallback  # pip install "ipfx[hf]"

Both transform the model before the trainer builds its optimizer, prune at initialisation
(``prune="snip"``, ...) and/or on a schedule (``schedule="gmp"``, ``"imp"``, ``"rigl"``, ``"set"``),
log the sparsity through the trainer's logger and, with ``lower="dense"`` or ``"fused"``, keep a lowered
copy of the trained model on the callback as ``.lowered``.
"""

__all__: list[str] = []
