"""The offline synthetic viewpoint benchmark: procedural objects, heads, triplets and sequences with exact labels
(kinds ``objects, heads, triplets, sequences, head_triplets, head_sequences``).

- :mod:`.render`: the headless moderngl (EGL) renderer and **the camera/pixel convention** every label follows.
- :mod:`.parts`, :mod:`.meshes`, :mod:`.heads`: parametric parts, the 24 object categories, procedural heads.
- :mod:`.benchmark`: what each kind and split contains, the streaming :class:`SyntheticDataset`,
  :func:`render_benchmark` (to disk) and :func:`summarize`.

Quick start::

    from common.data.synthetic import render_benchmark, SyntheticDataset
    render_benchmark("data/synth", scale="full")                  # DIR/<kind>/<split>/labels.csv + images
    ds = SyntheticDataset("objects", "train", scale="full")       # the same images, rendered on demand
"""
from .benchmark import (
    KINDS,
    META_FILE,
    SPLITS,
    BenchmarkConfig,
    SyntheticDataset,
    ViewSpec,
    fib_rotations,
    format_summary,
    holds_other_files,
    load_config,
    read_meta,
    render_benchmark,
    summarize,
)
from .heads import build_head
from .meshes import CATEGORIES, IN_DOMAIN, OUT_OF_DOMAIN, build_object
from .render import Background, Camera, Light, get_renderer, project

__all__ = [
    "KINDS", "META_FILE", "SPLITS", "BenchmarkConfig", "SyntheticDataset", "ViewSpec", "fib_rotations",
    "format_summary", "holds_other_files", "load_config", "read_meta", "render_benchmark", "summarize", "build_head",
    "build_object", "CATEGORIES", "IN_DOMAIN", "OUT_OF_DOMAIN", "Background", "Camera", "Light", "get_renderer",
    "project",
]
