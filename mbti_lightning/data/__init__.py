"""The data: reading, cleaning, splitting, tokenizing and batching MBTI posts (one concern per module)."""

from mbti_lightning.data.loaders import Collator, _Rows
from mbti_lightning.data.module import MBTIDataModule
from mbti_lightning.data.splits import author_split, seed_split, stratified_split

__all__ = ["Collator", "MBTIDataModule", "_Rows", "author_split", "seed_split", "stratified_split"]
