"""Issue 19 item 9: a value a config reads from the environment (``${oc.env:...}``) is written
nowhere a run writes: MLflow store, artifacts, output folder, registered model, console.

The attack: a config (command line, experiment file) puts ``${oc.env:MY_API_KEY}`` into the run
name, a tag, a param, the experiment name and the registered model's name. The check: every byte
the run wrote is searched for the secret, raw and encoded. The positive control: the same run
with MY_API_KEY marked safe (TUNELAB_SAFE_ENV) has the secret in all those places, so the
search looks where the secret would be.
"""

from __future__ import annotations

import base64
import logging
import secrets
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from helpers.runs import mlflow_runs, train_cli

from tunelab.config.redaction import MIN_LENGTH, RedactFilter, Redactor, env_reads, marker, safe_names, withheld_values

# An experiment file in the user's own config folder: each spelling of an environment read.
LEAKY_EXPERIMENT = """# @package _global_
logger:
  experiment_name: ${oc.decode:${oc.env:MY_API_KEY}}
  register_best: ${oc.env:MY_API_KEY}
  tags:
    owner: team-${oc.env:MY_API_KEY}-x
    short: ${oc.env:SHORT_VALUE}
"""


def encodings(secret: str) -> dict[str, bytes]:
    """The secret as bytes a writer might have stored it: raw, URL-quoted, base64 at any offset."""
    forms = {"raw": secret.encode(), "url": quote(secret, safe="").encode()}
    for offset in range(3):  # base64 of a longer text holds the secret's at one of 3 alignments
        encoded = base64.b64encode(b"\0" * offset + secret.encode())[4 if offset else 0:-4]
        forms[f"base64+{offset}"] = encoded
    return forms


def train_with_secret(home: Path, secret: str, safe: str = "") -> SimpleNamespace:
    """One tiny tunelab-train whose config reads MY_API_KEY from the command line and from an
    experiment file in a hydra.searchpath folder."""
    user_conf = home / "my_conf"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "leaky.yaml").write_text(LEAKY_EXPERIMENT)
    env = {"MY_API_KEY": secret, "SHORT_VALUE": "ab", "TUNELAB_SAFE_ENV": safe}
    proc = train_cli(home, f"hydra.searchpath=[file://{user_conf}]", "experiment=leaky",
                     "run_name=${oc.env:MY_API_KEY}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(home)
    client = MlflowClient(f"sqlite:///{home / 'outputs' / 'mlflow.db'}")
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(home.parent / f"{home.name}-dl")))
    (folder,) = (home / "outputs" / "runs").iterdir()
    models = client.search_registered_models()
    return SimpleNamespace(proc=proc, run=run, config=config, folder=folder, models=[m.name for m in models])


def where_found(run: SimpleNamespace, home: Path, secret: str) -> list[str]:
    """Every place the secret is, in any encoding: the files under ``home`` (store, artifacts,
    output folder, registered model), the run's records and the console."""
    records = {"stdout": run.proc.stdout, "stderr": run.proc.stderr, "run name": run.run.info.run_name,
               "params": repr(run.run.data.params), "tags": repr(run.run.data.tags),
               "registered models": repr(run.models)}
    written = {name: text.encode() for name, text in records.items()}
    written.update({p.relative_to(home).as_posix(): p.read_bytes() for p in home.rglob("*") if p.is_file()})
    return [f"{name} ({form})" for form, needle in encodings(secret).items()
            for name, content in written.items() if needle in content]


@pytest.mark.slow
def test_values_read_from_the_environment_are_written_nowhere(tmp_path):
    secret = f"sk-{secrets.token_hex(12)}"
    home = tmp_path / "home"
    run = train_with_secret(home, secret)
    shown = marker("MY_API_KEY")
    # where the secret would have gone, the variable's marker is
    assert run.run.info.run_name == shown and run.run.data.params["run_name"] == shown
    assert run.run.data.tags["owner"] == f"team-{shown}-x" and run.models == [shown]
    assert run.run.data.tags["short"] == marker("SHORT_VALUE")  # a short value, replaced as a whole value
    saved = OmegaConf.load(run.folder / "resolved_config.yaml")  # still a config tunelab-eval can read
    assert saved.run_name == shown and OmegaConf.load(run.config).logger.register_best == shown
    assert f"registered: models:/{shown}/1" in run.proc.stdout
    # the console says what was withheld, and how to let a variable through
    assert "MY_API_KEY, SHORT_VALUE" in run.proc.stdout and "TUNELAB_SAFE_ENV" in run.proc.stdout
    files = {p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()}
    assert {"outputs/mlflow.db", f"outputs/runs/{run.folder.name}/resolved_config.yaml",
            f"outputs/runs/{run.folder.name}/train.log"} <= files  # the search below reads these
    assert any(name.startswith("outputs/mlartifacts/") and name.endswith("/config.yaml") for name in files)
    assert not where_found(run, home, secret)


@pytest.mark.slow
def test_the_search_finds_the_secret_when_it_is_marked_safe(tmp_path):
    """Positive control: TUNELAB_SAFE_ENV=MY_API_KEY lets the value through, and the search of
    the test above finds it in every kind of place it looks."""
    secret = f"sk-{secrets.token_hex(12)}"
    home = tmp_path / "home"
    run = train_with_secret(home, secret, safe="MY_API_KEY,SHORT_VALUE")
    found = where_found(run, home, secret)
    for place in ("run name", "params", "tags", "registered models", "stdout", "outputs/mlflow.db",
                  f"outputs/runs/{run.folder.name}/resolved_config.yaml"):
        assert f"{place} (raw)" in found, (place, found)
    assert any(f.startswith("outputs/mlartifacts/") and "config.yaml" in f for f in found), found
    assert run.run.data.tags["short"] == "ab"


def test_every_spelling_of_an_environment_read_is_found(monkeypatch):
    """Nested in resolvers, inside a string, decoded, inside a created node, in a list; a default
    is no read, and an unset variable without one hides none of the others."""
    monkeypatch.setenv("A_KEY", "value-a-123")
    monkeypatch.setenv("B_KEY", "value-b-456")
    monkeypatch.delenv("NOT_SET", raising=False)
    cfg = OmegaConf.create({
        "plain": "${oc.env:A_KEY}", "in_text": "x-${oc.env:B_KEY}-y", "nested": "${abspath:${oc.env:A_KEY}}",
        "decoded": "${oc.decode:${oc.env:A_KEY}}", "created": "${oc.create:{k: '${oc.env:B_KEY}'}}",
        "listed": ["${oc.env:A_KEY}"], "broken": "${oc.env:NOT_SET}", "defaulted": "${oc.env:NOT_SET,fallback}",
        "selected": "${oc.select:plain}", "deep": {"er": "${oc.env:B_KEY}"},
    })
    assert env_reads(cfg) == {"A_KEY": "value-a-123", "B_KEY": "value-b-456"}
    assert OmegaConf.select(cfg, "plain") == "value-a-123"  # the real oc.env is back


def test_safe_variables_are_the_environments_choice(monkeypatch):
    """tunelab's own path variables and TUNELAB_SAFE_ENV's names pass; empty values are never
    withheld (an empty string would match everywhere)."""
    for name, value in {"TUNELAB_HOME": "/home/me/runs", "MY_API_KEY": "sk-0123456789", "USER": "alice-1",
                        "EMPTY": ""}.items():
        monkeypatch.setenv(name, value)
    cfg = OmegaConf.create({k.lower(): f"${{oc.env:{k}}}" for k in ("TUNELAB_HOME", "MY_API_KEY", "USER", "EMPTY")})
    monkeypatch.delenv("TUNELAB_SAFE_ENV", raising=False)
    assert withheld_values(cfg) == {"sk-0123456789": "MY_API_KEY", "alice-1": "USER"}
    monkeypatch.setenv("TUNELAB_SAFE_ENV", " USER ,OTHER")
    assert withheld_values(cfg) == {"sk-0123456789": "MY_API_KEY"}


def test_a_config_cannot_mark_its_own_reads_safe(monkeypatch):
    """``hydra.job.env_set`` sets TUNELAB_SAFE_ENV before the job runs: then it is ignored."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.instance()
    previous = hydra.cfg
    monkeypatch.setenv("TUNELAB_SAFE_ENV", "MY_API_KEY")  # as Hydra's env_set would have set it
    try:
        hydra.cfg = OmegaConf.create({"hydra": {"job": {"env_set": {"TUNELAB_SAFE_ENV": "MY_API_KEY"}}}})
        assert "MY_API_KEY" not in safe_names()
    finally:
        hydra.cfg = previous
    assert "MY_API_KEY" in safe_names()


def test_short_values_are_replaced_only_where_they_are_a_whole_value():
    """A value shorter than MIN_LENGTH would blank every word that contains it: it is replaced
    where a param, tag, name or config entry equals it; longer values wherever they appear, in
    their URL and JSON spellings too."""
    long = "p@ss/wörd-9"
    redactor = Redactor({"ab": "SHORT", long: "LONG"})
    assert len("ab") < MIN_LENGTH <= len(long)
    assert redactor.value("ab") == "<env.SHORT>" and redactor.text("a cab ride") == "a cab ride"
    assert redactor.text(f"url=https://x/{quote(long, safe='')}?k={long}") == "url=https://x/<env.LONG>?k=<env.LONG>"
    assert redactor.text('{"k": "p@ss/w\\u00f6rd-9"}') == '{"k": "<env.LONG>"}'
    assert redactor.tree({"n": 5, "s": "ab", "t": ["x ab", f"-{long}-"]}) == {"n": 5, "s": "<env.SHORT>",
                                                                             "t": ["x ab", "-<env.LONG>-"]}
    assert Redactor().text("nothing withheld") == "nothing withheld"


def test_log_lines_and_tracebacks_are_redacted(monkeypatch):
    """The filter tunelab puts on Hydra's console and .log handlers rewrites the line as written."""
    from tunelab.config import redaction

    monkeypatch.setattr(redaction, "_active", Redactor({"sk-0123456789": "MY_API_KEY"}))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(logging.Formatter("%(message)s").format(record))
    handler.addFilter(RedactFilter())
    logger = logging.getLogger("tunelab.test_trust_secrets")
    logger.addHandler(handler)
    try:
        logger.warning("token %s used", "sk-0123456789")
        try:
            raise ValueError("bad key sk-0123456789")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert lines[0] == "token <env.MY_API_KEY> used"
    assert "bad key <env.MY_API_KEY>" in lines[1] and "sk-0123456789" not in "".join(lines)
