"""A small CNN for the 8 coarse emoji classes: recognisability of the emoji FLUX testbed's samples.

As :mod:`benchmarks.testbeds.digits_classifier` for the digits: trained on the real train split
of :func:`benchmarks.testbeds.emoji.load_emoji_images` (random shifts, flips, blur, contrast
changes and pixel noise, so that it also reads generated images), its accuracy reported on the
held-out test split (the floor a generator's samples are compared with). :meth:`forward` returns
the logits and 128-d penultimate features (for a Frechet distance). Inputs ``(B, 3, 32, 32)`` in
``[0, 1]``.

Train and save::

    python -m benchmarks.testbeds.emoji_classifier --minutes 6
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.testbeds.emoji import NUM_CLASSES, load_emoji_images

DEFAULT_CLASSIFIER_CHECKPOINT = (
    Path(__file__).resolve().parents[1] / "checkpoints" / "emoji_flux" / "emoji_classifier.safetensors"
)
"""Committed classifier weights (fp16 safetensors)."""
FEATURE_DIM = 128


class EmojiClassifier(nn.Module):
    """Conv(32)x2-pool-Conv(64)x2-pool-Conv(128)-pool-FC(128)-FC(8) on 32x32 RGB in ``[0, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, 32, 3, padding=1),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.Conv2d(64, 64, 3, padding=1),
                nn.Conv2d(64, 128, 3, padding=1),
            ]
        )
        self.fc1 = nn.Linear(128 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.dropout = nn.Dropout(0.3)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, 8), features (B, 128))`` of images ``(B, 3, 32, 32)`` in ``[0, 1]``."""
        x = images * 2.0 - 1.0
        c = self.convs
        x = F.max_pool2d(F.relu(c[1](F.relu(c[0](x)))), 2)
        x = F.max_pool2d(F.relu(c[3](F.relu(c[2](x)))), 2)
        x = F.max_pool2d(F.relu(c[4](x)), 2)
        feats = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(feats)), feats


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER_CHECKPOINT) -> EmojiClassifier:
    """Load the classifier (eval mode, fp32, CPU)."""
    model = EmojiClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


@torch.no_grad()
def classify(
    images: torch.Tensor, model: EmojiClassifier | None = None, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and features of images ``(N, 3, 32, 32)`` in ``[0, 1]`` (the committed model by default)."""
    images = torch.as_tensor(images).float().cpu()
    model = load_classifier() if model is None else model.eval()
    out = [model(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (up to 3 px, white fill), flip, blur, contrast/brightness and noise of ``[0, 1]`` images."""
    b = x.shape[0]
    pad = F.pad(x, (3, 3, 3, 3), value=1.0)
    dx, dy = torch.randint(0, 7, (2, b), generator=gen)
    x = torch.stack([pad[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(b)])
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    w = torch.rand(b, 1, 1, 1, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    x = (1 - w) * x + w * blurred
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)
    bright = 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = (x - 0.5) * contrast + 0.5 + bright
    x = x + 0.03 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def main(argv: list[str] | None = None) -> None:
    """Train on the real train split and save; prints the test-split accuracy."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.0, help="wall-time budget")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_CHECKPOINT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_tr, y_tr = load_emoji_images("train")
    x_te, y_te = load_emoji_images("test")
    x_tr, x_te = (x_tr + 1) / 2, (x_te + 1) / 2
    model = EmojiClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    # class-balanced sampling: the classes differ 7x in size
    weights = 1.0 / torch.bincount(y_tr, minlength=NUM_CLASSES).float()[y_tr]
    t0, step = time.time(), 0
    budget = args.minutes * 60
    while (elapsed := time.time() - t0) < budget:
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * elapsed / budget)).item())
        idx = torch.multinomial(weights, args.batch_size, replacement=True, generator=gen)
        model.train()
        loss = F.cross_entropy(model(augment(x_tr[idx], gen))[0], y_tr[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            acc = (classify(x_te, model)[0].argmax(1) == y_te).float().mean()
            print(f"step {step} {elapsed / 60:.1f}min loss {loss.item():.3f} test acc {acc:.3f}", flush=True)
    logits, _ = classify(x_te, model)
    pred = logits.argmax(1)
    acc = (pred == y_te).float().mean()
    per = [(pred[y_te == c] == c).float().mean().item() for c in range(NUM_CLASSES)]
    print(f"done: {step} steps, test accuracy {acc:.3f}; per class " + " ".join(f"{a:.2f}" for a in per))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(args.out))


if __name__ == "__main__":
    main()
