"""A tiny CNN classifier for the 16x16 digits: accuracy and Frechet-distance features for samples.

It stands in for the Inception network of FID (no pretrained weights are available offline):
:meth:`DigitsClassifier.forward` returns the logits and the 64-d penultimate activations.
Inputs are images in ``[0, 1]`` of shape ``(B, 1, 16, 16)``, the output range of
:class:`~benchmarks.testbeds.digits.DigitsDiTPipeline`.

It is trained on the same train split as the DiT (:func:`~benchmarks.testbeds.digits.load_digits_images`)
with small random shifts, contrast changes and pixel noise, so that it also reads generated
digits; its accuracy is reported on the held-out real test split.

Train and save::

    python -m benchmarks.testbeds.digits_classifier --epochs 40
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.testbeds.digits import IMAGE_SIZE, NUM_CLASSES, load_digits_images

DEFAULT_CLASSIFIER_CHECKPOINT = (
    Path(__file__).resolve().parents[1] / "checkpoints" / "digits_classifier.safetensors"
)
"""Committed classifier weights (fp32 safetensors)."""
FEATURE_DIM = 64
"""Size of the penultimate feature vector used for the Frechet distance."""


class DigitsClassifier(nn.Module):
    """Conv(32)-Conv(32)-pool-Conv(64)-pool-FC(64)-FC(10) on 16x16 1-channel images in ``[0, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (IMAGE_SIZE // 4) ** 2, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.dropout = nn.Dropout(0.3)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify images.

        Args:
            images: ``(B, 1, 16, 16)`` in ``[0, 1]``.

        Returns:
            ``(logits (B, 10), features (B, 64))``; features are the ReLU activations of the
            penultimate layer.
        """
        x = images * 2.0 - 1.0
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        feats = F.relu(self.fc1(x.flatten(1)))
        logits = self.fc2(self.dropout(feats))
        return logits, feats


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER_CHECKPOINT) -> DigitsClassifier:
    """Load the classifier weights (eval mode, fp32, CPU)."""
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classify(
    images: torch.Tensor, model: DigitsClassifier | None = None, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate features of images in ``[0, 1]`` (loads the committed model if ``model`` is None).

    Args:
        images: ``(N, 1, 16, 16)`` tensor in ``[0, 1]`` (an ``(N, 16, 16, 1)`` numpy array is also accepted).
        model: A classifier; defaults to :func:`load_classifier`.
        batch_size: Images per forward.

    Returns:
        ``(logits (N, 10), features (N, 64))`` as float32 CPU tensors.
    """
    images = torch.as_tensor(images)
    if images.ndim == 4 and images.shape[-1] == 1 and images.shape[1] != 1:
        images = images.permute(0, 3, 1, 2)
    images = images.float().cpu()
    model = load_classifier() if model is None else model.eval()
    logits, feats = [], []
    for start in range(0, images.shape[0], batch_size):
        lg, ft = model(images[start : start + batch_size])
        logits.append(lg)
        feats.append(ft)
    return torch.cat(logits), torch.cat(feats)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel shifts, contrast/brightness jitter and pixel noise on images in ``[0, 1]``."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    out = torch.stack(
        [padded[i, :, dy[i] : dy[i] + IMAGE_SIZE, dx[i] : dx[i] + IMAGE_SIZE] for i in range(b)]
    )
    gain = 0.7 + 0.8 * torch.rand(b, 1, 1, 1, generator=gen)
    out = out * gain + 0.05 * torch.randn(out.shape, generator=gen)
    return out.clamp(0.0, 1.0)


def train_classifier(epochs: int = 40, seed: int = 0, batch_size: int = 64) -> tuple[DigitsClassifier, float]:
    """Train on the train split; return the model and its accuracy on the real test split."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_train, y_train = load_digits_images("train")
    x_test, y_test = load_digits_images("test")
    x_train, x_test = (x_train + 1) / 2, (x_test + 1) / 2
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = (x_train.shape[0] + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x_train.shape[0], generator=gen)
        total = 0.0
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            logits, _ = model(_augment(x_train[idx], gen))
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            logits, _ = classify(x_test, model)
            acc = (logits.argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1} loss {total / len(perm):.4f} test acc {acc:.4f}", flush=True)
    model.eval()
    logits, _ = classify(x_test, model)
    acc = (logits.argmax(1) == y_test).float().mean().item()
    return model, acc


def main(argv: list[str] | None = None) -> None:
    """Train the classifier and save it as safetensors."""
    p = argparse.ArgumentParser(description="Train the digits classifier used by the benchmark metrics.")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_CHECKPOINT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, acc = train_classifier(args.epochs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    print(f"test accuracy {acc:.4f} ({time.time() - t0:.0f} s), saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
