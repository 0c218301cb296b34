"""Evaluate a trained model: ``python evaluate.py --cfg-path projects/eval/vqa.yaml [--options k=v ...]``.

Runs every entry under ``evaluation:`` on the model of ``model.load_from`` (a run's output_dir or a
checkpoint; null evaluates the untrained model) and writes ``<run.output_dir>/eval/<name>.json``.
With ``run.wandb.project`` or ``run.tensorboard.log_dir`` set, the metrics, the results table and a few
sample predictions also go to Weights & Biases or TensorBoard (at step 0).
Under ``torchrun --nproc_per_node N`` the samples are split between the processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from lavis.common import dist
from lavis.common.config import ConfigError, load_config
from lavis.common.logging import setup_logging
from lavis.common.registry import RegistryError
from lavis.datasets.builders.base import AnnotationError

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", required=True, help="project YAML with an 'evaluation:' section")
    parser.add_argument("--options", nargs="+", default=[], help="overrides: dotted.key=value ...")
    return parser.parse_args(argv)


def write_summary(rows: list[dict], out_dir: Path, model: str | None) -> tuple[Path, Path]:
    """``eval/results.json`` and ``eval/results.md`` beside the predictions: the table's rows."""
    # Imported here, as in main(): the evaluation module imports the models, after the config is checked.
    from lavis.tasks.evaluation import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps({"model": model, "results": rows}, indent=1) + "\n")
    title = f"Results of `{model}`" if model else "Results"
    md_path.write_text(f"{title}\n\n{markdown_table(rows)}\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.cfg_path, args.options)
        if not cfg.evaluation:
            raise ConfigError(f"{args.cfg_path}: nothing to evaluate; add entries under 'evaluation:'")
    except (ConfigError, RegistryError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    import torch

    from lavis.common.loggers import build_loggers
    from lavis.models import build_model, load_trained
    from lavis.runners.iter_runner import seed_everything
    from lavis.tasks.evaluation import Evaluator, flat_metrics, logged_samples, results_table, table_rows

    device = dist.init_distributed(cfg.run.device)
    seed_everything(cfg.run.seed)
    try:
        cfg.check_local_paths()
        model, processors = build_model(dataclasses.replace(cfg.model, load_from=None))
        if cfg.model.load_from:
            load_trained(model, cfg.model.load_from)
        else:
            log.warning("model.load_from is null: evaluating the untrained model")
        model.to(device)
        evaluator = Evaluator(cfg, model, processors)
    except (ConfigError, RegistryError, AnnotationError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    loggers = build_loggers(cfg, Path(cfg.run.output_dir)) if dist.is_main() else []  # run.wandb, run.tensorboard
    results = evaluator.evaluate(cfg.run.output_dir, model_name=cfg.model.load_from)
    if dist.is_main():
        rows = table_rows(cfg, results, evaluator.tasks)
        print(results_table(rows))
        for name, r in results.items():
            if r.metrics.get("ptb") == 0:
                print(f"note: {name}: captions tokenized without PTBTokenizer (no Java, or tokenizer: simple): "
                      "CIDEr and BLEU-4 are not comparable with published figures")
        write_summary(rows, Path(cfg.run.output_dir) / "eval", cfg.model.load_from)
        print(f"predictions and metrics: {cfg.run.output_dir}/eval/<name>.json; the table: eval/results.md and results.json")
        for logger in loggers:
            logger.log_metrics(flat_metrics(results), step=0)
            logger.log_evaluation(rows, logged_samples(results, evaluator.samples), step=0)
            logger.finish()
    dist.barrier()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
