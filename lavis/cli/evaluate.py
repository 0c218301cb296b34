"""Evaluate a trained model: ``python evaluate.py --cfg-path projects/eval/vqa.yaml [--options k=v ...]``.

Runs every entry under ``evaluation:`` on the model of ``model.load_from`` (a run's output_dir, a
checkpoint or a weights file; null evaluates the untrained model of the config's ``model`` section). The
model is the one trained: built from the run's ``config.yaml`` (a key this config sets itself that
contradicts it is an error, unless ``model.override`` lists it). Results (``<name>.json``, ``results.md``,
``results.json``) go to ``<run>/eval/<checkpoint>/<project>/`` (beside the weights for a model outside
a run), or to ``<run.output_dir>/eval/`` when the project or ``--options`` set ``run.output_dir``; a
directory that holds an earlier evaluation's results is refused unless ``run.overwrite=true``, which moves
it aside to ``<dir>.old-<time>``. Exit status: 0, 2 for a config or input error, 1 when an evaluation
skipped every sample (its row reads n/a; the others are written).
With ``run.wandb.project`` or ``run.tensorboard.log_dir`` set, the metrics, the results table and a few
sample predictions also go to Weights & Biases or TensorBoard (at step 0).
Under ``torchrun --nproc_per_node N`` the samples are split between the processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lavis.cli.arguments import parse_project_args, project_parser
from lavis.common import dist
from lavis.common.config import ConfigError, load_config
from lavis.common.registry import RegistryError
from lavis.common.resources import describe
from lavis.datasets.builders.base import AnnotationError
from lavis.tracking.logging import setup_logging

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = project_parser(__doc__, "project YAML with an 'evaluation:' section (projects/eval/demo.yaml, eval/demo)",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    return parse_project_args(parser, argv)


def write_summary(rows: list[dict], out_dir: Path, model: str | None) -> tuple[Path, Path]:
    """``results.json`` and ``results.md`` beside the predictions: the table's rows."""
    # Imported here, as in main(): the evaluation module imports the models, after the config is checked.
    from lavis.tracking.tables import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps({"model": model, "results": rows}, indent=1) + "\n")
    title = f"Results of `{model}`" if model else "Results"
    md_path.write_text(f"{title}\n\n{markdown_table(rows)}\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_projects:
        print(describe(), end="")
        return 0
    setup_logging()
    try:
        cfg = load_config(args.cfg_path, args.options)
        if not cfg.evaluation:
            raise ConfigError(f"{args.cfg_path}: nothing to evaluate; add entries under 'evaluation:'")
    except (ConfigError, RegistryError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    import torch

    from lavis.common import output_dir
    from lavis.models import build_model
    from lavis.models.loading import build_trained, evaluation_config, explicit_keys
    from lavis.runners.iter_runner import seed_everything
    from lavis.tasks.evaluation import (
        EvaluationFailed,
        Evaluator,
        earlier_results,
        flat_metrics,
        logged_samples,
        results_dir,
        table_rows,
    )
    from lavis.tracking.loggers import build_loggers
    from lavis.tracking.tables import results_table

    device = dist.init_distributed(cfg.run.device)
    seed_everything(cfg.run.seed)
    try:
        explicit = explicit_keys(args.cfg_path, args.options)
        cfg.check_local_paths()
        cfg, _ = evaluation_config(cfg, explicit)  # the model as trained: its run's config.yaml
        out = results_dir(cfg, args.cfg_path, output_dir_set="run.output_dir" in explicit)
        refusal = None
        if dist.is_main():
            refusal = output_dir.claim(
                out, earlier_results(out), cfg.run.overwrite, "evaluation",
                "Write this one elsewhere with --options run.output_dir=DIR (results go to DIR/eval)",
            )
        refusal = dist.all_gather_objects(refusal)[0]
        if refusal:
            raise ConfigError(refusal)
        if cfg.model.load_from:
            model, processors = build_trained(cfg.model, cfg.model.load_from)
        else:
            log.warning("model.load_from is null: evaluating the untrained model")
            model, processors = build_model(cfg.model)
        model.to(device)
        evaluator = Evaluator(cfg, model, processors)
    except (ConfigError, RegistryError, AnnotationError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # run.wandb, run.tensorboard: under run.output_dir when it is set, else beside the results
    log_dir = out.parent if "run.output_dir" in explicit or not cfg.model.load_from else out
    loggers = build_loggers(cfg, log_dir) if dist.is_main() else []
    failure = None
    try:
        with torch.no_grad():  # not set_grad_enabled(False): main() is also called in-process (tests, scripts)
            results = evaluator.evaluate(model_name=cfg.model.load_from, results_dir=out)
    except EvaluationFailed as err:
        failure, results = err, err.results
    if dist.is_main():
        rows = table_rows(cfg, results, evaluator.tasks)
        print(results_table(rows))
        for name, r in results.items():
            if r.metrics.get("ptb") == 0:
                print(f"note: {name}: captions tokenized without PTBTokenizer (no Java, or tokenizer: simple): "
                      "CIDEr and BLEU-4 are not comparable with published figures")
        write_summary(rows, out, cfg.model.load_from)
        print(f"predictions and metrics: {out}/<name>.json; the table: {out}/results.md and results.json")
        for logger in loggers:
            logger.log_metrics(flat_metrics(results), step=0)
            logger.log_evaluation(rows, logged_samples(results, evaluator.samples), step=0)
            logger.finish()
        if failure is not None:
            print(f"error: {failure}", file=sys.stderr)
    dist.barrier()
    dist.shutdown()
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
