"""Experiment tracking (MLflow) for training runs.

Importing this package is cheap: mlflow and matplotlib are imported on first use.

    from aion_train.tracking import Tracker
    tracker = Tracker(cfg.tracking, cfg.run_dir, active=(rank == 0))
    tracker.start(config_to_dict(cfg), run_id=previous_run_id)   # run_id=None: new run
    tracker.log_metrics({"loss": 2.3, "lr": 3e-3}, step=10)
    tracker.log_loss_curve({"loss": [(1, 2.9), (2, 2.5)]})
    tracker.end("FINISHED")
"""

from .mlflow_tracker import (
    RUN_INFO_FILE,
    Tracker,
    default_artifact_location,
    flatten_params,
    load_run_info,
    param_value,
    resolve_tracking_uri,
    sanitize_key,
)
from .plots import plot_curves
from .server import free_port, start_mlflow_server, stop_server, wait_for_health

__all__ = [
    "RUN_INFO_FILE",
    "Tracker",
    "default_artifact_location",
    "flatten_params",
    "free_port",
    "load_run_info",
    "param_value",
    "plot_curves",
    "resolve_tracking_uri",
    "sanitize_key",
    "start_mlflow_server",
    "stop_server",
    "wait_for_health",
]
