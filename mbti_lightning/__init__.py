"""Fine-tune language models to predict MBTI axes from text, with PyTorch Lightning."""

from mbti_lightning.data import MBTIDataModule
from mbti_lightning.model import MBTIClassifier

__all__ = ["MBTIClassifier", "MBTIDataModule"]
