"""``python -m lavis.convert``'s command line: its arguments, and an error as one line with status 2."""

from __future__ import annotations

import argparse
import sys

from lavis.interop.convert.hf_qwen2_vl import from_hf, to_hf
from lavis.interop.convert.release import from_qwen_vl, to_qwen_vl

DESCRIPTION = """Convert between Qwen-VL's and Qwen2-VL's released checkpoints and this framework's components.

    python -m lavis.convert from-qwen-vl SRC OUT   # a Qwen-VL / Qwen-VL-Chat release -> our layout
    python -m lavis.convert to-qwen-vl RUN OUT     # a model trained here -> Qwen-VL's layout
    python -m lavis.convert from-hf SRC OUT        # a transformers Qwen2-VL / Qwen2.5-VL checkpoint -> our layout
    python -m lavis.convert to-hf RUN OUT          # a model trained here (qwen2_vl_vit, patch_merger, qwen2_vl_lm) -> transformers

``from-qwen-vl`` reads a local copy of the release (``config.json``, safetensors or ``.bin`` weights,
sharded with their index json or whole, ``qwen.tiktoken``; its Python code is never run) and writes
OUT as the Qwen2-architecture transformers directory of the LLM (``config.json`` + safetensors, what
``AutoModelForCausalLM.from_pretrained`` loads) holding also ``vision.safetensors`` (the ViT as a
timm state dict), ``adapter.safetensors`` (the resampler with ``ln_post`` and ``proj``: the model's
``adapter.*`` weights, in ``qwen_resampler``'s naming) and ``qwen.tiktoken``:
``configs/models/presets/qwen_vl_chat.yaml`` with ``model.llm.pretrained=OUT`` assembles them (the
adapter through its ``model.load_from``).

``to-qwen-vl`` loads a trained model as :func:`lavis.load_model` does (a run's ``output_dir``, a
checkpoint directory or an exported model) and writes Qwen-VL's tensor names, ``config.json``,
``generation_config.json``, ``tokenizer_config.json`` and ``qwen.tiktoken``; ``--code-from`` copies
Qwen-VL's Python files from a local release, so that its own code (``trust_remote_code``) loads OUT.

``from-hf`` reads a local transformers Qwen2-VL or Qwen2.5-VL checkpoint (``config.json``, safetensors
whole or sharded, tensor names as released or as transformers 5 names them, the tokenizer files,
``preprocessor_config.json``) and writes OUT with every weight in one ``model.safetensors`` under our
names (``visual.merger.*`` -> ``adapter.*``, ``visual.*`` -> ``vision.model.*``, ``model.*`` /
``lm_head.*`` -> ``llm.*``), a ``config.yaml`` (qwen2_vl_vit + patch_merger + qwen2_vl_lm at the
checkpoint's architecture, hf_tokenizer, qwen2_vl_image), ``meta.json``, the tokenizer and processor
files and the source's ``config.json`` as ``hf_config.json``: ``lavis.load_model(OUT)`` and
``model.load_from=OUT`` take it. ``to-hf`` writes such a model back (LoRA merged) as a transformers
directory that ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` and
``AutoProcessor`` load, in the source's tensor layout (released by default).

All four name what is wrong with an input that is not what they read (its path and what was expected),
and write OUT as ``lavis.export`` does: a new or empty directory (one that holds anything only with
``--overwrite``, which moves it aside to ``OUT.old-<time>``), never the input, a directory inside or
above it, or a training run's directory; OUT appears only once complete.

What the mapping has to get right (each checked against Qwen-VL's ``visual.py`` / ``modeling_qwen.py``):
the ViT's ``attn.in_proj`` rows are grouped per head (q, k, v of head 0, then head 1, ...) where
timm's ``qkv`` holds all q rows, then all k, then all v; the LLM's ``c_attn`` is [q; k; v] and its
MLP is ``c_proj(w1(x) * silu(w2(x)))``, so ``w2`` is Qwen2's ``gate_proj`` and ``w1`` its ``up_proj``.
"""

OVERWRITE_HELP = ("write into a non-empty OUT, its content moved aside to OUT.old-<time> first (never deleted); "
                  "the input and a training run's directory are refused whatever this says")


def main(argv: list[str] | None = None) -> int:
    from lavis.tracking.logging import setup_logging

    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    inward = commands.add_parser("from-qwen-vl", help="a Qwen-VL release -> timm ViT, resampler, Qwen2 LLM")
    inward.add_argument("src", help="local copy of Qwen-VL or Qwen-VL-Chat (config.json, weights, qwen.tiktoken)")
    inward.add_argument("out", help="directory to write (the LLM directory, holding the other files too)")
    inward.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    outward = commands.add_parser("to-qwen-vl", help="a model trained here -> Qwen-VL's layout")
    outward.add_argument("run", help="a run's output_dir, a checkpoint directory or an exported model")
    outward.add_argument("out", help="directory to write")
    outward.add_argument("--code-from", default=None, help="a local Qwen-VL release whose Python files to copy into OUT")
    outward.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    from_hf_parser = commands.add_parser("from-hf", help="a transformers Qwen2-VL / Qwen2.5-VL checkpoint -> our layout")
    from_hf_parser.add_argument("src", help="local checkpoint directory (config.json, safetensors, tokenizer, preprocessor_config.json)")
    from_hf_parser.add_argument("out", help="directory to write")
    from_hf_parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    to_hf_parser = commands.add_parser("to-hf", help="a model trained here -> a transformers Qwen2-VL / Qwen2.5-VL directory")
    to_hf_parser.add_argument("run", help="a run's output_dir, a checkpoint directory or an exported model")
    to_hf_parser.add_argument("out", help="directory to write")
    to_hf_parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.command == "from-qwen-vl":
            from_qwen_vl(args.src, args.out, args.overwrite)
        elif args.command == "to-qwen-vl":
            to_qwen_vl(args.run, args.out, args.code_from, args.overwrite)
        elif args.command == "from-hf":
            from_hf(args.src, args.out, args.overwrite)
        else:
            to_hf(args.run, args.out, args.overwrite)
    except (ValueError, OSError) as err:  # ConversionError, a refused OUT, a missing or unreadable file
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
