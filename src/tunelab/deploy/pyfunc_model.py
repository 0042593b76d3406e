"""The MLflow pyfunc flavour of a fine-tuned tunelab model ("models from code": no pickle).

MLflow copies this file beside the model and runs it on load; ``load_context`` rebuilds the
adapter from the run's resolved config (judged like any stored config: trained.judged) and loads
the checkpoint with ``weights_only=True``.
Input: a DataFrame with one column of raw inputs, preprocessed exactly as the test split was:
``image`` (base64-encoded image bytes, or file paths), ``text`` (strings; a model trained on
text pairs also reads ``text_pair``) or ``audio`` (float waveforms at the model's sampling rate,
or file paths). Output: a DataFrame with the predicted ``label`` and one ``prob_<class>`` column per class, or ``prediction`` for regression
(multi-label: ``labels``, the names above the threshold joined by ``|``, and ``prob_<label>`` sigmoid probabilities). So
``mlflow models serve -m models:/NAME/VERSION`` answers JSON posts of raw images or texts.
"""

from __future__ import annotations

import warnings

import mlflow.pyfunc
import pandas as pd

from tunelab.data.modalities import PAIR_COLUMN, modality_of
from tunelab.data.preprocess import Preprocessor
from tunelab.deploy.exported import label_sets
from tunelab.engine.trained import Predictor, from_artifacts, load_adapter

# Inputs are arrays or strings by modality, so predict() has no single type hint to give;
# the signature logged with the model checks inputs instead.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method.*")


class TunelabModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        # the config inside the checkpoint (or, registered before checkpoints carried it, the
        # config artifact), held to the allow-list before anything is built from it
        trained = from_artifacts(context.artifacts)
        self.meta = trained.meta
        self.adapter = load_adapter(trained)
        self.predictor = Predictor(self.adapter, self.meta["task"]).eval()

    def _inputs(self, data):
        kind = modality_of(self.meta)
        if not hasattr(self, "preprocess"):
            self.preprocess = Preprocessor(self.meta["preprocess"], kind.processor(self.adapter.data_config))
        column = kind.name
        if not isinstance(data, pd.DataFrame):
            return self.preprocess(list(data))
        items = list(data[column] if column in data.columns else data.iloc[:, 0])
        if self.meta["preprocess"].get("pairs"):  # a model trained on text pairs: columns text and text_pair
            items = list(zip(items, data[PAIR_COLUMN] if PAIR_COLUMN in data.columns else data.iloc[:, 1]))
        return self.preprocess(items)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        with torch.no_grad():
            out = self.predictor(self._inputs(model_input))
        if self.meta["task"] == "regression":
            return pd.DataFrame({"prediction": out.numpy()})
        classes = self.meta["classes"]
        if self.meta["task"] == "multilabel":
            return label_sets(torch.sigmoid(out.float()).numpy(), classes, self.meta["threshold"])
        probs = torch.softmax(out.float(), dim=-1).numpy()
        frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
        frame.insert(0, "label", [classes[i] for i in probs.argmax(axis=1)])
        return frame


mlflow.models.set_model(TunelabModel())
