"""Synthesise the spoken-digits demo set with espeak-ng (Debian package espeak-ng).

    .venv/bin/python scripts/make_spoken_digits.py                  # into ./data/spoken_digits
    .venv/bin/python scripts/make_spoken_digits.py --out /data/digits --accents en-us en-gb

"zero".."nine" x accents x voice variants x speeds x pitches, one folder per digit
(``0_zero/`` ...), 22.05 kHz WAV. ``data=spoken_digits`` does this itself on first use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tunelab.data.spoken_digits import ACCENTS, PITCHES, SPEEDS, VARIANTS, synthesize
from tunelab.errors import TunelabError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/spoken_digits"), help="output folder")
    parser.add_argument("--accents", nargs="+", default=ACCENTS, help="espeak-ng voices (espeak-ng --voices=en)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="voice variants (m1..m7, f1..f5)")
    parser.add_argument("--speeds", nargs="+", type=int, default=SPEEDS, help="words per minute")
    parser.add_argument("--pitches", nargs="+", type=int, default=PITCHES, help="0-99")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        count = synthesize(args.out, args.accents, args.variants, args.speeds, args.pitches)
    except TunelabError as err:
        print(f"make_spoken_digits: error: {err}", file=sys.stderr)
        return 2
    print(f"{count} clips in {args.out} (use: tunelab-train model=wav2vec2_tiny data=spoken_digits "
          f"data.source.root={args.out.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
