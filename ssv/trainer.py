"""SSV training: the official loop's two phases on :class:`common.training.Trainer`, plus a supervised baseline.

One :meth:`SSVTrainer.train_step` = one V (critic) step then one S (generator) step, as in the release (n_critic = 1):

**V step** (S frozen; its graph still carries gradients to V's predictions):

- WGAN critic on real images with the drift term: ``-E V(x) + drift E V(x)^2 + E V(S(z1, v1))``;
- gradient penalty ``gp_weight * E (||grad V(x_hat)|| - 1)^2`` on real/fake interpolates;
- cycle on fakes: ``w_style ||z1 - z_hat||^2 + w_view L_v(v1, v_hat)``;
- image consistency on reals: ``w_imc (1 - cos(Phi(x), Phi(S(z_hat, v_hat))))`` (weight applied once; the release
  applied it twice), trilinear rotation so it reaches the angle heads;
- symmetry on reals: ``w_sym [L_v(V(hflip x), flip(sg V(x))) + ||z_hat(hflip x) - sg z_hat(x)||^2]``.

**S step** (V frozen, in train mode as in the release): a batch of 3 groups (z2, v2), (z2, v3), (z3, v2) of
``g_group`` samples each; ``-E V(S) + w_style ||z - z_hat||^2 + w_view L_v(v, v_hat)`` and the generator symmetry
``w_gsym SmoothL1(S(z2, flip v2), sg hflip S(z2, v2))``. Then the EMA generator is updated (decay ``ema_decay``,
ramped up as min(ema_decay, (1 + step) / (10 + step)); it draws the sample grids and the samples of
the experiments' diagnostics, and never feeds back into training).

**EMA of V** (``v_ema_decay`` > 0, not in the release): after every V step ``V_ema`` <- the same ramped average of V's
weights. It never feeds back into training (the trajectory of V and S is the same with or without it) and is
evaluated beside V (``ema/...`` metrics, :meth:`SSVTrainer.pose_model` ``(ema=True)``): V's viewpoint read-out
jitters from step to step at the cpu presets' learning rate, and averaging the weights over the last few hundred steps
removes part of that jitter. The supervised baseline keeps one too, so both can be compared with the same treatment.
A run resumed from a checkpoint written before V_ema existed starts it there (``v_ema_since``), ramp-up included.

Adam with betas (0, 0.99); the mapping MLP's learning rate is ``lr_mapping_mult`` x the generator's. Style codes are
U(-1, 1); viewpoints are drawn independently and uniformly in [-range, range] (radians in the config; the defaults are
the release's 300W-LP ranges: azimuth +-1.4 (80 deg), elevation +-1.2 (69 deg), tilt +-0.75 (43 deg)).

**Illumination** (``augment_gain > 0``, not in the release): every image V reads, real or synthetic, first gets a
random linear brightness ramp from one image edge (kornia's ``RandomLinearIllumination`` draws it, gain
U(0, augment_gain) in [0, 1] units; it is added without kornia's clamp, since S's output is not bounded). The
reconstruction of L_imc gets the same ramp as its real image. Without it, on the synthetic heads, S learns to show
azimuth as a left-right shading asymmetry, and V then reads the light direction of real heads as their azimuth.

**High-pass** (``d_highpass`` = sigma > 0, not in the release): V's trunk, hence the critic, every head and the
``critic`` Phi, reads ``x - GaussianBlur_sigma(x)`` (:meth:`ssv.networks.ViewpointNetwork.prefilter`) instead of
``x``, for real and synthetic images alike; linear shading and background ramps are removed exactly and smooth ones
strongly attenuated, so S can barely show a viewpoint with them and V can barely read one from them (the contrast of
edges passes). S's own low frequencies are then unconstrained (its raw samples have arbitrary colours);
``samples/*-seen_by_v.png`` shows what V sees. Part of V, so the supervised baseline gets it too. It makes the
illumination ramps pointless, so the CLI refuses both together.

**Learning-rate decay** (``lr_decay_end > lr_decay_start``, not in the release): every learning rate (V, S, the
mapping MLP, the supervised V) is multiplied by :func:`lr_multiplier`, a cosine from 1 at step ``lr_decay_start`` to
``lr_final`` at ``lr_decay_end``, constant after. The factor is a function of the step alone, so resume stays exact,
and a checkpoint may be resumed with a decay that starts at or after its step (:meth:`SSVTrainer.resume_ignored`):
the steps it has run are the same under either schedule, so a finished run can be continued with a decay.

Ablations: ``w_imc = 0`` (``--no-imc``), ``w_sym = w_gsym = 0`` (``--no-sym``); every weight is a config key.

**Supervised baseline** (``supervised = True``): the same V trained with the labels (L_v only, random horizontal flips
with mirrored labels), so the comparison isolates the self-supervision.

All randomness (z, v, flips, dropout, GP interpolation, illumination ramps) comes from the global torch RNG in the
main process, so :func:`common.training.fit` resumes bit-exactly. Under torchrun each rank takes ``batch_size / world``
real images and ``g_group / world`` generator samples, and gradients are averaged over ranks after each backward.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from common import distributed as dist_utils
from common.errors import ViewsslError
from common.training import Trainer, batch_iterator, seed_everything

from . import losses
from .features import build_phi, resolve_phi
from .networks import NETWORK_KEYS, PRESETS, build_synthesis, build_viewpoint, ema_copy, ema_update, ramped_decay
from .networks import to_model_range, to_unit_range
from .viewpoint import flip_angles

log = logging.getLogger("viewssl.ssv.trainer")

__all__ = ["SSVTrainer", "default_config", "TRAIN_DEFAULTS", "open_images", "sample_styles", "sample_viewpoints"]

#: Training defaults per preset (network sizes are in :data:`ssv.networks.PRESETS`).
TRAIN_DEFAULTS: dict[str, dict] = {
    "paper": {"batch_size": 2, "g_group": 2, "phi_size": 224},
    # lr 2e-3, not the release's 5e-4: why is in ssv/README.md ("Deliberate differences from the release")
    "cpu": {"batch_size": 16, "g_group": 8, "phi_size": 64, "lr_d": 2e-3, "lr_g": 2e-3},
}
TRAIN_DEFAULTS["cpu64"] = dict(TRAIN_DEFAULTS["cpu"])  # the same training at 64x64, as PRESETS["cpu64"]
TRAIN_DEFAULTS["cpu64w"] = dict(TRAIN_DEFAULTS["cpu"])

_COMMON_DEFAULTS = {
    "family": "ssv",
    "data": None,
    "eval_data": None,
    "seed": 0,
    "num_workers": 0,
    "supervised": False,
    # optimisation (release: Adam(0, 0.99), lr 5e-4 for V and S, 5e-6 for the mapping MLP; EMA 0.999;
    # the cpu presets raise lr, see TRAIN_DEFAULTS)
    "lr_d": 5e-4,
    "lr_g": 5e-4,
    "lr_mapping_mult": 0.01,
    "adam_betas": [0.0, 0.99],
    # cosine decay of every learning rate from 1x at step lr_decay_start to lr_final x at lr_decay_end, constant after
    # (not in the release; lr_decay_end <= lr_decay_start = off); see "Learning-rate decay" in the docstring
    "lr_decay_start": 0,
    "lr_decay_end": 0,
    "lr_final": 0.1,
    "ema_decay": 0.999,
    # EMA of V's weights, evaluated beside V (not in the release; does not change training; 0 = none)
    "v_ema_decay": 0.998,
    "lr_supervised": 1e-3,
    "supervised_flip": True,
    # loss weights (release README command)
    "gp_weight": 10.0,
    "drift": 1e-3,
    "w_style": 0.8,
    "w_view": 0.8,
    "w_imc": 0.4,
    "w_sym": 0.4,
    "w_gsym": 0.5,
    "phi": "auto",
    "phi_weights": None,
    # viewpoint sampling half-ranges in radians (release: 300W-LP faces)
    "az_range": 1.4,
    "el_range": 1.2,
    "tilt_range": 0.75,
    # random linear illumination on every image V reads (0 = off, the release); see "Illumination" in the docstring
    "augment_gain": 0.0,
}


def default_config(preset: str = "cpu", **overrides) -> dict:
    """The full, JSON-able config of a preset with ``overrides`` applied (unknown keys are an error)."""
    if preset not in PRESETS:
        raise ViewsslError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    config = {"preset": preset, **_COMMON_DEFAULTS, **PRESETS[preset], **TRAIN_DEFAULTS[preset]}
    unknown = sorted(set(overrides) - set(config) - {"steps"})
    if unknown:
        raise ValueError(f"unknown SSV config keys: {', '.join(unknown)}")
    config.update({k: v for k, v in overrides.items()})
    return config


def open_images(path, size: int):
    """Any image folder the project can open: ``common.data.formats.open_dataset`` when present, else ``labels.csv``."""
    if path is None:
        raise ViewsslError("--data: no training data given")
    try:
        from common.data.formats import open_dataset
    except ModuleNotFoundError as e:
        if e.name != "common.data.formats":
            raise
        from common.data.labels import LabeledFolder

        return LabeledFolder(path, size=size)
    return open_dataset(path, size)


def sample_styles(n: int, code_dim: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2 * code_dim) style codes (3-D and 2-D parts), U(-1, 1), from ``generator`` (default: the global RNG)."""
    return (torch.rand(n, 2 * code_dim, generator=generator) * 2.0 - 1.0).to(device)


def sample_viewpoints(n: int, ranges: tuple[float, float, float], device=None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 3) viewpoints, each angle independently U(-range, range) (radians), from ``generator`` (default: the
    global RNG)."""
    r = torch.tensor(ranges, dtype=torch.float32)
    return ((torch.rand(n, 3, generator=generator) * 2.0 - 1.0) * r).to(device)


def lr_multiplier(step: int, start: int, end: int, final: float) -> float:
    """The learning-rate factor at ``step``: 1 before ``start``, a cosine from 1 to ``final`` between ``start`` and
    ``end``, ``final`` from ``end`` on; 1 everywhere when ``end <= start`` (no decay)."""
    if end <= start or step <= start:
        return 1.0
    t = min(1.0, (step - start) / (end - start))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_schedule(config: dict) -> tuple[int, int, float]:
    """(start, end, final) of a config's learning-rate decay, the arguments of :func:`lr_multiplier` after the step."""
    return int(config["lr_decay_start"]), int(config["lr_decay_end"]), float(config["lr_final"])


def _same_lr_before(old: dict, new: dict, step: int) -> bool:
    """Whether two configs' learning-rate decays give the same factor at every step a checkpoint of ``step`` ran."""
    return all(lr_multiplier(s, *lr_schedule(old)) == lr_multiplier(s, *lr_schedule(new)) for s in range(step))


def _set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _average_gradients(module: torch.nn.Module) -> None:
    """Average parameter gradients over ranks (no-op in one process)."""
    if not dist_utils.is_distributed() or dist_utils.world_size() == 1:
        return
    world = dist_utils.world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _broadcast_parameters(module: torch.nn.Module) -> None:
    if not dist_utils.is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


class SSVTrainer(Trainer):
    """The SSV family's trainer (family ``"ssv"``); see the module docstring. ``config`` = :func:`default_config`."""

    family = "ssv"
    #: v_ema_decay only changes the evaluated average, never the training (a run from before it resumes with one)
    resume_ignore_keys = Trainer.resume_ignore_keys + ("num_workers", "v_ema_decay")
    #: runs from before these options
    resume_defaults = {"augment_gain": 0.0, "d_highpass": 0.0, "g_ball_mask": False, "lr_decay_start": 0,
                       "lr_decay_end": 0, "lr_final": 0.1}
    LR_DECAY_KEYS = ("lr_decay_start", "lr_decay_end", "lr_final")
    #: L_imc's feature network: only compared on resume when L_imc is on
    PHI_KEYS = ("phi", "phi_size", "phi_weights")
    #: what only the GAN uses: the supervised baseline resumes whatever their defaults have become since
    GAN_ONLY_KEYS = ("n_mlp", "volume_size", "rotate_size", "g_ball_mask", "g_channels_3d", "g_channels_3d_post",
                     "g_projection", "g_channels_2d", "g_group", "lr_d", "lr_g", "lr_mapping_mult", "adam_betas",
                     "ema_decay", "gp_weight", "drift", "w_style", "w_view", "w_imc", "w_sym", "w_gsym", "phi",
                     "phi_size", "phi_weights", "az_range", "el_range", "tilt_range", "augment_gain")

    def __init__(self, config: dict, device: torch.device = torch.device("cpu")):
        missing = [k for k in NETWORK_KEYS if k not in config]
        if missing:
            raise ValueError(f"SSV config lacks {', '.join(missing)}; build it with ssv.trainer.default_config")
        super().__init__(config, device)
        c = self.config
        self.supervised = bool(c.get("supervised", False))
        if self.supervised:
            self.resume_ignore_keys = type(self).resume_ignore_keys + self.GAN_ONLY_KEYS
        self.world = dist_utils.world_size()
        for key in ("batch_size", "g_group"):
            if int(c[key]) % self.world:
                raise ViewsslError(f"--{key.replace('_', '-')} {c[key]} is not divisible by the {self.world} processes")
        torch.manual_seed(int(c["seed"]))  # identical initial weights on every rank
        self.V = build_viewpoint(c).to(device)
        self.head = self.V.view_head
        _broadcast_parameters(self.V)
        self.v_ema_decay = float(c.get("v_ema_decay", 0.0))
        self.V_ema = ema_copy(self.V).eval() if self.v_ema_decay > 0 else None
        self.v_ema_since = 0  # the step V_ema started at (later than 0 for a run resumed from before V_ema existed)
        if self.supervised:
            self.opt_V = torch.optim.Adam(self.V.parameters(), lr=c["lr_supervised"])
        else:
            self.G = build_synthesis(c).to(device)
            _broadcast_parameters(self.G)
            self.G_ema = ema_copy(self.G).eval()
            betas = tuple(c["adam_betas"])
            self.opt_V = torch.optim.Adam(self.V.parameters(), lr=c["lr_d"], betas=betas)
            mapping = list(self.G.mapping.parameters())
            ids = {id(p) for p in mapping}
            rest = [p for p in self.G.parameters() if id(p) not in ids]
            self.opt_G = torch.optim.Adam(
                [{"params": rest}, {"params": mapping, "lr": c["lr_g"] * c["lr_mapping_mult"]}],
                lr=c["lr_g"],
                betas=betas,
            )
            self.phi_name, self.phi = None, None
            if c["w_imc"] > 0:
                self.phi_name = resolve_phi(c.get("phi", "auto"), c.get("phi_weights"))
                self.phi = build_phi(self.phi_name, critic=self.V, weights_path=c.get("phi_weights"),
                                     input_size=c.get("phi_size")).to(device)
                log.info("L_imc feature network Phi: %s", self.phi_name)
        # the rates the optimisers were built with; --lr-decay scales them (set_learning_rates)
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers().items()}
        self.ranges = (float(c["az_range"]), float(c["el_range"]), float(c["tilt_range"]))
        self.illumination = None
        if float(c.get("augment_gain", 0.0)) > 0 and not self.supervised:
            from kornia.augmentation import RandomLinearIllumination

            self.illumination = RandomLinearIllumination(gain=(0.0, float(c["augment_gain"])), p=1.0)
        self._dataset = None
        seed_everything(int(c["seed"]))  # training randomness: seed + rank

    # ------------------------------------------------------------------------------------------------ plumbing
    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"V": self.V} if self.supervised else {"V": self.V, "G": self.G, "G_ema": self.G_ema}
        if self.V_ema is not None:
            mods["V_ema"] = self.V_ema
        return mods

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.V_ema is not None:
            state["v_ema_since"] = self.v_ema_since
        return state

    def load_state_dict(self, state: dict, source: Path | None = None) -> None:
        """As :meth:`common.training.Trainer.load_state_dict`; a checkpoint from before ``V_ema`` starts it at V, at
        the checkpoint's step (its ramp-up starts there too)."""
        saved = state.get("modules", {})
        self.v_ema_since = int(state.get("v_ema_since", 0))
        if self.V_ema is not None and "V_ema" not in saved and "V" in saved:
            self.v_ema_since = int(state.get("step", 0))
            log.info("the checkpoint has no V_ema (written before it existed): V_ema starts as its V at step %d",
                     self.v_ema_since)
            state = {**state, "modules": {**saved, "V_ema": saved["V"]}}
        super().load_state_dict(state, source)

    def update_v_ema(self, step: int) -> None:
        """V_ema <- EMA of V, ramped up as the generator's (:func:`ssv.networks.ramped_decay`) from the step V_ema
        started at."""
        if self.V_ema is not None:
            ema_update(self.V_ema, self.V, ramped_decay(self.v_ema_decay, step - self.v_ema_since))

    def resume_ignored(self, saved_config: dict, step: int) -> tuple[str, ...]:
        """As :class:`common.training.Trainer`, plus the learning-rate decay keys when the checkpoint's schedule and
        this one agree on every step the checkpoint has run (e.g. a decay that starts at or after its step), and
        Phi's keys when neither run uses L_imc."""
        ignored = super().resume_ignored(saved_config, step)
        if _same_lr_before({**self.resume_defaults, **saved_config}, self.config, step):
            ignored = ignored + self.LR_DECAY_KEYS
        if not saved_config.get("w_imc") and not self.config.get("w_imc"):
            ignored = ignored + self.PHI_KEYS  # without L_imc on either side, Phi is never built
        return ignored

    def set_learning_rates(self, step: int) -> float:
        """Every optimiser's learning rates <- base x :func:`lr_multiplier` at ``step`` (the config's rates, also
        after a checkpoint restored its own); returns the factor."""
        mult = lr_multiplier(step, *lr_schedule(self.config))
        for name, opt in self.optimizers().items():
            for group, base in zip(opt.param_groups, self.base_lrs[name]):
                group["lr"] = base * mult
        return mult

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self.supervised:
            return {"V": self.opt_V}
        return {"V": self.opt_V, "G": self.opt_G}

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = open_images(self.config["data"], self.config["image_size"])
            if len(self._dataset) == 0:
                raise ViewsslError("the training folder has no images", self.config["data"])
        return self._dataset

    def batches(self, start_step: int) -> Iterator:
        return batch_iterator(self.dataset, int(self.config["batch_size"]), int(self.config["seed"]), start_step,
                              num_workers=int(self.config.get("num_workers", 0)))

    def sample_z(self, n: int) -> torch.Tensor:
        return sample_styles(n, int(self.config["code_dim"]), self.device)

    def sample_v(self, n: int) -> torch.Tensor:
        return sample_viewpoints(n, self.ranges, self.device)

    def illuminate(self, images: torch.Tensor, ramp: torch.Tensor | None = None):
        """(B, 3, H, W) model-range images -> (images + ramp, ramp); a new ramp is drawn unless one is given.

        Identity (ramp None) when ``augment_gain`` is 0. The ramp comes from the global RNG (exact resume).
        """
        if self.illumination is None:
            return images, None
        if ramp is None:
            params = self.illumination.forward_parameters(images.shape)
            ramp = 2.0 * params["gradient"].to(images.device, images.dtype)  # [0, 1] units -> model range
        return images + ramp, ramp

    def _v_forward(self, *images: torch.Tensor) -> list[dict]:
        """V on several batches: one concatenated pass (per-sample ops only) unless minibatch-stddev couples them."""
        if self.V.mbstd or len(images) == 1:
            return [self.V(x) for x in images]
        sizes = [x.shape[0] for x in images]
        out = self.V(torch.cat(images))
        parts = []
        start = 0
        for n in sizes:
            sl = slice(start, start + n)
            parts.append({"score": out["score"][sl], "z": out["z"][sl], "feat": out["feat"][sl],
                          "view": {k: v[sl] for k, v in out["view"].items()}})
            start += n
        return parts

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        mult = self.set_learning_rates(step)
        start, end, _ = lr_schedule(self.config)
        decaying = end > start
        if self.supervised:
            terms = self._supervised_step(batch)
            self.update_v_ema(step)
            return {**terms, "lr_mult": torch.tensor(mult)} if decaying else terms
        c = self.config
        x = to_model_range(batch["image"].to(self.device, non_blocking=True))
        B = x.shape[0]
        self.G.train()
        self.V.train()

        # ---- V (critic / analysis) step: S frozen
        _set_requires_grad(self.G, False)
        _set_requires_grad(self.V, True)
        z1, v1 = self.sample_z(B), self.sample_v(B)
        with torch.no_grad():
            fake = self.G(z1, v1)
        x, x_ramp = self.illuminate(x)
        fake, _ = self.illuminate(fake)
        use_sym = c["w_sym"] > 0
        outs = self._v_forward(*([x, losses.hflip(x), fake] if use_sym else [x, fake]))
        out_real, out_fake = outs[0], outs[-1]
        l_critic = losses.wgan_critic_loss(out_real["score"], out_fake["score"], drift=c["drift"])
        l_style = losses.style_loss(out_fake["z"], z1)
        l_view = self.head.loss(out_fake["view"], self.head.encode(v1))
        total = l_critic + losses.cycle_loss(l_style, l_view, c["w_style"], c["w_view"])
        terms = {"d_critic": l_critic.detach(), "d_style": l_style.detach(), "d_view": l_view.detach(),
                 "wdist": (out_real["score"].mean() - out_fake["score"].mean()).detach()}
        if use_sym:
            target = self.head.pseudo_target(out_real["view"], flip=True)
            l_sym = losses.view_symmetry_loss(self.head.loss, outs[1]["view"], target, outs[1]["z"], out_real["z"])
            total = total + c["w_sym"] * l_sym
            terms["d_sym"] = l_sym.detach()
        if c["w_imc"] > 0:
            v_hat = self.V.decode(out_real["view"])
            recon, _ = self.illuminate(self.G(out_real["z"], v_hat), x_ramp)
            with torch.no_grad():
                feat_real = self.phi(x)
            l_imc = losses.image_consistency_loss(feat_real, self.phi(recon))
            total = total + c["w_imc"] * l_imc
            terms["d_imc"] = l_imc.detach()
        if c["gp_weight"] > 0:
            gp = losses.gradient_penalty(self.V.critic, x, fake)
            total = total + c["gp_weight"] * gp
            terms["d_gp"] = gp.detach()
        self.opt_V.zero_grad(set_to_none=True)
        total.backward()
        _average_gradients(self.V)
        self.opt_V.step()
        self.update_v_ema(step)
        terms["d_total"] = total.detach()

        # ---- S (generator) step: V frozen, still in train mode (dropout on, as in the release)
        _set_requires_grad(self.G, True)
        _set_requires_grad(self.V, False)
        n = int(c["g_group"]) // self.world
        z2, z3 = self.sample_z(n), self.sample_z(n)
        v2, v3 = self.sample_v(n), self.sample_v(n)
        zs, vs = torch.cat([z2, z2, z3]), torch.cat([v2, v3, v2])
        use_gsym = c["w_gsym"] > 0
        if use_gsym:
            images = self.G(torch.cat([zs, z2]), torch.cat([vs, flip_angles(v2)]))
            images, flipped_view = images[: 3 * n], images[3 * n :]
        else:
            images = self.G(zs, vs)
        out = self.V(self.illuminate(images)[0])
        g_adv = losses.generator_adversarial_loss(out["score"])
        g_style = losses.style_loss(out["z"], zs)
        g_view = self.head.loss(out["view"], self.head.encode(vs))
        total_g = g_adv + losses.cycle_loss(g_style, g_view, c["w_style"], c["w_view"])
        terms.update({"g_adv": g_adv.detach(), "g_style": g_style.detach(), "g_view": g_view.detach()})
        if use_gsym:
            g_sym = losses.generator_symmetry_loss(flipped_view, images[:n])
            total_g = total_g + c["w_gsym"] * g_sym
            terms["g_sym"] = g_sym.detach()
        self.opt_G.zero_grad(set_to_none=True)
        total_g.backward()
        _average_gradients(self.G)
        self.opt_G.step()
        _set_requires_grad(self.V, True)
        ema_update(self.G_ema, self.G, ramped_decay(c["ema_decay"], step))
        terms["g_total"] = total_g.detach()
        if decaying:
            terms["lr_mult"] = torch.tensor(mult)
        return terms

    def _supervised_step(self, batch) -> dict[str, torch.Tensor]:
        x = to_model_range(batch["image"].to(self.device))
        angles = batch["angles"].to(self.device).float()
        if not torch.isfinite(angles).all():
            raise ViewsslError("--supervised needs viewpoint labels for every training image", self.config["data"])
        if self.config.get("supervised_flip", True):
            flip = torch.rand(x.shape[0]) < 0.5
            flip_d = flip.to(self.device)
            x = torch.where(flip_d.view(-1, 1, 1, 1), losses.hflip(x), x)
            angles = torch.where(flip_d.view(-1, 1), flip_angles(angles), angles)
        self.V.train()
        out = self.V(x)
        loss = self.head.loss(out["view"], self.head.encode(angles))
        self.opt_V.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(self.V)
        self.opt_V.step()
        with torch.no_grad():
            err = (self.V.decode(out["view"]) - angles).remainder(2 * math.pi)
            err = torch.minimum(err, 2 * math.pi - err).mean(0)
        return {"sup_view": loss.detach(), "sup_mae_az_deg": torch.rad2deg(err[0]),
                "sup_mae_el_deg": torch.rad2deg(err[1]), "sup_mae_tilt_deg": torch.rad2deg(err[2])}

    # ------------------------------------------------------------------------------------------------ outputs
    def pose_model(self, ema: bool = False):
        """The current V (``ema``: V_ema) as a :class:`ssv.model_io.SSVPoseModel` (shares the module; eval mode
        while in use)."""
        from .model_io import SSVPoseModel

        if ema and self.V_ema is None:
            raise ValueError("this run keeps no EMA of V (v_ema_decay = 0)")
        return SSVPoseModel(self.V_ema if ema else self.V, self.config, self.device)

    def evaluate(self, step: int) -> dict[str, float]:
        """Pose metrics of V (and, as ``ema/...``, of V_ema) on the labelled ``eval_data`` folder, through
        ``common.eval.run_metrics``."""
        from common.eval import run_metrics

        path = self.config.get("eval_data")
        if not path or not dist_utils.is_main():
            return {}
        was_training = self.V.training
        try:
            metrics = _flat_floats(dict(run_metrics(self.pose_model(), path, metrics=["viewpoint"],
                                                    device=self.device)))
            if self.V_ema is not None:
                ema = run_metrics(self.pose_model(ema=True), path, metrics=["viewpoint"], device=self.device)
                metrics.update({f"ema/{k}": v for k, v in _flat_floats(dict(ema)).items()})
                metrics["ema/since"] = float(self.v_ema_since)  # the step V_ema started at (experiments.ssv_seeds)
            return metrics
        finally:
            self.V.train(was_training)

    @torch.no_grad()
    def sample_grid(self, n_styles: int = 4, n_views: int = 7, sweep: str = "azimuth",
                    seen_by_v: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """EMA-generator samples: rows = fixed styles, columns = a sweep of one angle over its sampling range.

        Returns a (3, n_styles * S, n_views * S) image in [0, 1]. The styles come from a private generator, so the
        global RNG (and thus exact resume) is untouched. ``seen_by_v``: return (raw grid, grid of the same samples
        as V's trunk reads them: its high-pass, x2 around mid-gray), since that is all the losses constrain when
        ``d_highpass`` > 0.
        """
        if self.supervised:
            raise ValueError("the supervised baseline has no generator")
        index = {"azimuth": 0, "elevation": 1, "tilt": 2}[sweep]
        gen = torch.Generator().manual_seed(int(self.config["seed"]) + 12345)
        z = sample_styles(n_styles, int(self.config["code_dim"]), self.device, generator=gen)
        sweep_values = torch.linspace(-self.ranges[index], self.ranges[index], n_views)
        raw, seen = [], []
        for i in range(n_styles):
            v = torch.zeros(n_views, 3)
            v[:, index] = sweep_values
            imgs = self.G_ema(z[i : i + 1].expand(n_views, -1), v.to(self.device))
            raw.append(torch.cat(list(to_unit_range(imgs)), dim=2))
            if seen_by_v:
                seen.append(torch.cat(list(to_unit_range(2.0 * self.V.prefilter(imgs))), dim=2))
        if seen_by_v:
            return torch.cat(raw, dim=1).cpu(), torch.cat(seen, dim=1).cpu()
        return torch.cat(raw, dim=1).cpu()

    def log_media(self, step: int, writer, run_dir: Path) -> None:
        if self.supervised:
            return
        from common.io import write_image

        for sweep in ("azimuth", "elevation"):
            if self.V.highpass > 0:
                grids = zip(("", "-seen_by_v"), self.sample_grid(sweep=sweep, seen_by_v=True))
            else:
                grids = [("", self.sample_grid(sweep=sweep))]
            for suffix, grid in grids:
                write_image(Path(run_dir) / "samples" / f"{sweep}-{step:08d}{suffix}.png", grid)
                if writer is not None:
                    writer.add_image(f"samples/{sweep}_sweep{suffix}", grid, step)


def _flat_floats(metrics) -> dict[str, float]:
    out = {}

    def visit(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}{k}/", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix.rstrip("/")] = float(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[prefix.rstrip("/")] = float(value)

    visit("", metrics)
    return out
