"""Run one experiment through Flower's simulation engine, in this process.

We drive Flower with ``flwr.simulation.run_simulation``: it runs the ServerApp in a
thread of this process and the ClientApps in Ray actors, needs no SuperLink and no FAB
build, and starts in seconds, which is what lets the three-run main job finish well
inside three minutes on two cores. Its drawback is that it ignores
``[tool.flwr.app.config]``, so we hand it apps bound to explicit settings instead
(``make_server_app`` / ``make_client_app``). ``flwr run .`` drives the very same
``main`` and ``train`` functions through the supported SuperLink path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from pathlib import Path

from ..simulations.config import RunSettings, check_simulation

# Flower and Ray read these at import time; nothing here may reach the network.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def backend_config(num_cpus: int | None = None) -> dict:
    """One CPU per virtual client, as many parallel clients as there are cores."""
    cores = num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": False,
                      "configure_logging": False},
    }


def run_experiment(settings: RunSettings, num_clients: int, log_file: Path | None = None) -> None:
    """Run one federated experiment to completion; raises if the ServerApp failed.

    Results land in ``settings.output_dir`` (see :mod:`softmerge.server.results`). Raises
    :class:`~softmerge.server.output_lock.OutputBusy` at once, before any file is touched,
    if another run is writing there.
    """
    from ..server.output_lock import output_lock

    check_simulation(settings, num_clients)
    with output_lock(Path(settings.output_dir)) if settings.output_dir else contextlib.nullcontext():
        _simulate(settings, num_clients, log_file)


def _simulate(settings: RunSettings, num_clients: int, log_file: Path | None) -> None:
    from flwr.simulation import run_simulation

    from ..client.app import make_client_app
    from ..server.app import make_server_app

    flwr_logger = logging.getLogger("flwr")
    handler = None
    if log_file is not None:
        # The console keeps only our summary; Flower's per-round log goes to a file.
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, mode="w")
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))
        flwr_logger.addHandler(handler)
        console_handlers = [h for h in flwr_logger.handlers if h is not handler]
        saved_levels = [h.level for h in console_handlers]
        for console in console_handlers:
            console.setLevel(logging.ERROR)
    # Set when the runtime ends abnormally (Ctrl-C, SIGTERM, a crash): the ServerApp's thread
    # then stops at once instead of waiting out its rounds and marking the run finished.
    stop = threading.Event()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=make_server_app(settings, num_nodes=num_clients, stop=stop),
                client_app=make_client_app(settings),
                num_supernodes=num_clients,
                backend_config=backend_config(),
            )
    except BaseException:
        stop.set()
        raise
    finally:
        if handler is not None:
            flwr_logger.removeHandler(handler)
            handler.close()
            for console, level in zip(console_handlers, saved_levels):
                console.setLevel(level)
