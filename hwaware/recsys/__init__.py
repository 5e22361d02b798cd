"""Recommendation-model workloads: Criteo-schema click data and a DLRM to optimize.

`CriteoDataModule` serves synthetic (`generate_criteo_like`) or real (`load_criteo_tsv`) Criteo
logs as whole-batch tensors; `DLRM` is the LightningModule the recsys recipes quantize, and
`evaluate_auroc` measures any model with the DLRM call signature on a dataloader.
`EmbeddingBagList` holds a model's tables so that, once exported, they are looked up in one call.
"""

from hwaware.recsys.criteo import (
    DEFAULT_TABLE_SIZES,
    NUM_DENSE,
    NUM_SPARSE,
    CriteoDataModule,
    generate_criteo_like,
    hash_category,
    load_criteo_tsv,
    preprocess_dense,
)
from hwaware.recsys.dlrm import DLRM, evaluate_auroc
from hwaware.recsys.embedding import EmbeddingBagList

__all__ = [
    "NUM_DENSE",
    "NUM_SPARSE",
    "DEFAULT_TABLE_SIZES",
    "generate_criteo_like",
    "preprocess_dense",
    "hash_category",
    "load_criteo_tsv",
    "CriteoDataModule",
    "DLRM",
    "EmbeddingBagList",
    "evaluate_auroc",
]
