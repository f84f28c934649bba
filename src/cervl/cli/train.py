"""``cervl train``, ``ablate``, ``demo`` and ``pretrain-tiny``: parsing and printing."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cervl.cli.options import REPO_CONFIGS


def run_train(args) -> int:
    from cervl.train.config import load_config
    from cervl.train.recipe import train

    cfg = load_config(args.config, args.overrides)
    if args.skip_bad:
        cfg.skip_bad = True
    _print_train_result(train(cfg, progress=args.progress))
    return 0


def _print_train_result(result: dict) -> None:
    for name, ev in result["stages"].items():
        if ev:
            print(f"stage {name}: val accuracy {ev['accuracy']:.2%}, macro-F1 {ev['macro_f1']:.3f} (n={ev['n']})")
    test = result.get("test")
    if test:
        print(f"test accuracy ({test['label_set']}, {test['n']} samples): {test['accuracy']:.2%}, "
              f"macro-F1 {test['macro_f1']:.3f}, top-2 {test['top2_accuracy']:.2%}")
        print(f"report: {test['report']}")
    print(f"run directory: {result['run_dir']}")


def run_ablate(args) -> int:
    from cervl.experiments.ablate import run_ablation

    md = run_ablation(args.grid, progress=args.progress)
    print(md.read_text())
    print(f"ablation report: {md.with_suffix('.html')}")
    return 0


def run_demo(args) -> int:
    from cervl.train.config import load_config
    from cervl.data.prepare import prepare_synthce
    from cervl.train.recipe import train

    t0 = time.perf_counter()
    overrides = list(args.overrides)
    if args.rebuild_base:  # train from a freshly built base instead of the one shipped in the package
        base = Path("runs/pretrain-tiny/tiny-base")
        p = argparse.ArgumentParser()
        _pretrain_arguments(p)
        run_pretrain_tiny(p.parse_args(["--out", str(base)]))
        overrides.append(f"model.name={base.resolve()}")
    cfg = load_config(args.config, overrides)
    manifests = Path(cfg.test.manifest).parent  # the recipe's manifests live in runs/demo/manifests
    prepare_synthce(manifests.parent / "synthce", manifests, per_class=args.per_class, seed=0)
    print(f"SynthCE manifests in {manifests}")
    if args.data_only:
        return 0
    result = train(cfg)
    _print_train_result(result)
    test = result.get("test")
    if test:
        print(f"\nDEMO: stage-2 compound accuracy on the SynthCE test split (aligned): {test['accuracy']:.2%} "
              f"(chance {1 / len(test['confusion']):.0%}); total time {time.perf_counter() - t0:.0f} s")
    return 0


def run_pretrain_tiny(args) -> int:
    from cervl.train.pretrain_tiny import pretrain_tiny

    out = pretrain_tiny(args.config, args.overrides, per_class=args.per_class, out=args.out, workers=args.workers,
                        warmup_steps=args.warmup_steps)
    print(f"tiny base written to {out}")
    return 0


def _pretrain_arguments(p) -> None:
    p.add_argument("--config", type=Path, default=REPO_CONFIGS / "pretrain-tiny.yaml")
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("runs/pretrain-tiny/tiny-base"),
                   help="output folder (default runs/pretrain-tiny/tiny-base; the package's own copy is "
                        "src/cervl/assets/tiny-base)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=400, help="vision warm-up steps (phase 1)")
    p.add_argument("overrides", nargs="*")


def add_parsers(add) -> None:
    """The train, ablate, demo, pretrain-tiny sub-commands: arguments, and which function runs each."""
    p = add("train", help="run a staged training recipe (YAML) and evaluate it", description="Re-running the same "
            "command resumes: finished stages are reused and an interrupted stage continues from its checkpoint.")
    p.add_argument("config", type=Path, help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.1.lr=5e-5 output_dir=runs/x")
    p.add_argument("--skip-bad", action="store_true", help="train without the images that fail the pre-flight check")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_train)

    p = add("ablate", help="run an ablation grid (YAML) and write one comparison table and plot")
    p.add_argument("grid", type=Path, help="ablation YAML, e.g. configs/ablation-quickstart.yaml")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_ablate)

    p = add("demo", help="run the embedded default end to end (SynthCE + tiny base, offline)",
            description="Generates SynthCE into runs/demo/, prepares manifests, then runs configs/quickstart.yaml "
                        "(two LoRA stages) and reports the test accuracy.")
    p.add_argument("--config", type=Path, default=REPO_CONFIGS / "quickstart.yaml")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--data-only", action="store_true", help="only generate and prepare the data")
    p.add_argument("--rebuild-base", action="store_true", help="first rebuild the tiny base with pretrain-tiny "
                   "into runs/pretrain-tiny/tiny-base (~12 min) and train from it")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the recipe")
    p.set_defaults(func=run_demo)

    p = add("pretrain-tiny", help="rebuild the tiny pretrained base (AU-caption pretraining)",
            description="Generates a separate SynthCE (seed 1000), warms up the vision tower on AU intensities, "
                        "then fine-tunes tiny-qwen2-vl on AU captions (configs/pretrain-tiny.yaml). Writes to --out, "
                        "which must be new, empty, or a tiny base written by this command.")
    _pretrain_arguments(p)
    p.set_defaults(func=run_pretrain_tiny)


COMMANDS = {"train": run_train, "ablate": run_ablate, "demo": run_demo, "pretrain-tiny": run_pretrain_tiny}
