"""Training of the Siamese encoders (family ``encoder``): SimCLR / VICReg / SimSiam + trajectory loss, frame pairs.

One step:

1. two semantic views: augmentations of the centre image (``--pairs augment``), or of a frame and its partner in
   the same sequence (``same`` / ``nearby`` / ``distant``; the flip is shared by both frames of a pair);
2. the method's loss on the pooled backbone features of the two views (projector / predictor heads inside);
3. with ``traj_weight > 0``: the trajectory loss on the *unaugmented* (left, centre, right) triplet images, at
   the pooled features (default) or a mid-layer map (``traj_layer``), average-pooled to at most ``tap_grid`` x
   ``tap_grid`` cells (4: the taps the evaluation reads) and flattened;
4. one optimiser step; lr from the step index (warm-up + cosine), so resuming needs no scheduler state.

``--pairs dual`` (one model that is pose-informed and instance-invariant at once, the open problem SiamPose states): one
trunk, two sets of method heads, each frame drawn with a nearby *and* a distant partner. Head A ("heads") takes the loss
on (frame, nearby partner), head B ("heads_distant") on (frame, distant partner: any other frame of the sequence, so
sometimes an adjacent one, as SiamPose's ``uniform``), each pair augmented as in its single-purpose mode (4 backbone
passes per step instead of 2); the losses are summed. With ``traj_weight > 0`` the trajectory loss runs on (previous,
frame, next) consecutive frames of the same sequences (:meth:`SequenceFrames.consecutive`), unaugmented, at
``traj_layer`` of the shared trunk.

Under torchrun (WORLD_SIZE > 1) the whole network runs in one DistributedDataParallel forward, batch norms are
synchronised (:mod:`trajssl.distributed`), InfoNCE / VICReg see the embeddings of all processes, and the batch is
sharded by :func:`common.training.batch_iterator`. Online monitors: the mean per-dimension std of the normalised
embeddings (``std_z``, ``std_h``; scaled by sqrt(D), so ~1 = spread out, 0 = collapsed) every logged step, and kNN
category accuracy and 1-NN pose error on ``DIR/objects`` at each evaluation.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import distributed as dist_utils
from common.errors import ViewsslError
from common.training import Trainer, batch_iterator, eval_mode, seed_everything

from .augment import SemanticViews
from .data import PAIR_MODES, ImageFolder, SequenceFrames, TripletFolder, find_split
from .encoders import build_encoder, tap_vector
from .methods import METHODS, build_method, method_defaults
from .optim import OPTIMIZERS, build_optimizer, set_lr, warmup_cosine
from .trajectory_loss import trajectory_loss

log = logging.getLogger("viewssl.trajssl.trainer")

TRAJ_LAYERS = ("pooled", "layer2", "layer3", "layer4")

#: every config key and its default (None = the method's paper default, or derived)
DEFAULT_CONFIG = {
    "method": "vicreg",
    "traj_weight": 0.0,
    "traj_layer": "pooled",
    "pairs": "augment",
    "data": None,
    "image_size": 32,
    "batch_size": 32,
    "optimizer": None,          # lars for simclr / vicreg, sgd for simsiam
    "lr": None,                 # method base lr * batch / 256 (adamw: 1e-3)
    "weight_decay": None,       # method default (adamw: 0.05)
    "momentum": 0.9,
    "warmup_steps": None,       # 5 % of the horizon
    "schedule_steps": None,     # cosine horizon; None = steps (resolved, so a resume with more steps sees it change)
    "steps": 1000,
    "seed": 0,
    "arch": "resnet18",
    "small_stem": True,
    "weights": None,
    "augment": "full",
    "crop_scale_min": 0.08,
    "tap_grid": 4,
    "proj_hidden_dim": None,
    "proj_dim": None,
    "pred_hidden_dim": None,
    "temperature": None,
    "num_workers": 0,
    "eval_gallery": 1000,       # kNN monitor: at most this many DIR/objects/train images ...
    "eval_queries": 500,        # ... and this many DIR/objects/val (or test) queries
}


def resolve_config(config: dict) -> dict:
    """Fill defaults, check values (one-line :class:`ViewsslError` naming the option) and resolve derived ones."""
    unknown = sorted(set(config) - set(DEFAULT_CONFIG) - set(Trainer.resume_ignore_keys))
    if unknown:
        raise ViewsslError(f"unknown config key(s): {', '.join(unknown)}")
    c = {**DEFAULT_CONFIG, **{k: v for k, v in config.items() if v is not None or k not in DEFAULT_CONFIG}}
    if c["method"] not in METHODS:
        raise ViewsslError(f"--method {c['method']!r}: unknown method (available: {', '.join(METHODS)})")
    if c["pairs"] not in PAIR_MODES:
        raise ViewsslError(f"--pairs {c['pairs']!r}: expected one of {', '.join(PAIR_MODES)}")
    if c["traj_layer"] not in TRAJ_LAYERS:
        raise ViewsslError(f"--traj-layer {c['traj_layer']!r}: expected one of {', '.join(TRAJ_LAYERS)}")
    if not (isinstance(c["traj_weight"], (int, float)) and c["traj_weight"] >= 0 and math.isfinite(c["traj_weight"])):
        raise ViewsslError(f"--traj-weight {c['traj_weight']!r}: must be a number >= 0")
    for key in ("image_size", "batch_size", "steps"):
        if int(c[key]) < (2 if key == "batch_size" else 1):
            raise ViewsslError(f"--{key.replace('_', '-')} {c[key]}: too small")
    if c["image_size"] < 16:
        raise ViewsslError(f"--image-size {c['image_size']}: at least 16 pixels")
    if c["data"] is None:
        raise ViewsslError("--data: a dataset folder is required")
    d = method_defaults(c["method"])
    if c["optimizer"] is None:
        c["optimizer"] = d["optimizer"]
    if c["optimizer"] not in OPTIMIZERS:
        raise ViewsslError(f"--optimizer {c['optimizer']!r}: expected one of {', '.join(OPTIMIZERS)}")
    if c["lr"] is None:
        c["lr"] = 1e-3 if c["optimizer"] == "adamw" else d["lr"] * c["batch_size"] / 256
    if c["weight_decay"] is None:
        c["weight_decay"] = 0.05 if c["optimizer"] == "adamw" else d["weight_decay"]
    if not (math.isfinite(c["lr"]) and c["lr"] > 0):
        raise ViewsslError(f"--lr {c['lr']}: must be a finite number > 0")
    if not (math.isfinite(c["weight_decay"]) and c["weight_decay"] >= 0):
        raise ViewsslError(f"--weight-decay {c['weight_decay']}: must be a finite number >= 0")
    # The schedule is resolved into the config: resuming with a larger --steps would otherwise stretch the cosine
    # under the steps already run; now it shows as a config difference (keep it with --schedule-steps).
    c["schedule_steps"] = int(c["schedule_steps"] or c["steps"])
    if c["warmup_steps"] is None:
        c["warmup_steps"] = int(round(0.05 * c["schedule_steps"]))
    if c["schedule_steps"] < 1 or int(c["warmup_steps"]) < 0:
        raise ViewsslError(f"--schedule-steps {c['schedule_steps']} / --warmup-steps {c['warmup_steps']}: the "
                           "horizon must be >= 1 and the warm-up >= 0")
    for key in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim", "temperature"):
        if c[key] is None and key in d:
            c[key] = d[key]
    c["data"] = str(c["data"])
    return c


class SiameseNet(nn.Module):
    """Encoder + method heads, so that one DDP forward covers every backbone pass of a step."""

    def __init__(self, encoder: nn.Module, method: nn.Module, traj_layer: str, tap_grid: int,
                 method_b: nn.Module | None = None):
        super().__init__()
        self.encoder, self.method = encoder, method
        if method_b is not None:  # --pairs dual: the distant-pair heads (not registered otherwise)
            self.method_b = method_b
        self.traj_layer, self.tap_grid = traj_layer, tap_grid

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, triplet: torch.Tensor | None = None,
                v3: torch.Tensor | None = None, v4: torch.Tensor | None = None) -> dict:
        h1 = self.encoder(v1)["pooled"]
        h2 = self.encoder(v2)["pooled"]
        out = {"v1": {"h": h1, **self.method.heads(h1)}, "v2": {"h": h2, **self.method.heads(h2)}}
        if v3 is not None:
            h3 = self.encoder(v3)["pooled"]
            h4 = self.encoder(v4)["pooled"]
            out["v3"] = {"h": h3, **self.method_b.heads(h3)}
            out["v4"] = {"h": h4, **self.method_b.heads(h4)}
        if triplet is not None:
            f = self.encoder(triplet, taps=(self.traj_layer,))[self.traj_layer]
            out["traj"] = tap_vector(f, self.tap_grid)
        return out


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: mean per-dimension std of the L2-normalised embeddings, times sqrt(D) (0 = collapsed)."""
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


class EncoderTrainer(Trainer):
    family = "encoder"
    #: also free to change on resume: they do not change what is trained
    resume_ignore_keys = Trainer.resume_ignore_keys + ("num_workers", "eval_gallery", "eval_queries")

    def resume_ignored(self, saved_config: dict, step: int) -> tuple[str, ...]:
        """As :class:`common.training.Trainer`, plus the schedule keys of a checkpoint written before they were
        resolved into the config (None there) when its schedule is this run's."""
        ignored = super().resume_ignored(saved_config, step)
        total, warmup = saved_config.get("schedule_steps"), saved_config.get("warmup_steps")
        if total is None or warmup is None:
            total = int(total or saved_config.get("steps") or 0)
            warmup = int(round(0.05 * total)) if warmup is None else int(warmup)
            if (total, warmup) == self.schedule():
                ignored = ignored + ("schedule_steps", "warmup_steps")
        return ignored

    def __init__(self, config: dict, device: torch.device):
        config = resolve_config(config)
        super().__init__(config, device)
        c = self.config
        seed_everything(int(c["seed"]))
        self.world = dist_utils.world_size()
        self._build_data(c)

        self.encoder = build_encoder(c).to(device)
        self.method = build_method(c["method"], self.encoder.feat_dim, c).to(device)
        self.dual = c["pairs"] == "dual"
        self.method_b = build_method(c["method"], self.encoder.feat_dim, c).to(device) if self.dual else None
        net = SiameseNet(self.encoder, self.method, c["traj_layer"], int(c["tap_grid"]), self.method_b)
        if self.world > 1:
            from .distributed import convert_sync_batchnorm

            net = convert_sync_batchnorm(net, device)
            self.encoder, self.method = net.encoder, net.method
            self.method_b = getattr(net, "method_b", None)
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = net
        parts = {"encoder": self.encoder, "projector": self.method.projector}
        if hasattr(self.method, "predictor"):
            parts["predictor"] = self.method.predictor
        if self.dual:
            parts["projector_distant"] = self.method_b.projector
            if hasattr(self.method_b, "predictor"):
                parts["predictor_distant"] = self.method_b.predictor
        self.optimizer = build_optimizer(parts, c["optimizer"], float(c["lr"]), float(c["weight_decay"]),
                                         momentum=float(c["momentum"]),
                                         fixed_lr=(("predictor", "predictor_distant") if c["method"] == "simsiam"
                                                   else ()))
        self.augment = SemanticViews(int(c["image_size"]), mode=c["augment"],
                                     crop_scale=(float(c["crop_scale_min"]), 1.0)).to(device)
        self._eval_cache = None

    # --- data ----------------------------------------------------------------------------------------------------
    def _build_data(self, c: dict) -> None:
        size, data = int(c["image_size"]), c["data"]
        self.triplets = self.frames = None
        if c["traj_weight"] > 0 and c["pairs"] != "dual":  # dual: consecutive frames of the sequences instead
            root = find_split(data, "triplets")
            if root is None:
                raise ViewsslError("--traj-weight > 0 needs triplets: no triplets/train/labels.csv (with triplet and "
                                   "position columns) in this folder", data)
            self.triplets = TripletFolder(root, size)
        if c["pairs"] == "augment":
            if self.triplets is not None:
                self.source = self.triplets
            else:
                root = find_split(data, "triplets") or find_split(data, "objects")
                if root is None:
                    raise ViewsslError("no training images: expected triplets/train, objects/train or a labels.csv",
                                       data)
                self.source = (TripletFolder(root, size) if find_split(data, "triplets") == root
                               else ImageFolder(root, size))
        else:
            root = find_split(data, "sequences")
            if root is None:
                raise ViewsslError(f"--pairs {c['pairs']} needs sequences: no sequences/train/labels.csv "
                                   "(with sequence and frame columns) in this folder", data)
            self.frames = SequenceFrames(root, size)
            self.source = self.frames

    def batches(self, start_step: int) -> Iterator:
        c = self.config
        bs, seed, workers = int(c["batch_size"]), int(c["seed"]), int(c["num_workers"])
        main = batch_iterator(self.source, bs, seed, start_step, num_workers=workers)
        extra = None
        if self.triplets is not None and self.source is not self.triplets:
            extra = batch_iterator(self.triplets, bs, seed + 1, start_step, num_workers=workers)
        for batch in main:
            if self.frames is not None and c["pairs"] == "dual":
                batch["partner"] = self.frames.load(self.frames.partners(batch["index"], "nearby"))
                batch["partner_distant"] = self.frames.load(self.frames.partners(batch["index"], "distant"))
                if c["traj_weight"] > 0:
                    batch["triplet"] = torch.cat([self.frames.load(r) for r in self.frames.consecutive(batch["index"])])
            elif self.frames is not None:
                rows = self.frames.partners(batch["index"], c["pairs"])
                batch["partner"] = self.frames.load(rows)
            if extra is not None:
                t = next(extra)
                batch["triplet"] = torch.cat([t["left"], t["image"], t["right"]])
            elif self.triplets is not None:
                batch["triplet"] = torch.cat([batch["left"], batch["image"], batch["right"]])
            yield batch

    # --- training --------------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        if self.dual:
            return {"encoder": self.encoder, "heads": self.method, "heads_distant": self.method_b}
        return {"encoder": self.encoder, "heads": self.method}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def schedule(self) -> tuple[int, int]:
        """(cosine horizon, warm-up steps) of the learning rate."""
        return int(self.config["schedule_steps"]), int(self.config["warmup_steps"])

    def train_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        c, dev = self.config, self.device
        factor = set_lr(self.optimizer, warmup_cosine(step, *self.schedule()))
        self.net.train()
        dtype = self.encoder.stem[0].weight.dtype
        x = batch["image"].to(dev, dtype, non_blocking=True)
        x2 = batch["partner"].to(dev, dtype, non_blocking=True) if "partner" in batch else x
        v1, v2 = self.augment(x, x2, sync_flip="partner" in batch)
        triplet = batch["triplet"].to(dev, dtype, non_blocking=True) if "triplet" in batch else None
        v3 = v4 = None
        if self.dual:  # head B: the frame and its distant partner, augmented as --pairs distant does
            v3, v4 = self.augment(x, batch["partner_distant"].to(dev, dtype, non_blocking=True), sync_flip=True)
        out = self.net(v1, v2, triplet, v3, v4)
        terms = self.method.loss(out["v1"], out["v2"])
        if self.dual:
            far = self.method_b.loss(out["v3"], out["v4"])
            terms = {"semantic": terms["semantic"] + far["semantic"],
                     **{f"{k}_nearby": v for k, v in terms.items()}, **{f"{k}_distant": v for k, v in far.items()}}
        loss = terms["semantic"]
        if triplet is not None:
            traj = trajectory_loss(*out["traj"].chunk(3))
            terms["trajectory"] = traj.detach()
            loss = loss + float(c["traj_weight"]) * traj
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        terms = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        terms["std_z"] = embedding_spread(out["v1"]["z"])
        terms["std_h"] = embedding_spread(out["v1"]["h"])
        if self.dual:
            terms["std_z_distant"] = embedding_spread(out["v3"]["z"])
        terms["lr"] = torch.tensor(float(c["lr"]) * factor)
        return terms

    # --- online monitor ------------------------------------------------------------------------------------------
    def _eval_data(self):
        """(gallery, queries) of DIR/objects for the kNN monitor, loaded once; None if the folder has none."""
        if self._eval_cache is None:
            from pathlib import Path

            from common.data.labels import LabeledFolder

            root = Path(self.config["data"]) / "objects"
            query_dir = next((root / s for s in ("val", "test") if (root / s / "labels.csv").is_file()), None)
            if not (root / "train" / "labels.csv").is_file() or query_dir is None:
                self._eval_cache = False
                return None
            size = int(self.config["image_size"])
            sets = []
            for folder, cap in ((root / "train", self.config["eval_gallery"]),
                                (query_dir, self.config["eval_queries"])):
                ds = LabeledFolder(folder, size)
                g = torch.Generator().manual_seed(0)
                idx = torch.randperm(len(ds), generator=g)[: int(cap)].sort().values.tolist()
                items = [ds[i] for i in idx]
                sets.append({"image": torch.stack([it["image"] for it in items]),
                             "angles": torch.stack([it["angles"] for it in items]),
                             "category": torch.tensor([it["category"] for it in items])})
            self._eval_cache = tuple(sets)
            log.info("kNN monitor: %d gallery images from %s/train, %d queries from %s", len(sets[0]["image"]),
                     root, len(sets[1]["image"]), query_dir)
        return self._eval_cache or None

    @torch.no_grad()
    def features(self, images: torch.Tensor, taps=("pooled",), batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Eval-mode features of images (B, 3, S, S) as (B, D) vectors per tap (no gradient, no BN update)."""
        outs: dict[str, list] = {t: [] for t in taps}
        with eval_mode(self.encoder):
            for i in range(0, len(images), batch_size):
                f = self.encoder(images[i:i + batch_size].to(self.device), taps=tuple(taps))
                for t in taps:
                    outs[t].append(tap_vector(f[t], int(self.config["tap_grid"])).float().cpu())
        return {t: torch.cat(v) for t, v in outs.items()}

    def evaluate(self, step: int) -> dict[str, float]:
        if not dist_utils.is_main():
            return {}
        data = self._eval_data()
        if data is None:
            return {}
        from common.eval.knn import knn_classify, knn_search
        from common.eval.pose import geodesic_errors_deg, geodesic_summary
        from common.geometry import angles_to_matrix

        gallery, queries = data
        fg = self.features(gallery["image"], ("pooled", "layer3"))
        fq = self.features(queries["image"], ("pooled", "layer3"))
        metrics = {}
        for tap in ("pooled", "layer3"):
            if (gallery["category"] >= 0).all():
                pred = knn_classify(fg[tap], gallery["category"], fq[tap], k=20, temperature=0.07)
                metrics[f"knn_category_acc/{tap}"] = float((pred == queries["category"]).float().mean())
            nn_idx = knn_search(fg[tap], fq[tap], 1).indices[:, 0]
            rg = angles_to_matrix(*gallery["angles"][nn_idx].double().unbind(1))
            rq = angles_to_matrix(*queries["angles"].double().unbind(1))
            pose = geodesic_summary(geodesic_errors_deg(rg, rq))  # as common.eval scores it
            metrics[f"knn_pose_median_deg/{tap}"] = pose["median_geodesic"]
            metrics[f"knn_pose_acc30/{tap}"] = pose["acc_30"]
        return metrics
