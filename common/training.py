"""One training loop for every family: run folders, logging, checkpoints, exact resume, signals.

A family subclasses :class:`Trainer` (models, optimisers, a deterministic batch stream and one ``train_step`` that
runs its own loss phases) and hands it to :func:`fit`, which owns everything that must not be lost:

- a numbered run folder (``runs/00003-ssv-heads``) with ``config.json``, tensorboard logs (``tb/``), ``metrics.jsonl``
  and ``checkpoints/ckpt-00001000.pt``;
- checkpoints with the full state (modules, optimisers, schedulers, step, RNG states of torch / numpy / python for
  every rank, config, family) and ``train_seconds`` (the run's training time so far, over every resume, without its
  evaluations and sample images), written atomically; the data order needs no state because :func:`batch_iterator`
  derives it from (seed, step);
- ``resume="auto"``: the newest *readable* checkpoint (a truncated one is reported and the previous one used);
  a different config is refused with the keys that differ, unless ``force`` (then the optimisers' settings are
  the new config's; their state and a scheduled lr are the checkpoint's);
- the run folder is locked for the run (:func:`common.io.folder_lock`): a second process resuming it is refused;
- SIGINT / SIGTERM: the current step finishes, a checkpoint is written, then :class:`TrainingInterrupted` is raised;
- a non-finite loss term stops the run with the step and the terms named, and so do non-finite weights at a
  checkpoint (not saved); the last good checkpoint is kept.

On CPU with a fixed seed, N steps == N/2 steps + resume + N/2 steps, bit for bit (tests check it per family).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import signal
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed as dist_utils
from .errors import ViewsslError, error_summary
from .io import atomic_save, atomic_write_bytes, atomic_write_json, folder_lock, load_checkpoint

log = logging.getLogger("viewssl.training")

CHECKPOINT_VERSION = 1
#: ``fit(force_hint=...)`` of the experiment scripts, which have no --force
RETRAIN_HINT = "use another --out for these settings (or delete this run folder to train it again)"
_CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")

__all__ = ["Trainer", "fit", "RETRAIN_HINT", "new_run_dir", "find_resumable_run", "batch_iterator",
           "find_checkpoint", "config_diff", "capture_rng", "restore_rng", "TrainingInterrupted", "NonFiniteLoss",
           "seed_everything"]


class TrainingInterrupted(ViewsslError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first."""

    exit_code = 130


class NonFiniteLoss(ViewsslError):
    """A loss term became NaN or infinite."""


class Trainer:
    """Base class of a family's trainer. Subclasses build everything from ``config`` (a JSON-able dict) in
    ``__init__`` and do no file I/O; :func:`fit` does the I/O."""

    family: str = "base"
    #: config keys that may change between a run and its resumption (they do not change the training itself)
    resume_ignore_keys: tuple[str, ...] = ("steps", "device", "out", "resume", "force", "checkpoint_every",
                                           "eval_every", "log_every", "media_every", "eval_data", "progress", "debug")
    #: Config keys added after checkpoints were written, with the value those older runs behaved as (resume fills them
    #: in before comparing configs, so an old run stays resumable).
    resume_defaults: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, config: dict, device: torch.device):
        self.config = dict(config)
        self.device = device

    # --- what a family provides -------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def schedulers(self) -> dict[str, Any]:
        return {}

    def batches(self, start_step: int) -> Iterator:
        raise NotImplementedError

    def train_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        """Figures of the model at ``step`` (fit calls it on the main process only)."""
        return {}

    def resume_ignored(self, saved_config: dict, step: int) -> tuple[str, ...]:
        """Config keys that may differ from ``saved_config`` when resuming its checkpoint of ``step``."""
        return self.resume_ignore_keys

    def log_media(self, step: int, writer, run_dir: Path) -> None:
        """Sample images into tensorboard / the run folder (fit calls it on the main process only)."""
        return None

    # --- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "modules": {k: _unwrap(m).state_dict() for k, m in self.modules().items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers().items()},
        }

    def load_state_dict(self, state: dict, source: Path | None = None) -> None:
        for group in ("modules", "optimizers", "schedulers"):
            mine = getattr(self, group)()
            saved = state.get(group, {})
            missing = sorted(set(mine) - set(saved))
            if missing:
                raise ViewsslError(f"checkpoint lacks {group} {', '.join(missing)}", source)
            for name, obj in mine.items():
                try:
                    settings = _optimizer_settings(obj) if group == "optimizers" else None
                    (_unwrap(obj) if group == "modules" else obj).load_state_dict(saved[name])
                    if settings is not None:
                        # the optimiser's state (momenta, moments) resumes; its settings (weight decay, momentum,
                        # betas, a trainer's base_lr, ...) are this config's: the checkpoint's unless --force changed
                        # them. The lr itself resumes, as a torch scheduler keeps it there (trainers that set it
                        # from the step alone set it again at the next step)
                        for g, mine_ in zip(obj.param_groups, settings):
                            g.update(mine_)
                except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
                    raise ViewsslError(f"{group[:-1]} {name!r} does not match this config ({error_summary(e)})",
                                       source) from e


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode for the block (dropout off, batch norm's running statistics), then in the mode it was
    in before (a network shared with training keeps training)."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def _optimizer_settings(optimizer) -> list[dict]:
    """Each param group's settings as built from the config: all but its parameters and the lr a scheduler moves."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]


def _unwrap(module):
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


# --- reproducibility -------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (each rank gets ``seed + rank``)."""
    seed = int(seed) + dist_utils.rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """RNG states of torch (CPU, CUDA and MPS), numpy and python, in a form ``torch.load(weights_only=True)``
    accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda, n = state["cuda"], torch.cuda.device_count()
        if len(cuda) != n:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d", len(cuda), n)
        torch.cuda.set_rng_state_all(cuda[:n])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# --- data order --------------------------------------------------------------------------------------------------
class _ResumableBatchSampler:
    """Infinite stream of index batches: epoch e is ``randperm(n)`` seeded by (seed, e), cut into full global
    batches; the stream starts exactly at ``start_step``. Under DDP each rank takes its slice ``rank::world``."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, shuffle: bool = True,
                 where: Path | None = None):
        world, me = dist_utils.world_size(), dist_utils.rank()
        if batch_size % world:
            raise ViewsslError(f"--batch-size {batch_size} is not divisible by the {world} processes")
        if n < batch_size:
            raise ViewsslError(f"{n} training items, fewer than one batch (--batch-size {batch_size})",
                               where if where is not None else "the dataset")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.shuffle, self.world, self.rank = shuffle, world, me

    def __iter__(self):
        per_epoch = self.n // self.batch_size
        epoch, offset = divmod(self.start_step, per_epoch)
        while True:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.n, generator=g)
            else:
                order = torch.arange(self.n)
            for b in range(offset, per_epoch):
                batch = order[b * self.batch_size:(b + 1) * self.batch_size]
                yield batch[self.rank::self.world].tolist()
            epoch, offset = epoch + 1, 0


def batch_iterator(dataset: Dataset, batch_size: int, seed: int, start_step: int, num_workers: int = 0,
                   collate_fn: Callable | None = None, shuffle: bool = True) -> Iterator:
    """Infinite iterator of batches that depends only on (dataset, batch_size, seed, start_step).

    ``batch_size`` is the global batch; under DDP each rank gets ``batch_size / world`` of it. Item loading may use
    worker processes (items are deterministic); augmentation must happen in the main process.
    """
    # the folder to name in errors: a labels.csv table's folder or the dataset's root, where it has one
    table = getattr(dataset, "table", None)
    where = getattr(table, "root", None) or getattr(dataset, "root", None)
    sampler = _ResumableBatchSampler(len(dataset), batch_size, seed, start_step, shuffle, where)
    # A private generator: creating the loader's iterator must not draw from the global RNG (exact resume).
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=_leave_process_group if num_workers > 0 else None)
    return iter(loader)


def _leave_process_group(worker_id: int) -> None:
    """In a loader worker: leave the main process's group, so that a signal sent to the whole group (Ctrl-C,
    ``kill -- -PGID``, a scheduler's pre-emption) is the main process's to handle (it finishes the step and writes a
    checkpoint); a worker killed by one would make the main process fail mid-step. The loader still stops its workers
    with a SIGTERM of their own (ignoring SIGTERM instead would hang the exit of a process that fails), and a worker
    whose parent died exits by itself."""
    os.setpgid(0, 0)


# --- run folders and checkpoints -------------------------------------------------------------------------------
def new_run_dir(out_root: str | Path, tag: str) -> Path:
    """Create ``out_root/NNNNN-tag`` with the next free number (stylegan2-ada style)."""
    out_root = Path(out_root)

    def make() -> Path:
        out_root.mkdir(parents=True, exist_ok=True)
        while True:  # two runs started at once in one --out: the second takes the next number
            numbers = [int(m.group(1)) for p in out_root.glob("*") if (m := re.match(r"^(\d{5,})-", p.name))]
            candidate = out_root / f"{(max(numbers) + 1 if numbers else 0):05d}-{tag}"
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue

    # Every rank must agree on the folder: rank 0 decides (and a failure there stops every rank)
    run_dir = dist_utils.on_main(make, f"making a run folder in {out_root}")
    return Path(dist_utils.all_gather_objects(str(run_dir))[0])


def resolve_run_dir(out_root: str | Path, tag: str, resume: str | None, trainer: Trainer,
                    force: bool = False) -> tuple[Path, str | None]:
    """Where a CLI run trains and what :func:`fit` resumes (its ``resume`` argument):

    - no ``resume``: a new numbered folder ``out_root/NNNNN-tag``;
    - ``auto``: the run :func:`find_resumable_run` finds (resumed there), else a new folder;
    - a path: a run folder, its ``checkpoints`` folder or a checkpoint file; training continues in that run folder.
    """
    if resume == "auto":
        run = find_resumable_run(out_root, tag, trainer, force)
        if run is not None:
            return run, "auto"
        log.info("--resume auto: no run of this config in %s, starting a new one", out_root)
    if resume is None or resume == "auto":
        return new_run_dir(out_root, tag), None
    p = Path(resume)
    if not p.exists():
        raise ViewsslError("--resume: no such run folder or checkpoint", p)
    if p.is_file():
        folder = p.parent
        if folder.name.startswith("set-aside-") and folder.parent.name == "checkpoints":
            folder = folder.parent  # a checkpoint set aside by an earlier resume: its run goes on from it
        return (folder.parent if folder.name == "checkpoints" else folder), str(p)
    if p.name == "checkpoints":
        return p.parent, str(p.parent)
    return p, str(p)


def find_resumable_run(out_root: str | Path, tag: str, trainer: Trainer, force: bool = False) -> Path | None:
    """``--resume auto``: the newest ``out_root/NNNNN-tag`` run folder with a checkpoint whose ``config.json`` matches
    ``trainer.config`` (the keys :meth:`Trainer.resume_ignored` allows to change are not compared), or None. Runs of
    the tag with another config (another seed, say) are named in the log and left alone; with ``force`` the newest
    run of the tag is taken whatever its config (:func:`fit` then logs the differences)."""
    runs = sorted((p for p in Path(out_root).glob(f"[0-9][0-9][0-9][0-9][0-9]-{tag}") if p.is_dir()), reverse=True)
    others = []
    for run in runs:
        ckpts = _checkpoints(run / "checkpoints")
        if not ckpts:
            continue
        if force:
            return run
        try:
            saved = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            others.append(f"{run.name} (no readable config.json)")
            continue
        if saved.get("family", trainer.family) != trainer.family:
            continue
        step = int(_CKPT_RE.match(ckpts[-1].name).group(1))
        # config.json is {"family": ..., **config}: the family is compared above (some configs hold it too)
        diff = config_diff({**trainer.resume_defaults, **saved}, {"family": trainer.family, **trainer.config},
                           trainer.resume_ignored(saved, step))
        if not diff:
            return run
        others.append(f"{run.name} ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''})")
    if others:
        log.info("--resume auto: not resuming %d run(s) of %s with another config: %s", len(others), tag,
                 ", ".join(others))
    return None


def _logged_eval(run_dir: Path, step: int) -> dict[str, float] | None:
    """The values of the last "eval" record of ``step`` in ``run_dir/metrics.jsonl``, or None."""
    found = None
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if rec.get("kind") == "eval" and rec.get("step") == step:
                    found = {k: v for k, v in rec.items() if k not in ("step", "kind", "time")}
    return found


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if _CKPT_RE.match(p.name)), key=lambda p: p.name)


def find_checkpoint(run_or_ckpt: str | Path) -> tuple[dict, Path]:
    """Load the checkpoint file given, or the newest readable one of a run folder (corrupt ones are reported and
    skipped). Returns (checkpoint dict, path)."""
    p = Path(run_or_ckpt)
    if p.is_file():
        return _validate(load_checkpoint(p), p), p
    if not p.exists():
        raise ViewsslError("no such run folder or checkpoint", p)
    candidates = _checkpoints(p / "checkpoints") or _checkpoints(p)
    if not candidates:
        raise ViewsslError("no checkpoints (ckpt-*.pt) in this run folder", p)
    for path in reversed(candidates):
        try:
            return _validate(load_checkpoint(path), path), path
        except ViewsslError as e:
            log.warning("skipping unreadable checkpoint: %s", e)
    raise ViewsslError(f"none of the {len(candidates)} checkpoints is readable", p)


def _validate(ckpt: dict, path: Path) -> dict:
    missing = [k for k in ("family", "config", "step", "modules") if k not in ckpt]
    if missing:
        raise ViewsslError(f"not a viewssl checkpoint (missing {', '.join(missing)})", path)
    return ckpt


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: config keys holding a file or folder: two configs agree on one if both name the same place from here (a run started
#: with a relative ``--data`` resumes with the absolute path, or through a symlink, and the other way round)
PATH_KEYS = ("data", "eval_data")


def config_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences ``key: old -> new`` between two configs, ignoring ``ignore`` keys."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys
            if a.get(k, "<absent>") != b.get(k, "<absent>") and not same_place(k, a.get(k), b.get(k))]


def same_place(key: str, a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b``, values of config key ``key``, are one folder or file named two ways (path keys only)."""
    return key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b)


def _set_aside_after(run_dir: Path, step: int | None) -> None:
    """A run resumed at ``step`` goes on from there: what its folder holds from later steps (newer checkpoints, left by
    a resume from an older one, and ``metrics.jsonl`` records logged after the last checkpoint of a killed run) is
    moved aside, not deleted: checkpoints to ``checkpoints/set-aside-<step>[-N]/`` (a new folder each time), records
    to ``metrics-set-aside.jsonl``. Otherwise ``--resume auto`` would later pick an abandoned checkpoint, and the
    records of those steps would appear twice. ``step`` None: a run starting from scratch in a used folder (killed
    before its first checkpoint), so every record and checkpoint there is set aside."""
    first = -1 if step is None else step
    what = "starting from scratch in a used folder" if step is None else f"resumed at step {step}"
    ckpt_dir = run_dir / "checkpoints"
    newer = [p for p in _checkpoints(ckpt_dir) if int(_CKPT_RE.match(p.name).group(1)) > first]
    if newer:
        base = ckpt_dir / f"set-aside-{'start' if step is None else f'{step:08d}'}"
        aside, n = base, 1
        while aside.exists():  # a second resume from the same step: a folder of its own
            n += 1
            aside = Path(f"{base}-{n}")
        aside.mkdir()
        for p in newer:
            p.replace(aside / p.name)
        log.warning("%s: moved %d newer checkpoint(s) to %s", what, len(newer), aside)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    keep, later = [], []
    for line in lines:
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            record_step = None  # an unreadable line (a killed write) is kept where it is
        (later if record_step is not None and record_step > first else keep).append(line if line.endswith("\n")
                                                                                  else line + "\n")
    if later:
        with open(run_dir / "metrics-set-aside.jsonl", "a") as f:
            f.writelines(later)
    if later or (lines and not lines[-1].endswith("\n")):  # a line cut short would swallow the next record
        atomic_write_bytes(metrics, "".join(keep).encode())
    if later:
        log.info("%s: moved %d later record(s) of metrics.jsonl to metrics-set-aside.jsonl", what, len(later))


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a second signal exits at once)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the current step and writing a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def fit(trainer: Trainer, run_dir: str | Path, steps: int, checkpoint_every: int = 500, eval_every: int = 0,
        log_every: int = 10, media_every: int = 0, resume: str | Path | None = None, force: bool = False,
        progress: bool = True, keep_checkpoints: int = 3, force_hint: str = "pass --force to resume anyway") -> dict:
    """Train ``trainer`` up to ``steps`` (total, counting resumed steps). See the module docstring.

    ``force_hint``: what the error for a checkpoint of another config tells the user to do (a script without
    ``--force`` says so its own way).

    Returns a dict with ``run_dir``, ``step``, ``start_step``, the last ``terms`` and ``metrics``, the last
    ``checkpoint``, and times in seconds: ``seconds`` (this call's wall time), ``side_seconds`` (this call's
    evaluations and sample images), ``call_train_seconds`` (this call's training: the rest) and ``train_seconds`` (the
    run's training over every resume, as the last checkpoint keeps it; NaN from a checkpoint older than that record)."""
    # the main process holds the run folder: a second run resuming it at the same time is refused (on every process)
    with contextlib.ExitStack() as held:
        dist_utils.on_main(lambda: held.enter_context(folder_lock(run_dir, "training run")), "locking the run folder")
        return _fit(trainer, Path(run_dir), steps, checkpoint_every=checkpoint_every, eval_every=eval_every,
                    log_every=log_every, media_every=media_every, resume=resume, force=force, progress=progress,
                    keep_checkpoints=keep_checkpoints, force_hint=force_hint)


def _fit(trainer: Trainer, run_dir: Path, steps: int, *, checkpoint_every: int, eval_every: int, log_every: int,
         media_every: int, resume: str | Path | None, force: bool, progress: bool, keep_checkpoints: int,
         force_hint: str) -> dict:
    ckpt_dir = run_dir / "checkpoints"
    main = dist_utils.is_main()
    start_step, resumed_from = 0, None
    prior_seconds = 0.0  # training time of the run before this call (NaN: a checkpoint from before it was kept)

    if resume is not None:
        source = ckpt_dir if str(resume) == "auto" else Path(resume)
        if str(resume) == "auto" and not _checkpoints(ckpt_dir):
            log.info("--resume auto: no checkpoint in %s yet, starting from step 0", ckpt_dir)
        else:
            ckpt, resumed_from = find_checkpoint(source)
            if ckpt["family"] != trainer.family:
                raise ViewsslError(f"is a {ckpt['family']!r} checkpoint, not {trainer.family!r}", resumed_from)
            diff = config_diff({**trainer.resume_defaults, **ckpt["config"]}, trainer.config,
                               trainer.resume_ignored(ckpt["config"], int(ckpt["step"])))
            if diff and not force:
                raise ViewsslError(f"config differs from the checkpoint's ({'; '.join(diff)}); {force_hint}",
                                   resumed_from)
            if diff:
                log.warning("resuming with a different config (--force): %s", "; ".join(diff))
            start_step = int(ckpt["step"])
            if start_step > steps:
                raise ViewsslError(f"the run is already at step {start_step}, past --steps {steps}; give --steps "
                                   f"{start_step} or more to continue it, or another output folder", resumed_from)
            trainer.load_state_dict(ckpt, resumed_from)
            prior_seconds = float(ckpt.get("train_seconds", math.nan))
            rng = ckpt.get("rng") or []
            if len(rng) == dist_utils.world_size():
                try:
                    restore_rng(rng[dist_utils.rank()])
                except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
                    raise ViewsslError(f"its RNG state is malformed ({type(e).__name__}: {e})", resumed_from) from e
            else:
                log.warning("checkpoint has RNG states for %d processes, this run has %d: RNG not restored",
                            len(rng), dist_utils.world_size())
            log.info("resumed from %s at step %d", resumed_from, start_step)

    def prepare_folder():  # the main process's (an error there stops every process)
        run_dir.mkdir(parents=True, exist_ok=True)
        _set_aside_after(run_dir, start_step if resumed_from is not None else None)
        # a checkpoint half-written when a run was killed (SIGKILL, power): its temp file is garbage (we hold the lock)
        for stale in ckpt_dir.glob(".ckpt-*.pt.*.tmp") if ckpt_dir.is_dir() else ():
            log.info("removing %s, a checkpoint left half-written by a killed run", stale)
            stale.unlink(missing_ok=True)
        atomic_write_json({"family": trainer.family, **trainer.config}, run_dir / "config.json")
        from torch.utils.tensorboard import SummaryWriter

        # events of steps after the checkpoint are dropped (those of its own step were logged before it was written);
        # a run from scratch drops every event an earlier start in this folder logged
        return SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if resumed_from is not None else 0)

    writer = dist_utils.on_main(prepare_folder, "preparing the run folder")

    last_ckpt: Path | None = resumed_from
    saved_step = start_step if resumed_from is not None else -1

    saved_seconds = prior_seconds  # the train_seconds of the newest checkpoint: what the result reports

    def save(step: int) -> Path:
        nonlocal saved_step, saved_seconds
        state = trainer.state_dict()
        # an update can make weights non-finite while the loss it was computed from was not: never save those
        bad = [f"{name}.{k}" for name, sd in state["modules"].items() for k, v in sd.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if dist_utils.any_true(bool(bad)):
            where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise NonFiniteLoss(f"non-finite weights after step {step} ({', '.join(bad[:3]) or 'on another process'}"
                                f"{', ...' if len(bad) > 3 else ''}); not saved; {where}")
        saved_step, saved_seconds = step, prior_seconds + trained_seconds()
        rng = dist_utils.all_gather_objects(capture_rng())
        path = ckpt_dir / f"ckpt-{step:08d}.pt"

        def write():  # the main process's; the others wait for it (and stop with it: a full disk)
            nonlocal last_ckpt
            atomic_save({"family": trainer.family, "version": CHECKPOINT_VERSION, "config": trainer.config,
                         "step": step, "rng": rng, "train_seconds": saved_seconds,
                         **state}, path)
            for old in _checkpoints(ckpt_dir)[:-keep_checkpoints]:
                old.unlink(missing_ok=True)
            last_ckpt = path

        dist_utils.on_main(write, f"writing checkpoint {path.name}")
        return path

    def log_scalars(step: int, values: dict[str, float], prefix: str) -> None:
        def write():
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(f"{prefix}/{k}", v, step)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "kind": prefix, "time": time.time(), **values}) + "\n")

        dist_utils.on_main(write, f"logging step {step}")

    result: dict[str, Any] = {"run_dir": str(run_dir), "start_step": start_step}
    terms_f: dict[str, float] = {}
    metrics: dict[str, float] = {}
    step = start_step
    bar = None
    if progress and main and steps > start_step:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start_step, desc=f"train {trainer.family}", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    side_seconds = 0.0  # of this call, in evaluations and sample images: not training time

    def trained_seconds() -> float:
        return time.perf_counter() - t0 - side_seconds

    @contextlib.contextmanager
    def off_the_clock():
        nonlocal side_seconds
        t = time.perf_counter()
        try:
            yield
        finally:
            side_seconds += time.perf_counter() - t

    def evaluate(step: int) -> dict[str, float]:
        with off_the_clock():
            values = dist_utils.on_main(lambda: trainer.evaluate(step), f"the evaluation at step {step}") or {}
            log_scalars(step, values, "eval")
        return values

    try:
        with _SignalFlag() as flag:
            batches = trainer.batches(start_step)
            while step < steps:
                batch = next(batches)
                terms = trainer.train_step(batch, step)
                terms_f = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}
                bad = {k: v for k, v in terms_f.items() if not math.isfinite(v)}
                if dist_utils.any_true(bool(bad)):  # every process stops, not only the one that saw it
                    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    what = ", ".join(f"{k}={v}" for k, v in terms_f.items()) if bad else "on another process"
                    raise NonFiniteLoss(f"non-finite loss at step {step}: {what}; {where}")
                step += 1
                if bar is not None:
                    bar.update(1)
                if log_every and step % log_every == 0:
                    log_scalars(step, {**terms_f, "sec_per_step": trained_seconds() / max(step - start_step, 1)},
                                "train")
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in list(terms_f.items())[:4]})
                if eval_every and step % eval_every == 0:
                    metrics = evaluate(step)
                if media_every and step % media_every == 0:
                    with off_the_clock():
                        dist_utils.on_main(lambda: trainer.log_media(step, writer, run_dir),
                                           f"the sample images at step {step}")
                if checkpoint_every and step % checkpoint_every == 0:
                    save(step)
                if dist_utils.any_true(flag.signum is not None):
                    path = save(step) if saved_step != step else ckpt_dir / f"ckpt-{step:08d}.pt"
                    raise TrainingInterrupted(f"interrupted at step {step}; checkpoint written to {path}; "
                                              f"continue with --resume {run_dir}")
            if saved_step != step:
                save(step)
            if eval_every and step % eval_every != 0:
                logged = _logged_eval(run_dir, step) if step == start_step else None
                metrics = evaluate(step) if logged is None else logged  # a finished run again: not logged twice
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    result.update({"step": step, "terms": terms_f, "metrics": metrics,
                   "checkpoint": str(ckpt_dir / f"ckpt-{step:08d}.pt"), "seconds": time.perf_counter() - t0,
                   "side_seconds": side_seconds, "call_train_seconds": trained_seconds(),
                   "train_seconds": saved_seconds})
    return result
