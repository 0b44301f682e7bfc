"""Siamese encoders for pose-aware self-supervised learning: SimCLR, VICReg and SimSiam, the viewpoint-trajectory
loss of trajSSL (ECCV 2024) and SiamPose-style frame pairs.

- :mod:`trajssl.trajectory_loss` -- ``trajectory_loss(z_l, z_c, z_r)``, the loss alone, on one screen;
- :mod:`trajssl.losses` -- ``info_nce_loss``, ``vicreg_loss`` / ``vicreg_terms``, ``simsiam_loss`` (+ the above);
- :mod:`trajssl.encoders` -- ResNet-18 (torchvision) with taps ``layer2/layer3/layer4/pooled``, small-image stem;
- :mod:`trajssl.methods` -- projector / predictor heads, ``METHODS`` registry;
- :mod:`trajssl.augment`, :mod:`trajssl.data`, :mod:`trajssl.optim`, :mod:`trajssl.distributed` -- views, triplet /
  frame-pair data, LARS + warm-up cosine, synchronised batch norm;
- :mod:`trajssl.trainer` -- ``EncoderTrainer`` (family ``encoder``) for ``common.training.fit``;
- :mod:`trajssl.model_io` -- the trained encoder as a ``common.eval`` PoseModel;
- :mod:`trajssl.cli` -- ``viewssl train encoder``.
"""
