"""A small spoken-digits set synthesised with espeak-ng, for speech demos and tests.

No speech data set or checkpoint can be downloaded here, so tunelab makes one: the words
"zero" .. "nine" spoken by several espeak-ng accents and voice variants at a few speeds and
pitches, one folder per digit (the audio-folder layout). Synthetic speech is far easier than
real recordings; it shows that the speech path works end to end, not what accuracy a real
model reaches on real speech.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import subprocess
from pathlib import Path

from tunelab.data.audio import load_audio_folder
from tunelab.data.folders import MAX_ENTRIES
from tunelab.data.table import Table
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m3", "f2", "f4"]
SPEEDS = [140, 190]  # words per minute
PITCHES = [35, 65]  # 0-99


def synthesize(root: str | Path, accents=ACCENTS, variants=VARIANTS, speeds=SPEEDS, pitches=PITCHES,
               progress: bool = True) -> int:
    """Write ``root/<d>_<digit>/<accent>_<variant>_s<speed>_p<pitch>.wav``; returns the file count."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise TunelabError("espeak-ng is not installed: `sudo apt-get install espeak-ng` "
                           "(scripts/setup.sh does this when run as root).")
    root = Path(root)
    combos = list(itertools.product(range(len(DIGITS)), accents, variants, speeds, pitches))
    for n, (d, accent, variant, speed, pitch) in enumerate(combos, 1):
        digit = DIGITS[d]
        out = root / f"{d}_{digit}" / f"{accent}_{variant}_s{speed}_p{pitch}.wav"  # folders sort 0..9
        if out.is_file():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.wav")  # never leave a half-written clip behind
        cmd = [espeak, "-v", f"{accent}+{variant}", "-s", str(speed), "-p", str(pitch), "-w", str(tmp), digit]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not tmp.is_file():
            raise TunelabError(f"espeak-ng failed for {digit!r} ({accent}+{variant}): {result.stderr.strip()}")
        tmp.rename(out)
        if progress and (n % 200 == 0 or n == len(combos)):
            log.info("spoken digits: %d/%d clips in %s", n, len(combos), root)
    return len(combos)


def load_spoken_digits(root: str, synthesize_missing: bool = True, max_entries: int = MAX_ENTRIES) -> Table:
    """The spoken-digits folder at ``root``, synthesised first when it is missing."""
    base = Path(root).expanduser()
    if not any(base.glob("*/*.wav")):
        if not synthesize_missing:
            raise TunelabError(f"no spoken digits at {base}; run `python scripts/make_spoken_digits.py --out {base}`.")
        log.info("spoken digits: synthesising the set into %s with espeak-ng (once, ~15 s)", base)
        synthesize(base)
    return load_audio_folder(str(base), max_entries=max_entries)
