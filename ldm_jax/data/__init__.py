"""Data: example sources (Fashion-MNIST, skimage photos, image folders, tfds) and the batch pipeline."""

from ldm_jax.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from ldm_jax.data.pipeline import (
    BatchIterator,
    Preprocessor,
    default_data_config,
    make_dataset,
    make_source,
    to_channels,
    to_float,
)
from ldm_jax.data.sources import (
    FashionMNISTSource,
    ImageFolderSource,
    InMemorySource,
    PhotoSource,
    TFDSSource,
    resize_uint8,
)

__all__ = [
    "CLASS_NAMES", "BatchIterator", "FashionMNISTSource", "ImageFolderSource", "InMemorySource",
    "PhotoSource", "Preprocessor", "TFDSSource", "default_data_config", "load_fashion_mnist", "make_dataset",
    "make_source", "resize_uint8", "to_channels", "to_float",
]
