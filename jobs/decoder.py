"""Train a run's answer writer: a causal language model that writes the answer whose embedding
it is given (cube/decoder). The cube predicts an answer embedding; this turns it into text.

    cube decoder --run runs/demo                       # SmolLM2, frozen; trains RUN/decoder
    cube decoder --run runs/demo --set epochs=5 --set decoder.prompt_tokens=16
    cube decoder --run runs/demo --resume              # continue an interrupted decoder run
    cube eval --run runs/demo --generate               # then: the generation table

It learns by reconstruction: each training answer is written from that answer's own embedding
(no cube involved), with DDP over Ray Train workers that stream the run's training split. On
this project's 2-core CPU machine an epoch over the shipped data with SmolLM2 takes minutes;
docs/generation.md has the figures. The run must be a local folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cube.data.storage import LOG
from cube.job_config import DecoderJobConfig
from jobs.common import add_config_flags, config_from_args, run_main, setup_logging
from jobs.decoder_trainer import train_decoder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube decoder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="a run folder written by `cube train`")
    p.add_argument("--resume", action="store_true", help="continue RUN/decoder from its last checkpoint")
    add_config_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_exists = (Path(args.run) / "config.yaml").is_file()  # no log file left in a folder that is not a run
    setup_logging(args.verbose, Path(args.run) / "decoder" / LOG if run_exists else None)
    if "://" in args.run:
        parser.error("--run must be a local run folder: copy the run here first (cube decoder writes RUN/decoder "
                     "beside its checkpoints)")
    if args.resume and (args.config or args.overrides):
        parser.error("--resume takes only the run: the decoder's config is already in RUN/decoder/config.yaml")
    best = train_decoder(args.run, None if args.resume else config_from_args(DecoderJobConfig, args), args.resume)
    print(f"decoder: epoch {best['epoch']} kept, validation loss {best['val_loss']:.3f} → {args.run}/decoder/model")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
