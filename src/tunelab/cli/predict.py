"""``tunelab-predict``: label a folder or a CSV of new inputs with an exported model.

    tunelab-predict exported/digits new_images/ --out predictions.csv
    tunelab-predict exported/reviews reviews.csv --column review
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tunelab.errors import TunelabError

SUFFIXES = {"image": {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"},
            "audio": {".wav", ".flac", ".ogg", ".mp3"}}


class Exported:
    """An export folder: its runtime session, labels and preprocessing."""

    def __init__(self, folder: Path, runtime: str = "auto"):
        from tunelab.data.preprocess import Preprocessor

        self.folder = Path(folder)
        meta_path = self.folder / "tunelab_export.json"
        if not meta_path.is_file():
            raise TunelabError(f"{self.folder} is not a tunelab export (no tunelab_export.json); make one with tunelab-export.")
        self.meta = json.loads(meta_path.read_text())
        settings = self.meta["preprocess"]
        processor = None
        if settings["modality"] != "image":
            from transformers import AutoFeatureExtractor, AutoTokenizer

            loader = AutoTokenizer if settings["modality"] == "text" else AutoFeatureExtractor
            try:  # False, not transformers' default: that asks at a terminal whether to run the folder's code
                processor = loader.from_pretrained(self.folder / "preprocess", trust_remote_code=False)
            except ValueError as err:  # an auto_map naming Python in the folder, or no processor at all
                raise TunelabError(f"cannot read the preprocessing in {self.folder / 'preprocess'} "
                                   f"({' '.join(str(err).split())[:300]}); tunelab never runs code shipped "
                                   "with a model (trust_remote_code).") from None
        self.preprocess = Preprocessor(settings, processor)
        onnx, ts = self.folder / "model.onnx", self.folder / "model.ts"
        if runtime == "auto":
            runtime = "onnx" if onnx.is_file() else "torchscript"
        if runtime == "onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        else:
            import warnings

            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                self.module = torch.jit.load(str(ts)).eval()
        self.runtime = runtime

    def scores(self, items: list) -> np.ndarray:
        inputs = self.preprocess(items)
        tensors = [inputs] if not isinstance(inputs, dict) else [inputs[name] for name in self.meta["inputs"]]
        if self.runtime == "onnx":
            feed = {name: t.numpy() for name, t in zip(self.meta["inputs"], tensors)}
            return self.session.run(None, feed)[0]
        import torch

        with torch.no_grad():
            return self.module(*tensors).numpy()

    def label(self, items: list) -> pd.DataFrame:
        out = self.scores(items)
        if self.meta["task"] == "regression":
            return pd.DataFrame({"prediction": out.reshape(-1)})
        logits = out - out.max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        classes = self.meta["classes"]
        return pd.DataFrame({"label": [classes[i] for i in probs.argmax(axis=1)], "confidence": probs.max(axis=1)})


def read_inputs(source: Path, modality: str, column: str | None) -> list:
    if source.is_dir():
        if modality == "text":
            raise TunelabError("a text model labels a CSV with a text column, not a folder.")
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in SUFFIXES[modality])
        if not files:
            raise TunelabError(f"no {modality} files ({', '.join(sorted(SUFFIXES[modality]))}) under {source}.")
        return [str(p) for p in files]
    from tunelab.data.table import read_frame

    if not source.is_file():
        raise TunelabError(f"{source} does not exist: pass a folder of files or a CSV.")
    column = column or ("text" if modality == "text" else "path")
    frame, _ = read_frame(str(source), {}, key="inputs")
    if column not in frame.columns:
        raise TunelabError(f"{source} has no column {column!r} (columns: {list(frame.columns)}); pass --column NAME.")
    values = frame[column].dropna().tolist()
    if modality != "text":  # paths relative to the CSV's folder, as the data configs read them
        values = [str(v) if Path(str(v)).is_absolute() else str(source.parent / str(v)) for v in values]
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="tunelab-predict", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("export", type=Path, help="a folder written by tunelab-export")
    parser.add_argument("inputs", type=Path, help="a folder of images / audio files, or a CSV (column path or text)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default predictions.csv)")
    parser.add_argument("--column", default=None, help="the CSV column with the inputs (default: text or path)")
    parser.add_argument("--runtime", choices=("auto", "onnx", "torchscript"), default="auto",
                        help="auto: ONNX Runtime when model.onnx exists, else TorchScript")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from tunelab.umask import set_for_cli

    set_for_cli("tunelab-predict")  # private files (tunelab/umask.py)
    args = parse_args(argv)
    try:
        model = Exported(args.export, args.runtime)
        items = read_inputs(args.inputs, model.meta["preprocess"]["modality"], args.column)
        frames = [model.label(items[i: i + args.batch_size])
                  for i in tqdm(range(0, len(items), args.batch_size), desc="labelling", unit="batch",
                                disable=not sys.stderr.isatty())]
    except TunelabError as err:
        print(f"tunelab-predict: error: {err}", file=sys.stderr)
        sys.exit(2)
    result = pd.concat(frames, ignore_index=True)
    result.insert(0, "input", items)
    result.to_csv(args.out, index=False)
    summary = result["label"].value_counts().head(5).to_dict() if "label" in result else {}
    print(f"labelled {len(result)} inputs with {model.runtime} -> {args.out}" + (f"  (most frequent: {summary})" if summary else ""))


if __name__ == "__main__":
    main()
