"""Values a config read from the environment are never written: not in MLflow, files or logs.

A config may say ``run_name: ${oc.env:MY_API_KEY}`` (by mistake, or written by someone else to
fish credentials out of whoever runs it). The environment holds secrets; a run's records are
shared. So every value an ``${oc.env:...}`` interpolation reads (also nested:
``${abspath:${oc.env:X}}``, ``"a-${oc.env:X}-b"``, ``${oc.decode:${oc.env:X}}``, or in Hydra's
own settings) is withheld from whatever tunelab writes: run name, params, tags, experiment
name, ``config.yaml`` / ``resolved_config.yaml``, model names, console and log file. It shows
as ``<env.NAME>``.

The environment decides what may be written, never a config file: ``TUNELAB_SAFE_ENV=USER,HOSTNAME``
lets the named variables through; tunelab's own ``TUNELAB_HOME`` / ``TUNELAB_CONF`` /
``TUNELAB_PARENT_RUN_ID`` (where outputs go, a run id) always pass.

Short values cannot be told apart from the text around them (``${oc.env:DEBUG}`` = ``1`` would
blank every digit), so values under MIN_LENGTH characters are replaced only where they are a
whole value (a param, a tag, the run name, a config entry); longer ones wherever they appear.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import quote

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import Container, DictConfig, ListConfig, OmegaConf

log = logging.getLogger("tunelab")

ALWAYS_SAFE = ("TUNELAB_HOME", "TUNELAB_CONF", "TUNELAB_PARENT_RUN_ID")  # locations and a run id, never secrets
MIN_LENGTH = 6  # replaced inside longer text from this length on (a 6-hex-digit chance match: ~1e-6)


def safe_names() -> set[str]:
    """Variables whose values may be written: tunelab's own and those TUNELAB_SAFE_ENV names.
    A config cannot extend the list by setting TUNELAB_SAFE_ENV through ``hydra.job.env_set``."""
    listed = os.environ.get("TUNELAB_SAFE_ENV", "")
    if "TUNELAB_SAFE_ENV" in _hydra_env_set():
        listed = ""
    return {*ALWAYS_SAFE, *(name.strip() for name in listed.split(",") if name.strip())}


def _hydra_env_set() -> set[str]:
    """The variables the running Hydra job set from its config (``hydra.job.env_set``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return set(map(str, (OmegaConf.select(HydraConfig.get(), "job.env_set") or {}).keys()))


def env_reads(cfg: DictConfig) -> dict[str, str]:
    """Every environment variable ``cfg`` (and the running Hydra app's own settings, bar its
    launcher's, which hand the environment to trials and are never written) reads, with its
    value. Found by resolving each value with ``oc.env`` recording what it returns, so any
    nesting of interpolations and resolvers is seen."""
    from hydra.core.hydra_config import HydraConfig

    reads: dict[str, str] = {}
    with _recording_env(reads):
        _resolve_each(cfg)
        if HydraConfig.initialized():
            _resolve_each(HydraConfig.get(), skip=("launcher",))
    return reads


@contextmanager
def _recording_env(reads: dict[str, str]) -> Iterator[None]:
    from omegaconf.basecontainer import BaseContainer
    from omegaconf.resolvers import oc

    def env(key: str, *default: Any) -> Any:
        value = oc.env(key, *default)
        if key in os.environ:  # a default given in the config is no secret
            reads[key] = os.environ[key]
        return value

    original = BaseContainer._resolvers.get("oc.env")
    OmegaConf.register_new_resolver("oc.env", env, replace=True)
    try:
        yield
    finally:
        BaseContainer._resolvers["oc.env"] = original


def _resolve_each(node: Container, skip: tuple[str, ...] = ()) -> None:
    """Resolve every value on its own: one broken interpolation hides no other value's reads."""
    keys = [k for k in node.keys() if k not in skip] if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        try:
            child = node._get_node(key)
            plain_container = isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation()
            if plain_container and not child._is_none():
                _resolve_each(child)
                continue
            value = node[key]  # resolves an interpolation
            if isinstance(value, (DictConfig, ListConfig)):
                OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - a broken value is the config checks' to report, not ours
            continue


class Redactor:
    """Replaces withheld values (``{value: variable name}``) in text, values and trees."""

    def __init__(self, withheld: dict[str, str] | None = None):
        self.withheld: dict[str, str] = {}
        self.add(withheld or {})

    def add(self, withheld: dict[str, str]) -> None:
        for value, name in withheld.items():
            # the spellings the value takes in URLs and JSON too
            for spelling in {value, quote(value, safe=""), json.dumps(value)[1:-1]}:
                self.withheld.setdefault(spelling, name)
        long = sorted((v for v in self.withheld if len(v) >= MIN_LENGTH), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, long))) if long else None

    def text(self, text: str) -> str:
        """``text`` with every withheld value of MIN_LENGTH characters or more replaced."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(lambda m: marker(self.withheld[m.group()]), text)

    def value(self, value: Any) -> Any:
        """A whole value (param, tag, name, config entry): replaced when it IS a withheld value,
        of any length; else its text redacted. Non-strings pass unless they print as a secret."""
        if value is None or not self.withheld:
            return value
        shown = str(value)
        if shown in self.withheld:
            return marker(self.withheld[shown])
        return self.text(value) if isinstance(value, str) else value

    def tree(self, node: Any) -> Any:
        """Plain containers (a resolved config, model_meta) with every key and value redacted."""
        if isinstance(node, dict):
            return {self.text(k) if isinstance(k, str) else k: self.tree(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [self.tree(v) for v in node]
        return self.value(node)


def marker(name: str) -> str:
    """What a withheld value shows as: the variable's name, no ``:`` or ``/`` (MLflow refuses
    them in model names), no ``*`` or ``$`` (a YAML alias, an interpolation when reloaded)."""
    return f"<env.{name}>"


_active = Redactor()  # what this process has read from the environment for its runs


def withheld_values(cfg: DictConfig) -> dict[str, str]:
    """``{value: variable}`` of what ``cfg`` reads from the environment and may not write: not
    safe, not empty (an empty value would match everywhere and hides nothing)."""
    safe = safe_names()
    return {value: name for name, value in env_reads(cfg).items() if name not in safe and value}


def protect(cfg: DictConfig) -> Redactor:
    """Withhold, from here on in this process, the values ``cfg`` reads from the environment
    (bar the safe ones) from all of tunelab's records, and from the log handlers' lines."""
    withheld = withheld_values(cfg)
    new = sorted({name for value, name in withheld.items() if value not in _active.withheld})
    _active.add(withheld)
    _filter_log_handlers()
    if new:
        log.info("not writing the values of %s (read by ${oc.env:...}) into this run's records; they show as "
                 "<env.NAME>. Mark variables that are no secret with TUNELAB_SAFE_ENV=NAME,...", ", ".join(new))
    return _active


def redact(text: str) -> str:
    return _active.text(text)


def redact_value(value: Any) -> Any:
    return _active.value(value)


def redacted_yaml(cfg: DictConfig) -> str:
    """``cfg`` resolved, as YAML, without the withheld values (redacted entry by entry, so a
    long value folded over two lines by the YAML writer is still caught)."""
    return OmegaConf.to_yaml(OmegaConf.create(_active.tree(OmegaConf.to_container(cfg, resolve=True))))


class RedactFilter(logging.Filter):
    """On a log handler: the line it writes, message and traceback, without withheld values."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact(message)
        if shown != message:
            record.msg, record.args = shown, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def _filter_log_handlers() -> None:
    """Every handler the root, tunelab, Lightning and Hydra loggers have now (Hydra set up the
    console and the job's .log file before any tunelab code ran)."""
    for name in (None, "tunelab", "lightning", "lightning.pytorch", "hydra"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactFilter) for f in handler.filters):
                handler.addFilter(RedactFilter())


class RedactingClient(MlflowClient):
    """An MlflowClient that sends no withheld value: run names, params, tags and text artifacts
    pass the process's Redactor on their way out, whichever code path writes them."""

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        tags = {k: redact_value(str(v)) for k, v in (tags or {}).items()}
        return super().create_run(experiment_id, start_time, tags, redact_value(run_name))

    def update_run(self, run_id, status=None, name=None):
        return super().update_run(run_id, status, redact_value(name))

    def set_tag(self, run_id, key, value, synchronous=None):
        return super().set_tag(run_id, key, redact_value(str(value)), synchronous)

    def log_param(self, run_id, key, value, synchronous=None):
        return super().log_param(run_id, key, redact_value(str(value)), synchronous)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        params = [Param(p.key, redact_value(p.value)) for p in params]
        tags = [RunTag(t.key, redact_value(t.value)) for t in tags]
        return super().log_batch(run_id, metrics, params, tags, synchronous)

    def log_text(self, run_id, text, artifact_file):
        return super().log_text(run_id, redact(text), artifact_file)

    def log_dict(self, run_id, dictionary, artifact_file):
        return super().log_dict(run_id, _active.tree(dictionary), artifact_file)
