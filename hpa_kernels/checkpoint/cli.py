"""The console entry points ``hpa-calibrate`` and ``hpa-adjust``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from ..config import SELECTION_MODES, HPAConfig
from .adjust import adjust_checkpoint
from .calibrate import calibrate_checkpoint


def _run(prog: str, work: Callable[[], str]) -> int:
    """``work()``'s line on stdout and 0; a ValueError or OSError (bad input, a missing or existing
    path) as ``<prog>: error: <message>`` on stderr and 2, as argparse reports bad arguments."""
    try:
        print(work())
    except (ValueError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def calibrate_main(argv: Sequence[str] | None = None) -> int:
    """``hpa-calibrate``: per-layer hinv vectors of a local model on a JSONL set → a safetensors file."""
    parser = argparse.ArgumentParser(
        prog="hpa-calibrate", description=calibrate_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a save_pretrained directory (local)")
    parser.add_argument(
        "--data",
        required=True,
        help="JSONL: one sample a line, input_ids or text fields, optionally with an 'image' path "
        "(relative to the file) read with the model's processor",
    )
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    parser.add_argument("--field", default="text", help="text field(s), comma-separated, joined by newlines")
    parser.add_argument("--max-samples", type=int, default=None, help="read at most this many lines (default: all)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sample, longer ones cut")
    parser.add_argument(
        "--auto-class", default=None, help="transformers class to load with (None: config.json's architectures)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer / processor directory (None: --model)")
    parser.add_argument(
        "--damping", type=float, default=HPAConfig().damping, help="λ of H + λ·mean(diag H)·I (HPAConfig.damping)"
    )
    parser.add_argument("--extra-layer", action="append", default=[], help="an nn.Linear outside the blocks")
    parser.add_argument("--include", action="append", default=[], help="fnmatch pattern of more layers to manage")
    parser.add_argument("--exclude", action="append", default=[], help="fnmatch pattern of layers never managed")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the model's dtype"
    )
    args = parser.parse_args(argv)

    def work() -> str:
        hinv = calibrate_checkpoint(
            args.model,
            args.data,
            args.out,
            fields=[field.strip() for field in args.field.split(",") if field.strip()],
            max_samples=args.max_samples,
            max_length=args.max_length,
            auto_class=args.auto_class,
            tokenizer_dir=args.tokenizer,
            config=HPAConfig(
                damping=args.damping,
                extra_layers=tuple(args.extra_layer),
                include=tuple(args.include),
                exclude=tuple(args.exclude),
            ),
            dtype=getattr(torch, args.dtype),
        )
        return f"hpa-calibrate: {len(hinv)} layers -> {args.out}"

    return _run("hpa-calibrate", work)


def adjust_main(argv: Sequence[str] | None = None) -> int:
    """``hpa-adjust``: HPA's end-of-task edit on safetensors checkpoints, streaming tensor by tensor."""
    defaults = HPAConfig()
    parser = argparse.ArgumentParser(
        prog="hpa-adjust", description=adjust_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--before", required=True, help="checkpoint directory before the task (W_prev)")
    parser.add_argument("--after", required=True, help="checkpoint directory after the task (W_new)")
    parser.add_argument("--safety", required=True, help="hinv file of the safety set on --before")
    parser.add_argument("--task", required=True, help="hinv file of the task set on --after")
    parser.add_argument("--out", required=True, help="new checkpoint directory")
    parser.add_argument("--p-max", type=float, default=defaults.p_max, help="retain ratio of the first block")
    parser.add_argument("--p-min", type=float, default=defaults.p_min, help="retain ratio of the last block")
    parser.add_argument(
        "--focus-multiplier", type=float, default=defaults.focus_multiplier, help="focus set size / retain ratio"
    )
    parser.add_argument(
        "--alpha-bounds", type=float, nargs=2, default=list(defaults.alpha_bounds), help="clamp of the balance α"
    )
    parser.add_argument("--no-orthogonal", action="store_true", help="skip Step 3's projection (ablation)")
    parser.add_argument("--selection", choices=SELECTION_MODES, default=defaults.selection, help="column rule")
    parser.add_argument("--backend", default="auto", help="kernels backend (hpa_kernels.ops.available_backends())")
    args = parser.parse_args(argv)

    def work() -> str:
        config = HPAConfig(
            p_max=args.p_max,
            p_min=args.p_min,
            focus_multiplier=args.focus_multiplier,
            alpha_bounds=tuple(args.alpha_bounds),
            orthogonal=not args.no_orthogonal,
            selection=args.selection,
        )
        reports = adjust_checkpoint(
            args.before, args.after, args.safety, args.task, args.out, config=config, backend=args.backend
        )
        retained = sum(report.num_retained for report in reports.values())
        columns = sum(report.num_columns for report in reports.values())
        return f"hpa-adjust: edited {len(reports)} tensors, retained {retained} of {columns} columns -> {args.out}"

    return _run("hpa-adjust", work)
