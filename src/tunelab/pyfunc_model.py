"""The MLflow pyfunc flavour of a fine-tuned tunelab model ("models from code": no pickle).

MLflow copies this file beside the model and runs it on load; ``load_context`` rebuilds the
adapter from the run's resolved config and loads the checkpoint with ``weights_only=True``.
Inputs: image batches as float arrays (N, C, H, W) normalised like training; texts as a list
of strings or a DataFrame column ``text``; audio as float arrays (N, samples) at the model's
sampling rate. Output: a DataFrame with the predicted ``label`` and one ``prob_<class>``
column per class, or ``prediction`` for regression.
"""

from __future__ import annotations

import json
import warnings

import mlflow.pyfunc
import numpy as np
import pandas as pd


# Inputs are arrays or strings by modality, so predict() has no single type hint to give;
# the signature logged with the model checks inputs instead.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method.*")


class TunelabModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pathlib import Path

        from omegaconf import OmegaConf

        from tunelab.trained import Trained, load_adapter

        with open(context.artifacts["meta"]) as f:
            self.meta = json.load(f)
        trained = Trained(OmegaConf.load(context.artifacts["config"]), self.meta, Path(context.artifacts["checkpoint"]))
        self.adapter = load_adapter(trained)
        self.mean, self.std = self.adapter.target_stats

    def _inputs(self, data):
        import torch

        modality, config = self.meta["modality"], self.adapter.data_config
        if modality == "text":
            texts = list(data["text"]) if isinstance(data, pd.DataFrame) else [str(t) for t in data]
            return dict(config["tokenizer"](texts, padding=True, truncation=True, return_tensors="pt",
                                            max_length=config.get("max_positions")))
        array = data.to_numpy() if isinstance(data, pd.DataFrame) else np.asarray(data)
        tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)
        if modality == "audio":
            extractor = config["feature_extractor"]
            return dict(extractor(list(tensor.numpy()), sampling_rate=config["sampling_rate"], return_tensors="pt"))
        return tensor

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        with torch.no_grad():
            out = self.adapter.model(self._inputs(model_input))
        if self.meta["task"] == "regression":
            return pd.DataFrame({"prediction": (out.squeeze(-1) * self.std + self.mean).numpy()})
        probs = torch.softmax(out.float(), dim=-1).numpy()
        classes = self.meta["classes"]
        frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
        frame.insert(0, "label", [classes[i] for i in probs.argmax(axis=1)])
        return frame


mlflow.models.set_model(TunelabModel())
