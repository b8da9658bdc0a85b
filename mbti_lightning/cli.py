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

from mbti_lightning import baseline, loading
from mbti_lightning.callbacks import LogLines, ProgressBar, Throughput
from mbti_lightning.data import MBTIDataModule
from mbti_lightning.errors import UserError
from mbti_lightning.metrics import score_predictions
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.predict import PredictionWriter
from mbti_lightning.signals import Stopped, stop_on_signals

DESCRIPTION = "Fine-tune, evaluate, explain and serve MBTI classifiers (docs: README.md)."
EPILOG = (
    "more subcommands: serve MODEL, an HTTP endpoint (LitServe) for a checkpoint, an exported folder or a hub id "
    "(mbti-lightning serve --help). The export is its own command: mbti-lightning-export --help. Several devices or "
    "nodes: fit --trainer.strategy ddp, or fsdp2 to shard the weights, gradients and optimizer states over them "
    "(docs/resuming-and-distributed.md)."
)


class MBTITrainer(Trainer):
    """Lightning's Trainer with more subcommands (`baseline`, `report` and `explain`), and a trained model always
    loaded as `mbti_lightning.loading` loads it: `predict`, `validate` and `test` with a checkpoint or an exported
    model take its weights in their trained dtype and its data settings, as the report, the server and the card do.
    """

    #: `ckpt_path` values that are Lightning's own names for a checkpoint of the run in this process.
    LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")

    #: Options of how to run a model (`loading.RUNTIME_SETTINGS`) that the command line gave: they win over a
    #: trained model's. Set by `MBTILightningCLI`.
    runtime: dict[str, Any] = {}
    #: The data settings the command line gave: a corpus setting among them that differs from a trained model's
    #: scores that other corpus (`loading.other_corpus`). Set by `MBTILightningCLI`.
    data_given: set[str] = set()

    def _load(self, source: str | None, datamodule, allow_changed_data: bool, split: str | None):
        """(`loading.Loaded` of `source`, or None; the data module of its data settings) with every input a command
        reads checked first, nothing built: the model, the data files, the splits it was trained with, `split` (None:
        a predict file)."""
        loaded = loading.load(source, self.runtime) if source else None
        if loaded:
            datamodule = loading.datamodule(loaded, datamodule, self.data_given)
        if split:
            datamodule.prepare_data()
            datamodule.setup("test")
        other = loaded and loading.other_corpus(loaded, datamodule)
        if other:
            scored = ", ".join(f"data.{key} {b!r} (trained on {a!r})" for key, (a, b) in other.items())
            rank_zero_info(f"scoring another corpus than the model was trained on: {scored}")
        elif loaded and split:
            loading.check_splits(datamodule, loaded, allow_changed_data)
        datamodule.check_inputs(split)
        return loaded, datamodule

    def _loaded(self, model, datamodule, ckpt_path, allow_changed_data: bool, split: str | None):
        """(model, data module, ckpt_path for Lightning) for a subcommand: with a checkpoint file, an exported folder
        or a hub id (as ``--ckpt_path`` or ``model.model_name_or_path``), the model and data as `loading` gives them,
        the splits checked where the subcommand reads `split` (None: a predict file). Every bad input stops before a
        model is built."""
        if ckpt_path in self.LIGHTNING_CKPT_NAMES:
            return model, datamodule, ckpt_path
        if ckpt_path:
            source = str(ckpt_path)
        else:  # an exported model runs as exported, whatever `from_scratch` (a training setting) says
            name = model.hparams.model_name_or_path
            source = name if loading.is_export(name) else None
        loaded, datamodule = self._load(source, datamodule, allow_changed_data, split)
        if not loaded:
            return model, datamodule, ckpt_path
        rank_zero_info(
            f"model: {loaded.name} ({str(loaded.dtype).removeprefix('torch.')}), chosen by {loaded.chosen_by}"
        )
        return loaded.model, datamodule, None

    def predict(
        self,
        model: MBTIClassifier | None = None,
        dataloaders: Any = None,
        datamodule: MBTIDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        allow_changed_data: bool = False,
    ) -> Any:
        """Predict `data.predict_file` (else the test split) and write `--predictions.output`.

        Args:
            ckpt_path: A checkpoint written by ``fit``, or an exported folder; its weights in the dtype it was
                trained in, and its data settings (max_length, masking...) over the command line's. An exported
                folder may also go in ``--model.model_name_or_path``.
            allow_changed_data: Go on where the data no longer gives the splits the model was trained with.
        """
        split = None if datamodule.hparams.predict_file else "test"
        model, datamodule, ckpt_path = self._loaded(model, datamodule, ckpt_path, allow_changed_data, split)
        return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)

    def validate(
        self,
        model: MBTIClassifier | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: MBTIDataModule | None = None,
        weights_only: bool | None = None,
        allow_changed_data: bool = False,
    ) -> list:
        """Score the validation split.

        Args:
            ckpt_path: A checkpoint written by ``fit``, loaded as `predict` loads it.
            allow_changed_data: Go on where the data no longer gives the splits the model was trained with.
        """
        model, datamodule, ckpt_path = self._loaded(model, datamodule, ckpt_path, allow_changed_data, "validation")
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def test(
        self,
        model: MBTIClassifier | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: MBTIDataModule | None = None,
        weights_only: bool | None = None,
        allow_changed_data: bool = False,
    ) -> list:
        """Score the test split.

        Args:
            ckpt_path: A checkpoint written by ``fit``, loaded as `predict` loads it.
            allow_changed_data: Go on where the data no longer gives the splits the model was trained with.
        """
        model, datamodule, ckpt_path = self._loaded(model, datamodule, ckpt_path, allow_changed_data, "test")
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

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
        calibrate: bool = True,
        allow_changed_data: bool = False,
    ) -> dict:
        """Write the test-split report of a trained model: ``report.md``, ``report.json`` and plots.

        The data settings are the model's own (the split, max_length, masking...: one line names each that the
        command line gave otherwise); only batch sizes and workers come from the command line.

        Args:
            ckpt_path: A checkpoint written by ``fit``, or a folder (or hub id) written by
                ``mbti-lightning-export``.
            out: The report's folder; default ``reports/<checkpoint folder>-<checkpoint name>``.
            resamples: Bootstrap resamples of the persons for every interval.
            draws: Random draws of each person's posts per point of the how-much-text curve.
            calibrate: For a checkpoint, calibrate its scores on validation as the export does (false: its raw
                scores, as ``--no-calibrate``). An export's scores are reported as exported.
            allow_changed_data: Go on where the data no longer gives the splits the model was trained with
                (the report's figures could then include training rows).
        """
        import importlib.util

        from mbti_lightning import report

        if importlib.util.find_spec("matplotlib") is None:
            raise UserError('the report\'s plots need matplotlib: pip install "mbti-lightning[export]"')
        folder = Path(out) if out else Path("reports") / f"{Path(ckpt_path).parent.name}-{Path(ckpt_path).stem}"
        report.check_out(folder)
        loaded, datamodule = self._load(ckpt_path, datamodule, allow_changed_data, "test")
        trained = None
        if loading.other_corpus(loaded, datamodule):  # the corpus it was trained on calibrates and fits the baseline
            trained = loading.datamodule(loaded)
            trained.prepare_data()
            trained.setup("test")
            loading.check_splits(trained, loaded, allow_changed_data)
        return report.build(loaded, datamodule, folder, resamples, draws, calibrate, trained)

    def explain(
        self,
        model: MBTIClassifier,
        datamodule: MBTIDataModule,
        ckpt_path: str | None = None,
        texts: list[str] | None = None,
        out: str = "explanations",
        steps: int = 50,
    ) -> dict:
        """Each word's contribution toward the letter shown, as a self-contained HTML page and JSON, with ERASER's
        faithfulness and leak flags.

        Args:
            ckpt_path: A checkpoint written by ``fit``, or an exported folder or hub id; without it, the exported
                model of ``--model.model_name_or_path``. Its max_length and masking are used.
            texts: Texts to explain; else ``--data.predict_file`` (its author column groups posts by person).
            out: Folder for ``explanations.html`` and ``explanations.json``.
            steps: Integrated Gradients steps (per reference text: twice the work where two are mixed).
        """
        from mbti_lightning import explain  # captum, only for this command

        source = ckpt_path or model.hparams.model_name_or_path
        loaded, datamodule = self._load(source, datamodule, False, None)
        authors = None
        if not texts:
            if not datamodule.hparams.predict_file:
                raise UserError('explain needs texts: --texts \'["...", "..."]\' or --data.predict_file FILE')
            datamodule.setup("predict")
            texts, authors = datamodule.predict_inputs["text"], datamodule.predict_inputs["author"]
        if torch.cuda.is_available():
            loaded.model.cuda()
        report = explain.run(loaded, texts, authors, Path(out), steps)
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
        # Lightning 2.6 reads the whole checkpoint into memory here for its hyperparameters (a full-size model's
        # weights and optimizer states, again), and lays them over the whole parsed config, so `--model.compile
        # false` next to it was silently ignored (upstream: Lightning-AI/pytorch-lightning#21455, open). Here the
        # checkpoint is memory-mapped; it still wins over config files and defaults, and model options given on the
        # command line win over it.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not str(ckpt_path).endswith(".ckpt") or not Path(ckpt_path).is_file():
            return
        parsed = self.config.clone()
        hparams = loading.hyperparameters(loading.read_checkpoint(Path(ckpt_path)))
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        if not isinstance(self._args, list):
            return
        for key in keys_given(list(map(str, self._args))):
            name = f"{subcommand}.model.{key}"
            if name in parsed:
                self.config[name] = parsed[name]

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        args = list(map(str, self._args)) if isinstance(self._args, list) else []
        given = keys_given(args)
        self.trainer.runtime = {key: self.model.hparams[key] for key in given & set(loading.RUNTIME_SETTINGS)}
        self.trainer.data_given = keys_given(args, "data")

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
            self.trainer_defaults["callbacks"] = [c for c in callbacks if not isinstance(c, (ProgressBar, LogLines))]
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


def keys_given(args: list[str], group: str = "model") -> set[str]:
    """The arguments of `group` (``model`` or ``data``) that command-line `args` set, in any of jsonargparse's forms:
    ``--model.key value``, ``--model.key=value``, ``--model.init_args.key ...``, and ``--model FILE.yaml`` /
    ``--model '{key: ...}'`` / ``--model=...`` (all keys of the file or mapping)."""
    keys: set[str] = set()
    for i, arg in enumerate(args):
        name, has_value, value = arg.partition("=")
        if name.startswith(f"--{group}."):
            keys.add(name.removeprefix(f"--{group}.").removeprefix("init_args.").split(".")[0])
        elif name == f"--{group}" and (has_value or i + 1 < len(args)):
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
            # Always added, never saved in config.yaml; a log file (no terminal) gets lines, not a live bar.
            "callbacks": [ProgressBar() if sys.stdout.isatty() else LogLines(), Throughput()],
            "plugins": [{"class_path": "mbti_lightning.checkpoint.AtomicCheckpointIO"}],
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "mbti-lightning", "description": DESCRIPTION, "epilog": EPILOG},
        args=args,
        run=run,
    )


def main() -> None:
    """The `mbti-lightning` console script; `serve` is a LitServe server, not a Trainer subcommand. A known bad
    input (`UserError`) prints its message alone; SIGTERM or SIGINT stop any other command (`signals`)."""
    try:
        if sys.argv[1:2] == ["serve"]:
            from mbti_lightning import serve

            return serve.main(sys.argv[2:])
        stop_on_signals()
        cli_main()
    except UserError as err:
        sys.stderr.write(f"mbti-lightning: error: {err}\n")
        sys.exit(2)
    except Stopped as stopped:
        sys.stderr.write(f"mbti-lightning: {stopped}\n")
        sys.exit(stopped.exit_code)
