"""What ``cervl`` prints on Ctrl-C: one line saying what an interrupted command kept and how to go on."""

from __future__ import annotations


def kept_after_interrupt(args) -> str:
    """What an interrupted command leaves behind, and how to carry on."""
    out = getattr(args, "out", None)
    if args.command in ("train", "demo"):
        return ("finished stages and the last checkpoint of the running stage are kept; run the same command "
                "again to resume")
    if getattr(args, "engine", "local") == "ray" and args.command in ("predict", "abaw"):
        return (f"finished shards are kept ({out}.parts, or {out}/ for Parquet); run the same command again to "
                f"resume from them")
    if args.command == "synth":
        return f"{out} is incomplete; run the command again (it rewrites the files it wrote)"
    if args.command in ("predict", "abaw", "eval", "compare", "prepare"):
        return f"nothing was written to {out} (it is written when the command ends); run the command again"
    if args.command == "align":
        return f"{out} is incomplete; run the command again to write it anew"
    return "nothing to resume"
