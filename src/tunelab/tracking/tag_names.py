"""The names of every MLflow tag tunelab sets or reads: one place, so a reader (the UI, the
experiment reports, resume=auto) and the writer cannot drift apart. The values are part of
tunelab's interface: experiment reports and saved searches in the MLflow UI name them."""

# Every run
VERSION = "tunelab.version"
CONFIG_HASH = "tunelab.config_hash"
KIND = "tunelab.kind"
JOB_NUM = "tunelab.job_num"
ERROR = "tunelab.error"
NOT_LOGGED = "tunelab.not_logged"
VIEW = "tunelab.view"

# A sweep's parent run and its trials
SWEEP = "tunelab.sweep"
SWEEP_DIR = "tunelab.sweep_dir"
STUDY = "tunelab.study"
BEST_RUN_ID = "tunelab.best_run_id"
BEST_TRIAL = "tunelab.best_trial"
TRIAL = "tunelab.trial"
TRIAL_STATE = "tunelab.trial_state"

# Resume, pre-emption and the attempts of one run
RECIPE_HASH = "tunelab.recipe_hash"
PREEMPTED_CHECKPOINT = "tunelab.preempted_checkpoint"
OUTPUT_DIR = "tunelab.output_dir"
EARLIER_OUTPUT_DIRS = "tunelab.earlier_output_dirs"  # the folders of the attempts before, one a line
HOST = "tunelab.host"
PID = "tunelab.pid"
PROCESS = "tunelab.process"  # machine, boot, pid namespace and start time: tells a reused pid from ours
HEARTBEAT = "tunelab.heartbeat"  # unix seconds of the last sign of life
SLURM_JOB_ID = "tunelab.slurm_job_id"  # <array job>_<task> of a Slurm array, else the job id
RESUMED_FROM = "tunelab.resumed_from"
LOST_ATTEMPTS = "tunelab.lost_attempts"  # attempts that died without a checkpoint, and the steps they lost

# Across ranks
RANK_CONFIG_HASHES = "tunelab.rank_config_hashes"

# Where the weights came from
INIT_FROM = "tunelab.init_from"
INIT_FROM_RUN = "tunelab.init_from_run"
INIT_FROM_SKIPPED = "tunelab.init_from_skipped"
REGISTERED_MODEL = "tunelab.registered_model"

# After training: eval and monitor runs
EVAL_OF = "tunelab.eval_of"
EVAL_SOURCE = "tunelab.eval_source"
EVAL_TTA = "tunelab.eval_tta"  # the test-time augmentation behind an eval run's <split>/tta/* metrics
MONITOR_OF = "tunelab.monitor_of"
MONITOR_INPUTS = "tunelab.monitor_inputs"
