"""The `mbti-lightning` command: LightningCLI with this project's defaults."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, ThroughputMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mbti_lightning.data import MBTIDataModule
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.predict import PredictionWriter


class TokenThroughputMonitor(ThroughputMonitor):
    """Logs samples/s, real (non-pad) tokens/s, FLOP/s and, on GPUs Lightning knows, MFU."""

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_num_tokens, window_size=window_size)


def _batch_size(batch: dict) -> int:
    return len(batch["labels"])


def _num_tokens(batch: dict) -> int:
    return batch["num_tokens"]


class MBTILightningCLI(LightningCLI):
    """Adds the checkpoint callback as `--checkpoint.*`, the prediction writer as `--predictions.*`, and links
    the values data and model share."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "checkpoints",
                "checkpoint.filename": "best-step{step}-mcc{val/mcc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.monitor": "val/mcc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
            }
        )
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("data.target", "model.target")


def cli_main(args: list[str] | None = None, run: bool = True) -> MBTILightningCLI:
    """Run the CLI; `args` lets tests and benchmarks call it in-process, `run=False` only builds it."""
    return MBTILightningCLI(
        MBTIClassifier,
        MBTIDataModule,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
            "callbacks": [RichProgressBar(), TokenThroughputMonitor()],  # always added, never saved in config.yaml
            "plugins": [{"class_path": "mbti_lightning.checkpoint.AtomicCheckpointIO"}],
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """The `mbti-lightning` console script."""
    cli_main()
