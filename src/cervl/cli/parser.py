"""The argument parser of ``cervl``: one sub-command per pipeline stage (see :mod:`cervl.cli`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cervl import __version__
from cervl.registry import suggest

REPO_CONFIGS = Path("configs")  # relative: `make demo` runs from the repository root; elsewhere pass --config


def _face_options(p, *, video: bool = True) -> None:
    """Detector options shared by predict, abaw and align."""
    p.add_argument("--detector", default="mtcnn", help="face detector: mtcnn (default, offline) or yunet")
    p.add_argument("--detect-side", type=int, default=640, help="mtcnn: search faces on a copy with this longest "
                   "side (landmarks still come from the full-resolution image); 0 = full size. Default 640")
    p.add_argument("--min-face", type=int, default=20, help="mtcnn: smallest face, in pixels of that copy")
    p.add_argument("--face-search", default="all", choices=["all", "largest"],
                   help="mtcnn: 'all' searches every face size (default); 'largest' stops once the largest face is "
                        "certain (same largest face, 2-10x faster on photos with large faces)")
    p.add_argument("--detector-model", help="yunet: path of face_detection_yunet_2023mar.onnx")
    p.add_argument("--landmarks", default="single", choices=["single", "flip"],
                   help="flip: also detect on the mirrored image and average the landmarks (closer alignment, "
                        "about twice the detection time; see cervl landmark-error)")
    p.add_argument("--workers", type=int, default=1, help="preprocess in this many processes, one core each: photos "
                   "are aligned in parallel; videos are decoded, tracked and aligned one per process")
    if video:
        p.add_argument("--redetect-every", type=int, default=120,
                       help="videos: full face detection every N sampled frames (and whenever the face is lost)")
        p.add_argument("--verify-every", type=int, default=10, help="videos: re-locate the face with O-Net every N "
                       "frames; optical flow in between (1 = O-Net on every frame)")


def _zero_shot_options(p) -> None:
    """--model/--prompt/--label-set: score with a base model and no run folder (instead of --run)."""
    g = p.add_argument_group("zero-shot (instead of --run)")
    g.add_argument("--model", help="a base model: hub id, local folder, or pretrained-tiny (the shipped tiny base)")
    g.add_argument("--prompt", default="minimal", help="prompt style with --model (minimal, context, au-caption)")
    g.add_argument("--label-set", dest="zs_label_set", default="rafdb-compound", help="label set with --model")


def _ray_options(p, *, output_format: bool = False) -> None:
    """--engine ray and its options (predict, align, abaw); see README "Scale out"."""
    g = p.add_argument_group("scale-out (Ray)")
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this machine (--workers processes); ray: a Ray cluster (pip install 'cervl[ray]')")
    g.add_argument("--ray-address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")
    g.add_argument("--actors", type=int, help="ray: fixed number of predictor actors")
    g.add_argument("--min-actors", type=int, help="ray: autoscaling pool, fewest actors (default 1)")
    g.add_argument("--max-actors", type=int, help="ray: autoscaling pool, most actors (default 2)")
    g.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="ray: GPUs per actor (0 on CPU)")
    g.add_argument("--cpus-per-actor", type=float, help="ray: CPUs per actor (default: 1 with GPUs; else the "
                   "cluster's CPUs left after one decode task, shared by the actors)")
    g.add_argument("--cpus-per-task", type=float, default=0.5, help="ray: CPUs per decode/align task (default 0.5)")
    g.add_argument("--shard-size", type=int, default=64, help="ray: images per shard, the unit of retry and resume")
    g.add_argument("--ship-run", action="store_true", help="ray: send the run's weights through the object store "
                   "(small runs) instead of reading --run on every node")
    if output_format:
        g.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"],
                       help="ray: output JSON Lines (default) or a Parquet dataset folder")


class SuggestingParser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped sub-command, choice or option, as config keys have."""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += suggest(choice.group(1), re.findall(r"'?([\w-]+)'?", choice.group(2))).replace(";", ",", 1)
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            message += suggest(unknown.group(1).split("=")[0], self.option_names()).replace(";", ",", 1)
        super().error(message)

    def option_names(self) -> list[str]:
        """Every option string of this parser and of the sub-command chosen on the command line."""
        names = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and self.chosen in action.choices:
                names += list(action.choices[self.chosen]._option_string_actions)
        return names

    chosen: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="cervl", description="Compound Expression Recognition with large "
                              "Vision-Language models")
    parser.add_argument("--version", action="version", version=f"cervl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SuggestingParser)
    add = sub.add_parser

    p = add("synth", help="generate the SynthCE synthetic compound-expression dataset")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--per-class", type=int, default=100, help="samples per class and subset (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of each class named test_*")
    p.add_argument("--subsets", default="basic,compound", help="comma list of basic,compound")
    p.add_argument("--size", type=int, default=112, help="aligned crop size in pixels (default 112)")
    p.add_argument("--original-size", type=int, default=192, help="original image size in pixels (default 192)")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any value)")

    p = add("prepare", help="read a dataset in its real layout and write a manifest",
            description="Datasets: rafdb, affwild2, cexprdb, folder, csv. See README for layouts.")
    p.add_argument("dataset", help="rafdb | affwild2 | cexprdb | folder | csv")
    p.add_argument("root", type=Path, help="dataset root (for csv: the CSV file)")
    p.add_argument("-o", "--out", required=True, type=Path, help="manifest to write (.jsonl)")
    p.add_argument("--subset", help="rafdb: basic (default) | compound")
    p.add_argument("--variant", help="rafdb: aligned (default) | original")
    p.add_argument("--annotations", help="affwild2/cexprdb: annotation folder (relative to ROOT or absolute)")
    p.add_argument("--frames", help="affwild2: frame folder (default ROOT/cropped_aligned)")
    p.add_argument("--every", type=int, help="affwild2/cexprdb: keep every Nth frame (default 1)")
    p.add_argument("--label-set", help="folder/csv: label set (default: inferred from the labels)")
    p.add_argument("--split", help="split for datasets without one (train | val | test)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="move this fraction of train to val, deterministically (per video for video data)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples, summarise them and write the first "
                   "offenders to MANIFEST.bad.jsonl instead of stopping")
    p.add_argument("--no-check-images", dest="check_images", action="store_false",
                   help="do not open every image to check it decodes (faster on huge frame sets)")

    p = add("compose", help="make compound training faces from basic-labelled aligned faces (no compound labels)",
            description="Region mode joins the upper face of one emotion to the lower face of another at a feathered "
                        "seam (which goes above: from the AU prototypes); mixup blends two whole faces. Writes "
                        "OUT/images/, OUT/manifest.jsonl (provenance per record), OUT/compose.json, a sample sheet.")
    p.add_argument("manifest", type=Path, help="basic-labelled manifest of aligned crops (or records with landmarks)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (new, empty, or an earlier compose)")
    p.add_argument("--label-set", default="rafdb-compound", help="target compound label set (rafdb-compound, cexprdb)")
    p.add_argument("--mode", default="region", choices=["region", "mixup"])
    p.add_argument("--per-class", type=int, default=120, help="composed images per compound class (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", action="append", help="input split(s) to draw faces from (default: train)")
    p.add_argument("--feather", type=float, default=12.0, help="region: seam width in pixels of the 112-px crop")
    p.add_argument("--mix", default="0.4,0.6", help="mixup: range of the first face's weight, LOW,HIGH")
    p.add_argument("--size", type=int, default=112, help="output crop size (default 112)")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any value)")

    p = add("pseudo-label", help="label basic-labelled or unlabelled frames with a trained compound run",
            description="Keeps a frame as compound class C when C's components include its annotated basic emotion "
                        "(if any), p(C) >= --threshold, and C is the top class of the --window records before and "
                        "after it in its track (same video and face, by frame). Each kept record keeps its split. "
                        "Prints per-class counts and the coverage at several thresholds. RUN must be a compound run.")
    p.add_argument("--run", required=True, type=Path, help="a compound run (cervl train)")
    p.add_argument("--manifest", required=True, type=Path, help="the frames: basic-labelled (Aff-Wild2) or unlabelled")
    p.add_argument("--split", action="append", help="manifest split(s) (default: all; every record keeps its split)")
    p.add_argument("-o", "--out", required=True, type=Path, help="the pseudo-labelled manifest (.jsonl)")
    p.add_argument("--threshold", type=float, default=0.7, help="smallest p(C) kept (default 0.7)")
    p.add_argument("--window", type=int, default=2, help="records of the same track on each side that must agree "
                   "(default 2; 0: off)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--truth", type=Path, help="a manifest of the same images with true compound labels: report "
                   "precision too (for measuring, e.g. on SynthCE)")
    _ray_options(p)

    p = add("landmark-error", help="measure a face detector's landmark error on records with true landmarks",
            description="Writes OUT (JSON): the mean normalised error (NME, over the inter-ocular distance), the faces "
                        "missed, and every face's five offsets in the face's frame: the distribution that "
                        "augment.align_noise draws from.")
    p.add_argument("manifest", type=Path, help="a manifest whose records carry landmarks (e.g. SynthCE or RAF-DB "
                   "originals)")
    p.add_argument("-o", "--out", required=True, type=Path, help="errors file (.json)")
    p.add_argument("--split", action="append", help="manifest split(s) (default: all)")
    p.add_argument("--limit", type=int, default=0, help="first N records only")
    _face_options(p, video=False)

    p = add("align", help="detect faces and write 5-point aligned crops plus a manifest",
            description="INPUT is a folder of images or a manifest (known landmarks are used instead of "
                        "detection), a video file, or with --videos a folder of videos and frame folders "
                        "(OUT/frames/<video>/<frame:05d>.jpg, the Aff-Wild2 cropped_aligned layout).")
    p.add_argument("input", type=Path)
    p.add_argument("--videos", action="store_true", help="INPUT is a folder of videos and frame folders")
    p.add_argument("--every", type=int, default=1, help="videos: align every Nth frame (default 1)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (crops, manifest.jsonl, summary.json)")
    p.add_argument("--size", type=int, default=112, help="crop size (default 112, the 5-point template size)")
    _face_options(p)
    p.add_argument("--faces", default="largest", choices=["largest", "all"])
    p.add_argument("--fallback", default="skip", choices=["skip", "center"], help="when no face is found")
    p.add_argument("--label-set", default="basic-7", help="label set of the output records for folder input")
    p.add_argument("--split", default="test", help="split of the output records for folder input")
    p.add_argument("--batch-size", type=int, default=8)
    _ray_options(p)

    p = add("train", help="run a staged training recipe (YAML) and evaluate it", description="Re-running the same "
            "command resumes: finished stages are reused and an interrupted stage continues from its checkpoint.")
    p.add_argument("config", type=Path, help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.1.lr=5e-5 output_dir=runs/x")
    p.add_argument("--skip-bad", action="store_true", help="train without the images that fail the pre-flight check")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = add("predict", help="predict expressions with a trained run, or zero-shot with a base model")
    p.add_argument("inputs", nargs="*", type=Path, help="image files, folders of images, or videos")
    p.add_argument("--run", type=Path, help="run directory written by cervl train")
    _zero_shot_options(p)
    p.add_argument("--manifest", type=Path, help="predict the records of a manifest")
    p.add_argument("--split", action="append", help="manifest split(s) to predict (default: all)")
    p.add_argument("--mode", default="score", choices=["score", "generate"])
    p.add_argument("--normalize", default="sum", choices=["sum", "mean"],
                   help="score mode: sum (default) or mean log-likelihood over the answer tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--align", action="store_true", help="detect and align faces in photos before predicting")
    p.add_argument("--compound-from-basic", nargs="?", const="rafdb-compound", metavar="LABEL_SET",
                   help="a basic-emotion run answers in a compound label set (default rafdb-compound): "
                        "P(A and B) proportional to p_A * p_B, renormalised (the pair-wise baseline)")
    _face_options(p)
    p.add_argument("--frames-as-video", action="store_true", help="treat each input folder as one video's frames")
    p.add_argument("--every", type=int, default=1, help="videos: predict every Nth frame")
    p.add_argument("--smoothing", default="gaussian", choices=["none", "moving", "gaussian"])
    p.add_argument("--window", type=int, default=5, help="moving-average window (frames)")
    p.add_argument("--sigma", type=float, default=1.5, help="Gaussian smoothing sigma (frames)")
    p.add_argument("--plot", action="store_true", help="videos: write <out>.<video>.png of probabilities over time")
    p.add_argument("-o", "--out", required=True, type=Path, help="predictions JSONL")
    _ray_options(p, output_format=True)

    p = add("explain", help="saliency maps: where on the face each class's probability comes from",
            description="Per image: OUT/<id>.png (the face, then its classes' maps) and OUT/<id>.npz. With a labelled "
                        "--manifest also the mean map per true class, the most-confused pairs' difference maps and "
                        "OUT/where_it_looks.html (embed it with cervl eval --explain OUT).")
    p.add_argument("inputs", nargs="*", type=Path, help="image files, folders of images, or videos")
    p.add_argument("--run", type=Path, help="run directory written by cervl train")
    _zero_shot_options(p)
    p.add_argument("--manifest", type=Path, help="explain the records of a manifest")
    p.add_argument("--split", action="append", help="manifest split(s) (default: all)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--method", default="occlusion", help="occlusion (exact, default) or gradient (cheap)")
    p.add_argument("--classes", nargs="+", default=["top2"], metavar="CLASS",
                   help="top2 (default), all, or class names to explain")
    p.add_argument("--patch", type=int, help="occlusion patch side in pixels (default 24 on a 112-px crop, scaled)")
    p.add_argument("--stride", type=int, help="occlusion stride in pixels (default 8 on a 112-px crop, scaled)")
    p.add_argument("--batch-size", type=int, default=64, help="occluded images per model call")
    p.add_argument("--align", action="store_true", help="detect and align faces in photos first")
    p.add_argument("--every", type=int, default=1, help="videos: explain every Nth frame")
    p.add_argument("--au-check", action="store_true", help="SynthCE only: score the maps against the generator's "
                   "action-unit regions (pointing game, energy ratio)")
    _face_options(p)

    p = add("abaw", help="ABAW compound-expression submission file for a folder of C-EXPR-DB videos",
            description="ROOT holds the test videos or one folder of frames per video. Every frame gets a line "
                        "<video>/<frame:05d>.jpg,<0-6> (1-based frames).")
    p.add_argument("root", type=Path)
    p.add_argument("--run", required=True, type=Path, help="a run trained with label set cexprdb (or a superset)")
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument("--every", type=int, default=1, help="score every Nth frame; others take the nearest score")
    p.add_argument("--smoothing", default="gaussian", choices=["none", "moving", "gaussian"])
    _face_options(p)
    _ray_options(p)

    p = add("eval", help="metrics, plots and an HTML report from a predictions JSONL")
    p.add_argument("predictions", type=Path)
    p.add_argument("-o", "--out", required=True, type=Path, help="report folder")
    p.add_argument("--label-set", help="default: from PREDICTIONS.meta.json")
    p.add_argument("--title", default=None)
    p.add_argument("--explain", type=Path, metavar="DIR", help="add the 'Where the model looks' section of a "
                   "cervl explain --manifest folder")

    p = add("compare", help="compare two or more eval reports side by side (per-class deltas)")
    p.add_argument("reports", nargs="+", type=Path, help="report folders written by cervl eval")
    p.add_argument("--names", help="comma-separated column names (default: folder names)")
    p.add_argument("-o", "--out", required=True, type=Path)

    p = add("ablate", help="run an ablation grid (YAML) and write one comparison table and plot")
    p.add_argument("grid", type=Path, help="ablation YAML, e.g. configs/ablation-quickstart.yaml")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = add("serve", help="serve a trained run (or, zero-shot, a base model) over HTTP: REST API, web page, metrics")
    p.add_argument("--run", type=Path, help="run directory written by cervl train")
    _zero_shot_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--align", action="store_true",
                   help="align faces by default (MTCNN + 5-point alignment of the largest face; align=false per request)")
    p.add_argument("--max-batch", type=int, default=32, help="images per model call (1 = no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--api-key-env", help="name of an environment variable holding the API key")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-body-mb", type=int, default=20, help="largest image request body (MB)")
    p.add_argument("--max-video-seconds", type=float, default=600.0, help="longest uploaded video")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request model timeout (s)")
    p.add_argument("--max-request-mp", type=float, default=80.0,
                   help="decoded megapixels per request, all its images together (checked on the headers)")
    p.add_argument("--max-inflight-mp", type=float, default=160.0, help="decoded megapixels held by all requests "
                   "at once; a request that does not fit waits up to 10 s, then gets 503")
    p.add_argument("--max-video-jobs", type=int, default=4, help="video jobs queued or running at once (then 429)")

    p = add("labels", help="list label sets, or show one as JSON")
    p.add_argument("name", nargs="?", help="a label set name (default: list them)")

    p = add("demo", help="run the embedded default end to end (SynthCE + tiny base, offline)",
            description="Generates SynthCE into runs/demo/, prepares manifests, then runs configs/quickstart.yaml "
                        "(two LoRA stages) and reports the test accuracy.")
    p.add_argument("--config", type=Path, default=REPO_CONFIGS / "quickstart.yaml")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--data-only", action="store_true", help="only generate and prepare the data")
    p.add_argument("--rebuild-base", action="store_true", help="first rebuild the tiny base with pretrain-tiny "
                   "into runs/pretrain-tiny/tiny-base (~12 min) and train from it")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the recipe")

    p = add("pretrain-tiny", help="rebuild the tiny pretrained base (AU-caption pretraining)",
            description="Generates a separate SynthCE (seed 1000), warms up the vision tower on AU intensities, "
                        "then fine-tunes tiny-qwen2-vl on AU captions (configs/pretrain-tiny.yaml). Writes to --out, "
                        "which must be new, empty, or a tiny base written by this command.")
    p.add_argument("--config", type=Path, default=REPO_CONFIGS / "pretrain-tiny.yaml")
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("runs/pretrain-tiny/tiny-base"),
                   help="output folder (default runs/pretrain-tiny/tiny-base; the package's own copy is "
                        "src/cervl/assets/tiny-base)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=400, help="vision warm-up steps (phase 1)")
    p.add_argument("overrides", nargs="*")
    return parser
