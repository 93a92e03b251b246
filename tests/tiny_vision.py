"""A tiny ViT with random weights and its image processor, built offline (no download), and
images made with PIL.

Used by the image predictors' tests, the docs example and any benchmark: ``build_tiny_vit``
saves a ``ViTForImageClassification`` (``kind="classifier"``, ``NUM_LABELS`` classes named
``LABELS``) or a ``ViTModel`` with its pooler (``kind="embedder"``) and a ``ViTImageProcessor``
beside it, so ``AutoImageProcessor`` and ``AutoModel*`` load the directory as they would a
real checkpoint.
"""

from __future__ import annotations

import io
import os

IMAGE_SIZE = 32
HIDDEN = 32
NUM_LABELS = 7
LABELS = [f"class_{i}" for i in range(NUM_LABELS)]


def build_tiny_vit(path: str | os.PathLike, *, kind: str = "classifier", seed: int = 0) -> str:
    """Save a tiny random ViT and its image processor under ``path``; returns ``path``."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTModel
    from transformers import ViTImageProcessorPil as ViTImageProcessor  # PIL's: no torchvision here
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=2 * HIDDEN, num_labels=NUM_LABELS,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )
    torch.manual_seed(seed)
    model = (ViTForImageClassification(config) if kind == "classifier" else ViTModel(config, add_pooling_layer=True)).eval()
    model.save_pretrained(str(path))
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(path))
    return str(path)


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (40, 30)) -> bytes:
    """A random RGB image (a different one per ``seed``) encoded as ``fmt``."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


#: bytes no decoder recognises, and a PNG cut off in its pixel data
NOT_AN_IMAGE = b"this is not an image"


def truncated_png(seed: int = 99) -> bytes:
    data = image_bytes(seed, size=(64, 64))
    return data[: len(data) // 2]


def build_tiny_resnet(path: str | os.PathLike, *, seed: int = 0) -> str:
    """Save a tiny random ResNet classifier whose image processor keeps each image's own size
    (``do_resize=False``): inputs of several sizes, which a convolutional model takes."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers import ViTImageProcessorPil as ViTImageProcessor  # PIL's: no torchvision here
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )
    torch.manual_seed(seed)
    ResNetForImageClassification(config).eval().save_pretrained(str(path))
    ViTImageProcessor(do_resize=False).save_pretrained(str(path))
    return str(path)
