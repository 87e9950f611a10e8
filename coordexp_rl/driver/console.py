"""What a launch prints: our progress bars, evaluations, results and warnings on the console; the engine's,
Ray's and the libraries' output in the run folder's ``logs/`` (``--verbose``: on the console as well).

- Driver: every record goes to ``logs/driver.log``; the console shows this project's own records
  (``coordexp_rl``, ``learner``, ``actors``) and errors from anyone. Python warnings are logged, not printed.
- Actors: Ray does not forward their output (``log_to_driver``); each actor's stdout and stderr go to
  ``logs/worker-<pid>.log`` (coordexp_rl.runtime.send_output_to_log_dir, switched on by ``actor_options``).
  What an actor prints before that (its imports) stays in Ray's own session logs.
Failures still reach the console: an actor's error returns to the driver, which reports it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from coordexp_rl.runtime import WORKER_LOG_DIR

LOG_DIR = "logs"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OURS = ("coordexp_rl", "learner", "actors")  # loggers whose INFO records the console shows


class _OursOrErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".", 1)[0] in OURS


class Console:
    """The logging of one launch: a console handler at once (everything at INFO while the config loads),
    then ``route`` once the run folder is known; ``close`` removes what it added (a process may launch
    again, as the tests do)."""

    def __init__(self):
        self.console = logging.StreamHandler()
        self.console.setFormatter(logging.Formatter(FORMAT))
        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.setLevel(logging.INFO)
        self.added: list[tuple[logging.Logger, logging.Handler]] = [(self.root, self.console)]
        self.removed: list[logging.Handler] = []  # Ray's own console handlers, while quiet
        self.root.addHandler(self.console)

    def route(self, out: Path, verbose: bool) -> dict:
        """Records to ``<out>/logs/driver.log`` too and, unless ``verbose``, other libraries' off the
        console. Returns the Ray actor options that send the actors' output to ``<out>/logs/``."""
        folder = out / LOG_DIR
        folder.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(folder / "driver.log")
        to_file.setFormatter(logging.Formatter(FORMAT))
        ray_logger = logging.getLogger("ray")  # Ray logs through its own handlers, not the root's
        for logger in (self.root, ray_logger):
            logger.addHandler(to_file)
            self.added.append((logger, to_file))
        logging.captureWarnings(True)  # library warnings become records of "py.warnings": in the file
        if verbose:
            return {}
        self.console.addFilter(_OursOrErrors())
        self.removed = [h for h in ray_logger.handlers if h is not to_file]
        for handler in self.removed:
            ray_logger.removeHandler(handler)
        return {"runtime_env": {"env_vars": {WORKER_LOG_DIR: str(folder.resolve())}}}

    def close(self) -> None:
        logging.captureWarnings(False)
        for logger, handler in self.added:
            logger.removeHandler(handler)
            if isinstance(handler, logging.FileHandler):
                handler.close()
        for handler in self.removed:
            logging.getLogger("ray").addHandler(handler)
        self.root.setLevel(self.level)
        self.added, self.removed = [], []
