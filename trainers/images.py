"""Images on the same machinery as text — kept as one import point for the image pieces, which
live next to their text counterparts:

- the encoder and its input conventions: ``image_encoder``;
- augmentations (``ImageAugmenter``): ``augment``;
- the two-view stream (``ImageStream``): ``data``;
- the digits dataset (``build_digits_dataset``): ``digits_data``;
- frozen-feature evaluation (``ImageEval``, ``knn_accuracy``, ``probe_accuracy``): ``evaluate``.
"""

from .augment import ImageAugmenter  # noqa: F401
from .data import ImageStream  # noqa: F401
from .digits_data import build_digits_dataset  # noqa: F401
from .evaluate import ImageEval, knn_accuracy, probe_accuracy  # noqa: F401
from .image_encoder import (BUILTIN_CNN, ImageEncoder, ImageEncoderSettings, build_image_encoder,  # noqa: F401
                            decode_images, is_image_model, png_bytes, prepare, to_tensor)
