"""The `mbti-lightning` command: LightningCLI with this project's defaults."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from mbti_lightning import baseline
from mbti_lightning.callbacks import ProgressBar, Throughput
from mbti_lightning.data import MBTIDataModule
from mbti_lightning.metrics import score_predictions
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.predict import PredictionWriter
from mbti_lightning.tokenizer import load_tokenizer


class MBTITrainer(Trainer):
    """Lightning's Trainer with more subcommands: `baseline`, `report` and `explain`."""

    def baseline(self, model: MBTIClassifier, datamodule: MBTIDataModule) -> dict[str, float]:
        """Fit TF-IDF + logistic regression on the training split and score it on validation and test.

        The same rows and metrics as the model's (see `mbti_lightning.baseline`), logged as
        ``val/baseline/*`` and ``test/baseline/*`` by the trainer's loggers, and printed. It takes the
        run's own config; of the model's arguments only ``model_name_or_path`` is used (its tokenizer
        truncates the texts as training does, so the baseline reads what the model read), and no
        weights are loaded: the others can stay at their defaults.
        """
        datamodule.prepare_data()
        datamodule.setup("fit")
        preds = baseline.fit_predict(datamodule, ("validation", "test"))
        metrics = {}
        for split, stage in (("validation", "val"), ("test", "test")):
            if split in preds:
                scores = score_predictions(datamodule.heads, preds[split], baseline.split_labels(datamodule, split))
                metrics |= baseline.log_keys(stage, scores)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)
            logger.save()
        rank_zero_info("\n".join(f"{name}: {value:.4f}" for name, value in metrics.items()))
        return metrics

    def report(
        self,
        model: MBTIClassifier,
        datamodule: MBTIDataModule,
        ckpt_path: str,
        out: str | None = None,
        resamples: int = 1000,
        draws: int = 10,
    ) -> dict:
        """Write the test-split report of a checkpoint: ``report.md``, ``report.json`` and plots.

        Args:
            ckpt_path: A checkpoint written by ``fit``.
            out: The report's folder; default ``reports/<checkpoint folder>-<checkpoint name>``.
            resamples: Bootstrap resamples of the persons for every interval.
            draws: Random draws of each person's posts per point of the how-much-text curve.
        """
        import importlib.util

        from mbti_lightning import export, report

        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError('the report\'s plots need matplotlib: pip install "mbti-lightning[export]"')
        checkpoint = export.read_checkpoint(Path(ckpt_path))
        datamodule.prepare_data()
        datamodule.setup("test")
        export.check_splits(datamodule, checkpoint["mbti_lightning"].get("splits"), allow=False)
        folder = Path(out) if out else Path("reports") / f"{Path(ckpt_path).parent.name}-{Path(ckpt_path).stem}"
        return report.build(export.load_model(checkpoint), datamodule, folder, resamples, draws)

    def explain(
        self,
        model: MBTIClassifier,
        datamodule: MBTIDataModule,
        ckpt_path: str | None = None,
        texts: list[str] | None = None,
        out: str = "explanations",
        steps: int = 50,
    ) -> dict:
        """Token attributions for texts as a self-contained HTML page and JSON, with faithfulness and leak flags.

        Args:
            ckpt_path: A checkpoint written by ``fit``; without it, the model of ``--model.*`` (an exported
                folder or hub id with ``--model.model_name_or_path ... --model.from_scratch false``).
            texts: Texts to explain; else ``--data.predict_file`` (its author column groups posts by person).
            out: Folder for ``explanations.html`` and ``explanations.json``.
            steps: Integrated Gradients steps.
        """
        from mbti_lightning import explain, export  # captum, only for this command

        if ckpt_path:
            model = export.load_model(export.read_checkpoint(Path(ckpt_path)))
        else:
            model.configure_model()
        hp, authors = datamodule.hparams, None
        if not texts:
            if not hp.predict_file:
                raise ValueError('explain needs texts: --texts \'["...", "..."]\' or --data.predict_file FILE')
            datamodule.setup("predict")
            texts, authors = datamodule.predict_inputs["text"], datamodule.predict_inputs["author"]
        if torch.cuda.is_available():
            model.cuda()
        tokenizer = load_tokenizer(hp.tokenizer)
        report = explain.run(model, tokenizer, texts, authors, Path(out), hp.max_length, hp.mask_type_mentions, steps)
        rank_zero_info(f"explanations written to {Path(out) / 'explanations.html'}")
        return report


class MBTILightningCLI(LightningCLI):
    """Adds the checkpoint callback as `--checkpoint.*`, the prediction writer as `--predictions.*`, and links
    the values data and model share.

    (It overrides private methods of LightningCLI, where Lightning offers no public hook; pyproject.toml
    bounds lightning to 2.6 and tests/test_private_apis.py checks they are there.)
    """

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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return LightningCLI.subcommands() | {
            "baseline": {"model", "datamodule"},
            "report": {"model", "datamodule"},
            "explain": {"model", "datamodule"},
        }

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self._args = sys.argv[1:] if args is None else args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # With --ckpt_path, Lightning 2.6 lays the checkpoint's model hyperparameters over the whole
        # parsed config, so `--model.compile false` next to it was silently ignored (upstream:
        # Lightning-AI/pytorch-lightning#21455, open). The checkpoint still wins over config files
        # and defaults; model options given on the command line win over it.
        parsed = self.config.clone()
        super()._parse_ckpt_path()
        if not isinstance(self._args, list) or not self.config.get("subcommand"):
            return
        for key in model_keys_given(list(map(str, self._args))):
            name = f"{self.config.subcommand}.model.{key}"
            if name in parsed:
                self.config[name] = parsed[name]

    def before_fit(self) -> None:
        """Stop before training where `checkpoint.dirpath` holds another target's run: its `last.ckpt` would stay
        beside this run's `last-v1.ckpt`, and commands that name `last.ckpt` would load the wrong model."""
        callback = self.trainer.checkpoint_callback
        last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
        if self.config.fit.get("ckpt_path") or last is None or not last.is_file():
            return
        heads = (
            torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("mbti_lightning", {}).get("heads")
        )
        if heads is not None and list(heads) != list(self.model.heads):
            raise ValueError(
                f"{last.parent} holds checkpoints of a {', '.join(heads)} model and this run predicts "
                f"{', '.join(self.model.heads)}; set --checkpoint.dirpath to a folder of its own"
            )

    def after_fit(self) -> None:
        """Name the checkpoints the fit wrote, for `validate`, `test` and the export."""
        callback = self.trainer.checkpoint_callback
        if callback is None:
            return
        best, score = callback.best_model_path, callback.best_model_score
        if best and score is not None:
            best += f" ({callback.monitor} {float(score):.4f})"
        rank_zero_info(f"best checkpoint: {best or 'none'}; last: {callback.last_model_path or 'none'}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Lightning refuses a progress bar callback with `trainer.enable_progress_bar: false`.
        if self._get(self.config_init, "trainer", default={}).get("enable_progress_bar") is False:
            callbacks = self.trainer_defaults["callbacks"]
            self.trainer_defaults["callbacks"] = [c for c in callbacks if not isinstance(c, ProgressBar)]
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        # Likewise a checkpoint callback (`--checkpoint.*`) with `trainer.enable_checkpointing: false`.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        # These log no metrics: no logs/<name>/version_N (and its config.yaml) for each call.
        if self.subcommand in ("predict", "report", "explain"):
            config, self.save_config_callback = config | {"logger": False}, None
        return super()._instantiate_trainer(config, callbacks)


def _read_if_file(value: str) -> str:
    try:
        return Path(value).read_text() if Path(value).is_file() else value
    except OSError:  # e.g. a mapping too long to be a file name
        return value


def model_keys_given(args: list[str]) -> set[str]:
    """The model arguments that command-line `args` set, in any of jsonargparse's forms: ``--model.key value``,
    ``--model.key=value``, ``--model.init_args.key ...``, and ``--model FILE.yaml`` / ``--model '{key: ...}'`` /
    ``--model=...`` (all keys of the file or mapping)."""
    keys: set[str] = set()
    for i, arg in enumerate(args):
        name, has_value, value = arg.partition("=")
        if name.startswith("--model."):
            keys.add(name.removeprefix("--model.").removeprefix("init_args.").split(".")[0])
        elif name == "--model" and (has_value or i + 1 < len(args)):
            value = value if has_value else args[i + 1]
            loaded = yaml.safe_load(_read_if_file(value))
            if isinstance(loaded, dict):
                keys |= set(loaded.get("init_args", loaded))
    return keys


def cli_main(args: list[str] | None = None, run: bool = True) -> MBTILightningCLI:
    """Run the CLI; `args` lets tests and benchmarks call it in-process, `run=False` only builds it."""
    return MBTILightningCLI(
        MBTIClassifier,
        MBTIDataModule,
        trainer_class=MBTITrainer,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
            "callbacks": [ProgressBar(), Throughput()],  # always added, never saved in config.yaml
            "plugins": [{"class_path": "mbti_lightning.checkpoint.AtomicCheckpointIO"}],
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """The `mbti-lightning` console script; `serve` is a LitServe server, not a Trainer subcommand."""
    if sys.argv[1:2] == ["serve"]:
        from mbti_lightning import serve

        return serve.main(sys.argv[2:])
    cli_main()
