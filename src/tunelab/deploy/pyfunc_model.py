"""The MLflow pyfunc flavour of a fine-tuned tunelab model ("models from code": no pickle).

MLflow copies this file beside the model and runs it on load; ``load_context`` rebuilds the
adapter from the run's resolved config (judged like any stored config: trained.judged) and loads
the checkpoint with ``weights_only=True``.
Input: a DataFrame with one column of raw inputs, preprocessed exactly as the test split was:
``image`` (base64-encoded image bytes, or file paths), ``text`` (strings) or ``audio`` (float
waveforms at the model's sampling rate, or file paths). Output: a DataFrame with the predicted
``label`` and one ``prob_<class>`` column per class, or ``prediction`` for regression. So
``mlflow models serve -m models:/NAME/VERSION`` answers JSON posts of raw images or texts.
"""

from __future__ import annotations

import warnings

import mlflow.pyfunc
import pandas as pd


# Inputs are arrays or strings by modality, so predict() has no single type hint to give;
# the signature logged with the model checks inputs instead.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method.*")


class TunelabModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from tunelab.engine.trained import Predictor, from_artifacts, load_adapter

        # the config inside the checkpoint (or, registered before checkpoints carried it, the
        # config artifact), held to the allow-list before anything is built from it
        trained = from_artifacts(context.artifacts)
        self.meta = trained.meta
        self.adapter = load_adapter(trained)
        self.predictor = Predictor(self.adapter, self.meta["task"]).eval()

    def _inputs(self, data):
        from tunelab.data.preprocess import Preprocessor

        if not hasattr(self, "preprocess"):
            config = self.adapter.data_config
            self.preprocess = Preprocessor(self.meta["preprocess"], config.get("tokenizer") or config.get("feature_extractor"))
        column = self.meta["preprocess"]["modality"]
        if isinstance(data, pd.DataFrame):
            items = list(data[column] if column in data.columns else data.iloc[:, 0])
        else:
            items = list(data)
        return self.preprocess(items)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        with torch.no_grad():
            out = self.predictor(self._inputs(model_input))
        if self.meta["task"] == "regression":
            return pd.DataFrame({"prediction": out.numpy()})
        probs = torch.softmax(out.float(), dim=-1).numpy()
        classes = self.meta["classes"]
        frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
        frame.insert(0, "label", [classes[i] for i in probs.argmax(axis=1)])
        return frame


mlflow.models.set_model(TunelabModel())
