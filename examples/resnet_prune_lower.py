"""Transform a torchvision ResNet, prune it at random in coefficient space, lower it, check outputs.

    python examples/resnet_prune_lower.py [--model resnet18] [--sparsity 0.9]

Runs on CPU in a few seconds, with random weights (no download).
"""

import argparse
import io
import time

import torch
import torchvision

import ipfx


def saved_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of coefficients to prune")
    parser.add_argument("--space", default="ip", choices=["ip", "sp"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(2, 3, 224, 224)

    start = time.perf_counter()
    ip_model = ipfx.transform(model, space=args.space)  # every conv/linear weight -> coeff x mask x basis
    print(f"transformed {args.model} in {time.perf_counter() - start:.2f} s: "
          f"{len(ipfx.rewritten_weights(ip_model))} weights in coefficient form")
    for info in ipfx.rewritten_weights(ip_model)[:3]:
        print("  ", info)

    with torch.no_grad():
        y_original = model(x)
        y_transformed = ip_model(x)
    print(f"transform preserves outputs: max |diff| = {(y_transformed - y_original).abs().max():.2e}")

    report = ipfx.prune(ip_model, "random", args.sparsity, seed=0)
    print(f"pruned at random: sparsity {ipfx.sparsity(ip_model):.3f} over {len(report.rows)} tensors")

    with torch.no_grad():
        y_pruned = ip_model(x)
        dense = ipfx.lower(ip_model, target="dense")  # plain convolutions, runs without ipfx
        fused = ipfx.lower(ip_model, target="fused")  # sparse coefficients + basis (torch.ops.ipfx.ip_conv)
        for name, lowered in (("dense", dense), ("fused", fused)):
            diff = (lowered(x) - y_pruned).abs().max().item()
            print(f"lower(target={name!r}) matches the pruned model: max |diff| = {diff:.2e}, "
                  f"saved state {saved_bytes(lowered) / 2**20:.1f} MiB")
            assert torch.allclose(lowered(x), y_pruned, rtol=1e-3, atol=1e-4 * y_pruned.abs().max().item())
    print(f"dense original: {saved_bytes(model) / 2**20:.1f} MiB")
    print("ok")


if __name__ == "__main__":
    main()
