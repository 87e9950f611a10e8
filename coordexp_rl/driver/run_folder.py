"""A run folder belongs to one run: a launch into a folder that holds another run is refused unless it
resumes that run (``run.resume``) or replaces it (``run.overwrite``), and a resume is checked against the
config the checkpoint was trained under.

Why: without this, a second launch into ``runs/default`` mixed both runs' steps in metrics.jsonl,
replaced config.yaml, let ``run.keep_last`` delete the new run's checkpoints in favour of the old run's
higher steps, and a later ``run.resume=auto`` resumed the old weights under the new config.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from coordexp_rl.config import Config, changed_settings, flat_settings, is_stage2_only, load_config
from coordexp_rl.errors import UserError
from learner.checkpoint import read_state

log = logging.getLogger(__name__)

# What a launch writes into its folder (TensorBoard included); what overwrite removes. A Parquet spill
# folder (buffer.spill_dir) is not in the list: it is an audit trail, kept.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "eval", "tb", "plots", "final_model", "report.md",
               "results.json", "trackers.json", "wandb", "mlflow.db", "mlartifacts", "logs", "faults.json")
# Keys a resume may change without a word: how long, how it is run and observed, not what was trained.
RESUME_FREE = ("run.", "eval.", "stage1.steps", "stage2.steps", "data.check_images", "rollout.num_actors",
               "rollout.cpus_per_actor", "rollout.gpus_per_actor", "rollout.node_resource", "rollout.max_restarts",
               "rollout.gone_timeout_s", "learner.", "weight_sync.", "buffer.spill_dir", "buffer.max_restarts")


class RunFolderError(UserError):
    """The run folder holds another run, or the checkpoint to resume was trained under another config."""


def holds_run(out: Path) -> list[str]:
    """The run outputs in ``out`` (empty: no run there)."""
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def claim_run_folder(cfg: Config) -> None:
    """Check (and with run.overwrite, empty) ``run.out_dir`` before a launch writes into it."""
    out, resume = Path(cfg.run.out_dir), cfg.run.resume
    found = holds_run(out)
    continues_this_run = resume == "auto" or (resume and _resolved(_run_dir(cfg)) == _resolved(out))
    if found and not continues_this_run:
        if not cfg.run.overwrite:
            raise RunFolderError(
                f"run.out_dir={out} holds another run ({', '.join(found)}); resume it with run.resume=auto, start "
                "a new one with another run.out_dir, or replace it with run.overwrite=true")
        log.warning("run.overwrite=true: removing the previous run in %s (%s)", out, ", ".join(found))
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if resume and resume != "auto":
        read_state(Path(resume))  # a damaged or incomplete checkpoint is refused before Ray starts
    if resume:
        check_resume_config(cfg)


def probe_writable(out: Path) -> None:
    """Write (and remove) a file in the run folder and its checkpoint folder now, so that an unwritable one
    is found before the work, not at the first checkpoint."""
    for folder in (out, out / "checkpoints"):
        probe = folder / ".write-probe"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunFolderError(f"run.out_dir={out}: cannot write into {folder} ({e.strerror or e})") from None


def _run_dir(cfg: Config) -> Path:
    """The folder of the run whose checkpoint ``run.resume`` names (``auto``: this run's)."""
    resume = cfg.run.resume
    return Path(cfg.run.out_dir) if resume == "auto" else Path(resume).parent.parent


def _resolved(path: Path) -> Path:
    return path.expanduser().resolve()


def config_differences(saved: Config, cfg: Config) -> list[str]:
    """Dotted keys whose values differ between two configs, ``key: saved -> now``, resume-free keys left out."""
    a, b = saved.model_dump(), cfg.model_dump()
    fa, fb = flat_settings(a), flat_settings(b)
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in changed_settings(a, b) if not k.startswith(RESUME_FREE)]


def check_resume_config(cfg: Config) -> None:
    """The config the checkpoint's run saved against this one: a difference in what Stage-1 trains (model,
    data, Stage-1 losses, optimizer) is refused; Stage-2-only differences (an ablation arm started from a
    default run's Stage-1 checkpoint, a changed Stage-2 setting) are logged."""
    resume, run_dir = cfg.run.resume, _run_dir(cfg)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        if resume != "auto":
            log.warning("run.resume=%s: no config.yaml in %s; the checkpoint's config is not checked", resume,
                        run_dir)
        return
    differences = config_differences(load_config(saved_path), cfg)
    trained = [d for d in differences if not is_stage2_only(d.split(":")[0])]
    if trained:
        raise RunFolderError(
            f"run.resume={resume}: the checkpoint was trained under {saved_path}, which differs in what it trains: "
            f"{'; '.join(trained)}; resume with those settings or start a new run.out_dir")
    if differences:
        log.warning("run.resume=%s: settings differ from %s: %s", resume, saved_path, "; ".join(differences))
