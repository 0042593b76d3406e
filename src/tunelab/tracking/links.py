"""Links into the MLflow UI that tunelab prints: the runs table of an experiment, a run's page."""

from __future__ import annotations

import hashlib
import json
from urllib.parse import quote

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tunelab.tracking import tag_names


SECRET_PARAMS = ("password", "passwd", "pwd", "secret", "token")  # query keys a URI may carry a credential in


def shown_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***``: what messages and logs may print. The
    password of ``user:password@host`` and of query parameters (``?password=...``, which
    SQLAlchemy hands to the database driver) alike; a path or a URI without either is unchanged."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc and not parts.query:
        return uri
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostport}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(any(word in key.lower() for word in SECRET_PARAMS) for key, _ in query):
        masked = [(k, "***" if any(word in k.lower() for word in SECRET_PARAMS) else v) for k, v in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)


# -- links into the MLflow UI -------------------------------------------------------------------
# MLflow 3 opens an experiment on its GenAI overview; ``workflowType=machine_learning`` opens the
# classic runs table instead. The table's columns cannot be set in a URL, but MLflow's shared
# views can: a JSON view state in the experiment tag ``mlflow.sharedViewState.<key>``, opened by
# ``viewStateShareKey=<key>``. Sorting stays by start time: sorted by a metric (or filtered),
# MLflow stops nesting a sweep's trials under their parent run.
UI_DEFAULT = "http://127.0.0.1:5000"  # where tunelab-ui serves a local store unless told otherwise
VIEW_TAG = "mlflow.sharedViewState."
DEFAULT_VIEW_TAG = tag_names.VIEW  # the key of the experiment's view for tunelab-ui's link


def save_view(client: MlflowClient, exp_id: str, objective: str, params: list[str] = (),
              default: bool = False) -> str | None:
    """Store a runs-table view on the experiment: the objective (and the sweep parent's ``best/``
    value) and ``params`` as columns; ``default``: the view tunelab-ui links to. Returns its key
    (the same for the same columns), None if the store refused: a link is no reason to fail a run."""
    columns = [f"metrics.`{objective}`", f"metrics.`best/{objective}`", *(f"params.`{p}`" for p in params)]
    state = json.dumps({"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False})
    key = "tunelab-" + hashlib.sha256(state.encode()).hexdigest()[:12]
    wanted = {VIEW_TAG + key: state, **({DEFAULT_VIEW_TAG: key} if default else {})}
    try:
        # Written only when missing: parallel trials would otherwise all write the same tags at once.
        tags = client.get_experiment(exp_id).tags
        for tag, value in wanted.items():
            if tags.get(tag) != value:
                client.set_experiment_tag(exp_id, tag, value)
    except MlflowException:
        return None
    return key


def ui_address(uri: str) -> str:
    """The UI of a store: a server is its own UI; a local store's is what tunelab-ui serves."""
    return shown_uri(uri).rstrip("/") if uri.startswith(("http://", "https://")) else UI_DEFAULT


def runs_page(experiment_id: str, view: str | None = None) -> str:
    """The URL fragment of an experiment's runs table (in the ``view`` saved by save_view)."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={quote(view)}" if view else "")
    return f"#/experiments/{experiment_id}/runs?{query}"


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (for a local store, once ``tunelab-ui --store`` serves it)."""
    return f"{ui_address(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_hint(uri: str, page: str) -> str:
    """How to open ``page`` (a URL fragment): the link, and for a local store the command first."""
    link = f"{ui_address(uri)}/{page}"
    if uri.startswith("sqlite:///"):
        return f"tunelab-ui --store {uri[len('sqlite:///'):]}  then open {link}"
    return link
