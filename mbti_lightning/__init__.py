"""Fine-tune language models to predict MBTI axes from text, with PyTorch Lightning."""

import logging

# bitsandbytes' CPU backend looks for a 4-bit matmul kernel at import and, without the `kernels` package, logs
# a warning on every run. This project never runs 4-bit weights on a CPU (QLoRA needs CUDA): that one message
# is dropped, nothing else of bitsandbytes' (installed before anything imports it).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit_forward" not in record.msg)

from mbti_lightning.data import MBTIDataModule  # noqa: E402 (after the filter)
from mbti_lightning.model import MBTIClassifier  # noqa: E402

__all__ = ["MBTIClassifier", "MBTIDataModule"]
