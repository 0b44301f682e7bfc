"""SSV's ablation over seeds: several ``experiments.ssv_heads`` output folders in one table and one plot.

    python -m experiments.ssv_seeds OUT1 OUT2 ... [--out runs/ssv_seeds] [--step N] [--window FIRST LAST]

Each folder's ``ssv_heads.json`` names its rows (a table kept beside it, e.g. ``OUT1/ssv_heads_6000.json``, may be given
instead or as well: its rows at that step; a folder whose command is still training, without ``ssv_heads.json``, gives
the row folders it has, at the steps evaluated so far); a row's seed is its run's ``config.json`` seed. A (row, seed)
has a calibrated MAE at every step V was evaluated during training (``--eval-every``, from ``metrics.jsonl``) and at its
table step. For every step, the table gives each row's mean and standard deviation over the seeds evaluated there (the
values seed by seed beside them), and checks the paper's ordering full < no_imc < no_imc_sym on the seeds that have all
three rows at that step: on their means, and seed by seed; and each step of it seed by seed, on the seeds that have
both of its rows (``no_imc-full``, ``no_imc_sym-no_imc``: how much worse the row without the loss is; > 0 is in order),
with their mean, the one-sided p of a paired t-test over the seeds (small p: the loss helps beyond the seed noise)
and the seeds that test would need for 80 % power if the true step were this mean at this spread.
Folders whose runs differ in anything but the seed, the steps, the loss switches of the rows and L_imc's feature
network (preset, image size, high-pass, ...) are refused (``ssv_heads.settings_diff``, every pair of rows): a
learning-rate decay only where it changed a step both rows trained up to the last step they count at; the supervised
row's settings of S, which it never uses, not at all.
Writes ``OUT/ssv_seeds.md``, ``OUT/ssv_seeds.json`` and ``OUT/ssv_seeds.png`` (thin lines: seeds; thick: the mean where
every seed of the row was evaluated; the full row's title names L_imc's feature network, ``--phi``, as
``settings.full_phi`` in the JSON). ``--ema`` does all this for V_ema, the moving average of V's weights that runs
keep since it exists (rows without it are left out; of a run resumed from before it, only the evaluations from
3/(1-decay) steps after V_ema started on, as ``ssv_heads`` scores it).

With a full row and a supervised row, the 1.3x goal of issue 4 is checked on each row at the last step where all
its seeds were evaluated (the rows may stop at different steps, SSV needing many more; seeds of a row trained
further, or left out where a row's seeds share no step, are named beside it): the mean over those seeds of SSV full
against GOAL_RATIO x that of the supervised V. It closes the markdown table, is ``goal`` in the JSON, and a
dash-dotted line in the plot.

One evaluation of V moves by half a degree from the next late in training; ``--window FIRST LAST`` averages each seed
of each row over its evaluations from step FIRST to LAST (the steps in that window where every seed of the row was
evaluated), with their sample standard deviation, and the row over those seeds' means: a table after the goal, and
``window`` in the JSON.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import click

from common.cli import ViewsslCommand
from common.errors import ViewsslError

from .ssv_heads import (EVAL_ONLY_KEYS, GOAL_RATIO, PHI_KEYS, ROW_KEYS, ROW_TITLES, ROWS, draw_goal, ema_history,
                         eval_history, save_mae_plot, settings_diff)

ORDER = ("full", "no_imc", "no_imc_sym")
#: the steps of the ordering, each named "worse-better" (no_imc-full: how much worse the row without L_imc is)
GAP_NAMES = tuple(f"{worse}-{better}" for better, worse in zip(ORDER, ORDER[1:]))


def collect(folders: list[Path], ema: bool = False) -> tuple[dict[str, dict[int, dict[int, float]]], dict]:
    """{row: {seed: {step: calibrated MAE}}} of the SSV rows in ``folders``, and the settings they share.

    ``ema``: V_ema's calibrated MAE instead of V's (steps and rows without it are left out)."""
    prefix = "ema/" if ema else ""
    curves: dict[str, dict[int, dict[int, float]]] = {}
    shared: dict | None = None
    shared_row = None
    accepted: list[tuple[dict, str, int, Path]] = []  # (config, row, last step counted, config path) taken so far
    phi: dict[str, tuple[dict, Path]] = {}
    origin: dict[tuple[str, int], Path] = {}  # the run folder each (row, seed) comes from
    for path in map(Path, folders):
        # a folder's ssv_heads.json, or a table kept beside it (ssv_heads_3000.json: the row at an earlier step)
        kept = path.suffix == ".json"
        folder, table = (path.parent, path) if kept else (path, path / "ssv_heads.json")
        rows = {}
        if table.exists() or kept:
            try:
                rows = dict(json.loads(table.read_text())["rows"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ViewsslError(f"not an ssv_heads result ({type(e).__name__}: {e})", table) from None
        if not kept:
            # rows of an ssv_heads command still training (its ssv_heads.json, if any, lists the finished ones):
            # their folders, with the evaluations they have so far
            rows.update({row: {} for row in ROWS if row not in rows and (folder / row / "config.json").is_file()})
            if not rows:
                raise ViewsslError(f"not an ssv_heads result (no ssv_heads.json, and no row folder "
                                   f"{'/, '.join(ROWS)}/ with a config.json)", table)
        for row, r in rows.items():
            if row not in ROWS:
                continue
            config_path = folder / row / "config.json"
            try:
                config = json.loads(config_path.read_text())
                seed = int(config["seed"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ViewsslError(f"cannot read the run's seed ({type(e).__name__}: {e})", config_path) from None
            row_phi = {k: config.get(k) for k in PHI_KEYS}
            phi_ref, phi_from = phi.setdefault(row, (row_phi, config_path))
            _refuse(sorted(k for k in PHI_KEYS if row_phi[k] != phi_ref[k]), phi_from, config_path,
                    f"the seeds of row {row}")
            run = (folder / row).resolve()
            first = origin.setdefault((row, seed), run)
            if first != run:
                raise ViewsslError(f"row {row} of seed {seed} is also in {first}: two runs of one seed cannot be "
                                   f"told apart (pass one of them)", folder / row)
            # V_ema: without the evaluations of one started late (a run resumed from before it), which is V itself
            # at first (the table's final figure follows the same rule)
            steps, values = (ema_history if ema else eval_history)(folder / row)
            if kept and isinstance(r.get("steps"), int):
                # a kept table is its rows at its step: the evaluations of the training after it are not its own
                kept_steps = [i for i, s in enumerate(steps) if s <= r["steps"]]
                steps, values = [steps[i] for i in kept_steps], [values[i] for i in kept_steps]
            final = (r.get("metrics") or {}).get(f"{prefix}calibrated/mae")
            if not steps and final is None:
                continue  # ema: a run from before V_ema
            # checked against every row taken so far: a learning-rate decay counts where it changed a step both
            # rows trained up to the last step they count at (a row resumed with --lr-decay after a kept table of
            # it is that table's training), which is not a relation that carries over from one pair to the next
            last = max(steps + ([int(r["steps"])] if final is not None else []))
            for other, other_row, other_last, other_path in accepted:
                _refuse(settings_diff(config, row, other, other_row, min(last, other_last)), other_path,
                        config_path, "rows of one ablation")
            accepted.append((config, row, last, config_path))
            if shared is None or (shared_row == "supervised" and row != "supervised"):
                # the settings they share, as an SSV row has them
                shared = {k: v for k, v in config.items() if k not in ROW_KEYS | PHI_KEYS | EVAL_ONLY_KEYS}
                shared_row = row
            curve = curves.setdefault(row, {}).setdefault(seed, {})
            curve.update(zip(steps, values))
            if final is not None:
                curve[int(r["steps"])] = float(final)
    if not curves:
        raise ViewsslError(f"no SSV rows in {', '.join(map(str, folders))}")
    shared = dict(shared or {})
    if "full" in curves:  # the one row of the ablation that builds L_imc's feature network (--ema: if it has V_ema)
        shared["full_phi"] = phi["full"][0]["phi"]
    return curves, shared


def _refuse(diff: list[str], reference_path: Path, path: Path, who: str) -> None:
    if diff:
        raise ViewsslError(f"its settings differ from {reference_path} in {', '.join(diff)}: {who} must share them",
                           path)


def _ordered(values: list[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def gap_test(gaps: list[float]) -> dict[str, float | None]:
    """Paired one-sided t-test of the paper's claim that the row without the loss is worse: (n,) per-seed gaps
    (worse - better) -> their mean, t = mean / (std / sqrt(n)), p = P(T_{n-1} >= t) under "no effect" and
    ``seeds_for_power`` (:func:`seeds_for_power` at this mean and std). t, p and seeds_for_power are None with fewer
    than two seeds or gaps without spread; seeds_for_power is None too where the mean is not positive."""
    from scipy import stats

    mean = statistics.fmean(gaps) if gaps else float("nan")
    std = statistics.stdev(gaps) if len(gaps) >= 2 else 0.0
    if std == 0:
        return {"mean": mean, "t": None, "p": None, "n": len(gaps), "seeds_for_power": None}
    res = stats.ttest_1samp(gaps, 0.0, alternative="greater")
    return {"mean": mean, "t": float(res.statistic), "p": float(res.pvalue), "n": len(gaps),
            "seeds_for_power": seeds_for_power(mean, std)}


def t_test_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """The probability that the one-sided one-sample t-test at level ``alpha`` on n values rejects "no effect" when
    their true mean is ``effect`` standard deviations: P(T'_{n-1}(effect sqrt(n)) >= t_{1-alpha, n-1}), T' the
    noncentral t."""
    from scipy import stats

    return float(stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, effect * math.sqrt(n)))


def seeds_for_power(mean: float, std: float, alpha: float = 0.05, power: float = 0.8,
                    limit: int = 100_000) -> int | None:
    """The fewest seeds n >= 2 with which the one-sided paired t-test at level ``alpha`` finds a true mean gap
    ``mean`` (per-seed spread ``std``) with probability ``power`` (:func:`t_test_power`). None where the mean is not
    positive, or n would pass ``limit``."""
    if not (mean > 0 and std > 0):
        return None

    def enough(n: int) -> bool:
        return t_test_power(mean / std, n, alpha) >= power

    hi = 2
    while not enough(hi):  # the power grows with n: double, then bisect
        if hi >= limit:
            return None
        hi = min(2 * hi, limit)
    lo = hi // 2 if hi > 2 else 1  # below the answer: enough(lo) is False (or lo = 1, below the smallest n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def _mean_std(values: list[float]) -> dict[str, float]:
    """{"mean", "std"} of (n,) values: the sample standard deviation, 0.0 of one value."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _shared_steps(by_seed: dict[int, dict[int, float]]) -> list[int]:
    """The steps, in order, at which every seed of a row ({seed: {step: value}}) was evaluated."""
    return sorted(set.intersection(*(set(c) for c in by_seed.values())))


def summarize(curves: dict[str, dict[int, dict[int, float]]]) -> list[dict]:
    """One record per evaluated step: each row's values by seed, mean and std, and the ordering checks."""
    steps = sorted({s for by_seed in curves.values() for c in by_seed.values() for s in c})
    records = []
    for step in steps:
        rec: dict = {"step": step, "rows": {}}
        for row, by_seed in curves.items():
            vals = {seed: c[step] for seed, c in sorted(by_seed.items()) if step in c}
            if vals:
                rec["rows"][row] = {"by_seed": vals, **_mean_std(list(vals.values()))}
        values = {r: rec["rows"].get(r, {}).get("by_seed", {}) for r in ORDER}  # {row: {seed: value}} at this step
        seeds = sorted(set.intersection(*(set(values[r]) for r in ORDER)))
        if seeds:  # compared on the seeds that have all three rows at this step
            by_seed = {s: [values[r][s] for r in ORDER] for s in seeds}
            rec["ordering_on_means"] = _ordered([statistics.fmean(v[i] for v in by_seed.values())
                                                 for i in range(len(ORDER))])
            rec["ordering_by_seed"] = {s: _ordered(v) for s, v in by_seed.items()}
        # each step of the ordering, seed by seed, on the seeds that have both of its rows at this step: how much
        # worse the row without the loss is (> 0: in order)
        gaps = {}
        for name, better, worse in zip(GAP_NAMES, ORDER, ORDER[1:]):
            both = sorted(values[better].keys() & values[worse].keys())
            if both:
                gaps[name] = {s: values[worse][s] - values[better][s] for s in both}
        if gaps:
            rec["gaps"] = gaps
            rec["gap_tests"] = {name: gap_test(list(g.values())) for name, g in gaps.items()}
        records.append(rec)
    return records


def goal(records: list[dict]) -> dict | None:
    """Issue 4's goal on the means over seeds: {"full": and "supervised": {step, by_seed, mean, std, beyond,
    missing}, ratio (full / supervised), target (GOAL_RATIO x supervised), met}; None without both rows.

    Each row is taken at the last step where every one of its seeds was evaluated (the thick mean line of the plot),
    so one seed trained longer than the others cannot decide alone; ``beyond`` gives {seed: (last step, value)} of
    the seeds evaluated after it. A row whose seeds share no step is taken at the last step with the most of them,
    and ``missing`` gives the last evaluation of each seed left out there. The "learned" rule of
    ``ssv_heads.check_goals`` (SSV full at least 10% under the random floor) is not repeated: the random row is not
    read here; each ssv_heads table has it."""
    last = {}
    for row in ("full", "supervised"):
        at = [r for r in records if row in r["rows"]]
        if not at:
            return None
        most = max(len(r["rows"][row]["by_seed"]) for r in at)
        rec = [r for r in at if len(r["rows"][row]["by_seed"]) == most][-1]
        latest = {}  # every seed's last evaluation
        for r in at:
            latest.update({s: (r["step"], v) for s, v in r["rows"][row]["by_seed"].items()})
        chosen = rec["rows"][row]["by_seed"]
        last[row] = {"step": rec["step"], **rec["rows"][row],
                     "beyond": {s: sv for s, sv in latest.items() if s in chosen and sv[0] > rec["step"]},
                     "missing": {s: sv for s, sv in sorted(latest.items()) if s not in chosen}}
    full, supervised = last["full"]["mean"], last["supervised"]["mean"]
    return {**last, "ratio": full / supervised, "target": GOAL_RATIO * supervised,
            "met": bool(full <= GOAL_RATIO * supervised)}


def goal_line(g: dict, ema: bool = False) -> str:
    """One sentence of :func:`goal`'s result (``ema``: its figures are V_ema's)."""
    def row(r):
        n = len(r["by_seed"])
        spread = f" ± {r['std']:.2f}" if n > 1 else ""
        seeds = ", ".join(f"s{s}" for s in r["by_seed"])
        of = f" of {n + len(r['missing'])}" if r["missing"] else ""
        later = "".join(f"; s{s} goes on to {step} steps: {v:.2f}" for s, (step, v) in sorted(r["beyond"].items()))
        left = "".join(f"; s{s} left out, its last evaluation at {step} steps: {v:.2f}"
                       for s, (step, v) in r["missing"].items())
        return f"{r['mean']:.2f}{spread} at {r['step']} steps ({n}{of} seed{'s' * (n + len(r['missing']) > 1)}: " \
               f"{seeds}{later}{left})"

    return (f"Goal (issue 4{', V EMA on both' if ema else ''}), each row at the last step all its seeds were "
            f"evaluated (or most, when they share none): SSV full {row(g['full'])} against supervised "
            f"{row(g['supervised'])}: **{g['ratio']:.2f}x**; {GOAL_RATIO}x is {g['target']:.2f}: "
            + ("**met**" if g["met"] else "**not met**") + ".")


def window(curves: dict[str, dict[int, dict[int, float]]], first: int, last: int) -> dict[str, dict]:
    """Each row averaged over its evaluations from step ``first`` to ``last`` (both included): {row: {"steps": the
    steps in the window where every seed of the row was evaluated, "by_seed": {seed: {"mean", "std"}} over those
    steps, "mean", "std" over the seeds' means}}. Standard deviations are the sample ones (0.0 of one value); rows
    without such a step are left out."""
    out = {}
    for row, by_seed in curves.items():
        steps = [s for s in _shared_steps(by_seed) if first <= s <= last]
        if not steps:
            continue
        seeds = {seed: _mean_std([c[s] for s in steps]) for seed, c in sorted(by_seed.items())}
        out[row] = {"steps": steps, "by_seed": seeds, **_mean_std([r["mean"] for r in seeds.values()])}
    return out


def window_markdown(w: dict[str, dict], first: int, last: int, titles: dict[str, str] = ROW_TITLES,
                    ema: bool = False) -> str:
    """:func:`window`'s result as a table: one line per row."""
    lines = [f"Mean over the evaluations from {first} to {last} steps{' (V EMA)' if ema else ''}, each seed's "
             f"(± sample standard deviation over its evaluations), then the row's over its seeds:", "",
             "| row | evaluations | by seed | mean over seeds |", "|---|---|---|---|"]
    for row, r in w.items():
        steps = r["steps"]
        seeds = ", ".join(f"{v['mean']:.2f} ± {v['std']:.2f} (s{s})" for s, v in r["by_seed"].items())
        over = f"**{r['mean']:.2f}** ± {r['std']:.2f}" if len(r["by_seed"]) > 1 else f"**{r['mean']:.2f}**"
        lines.append(f"| {titles.get(row, row)} | {len(steps)}, {steps[0]} to {steps[-1]} | {seeds} | {over} |")
    return "\n".join(lines) + "\n"


def row_titles(shared: dict) -> dict[str, str]:
    """The rows' titles; the full row's names L_imc's feature network Phi (``--phi``), which its seeds share."""
    titles = dict(ROW_TITLES)
    if shared.get("full_phi"):
        titles["full"] = f"{ROW_TITLES['full']} (Phi: {shared['full_phi']})"
    return titles


def markdown(records: list[dict], rows: list[str], titles: dict[str, str] = ROW_TITLES) -> str:
    head = ("| step | " + " | ".join(titles.get(r, r) for r in rows)
            + " | ordering on means (seeds) | seeds in order | " + " | ".join(GAP_NAMES) + " |")
    lines = [head, "|" + "---|" * (len(rows) + 3 + len(GAP_NAMES))]
    for rec in records:
        cells = []
        for row in rows:
            r = rec["rows"].get(row)
            if r is None:
                cells.append("-")
                continue
            seeds = ", ".join(f"{v:.1f} (s{s})" for s, v in r["by_seed"].items())
            cells.append(f"**{r['mean']:.1f}** ± {r['std']:.1f}: {seeds}" if len(r["by_seed"]) > 1 else seeds)
        order = rec.get("ordering_on_means")
        by_seed = rec.get("ordering_by_seed") or {}
        cells.append("-" if order is None else ("yes" if order else "no") + f" ({len(by_seed)})")
        cells.append(f"{sum(by_seed.values())} of {len(by_seed)}" if by_seed else "-")
        for name in GAP_NAMES:
            gap = (rec.get("gaps") or {}).get(name)
            test = (rec.get("gap_tests") or {}).get(name)
            cells.append(", ".join(f"{v:+.1f} (s{s})" for s, v in gap.items())
                         + (f"; mean {test['mean']:+.1f}, p {test['p']:.2g}" if test and test["p"] is not None else "")
                         + (f", 80 % power at {test['seeds_for_power']} seeds" if test and test.get("seeds_for_power")
                            else "")
                         if gap else "-")
        lines.append(f"| {rec['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, dict[int, dict[int, float]]], path: Path, title: str = "", g: dict | None = None,
         titles: dict[str, str] = ROW_TITLES) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (row, by_seed) in enumerate(curves.items()):
        color = f"C{i}"
        for c in by_seed.values():
            s = sorted(c)
            ax.plot(s, [c[k] for k in s], color=color, alpha=0.35, linewidth=0.8)
        common = _shared_steps(by_seed)
        if common:
            ax.plot(common, [statistics.fmean(c[k] for c in by_seed.values()) for k in common], color=color,
                    linewidth=2, marker="o", markersize=3,
                    label=f"{titles.get(row, row)} (mean of {len(by_seed)})")
    if g is not None:
        draw_goal(ax, g["supervised"]["mean"], f"C{list(curves).index('supervised')}",
                  f" at {g['supervised']['step']}")
    save_mae_plot(fig, ax, path, title)


@click.command(cls=ViewsslCommand, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="OUT|TABLE.json...")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/ssv_seeds"), help="Output folder.")
@click.option("--step", "only_step", type=click.IntRange(min=1), default=None,
              help="Print only this step's line (the files keep every step).")
@click.option("--ema", is_flag=True,
              help="Score V_ema, the moving average of V's weights, instead of V (runs from before it are left out).")
@click.option("--window", "window_steps", type=(click.IntRange(min=0), click.IntRange(min=0)), default=None,
              metavar="FIRST LAST",
              help="Also average each seed of each row over its evaluations from step FIRST to LAST.")
def main(folders, out, only_step, ema, window_steps):
    """Mean over seeds of ssv_heads rows, the ablation ordering, and the learning curves with their spread.

    Each argument is an ssv_heads output folder (its ssv_heads.json; without one, its rows' evaluations so far) or a
    table kept in one (ssv_heads_3000.json)."""
    from common.io import atomic_write_bytes, atomic_write_json

    if window_steps is not None and window_steps[0] > window_steps[1]:
        raise click.BadParameter(f"FIRST {window_steps[0]} is after LAST {window_steps[1]}", param_hint="--window")
    curves, shared = collect(list(folders), ema=ema)
    records = summarize(curves)
    g = goal(records)
    rows = [r for r in (*ORDER, "supervised") if r in curves]
    titles = row_titles(shared)
    w = None
    if window_steps is not None:
        w = window(curves, *window_steps)
        if not w:
            raise click.UsageError(f"no row has an evaluation from step {window_steps[0]} to {window_steps[1]} "
                                   f"where all its seeds were evaluated")
    atomic_write_json({"folders": [str(f) for f in folders], "settings": shared, "ema": ema, "records": records,
                       "goal": g, "window": w}, out / "ssv_seeds.json")
    tail = "" if g is None else "\n" + goal_line(g, ema) + "\n"
    if w is not None:
        tail += "\n" + window_markdown(w, *window_steps, titles=titles, ema=ema)
    atomic_write_bytes(out / "ssv_seeds.md", (markdown(records, rows, titles) + tail).encode())
    plot(curves, out / "ssv_seeds.png",
         title=f"SSV ablation over seeds ({shared.get('preset', '?')}, {shared.get('image_size', '?')} px"
               + (", V EMA)" if ema else ")"), g=g, titles=titles)
    shown = [r for r in records if only_step is None or r["step"] == only_step]
    if only_step is not None and not shown:
        raise click.UsageError(f"no row was evaluated at step {only_step}")
    click.echo(markdown(shown, rows, titles) + tail, nl=False)
    click.echo(f"tables in {out / 'ssv_seeds.md'} and {out / 'ssv_seeds.json'}; plot {out / 'ssv_seeds.png'}")


if __name__ == "__main__":
    main()
