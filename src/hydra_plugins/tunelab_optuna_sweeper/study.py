"""Optuna pieces of the sweeper: storage, sampler, pruner and search space from config."""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler", "gp": "GPSampler"}
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner",
           "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}


class SweepConfigError(ValueError):
    """A sweeper setting that cannot work; the message names the key and the fix."""


def direction(value: str) -> str:
    try:
        return DIRECTIONS[str(value)]
    except KeyError:
        raise SweepConfigError(f"hydra.sweeper.direction must be one of {sorted(DIRECTIONS)}, got {value!r}") from None


@functools.lru_cache(maxsize=8)
def storage(url: str):
    """``sqlite:///x.db`` (or any database URL) -> RDB storage; a plain path -> a journal file.
    One per URL and process: the sweeper, its heartbeat and in-process jobs share its connections.

    The journal file is the default: it takes many writing processes (parallel trials
    reporting intermediate values) with file locks, where SQLite would answer 'database is locked'.
    A database server (``postgresql://...``) is what several machines share one study through.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in url:
        return _rdb_storage(url)
    path = Path(url).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _rdb_storage(url: str, tries: int = 3):
    """Optuna creates its tables on first use; two machines starting a study at once may both try
    (PostgreSQL then refuses one CREATE TABLE): the loser tries again, on the tables now there."""
    import optuna

    from tunelab.errors import TunelabError
    from tunelab.tracking.store import check_database, database_uri

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(database_uri(url), engine_kwargs=engine)
        except Exception as err:  # noqa: BLE001 - a bad URL or password is reported below, in one line
            try:
                check_database(url)
            except TunelabError as unreachable:
                raise SweepConfigError(f"hydra.sweeper.storage: {unreachable}") from None
            if attempt == tries - 1:
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]  # SQLAlchemy masks URLs
                raise SweepConfigError(f"hydra.sweeper.storage: Optuna could not set up its tables in "
                                       f"{_shown(url)}: {reason}") from None
            time.sleep(1.0 + attempt)


def _shown(url: str) -> str:
    from tunelab.tracking.links import shown_uri

    return shown_uri(url)


# conf/hydra/sweeper/optuna.yaml's pruner defaults, meant for the median and percentile pruners.
# Hydra merges them into any pruner a search file picks, so one that does not take them drops them.
DEFAULT_PRUNER_KEYS = {"n_startup_trials", "n_warmup_steps"}


def _build(kind: str, names: dict[str, str], node: dict | None, key: str):
    import inspect

    import optuna

    node = dict(node or {})
    name = str(node.pop("name", "none" if kind == "pruners" else "tpe"))
    if name not in names:
        raise SweepConfigError(f"hydra.sweeper.{key}.name must be one of {', '.join(names)}, got {name!r}")
    factory = getattr(getattr(optuna, kind), names[name])
    takes = set(inspect.signature(factory).parameters)
    unknown = set(node) - takes - (DEFAULT_PRUNER_KEYS if kind == "pruners" else set())
    if unknown:
        raise SweepConfigError(f"hydra.sweeper.{key}: the {name} {kind[:-1]} takes {', '.join(sorted(takes)) or 'no settings'}; "
                               f"got {', '.join(sorted(unknown))}")
    return factory(**{k: v for k, v in node.items() if k in takes})


def sampler(node: dict | None):
    return _build("samplers", SAMPLERS, node, "sampler")


def pruner(node: dict | None):
    return _build("pruners", PRUNERS, node, "pruner")


def open_study(storage_url: str, study_name: str, direction_name: str, sampler_node: dict | None = None,
               pruner_node: dict | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=storage(storage_url), study_name=study_name, direction=direction(direction_name),
        sampler=sampler(sampler_node) if sampler_node is not None else None,
        pruner=pruner(pruner_node) if pruner_node is not None else None, load_if_exists=True,
    )


def distribution(override) -> Any:
    """A Hydra sweep override -> an Optuna distribution.

    ``choice(a,b)`` or ``a,b`` -> categorical; ``range(1,5)`` -> int (or float) with a step;
    ``interval(1e-5,1e-2)`` -> float; ``tag(log, interval(...))`` -> log-uniform;
    ``int(interval(8,64))`` -> int.
    """
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution([v for v in override.sweep_iterator()])
    if isinstance(value, RangeSweep):
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return IntDistribution(int(value.start), int(value.stop) - int(value.step), step=int(value.step))
        return FloatDistribution(float(value.start), float(value.stop) - float(value.step), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise SweepConfigError(f"{key}: the Optuna sweeper cannot search {override.input_line!r}; use choice(...), "
                           "range(...), interval(...) or tag(log, interval(...))")


# -- one study, several sweep processes --------------------------------------------------------------
# Machines share a study through a database; each machine's sweep asks trials, runs them and tells
# their results. So "my trials" and "trials that died" cannot be told from the study's states alone:
# each trial carries who asked it and when that process last said it was alive, read the way
# resume=auto reads a run's process (tunelab.tracking.attempts.death).
OWNER = "tunelab.owner"  # the sweep process running the trial: host, pid, process identity
ALIVE = "tunelab.alive"  # that process's last sign of life, in seconds since the epoch
INTERRUPTED = "interrupted"  # FAIL because its process died: does not count, a rerun replaces it
SURPLUS = "tunelab.surplus"  # FAIL because two processes asked for the last slot at once
BEAT = 10.0  # seconds between signs of life
GRACE = 120.0  # a trial whose process (elsewhere) said nothing for this long is dead; allows clock skew


def is_stale(trial, now: float | None = None) -> bool:
    """A RUNNING trial that no process runs any more: on this machine its process is gone; on
    another one it has said nothing for GRACE seconds."""
    from tunelab.tracking import tag_names
    from tunelab.tracking.attempts import death

    now = time.time() if now is None else now
    owner = trial.user_attrs.get(OWNER)
    if not isinstance(owner, dict):  # asked a moment ago (its owner is written next), or by an older tunelab
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > GRACE
    return death({**owner, tag_names.HEARTBEAT: str(trial.user_attrs.get(ALIVE, 0))}, GRACE, now) is not None


def counts(trial, now: float | None = None) -> bool:
    """Whether a trial takes one of the study's n_trials: finished ones (a failed trial too),
    running ones that are alive, waiting ones; not those interrupted or surplus."""
    import optuna

    State = optuna.trial.TrialState
    if trial.state == State.FAIL:
        return not (trial.user_attrs.get(INTERRUPTED) or trial.user_attrs.get(SURPLUS))
    if trial.state == State.RUNNING:
        return not is_stale(trial, now)
    return True


def fail_stale(study) -> list:
    """Mark FAIL (interrupted) the RUNNING trials whose process is dead: they will never report.
    Another process may do the same at the same moment: whoever is second skips the trial."""
    import optuna

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not is_stale(trial):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (RuntimeError, ValueError):  # finished meanwhile, by its owner or another sweep
            continue
        failed.append(trial)
    return failed


def claim(study, trial) -> None:
    """Sign a trial this process just asked for."""
    from tunelab.tracking.attempts import process_tags

    study._storage.set_trial_user_attr(trial._trial_id, OWNER, process_tags())
    study._storage.set_trial_user_attr(trial._trial_id, ALIVE, time.time())


def drop_surplus(study, asked: list, n_trials: int) -> list:
    """The asked trials within the study's ``n_trials``; the others are told FAIL (surplus).

    Two processes that both see one free slot both ask. Trial numbers are handed out atomically
    by the storage, so each process ranks its trial among the counted trials with smaller numbers
    (those existed before it): a rank of n_trials or more is over the budget. Both processes rank
    the same way, so at most n_trials trials are kept; a smaller trial not yet known to be surplus
    can only make a larger one surplus too early, which the next round of asking fills again.
    """
    import optuna

    now = time.time()
    trials = study.get_trials(deepcopy=False)
    kept = []
    for trial in asked:
        rank = sum(counts(t, now) for t in trials if t.number < trial.number)
        if rank < n_trials:
            kept.append(trial)
            continue
        study._storage.set_trial_user_attr(trial._trial_id, SURPLUS, True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return kept


@contextmanager
def heartbeat(study, trials: list) -> Iterator[None]:
    """Refresh ALIVE on ``trials`` every BEAT seconds while the block (their jobs) runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT):
            for trial in trials:
                try:
                    study._storage.set_trial_user_attr(trial._trial_id, ALIVE, time.time())
                except Exception:  # noqa: BLE001 - finished meanwhile, or a storage hiccup: try next beat
                    continue

    thread = threading.Thread(target=beat, name="tunelab-optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=BEAT)


def live_trials(storage_url: str, study_name: str) -> set[int] | None:
    """Numbers of the study's RUNNING trials whose process is alive; None: no such study yet."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage(storage_url))
    except KeyError:
        return None
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return {t.number for t in running if not is_stale(t)}


def made_once(storage_url: str, study_name: str, direction_name: str, key: str, make: Callable[[], str],
              wait: float = 60.0) -> tuple[str | None, bool]:
    """The study's user attribute ``key``, made by exactly one of the processes that start the
    study at once. Returns (value, made_here); (None, False) when the study exists without it.

    Optuna's storages have no compare-and-set on attributes, but creating a study is atomic in
    every one of them (a unique name in a database, the order of the journal's lines): the one
    process whose ``create_new_study`` succeeds calls ``make()`` and stores the result; the others
    get DuplicatedStudyError and wait (up to ``wait`` s) for the value. A study that already has
    trials without it (started by an older tunelab, or its creator died first) is the caller's case.
    """
    from optuna.exceptions import DuplicatedStudyError
    from optuna.study import StudyDirection

    store = storage(storage_url)
    try:
        study_id = store.create_new_study([StudyDirection[direction(direction_name).upper()]], study_name)
    except DuplicatedStudyError:
        study_id = store.get_study_id_from_name(study_name)
    else:
        value = make()
        store.set_study_user_attr(study_id, key, value)
        return value, True
    deadline = time.monotonic() + wait
    while True:
        value = store.get_study_user_attrs(study_id).get(key)
        if value is not None or store.get_n_trials(study_id) or time.monotonic() > deadline:
            return value, False
        time.sleep(0.5)


def set_study_attr(storage_url: str, study_name: str, key: str, value: str) -> None:
    store = storage(storage_url)
    store.set_study_user_attr(store.get_study_id_from_name(study_name), key, value)
