"""The SSV ablation over seeds: values gathered from ssv_heads folders, means against an independent computation,
the ordering checks, and refusal of folders that are not one ablation."""
import json
import math
import statistics

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from common.errors import ViewsslError
from experiments.ssv_heads import draw_goal
from experiments.ssv_seeds import (collect, gap_test, goal, goal_line, main, row_titles, seeds_for_power, summarize,
                                   t_test_power, window)

CONFIG = {"preset": "cpu64", "image_size": 64, "d_highpass": 2.0, "phi": "auto", "w_imc": 1.0, "w_sym": 1.0}
SWITCHES = {"full": {"phi": "critic"}, "no_imc": {"w_imc": 0.0}, "no_imc_sym": {"w_imc": 0.0, "w_sym": 0.0},
            "supervised": {"supervised": True}}


def _folder(root, seed, rows, **config):
    """An ssv_heads output folder: rows = {row: (table steps, table value, {step: in-training evaluation})}."""
    root.mkdir(parents=True)
    table = {"rows": {"random": {"metrics": {"calibrated/mae": 31.0}, "steps": "-"}}}
    for row, (steps, final, history) in rows.items():
        (root / row).mkdir()
        (root / row / "config.json").write_text(json.dumps({**CONFIG, **SWITCHES[row], **config, "seed": seed}))
        lines = [{"step": s, "kind": "eval", "viewpoint/calibrated/mae": v} for s, v in history.items()]
        lines.append({"step": 10, "kind": "train", "d_critic": 0.5})
        (root / row / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        table["rows"][row] = {"steps": steps, "metrics": {"calibrated/mae": final}}
    (root / "ssv_heads.json").write_text(json.dumps(table))
    return root


@pytest.fixture
def two_seeds(tmp_path):
    a = _folder(tmp_path / "s0", 0, {"full": (1000, 18.0, {500: 25.0}), "no_imc": (1000, 21.0, {500: 24.0}),
                                     "no_imc_sym": (1000, 22.0, {500: 26.0})})
    b = _folder(tmp_path / "s1", 1, {"full": (1000, 20.0, {500: 27.0, 1000: 20.0}),
                                     "no_imc": (1000, 19.0, {500: 28.0})})
    c = _folder(tmp_path / "s1b", 1, {"no_imc_sym": (1500, 23.0, {500: 29.0, 1000: 25.0})})
    d = _folder(tmp_path / "s2", 2, {"full": (1000, 30.0, {})})  # a seed without the other rows
    return [a, b, c, d]


def test_values_by_row_seed_and_step_come_from_the_evaluations_and_the_table(two_seeds):
    curves, shared = collect(two_seeds)
    assert curves["full"] == {0: {500: 25.0, 1000: 18.0}, 1: {500: 27.0, 1000: 20.0}, 2: {1000: 30.0}}
    assert curves["no_imc_sym"] == {0: {500: 26.0, 1000: 22.0}, 1: {500: 29.0, 1000: 25.0, 1500: 23.0}}
    assert "random" not in curves and shared["preset"] == "cpu64" and "seed" not in shared


def test_means_and_the_ordering_on_means_and_by_seed(two_seeds):
    records = {r["step"]: r for r in summarize(collect(two_seeds)[0])}
    at = records[1000]
    assert at["rows"]["full"]["mean"] == pytest.approx(68.0 / 3)
    assert at["rows"]["full"]["std"] == pytest.approx(statistics.stdev([18.0, 20.0, 30.0]))
    assert at["rows"]["no_imc"]["by_seed"] == {0: 21.0, 1: 19.0}
    # on seeds 0 and 1 (seed 2 has no ablation rows): means 19.0 < 20.0 < 23.5; seed 0 in order (18 < 21 < 22),
    # seed 1 not (20 > 19)
    assert at["ordering_on_means"] is True and at["ordering_by_seed"] == {0: True, 1: False}
    # each step seed by seed: no_imc - full and no_imc_sym - no_imc (seed 1's no_imc_sym at 1000 is 25.0)
    assert at["gaps"]["no_imc-full"] == pytest.approx({0: 3.0, 1: -1.0})
    assert at["gaps"]["no_imc_sym-no_imc"] == pytest.approx({0: 1.0, 1: 6.0})
    # the paired t-test on two seeds (1 degree of freedom: Student's t is Cauchy): gaps 3, -1 -> t = 1 / (2.83 / 1.41)
    test = at["gap_tests"]["no_imc-full"]
    assert test["mean"] == pytest.approx(1.0) and test["t"] == pytest.approx(0.5)
    assert test["p"] == pytest.approx(0.5 - math.atan(0.5) / math.pi)
    # 500: means 26.0, 26.0, 27.5: not strictly ordered
    assert records[500]["ordering_on_means"] is False
    # 1500: only one row evaluated, so no ordering; one seed has std 0
    assert "ordering_on_means" not in records[1500] and records[1500]["rows"]["no_imc_sym"]["std"] == 0.0


def test_gap_test_against_students_t_with_two_degrees_of_freedom():
    # df = 2: P(T >= t) = 1/2 - t / (2 sqrt(2 + t^2)); gaps 1, 2, 6: mean 3, std sqrt(7), t = 3 sqrt(3) / sqrt(7)
    test = gap_test([1.0, 2.0, 6.0])
    t = 3 * math.sqrt(3) / math.sqrt(7)
    assert test["mean"] == pytest.approx(3.0) and test["t"] == pytest.approx(t) and test["n"] == 3
    assert test["p"] == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)))
    assert gap_test([-1.0, -2.0, -6.0])["p"] == pytest.approx(1 - test["p"])  # the loss hurting: p near 1
    for gaps in ([2.0], [2.0, 2.0]):  # one seed, or gaps without spread: no test
        test = gap_test(gaps)
        assert test["mean"] == pytest.approx(2.0) and test["t"] is None and test["p"] is None


def test_folders_of_different_settings_are_refused(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (1000, 18.0, {})})
    b = _folder(tmp_path / "b", 1, {"no_imc": (1000, 19.0, {})}, image_size=32)
    with pytest.raises(ViewsslError, match=r"b/no_imc/config.json.*differ.*image_size"):
        collect([a, b])
    # L_imc's feature network may differ between rows (it is unused without L_imc), not between the seeds of a row
    c = _folder(tmp_path / "c", 1, {"full": (1000, 19.0, {})}, phi="vgg")
    with pytest.raises(ViewsslError, match=r"c/full/config.json.*phi: the seeds of row full"):
        collect([a, c])
    (tmp_path / "d").mkdir()
    with pytest.raises(ViewsslError, match=r"d/ssv_heads.json.*not an ssv_heads result"):
        collect([a, tmp_path / "d"])
    # the decay of V_ema changes no training: a run from before it (no key) and one with it are one ablation
    e = _folder(tmp_path / "e", 1, {"no_imc": (1000, 19.0, {})}, v_ema_decay=0.998)
    curves, _ = collect([a, e])
    assert curves["no_imc"][1][1000] == 19.0


def test_the_full_rows_title_names_its_phi_and_the_rows_without_l_imc_name_none(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (1000, 18.0, {}), "no_imc": (1000, 19.0, {})}, phi="random")
    b = _folder(tmp_path / "b", 1, {"full": (1000, 17.0, {})}, phi="random")
    shared = collect([a, b])[1]
    titles = row_titles(shared)
    assert shared["full_phi"] == "random" and titles["full"] == "SSV full (Phi: random)"
    assert titles["no_imc"] == "SSV w/o L_imc"
    # without a full row, or with one from a run before --phi existed, no Phi is named
    c = _folder(tmp_path / "c", 0, {"no_imc": (1000, 19.0, {})})
    assert "full_phi" not in collect([c])[1]
    d = _folder(tmp_path / "d", 0, {"full": (1000, 18.0, {})})
    config = json.loads((d / "full" / "config.json").read_text())
    del config["phi"]
    (d / "full" / "config.json").write_text(json.dumps(config))
    assert row_titles(collect([d])[1])["full"] == "SSV full"


def test_a_supervised_row_may_leave_off_the_augmentations_of_s_and_nothing_else(tmp_path):
    sup = _folder(tmp_path / "sup", 0, {"supervised": (1000, 6.0, {})}, augment_gain=0.0, g_ball_mask=False)
    a = _folder(tmp_path / "a", 0, {"full": (1000, 18.0, {})}, augment_gain=0.5, g_ball_mask=True)
    b = _folder(tmp_path / "b", 1, {"full": (1000, 19.0, {})}, augment_gain=0.5, g_ball_mask=True)
    for folders in ([sup, a, b], [a, sup, b]):  # whichever comes first, the SSV rows must agree with each other
        curves, shared = collect(folders)
        assert curves["supervised"] == {0: {1000: 6.0}} and shared["augment_gain"] == 0.5
    c = _folder(tmp_path / "c", 1, {"no_imc": (1000, 19.0, {})}, augment_gain=0.0, g_ball_mask=True)
    with pytest.raises(ViewsslError, match=r"c/no_imc/config.json.*differ.*augment_gain"):
        collect([sup, a, c])
    # nor any other setting of S, which the supervised row never uses (a preset default changed since it ran)
    s2 = _folder(tmp_path / "s2", 1, {"supervised": (1000, 6.5, {})}, n_mlp=4, g_channels_2d=[8, 4], lr_d=1.0)
    assert collect([a, s2, b])[0]["supervised"] == {1: {1000: 6.5}}
    d = _folder(tmp_path / "d", 0, {"supervised": (1000, 6.0, {})}, augment_gain=0.0, image_size=32)
    with pytest.raises(ViewsslError, match=r"d/supervised/config.json.*differ.*image_size"):
        collect([a, d])
    with pytest.raises(ViewsslError, match=r"a/full/config.json.*differ.*image_size"):
        collect([d, a])


def test_a_table_kept_beside_the_folders_own_adds_its_step(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (2000, 11.0, {500: 25.0})})
    (a / "ssv_heads_1000.json").write_text(json.dumps({"rows": {"full": {"steps": 1000,
                                                                          "metrics": {"calibrated/mae": 18.0}}}}))
    curves, _ = collect([a, a / "ssv_heads_1000.json"])
    assert curves["full"] == {0: {500: 25.0, 1000: 18.0, 2000: 11.0}}
    assert collect([a / "ssv_heads_1000.json"])[0]["full"] == {0: {500: 25.0, 1000: 18.0}}
    with pytest.raises(ViewsslError, match=r"a/ssv_heads_9.json.*not an ssv_heads result"):
        collect([a / "ssv_heads_9.json"])


def test_a_kept_table_is_its_rows_at_its_step_not_the_training_after_it(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (2000, 11.0, {500: 25.0, 1000: 18.5, 1500: 14.0})})
    (a / "ssv_heads_1000.json").write_text(json.dumps({"rows": {"full": {"steps": 1000,
                                                                          "metrics": {"calibrated/mae": 18.0}}}}))
    assert collect([a / "ssv_heads_1000.json"])[0]["full"] == {0: {500: 25.0, 1000: 18.0}}
    curves, _ = collect([a])
    assert curves["full"] == {0: {500: 25.0, 1000: 18.5, 1500: 14.0, 2000: 11.0}}


def test_a_kept_table_of_a_row_resumed_later_with_a_learning_rate_decay_is_still_one_ablation(tmp_path):
    # seed 0 trained to 1,000 (its table kept), then resumed with a decay from 1,000 to 3,000; seed 1 without a decay
    decay = dict(lr_decay_start=1000, lr_decay_end=3000, lr_final=0.1)
    a = _folder(tmp_path / "a", 0, {"full": (3000, 9.0, {500: 25.0, 1000: 18.0, 2000: 12.0})}, **decay)
    (a / "ssv_heads_1000.json").write_text(json.dumps({"rows": {"full": {"steps": 1000,
                                                                          "metrics": {"calibrated/mae": 18.0}}}}))
    b = _folder(tmp_path / "b", 1, {"full": (1000, 19.0, {500: 26.0})}, lr_decay_start=0, lr_decay_end=0)
    curves, _ = collect([a / "ssv_heads_1000.json", b])
    assert curves["full"] == {0: {500: 25.0, 1000: 18.0}, 1: {500: 26.0, 1000: 19.0}}
    # both trained on past 1,000, one with the decay and one without: not one ablation
    c = _folder(tmp_path / "c", 1, {"full": (2000, 14.0, {500: 26.0})}, lr_decay_start=0, lr_decay_end=0)
    with pytest.raises(ViewsslError, match=r"c/full/config.json.*differ.*lr_decay_end, lr_decay_start"):
        collect([a, c])


def test_every_pair_of_rows_is_checked_whatever_the_order_of_the_folders(tmp_path):
    # A stops at 1,000 (before B's decay), so A agrees with B and with C; B and C do not agree with each other
    a = _folder(tmp_path / "a", 0, {"full": (1000, 18.0, {})})
    b = _folder(tmp_path / "b", 1, {"full": (3000, 9.0, {2000: 12.0})}, lr_decay_start=2000, lr_decay_end=3000)
    c = _folder(tmp_path / "c", 2, {"full": (3000, 10.0, {2000: 13.0})})
    fresh = tmp_path / "d"  # a row that has nothing yet (no evaluation, no table): it constrains nothing
    (fresh / "full").mkdir(parents=True)
    (fresh / "full" / "config.json").write_text(json.dumps({**CONFIG, **SWITCHES["full"], "seed": 3}))
    for order in ([a, b, c], [b, c, a], [b, a, c], [fresh, b, c]):
        with pytest.raises(ViewsslError, match=r"differ.*lr_decay_end, lr_decay_start"):
            collect(order)
    assert set(collect([fresh, a, b])[0]["full"]) == {0, 1}


def test_a_key_a_run_from_before_its_option_lacks_has_the_value_it_trained_with(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (1000, 18.0, {})}, d_highpass=0.0, g_ball_mask=False)
    b = _folder(tmp_path / "b", 1, {"full": (1000, 19.0, {})})
    config = json.loads((b / "full" / "config.json").read_text())
    del config["d_highpass"]  # from before --highpass (and --ball-mask), trained without them
    (b / "full" / "config.json").write_text(json.dumps(config))
    assert set(collect([a, b])[0]["full"]) == {0, 1}
    c = _folder(tmp_path / "c", 2, {"full": (1000, 19.0, {})}, d_highpass=2.0)
    with pytest.raises(ViewsslError, match=r"differ.*d_highpass"):
        collect([b, c])


def test_two_runs_of_one_row_and_seed_are_refused_not_merged(tmp_path):
    a = _folder(tmp_path / "a", 1, {"full": (1000, 18.0, {500: 30.0})})
    b = _folder(tmp_path / "b", 1, {"full": (1000, 28.0, {500: 29.0})})
    with pytest.raises(ViewsslError, match=r"b/full.*row full of seed 1 is also in .*a/full"):
        collect([a, b])
    c = _folder(tmp_path / "c", 2, {"full": (1000, 28.0, {500: 29.0})})
    assert sorted(collect([a, c])[0]["full"]) == [1, 2]
    assert collect([a, a / ".." / "a" / "ssv_heads.json"])[0]["full"] == {1: {500: 30.0, 1000: 18.0}}  # one run


def test_a_row_still_training_counts_beside_the_finished_rows_of_its_command(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (1000, 18.0, {500: 25.0}), "no_imc": (1000, 19.0, {500: 28.0})})
    table = json.loads((a / "ssv_heads.json").read_text())
    del table["rows"]["no_imc"]  # ssv_heads writes its table after each row: no_imc is still training
    (a / "ssv_heads.json").write_text(json.dumps(table))
    curves, _ = collect([a])
    assert curves["full"] == {0: {500: 25.0, 1000: 18.0}} and curves["no_imc"] == {0: {500: 28.0}}


def test_an_unreadable_table_of_earlier_commands_is_an_error_not_overwritten(tmp_path):
    from experiments.ssv_heads import _previous_rows

    assert _previous_rows(tmp_path) == ({}, None)
    (tmp_path / "ssv_heads.json").write_text(json.dumps({"rows": {"full": {"steps": 5}}, "command": "x"}))
    assert _previous_rows(tmp_path) == ({"full": {"steps": 5}}, "x")
    for text in ('{"rows": {"full": ', '{"rows": ["full"]}'):
        (tmp_path / "ssv_heads.json").write_text(text)
        with pytest.raises(ViewsslError, match=r"ssv_heads.json.*cannot read the rows of earlier commands"):
            _previous_rows(tmp_path)


def test_a_folder_still_training_gives_its_rows_evaluations_so_far(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (1000, 18.0, {500: 25.0})})
    b = _folder(tmp_path / "b", 1, {"full": (1000, 20.0, {500: 27.0, 1000: 20.5}), "no_imc": (1000, 19.0, {500: 28.0})})
    (b / "ssv_heads.json").unlink()  # its command has not finished: no table yet
    (b / "notes").mkdir()  # not a row
    curves, _ = collect([a, b])
    assert curves["full"] == {0: {500: 25.0, 1000: 18.0}, 1: {500: 27.0, 1000: 20.5}}
    assert curves["no_imc"] == {1: {500: 28.0}}
    (b / "no_imc" / "config.json").write_text(json.dumps({**CONFIG, "image_size": 32, "seed": 1}))
    with pytest.raises(ViewsslError, match=r"b/no_imc/config.json.*differ.*image_size"):
        collect([a, b])
    (tmp_path / "c" / "full").mkdir(parents=True)  # a row folder without its config.json
    with pytest.raises(ViewsslError, match=r"c/ssv_heads.json.*not an ssv_heads result.*no row folder full/"):
        collect([a, tmp_path / "c"])


def test_cli_writes_table_json_and_plot(two_seeds, tmp_path):
    out = tmp_path / "summary"
    result = CliRunner().invoke(main, [*map(str, two_seeds), "--out", str(out), "--step", "1000"])
    assert result.exit_code == 0, result.output
    assert "| 1000 | **22.7** ± 6.4: 18.0 (s0), 20.0 (s1), 30.0 (s2) |" in result.output
    # 51 and 8 seeds: the t-test's power (test_seeds_for_power_is_the_first_n_with_enough_power) at d 0.35 and 0.99
    assert ("| yes (2) | 1 of 2 | +3.0 (s0), -1.0 (s1); mean +1.0, p 0.35, 80 % power at 51 seeds | +1.0 (s0), "
            "+6.0 (s1); mean +3.5, p 0.2, 80 % power at 8 seeds |" in result.output)
    assert "| step | SSV full (Phi: critic) | SSV w/o L_imc | SSV w/o L_imc and L_sym |" in result.output
    assert "| 500 |" not in result.output
    assert "| 500 |" in (out / "ssv_seeds.md").read_text()
    data = json.loads((out / "ssv_seeds.json").read_text())
    assert [r["step"] for r in data["records"]] == [500, 1000, 1500] and data["settings"]["full_phi"] == "critic"
    assert (out / "ssv_seeds.png").stat().st_size > 0
    bad = CliRunner().invoke(main, [str(tmp_path / "nowhere"), "--out", str(out)])
    assert bad.exit_code == 2 and "nowhere/ssv_heads.json" in bad.output and "Traceback" not in bad.output


def test_ema_scores_v_ema_and_leaves_out_runs_without_it(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (1000, 18.0, {500: 25.0}), "no_imc": (1000, 21.0, {500: 24.0})})
    b = _folder(tmp_path / "b", 1, {"full": (1000, 20.0, {500: 27.0})})
    for row, history, final in (("full", {500: 24.0}, 17.0), ("no_imc", {500: 23.5}, 20.5)):  # seed 0 kept V_ema
        lines = (a / row / "metrics.jsonl").read_text().splitlines()
        lines = [json.dumps({**json.loads(line), **({"ema/viewpoint/calibrated/mae": history[500]}
                                                   if json.loads(line).get("step") == 500 else {})})
                 for line in lines]
        (a / row / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        table = json.loads((a / "ssv_heads.json").read_text())
        table["rows"][row]["metrics"]["ema/calibrated/mae"] = final
        (a / "ssv_heads.json").write_text(json.dumps(table))
    curves, _ = collect([a, b], ema=True)
    assert curves == {"full": {0: {500: 24.0, 1000: 17.0}}, "no_imc": {0: {500: 23.5, 1000: 20.5}}}
    assert collect([a, b])[0]["full"] == {0: {500: 25.0, 1000: 18.0}, 1: {500: 27.0, 1000: 20.0}}
    out = tmp_path / "summary"
    result = CliRunner().invoke(main, [str(a), str(b), "--out", str(out), "--ema", "--step", "1000"])
    assert result.exit_code == 0, result.output
    assert "| 1000 | 17.0 (s0) | 20.5 (s0) |" in result.output
    with pytest.raises(ViewsslError, match="no SSV rows"):
        collect([b], ema=True)
    # a full row left out (no V_ema) names no Phi: the table it writes has no full row to title
    assert collect([a, b], ema=True)[1]["full_phi"] == "critic"
    d = _folder(tmp_path / "d", 2, {"full": (1000, 19.0, {500: 26.0}), "no_imc": (1000, 21.0, {500: 24.0})})
    table = json.loads((d / "ssv_heads.json").read_text())
    table["rows"]["no_imc"]["metrics"]["ema/calibrated/mae"] = 20.0
    (d / "ssv_heads.json").write_text(json.dumps(table))
    curves, shared = collect([d], ema=True)
    assert set(curves) == {"no_imc"} and "full_phi" not in shared


def test_ema_of_a_run_resumed_from_before_v_ema_counts_only_once_it_averaged_something(tmp_path):
    from experiments.ssv_heads import ema_since

    # V evaluated every 500 steps; V_ema from 1,000 on (resumed there from a checkpoint without it), at decay 0.998
    # it is V's average from 1,000 + 1,500 = 2,500 on; an older log without ema/since: it started at the latest at
    # its first evaluation (1,500), so from 3,000 on
    history = {s: 30.0 - s / 500 for s in range(500, 3500, 500)}
    a = _folder(tmp_path / "a", 0, {"full": (3000, 23.0, history)}, v_ema_decay=0.998)
    b = _folder(tmp_path / "b", 1, {"full": (3000, 24.0, history)}, v_ema_decay=0.998)
    c = _folder(tmp_path / "c", 2, {"full": (3000, 25.0, history)}, v_ema_decay=0.998)  # V_ema kept from step 0
    for folder, since in ((a, 1000), (b, None), (c, 0)):
        path = folder / "full" / "metrics.jsonl"
        lines = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "eval" and (since == 0 or rec["step"] > 1000):
                rec["ema/viewpoint/calibrated/mae"] = rec["viewpoint/calibrated/mae"] - 1.0
                if since is not None:
                    rec["ema/since"] = float(since)
            lines.append(json.dumps(rec))
        path.write_text("\n".join(lines) + "\n")
    assert [ema_since(f / "full") for f in (a, b, c)] == [1000, 1500, 0]
    curves, _ = collect([a, b, c], ema=True)
    assert sorted(curves["full"][0]) == [2500, 3000]
    assert sorted(curves["full"][1]) == [3000]
    assert curves["full"][2] == {s: v - 1.0 for s, v in history.items()}
    assert sorted(collect([a, b, c])[0]["full"][0]) == sorted(history)  # V itself: every evaluation
    # an older log whose first evaluation already had V_ema: from step 0; a checkpoint's v_ema_since wins over that
    path = c / "full" / "metrics.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "ema/since"}) + "\n"
                            for line in path.read_text().splitlines()))
    assert ema_since(c / "full") == 0
    from common.io import atomic_save

    atomic_save({"family": "ssv", "config": {}, "step": 3000, "modules": {}, "v_ema_since": 1000},
                c / "full" / "checkpoints" / "ckpt-00003000.pt")
    assert ema_since(c / "full") == 1000


def test_the_goal_compares_each_row_at_its_last_step(tmp_path):
    # SSV full on one seed, trained longest; the supervised V on three seeds, to a step of its own
    ssv = _folder(tmp_path / "ssv", 4, {"full": (2000, 6.2, {500: 20.0, 1000: 9.0})})
    sups = [_folder(tmp_path / f"sup{s}", s, {"supervised": (1600, v, {500: 6.0})})
            for s, v in ((0, 4.05), (1, 4.24), (2, 4.25))]
    g = goal(summarize(collect([ssv, *sups])[0]))
    supervised = statistics.fmean([4.05, 4.24, 4.25])
    assert g["full"]["step"] == 2000 and g["full"]["by_seed"] == {4: 6.2}
    assert g["supervised"]["step"] == 1600 and g["supervised"]["mean"] == pytest.approx(supervised)
    assert g["supervised"]["std"] == pytest.approx(statistics.stdev([4.05, 4.24, 4.25]))
    assert g["ratio"] == pytest.approx(6.2 / supervised) and g["target"] == pytest.approx(1.3 * supervised)
    assert g["met"] is False  # 6.2 > 1.3 x 4.18 = 5.43
    line = goal_line(g)
    assert "SSV full 6.20 at 2000 steps (1 seed: s4)" in line and "4.18 ± 0.11 at 1600 steps (3 seeds" in line
    assert "**1.48x**" in line and "1.3x is 5.43: **not met**" in line
    # at 5.4 it is met, and without a supervised row (or a full one) there is no goal
    better = _folder(tmp_path / "better", 4, {"full": (2000, 5.4, {})})
    assert goal(summarize(collect([better, *sups])[0]))["met"] is True
    assert goal(summarize(collect([ssv])[0])) is None and goal(summarize(collect(sups)[0])) is None
    out = tmp_path / "summary"
    result = CliRunner().invoke(main, [str(ssv), *map(str, sups), "--out", str(out), "--step", "2000"])
    assert result.exit_code == 0, result.output
    assert "| 2000 | 6.2 (s4) |" in result.output and result.output.count("**not met**") == 1
    assert "**not met**" in (out / "ssv_seeds.md").read_text()
    saved = json.loads((out / "ssv_seeds.json").read_text())
    assert saved["goal"]["ratio"] == pytest.approx(6.2 / supervised) and saved["ema"] is False


def test_the_goal_takes_a_row_where_all_its_seeds_were_evaluated(tmp_path):
    # seeds 1 and 2 of SSV full stop at 2000; seed 0 goes on to 3000 (worse there): the row is its mean at 2000
    full = [_folder(tmp_path / "f0", 0, {"full": (3000, 9.0, {1000: 12.0, 2000: 7.0})}),
            _folder(tmp_path / "f1", 1, {"full": (2000, 6.0, {1000: 11.0})}),
            _folder(tmp_path / "f2", 2, {"full": (2000, 6.5, {1000: 13.0})})]
    sup = _folder(tmp_path / "sup", 0, {"supervised": (1600, 6.0, {})})
    g = goal(summarize(collect([*full, sup])[0]))
    assert g["full"]["step"] == 2000 and g["full"]["mean"] == pytest.approx(6.5)
    assert g["full"]["beyond"] == {0: (3000, 9.0)} and g["supervised"]["beyond"] == {} == g["full"]["missing"]
    assert g["ratio"] == pytest.approx(6.5 / 6.0) and g["met"] is True  # 6.5 <= 7.8; seed 0 alone (9.0) is not
    line = goal_line(g, ema=True)
    assert "(issue 4, V EMA on both)" in line and line.endswith("**met**.")
    assert "6.50 ± 0.50 at 2000 steps (3 seeds: s0, s1, s2; s0 goes on to 3000 steps: 9.00)" in line
    # seeds that share no step: the last step with the most of them
    apart = [_folder(tmp_path / "a0", 0, {"full": (1000, 8.0, {})}),
             _folder(tmp_path / "a1", 1, {"full": (1500, 7.0, {})})]
    g = goal(summarize(collect([*apart, sup])[0]))
    assert g["full"]["step"] == 1500 and g["full"]["mean"] == 7.0 and g["full"]["beyond"] == {}
    assert g["full"]["missing"] == {0: (1000, 8.0)} and g["supervised"]["missing"] == {}
    assert "7.00 at 1500 steps (1 of 2 seeds: s1; s0 left out, its last evaluation at 1000 steps: 8.00)" in goal_line(g)


def test_the_goal_line_in_a_plot_is_1_3x_the_supervised_mae():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    draw_goal(ax, 4.0, at=" at 1600")
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == pytest.approx([5.2, 5.2]) and line.get_label().endswith("at 1600 = 5.2")
    plt.close(fig)


def test_a_step_of_the_ordering_is_tested_on_the_seeds_that_have_both_of_its_rows(tmp_path):
    # full and no_imc only (no no_imc_sym anywhere): no ordering, but the L_imc step seed by seed and its t-test
    folders = [_folder(tmp_path / f"s{seed}", seed, {"full": (1000, full, {500: 30.0}),
                                                     "no_imc": (1000, no_imc, {500: 29.0})})
               for seed, full, no_imc in ((0, 17.0, 15.5), (3, 18.2, 19.0), (1, 14.0, 16.0))]
    records = {r["step"]: r for r in summarize(collect(folders)[0])}
    at = records[1000]
    assert "ordering_on_means" not in at and set(at["gaps"]) == {"no_imc-full"}
    assert at["gaps"]["no_imc-full"] == pytest.approx({0: -1.5, 1: 2.0, 3: 0.8})
    gaps = [-1.5, 2.0, 0.8]
    t = statistics.fmean(gaps) / (statistics.stdev(gaps) / math.sqrt(3))
    p = 0.5 - t / (2 * math.sqrt(2 + t * t))  # Student's t with 2 degrees of freedom, as above
    assert at["gap_tests"]["no_imc-full"]["p"] == pytest.approx(p)
    assert records[500]["gaps"]["no_imc-full"] == pytest.approx({0: -1.0, 1: -1.0, 3: -1.0})
    assert records[500]["gap_tests"]["no_imc-full"]["p"] is None  # gaps without spread
    md = CliRunner().invoke(main, [*map(str, folders), "--out", str(tmp_path / "out"), "--step", "1000"])
    assert md.exit_code == 0, md.output
    assert "+2.0 (s1), +0.8 (s3); mean +0.4" in md.output


def test_t_test_power_against_a_simulation():
    # 200,000 simulated runs of 27 seeds with gaps ~ N(0.5, 1): the share the one-sided t-test at 5 % rejects
    rng = np.random.default_rng(0)
    gaps = rng.normal(0.5, 1.0, size=(200_000, 27))
    t = gaps.mean(1) / (gaps.std(1, ddof=1) / math.sqrt(27))
    simulated = float((t >= stats.t.ppf(0.95, 26)).mean())
    assert t_test_power(0.5, 27) == pytest.approx(simulated, abs=0.004)  # 3 standard errors of the simulation
    assert t_test_power(0.0, 27) == pytest.approx(0.05)  # no effect: the test's level


def test_seeds_for_power_is_the_first_n_with_enough_power():
    # G*Power's one-tailed one-sample t-test at d = 0.5, alpha 0.05, power 0.8: 27 seeds
    assert seeds_for_power(0.5, 1.0) == 27
    for mean, std in ((1.0, 3.9), (2.0, 1.0), (0.3, 0.2), (5.0, 1.0)):
        n = seeds_for_power(mean, std)
        brute = next(k for k in range(2, 2000) if t_test_power(mean / std, k) >= 0.8)
        assert n == brute
    assert seeds_for_power(-1.0, 1.0) is None and seeds_for_power(0.0, 1.0) is None  # the loss does not help
    assert seeds_for_power(0.01, 10.0, limit=1000) is None  # beyond the limit
    # gap_test gives it for the gaps' own mean and spread, and the table prints it
    gaps = [1.0, 2.0, 6.0]
    assert gap_test(gaps)["seeds_for_power"] == seeds_for_power(3.0, statistics.stdev(gaps))
    assert gap_test([-1.0, -2.0, -6.0])["seeds_for_power"] is None


def test_the_window_averages_each_seed_over_the_steps_all_its_rows_seeds_share(tmp_path):
    a = _folder(tmp_path / "a", 0, {"full": (2000, 6.0, {500: 9.0, 1000: 8.0, 1500: 7.5, 2000: 7.0})})
    b = _folder(tmp_path / "b", 1, {"full": (2000, 5.0, {500: 9.5, 1000: 7.0, 2000: 6.5}),
                                    "no_imc": (1000, 11.0, {500: 12.0})})
    w = window(collect([a, b])[0], 1000, 2000)
    # full: seed 1 has no evaluation at 1500, so both seeds count 1000 and 2000 (the table's 2000 values: 6.0, 5.0)
    assert w["full"]["steps"] == [1000, 2000]
    assert w["full"]["by_seed"][0]["mean"] == pytest.approx(np.mean([8.0, 6.0]))
    assert w["full"]["by_seed"][0]["std"] == pytest.approx(np.std([8.0, 6.0], ddof=1))
    assert w["full"]["by_seed"][1]["mean"] == pytest.approx(6.0)
    assert w["full"]["mean"] == pytest.approx(6.5) and w["full"]["std"] == pytest.approx(np.std([7.0, 6.0], ddof=1))
    # no_imc, one seed, one step in the window: its value, no spread
    assert w["no_imc"]["by_seed"] == {1: {"mean": 11.0, "std": 0.0}} and w["no_imc"]["std"] == 0.0
    assert "no_imc" not in window(collect([a, b])[0], 1500, 2000)
    assert window(collect([a, b])[0], 2500, 3000) == {}


def test_cli_window_prints_the_means_and_refuses_an_empty_or_reversed_window(two_seeds, tmp_path):
    out = tmp_path / "summary"
    result = CliRunner().invoke(main, [*map(str, two_seeds), "--out", str(out), "--step", "1000",
                                       "--window", "500", "1000"])
    assert result.exit_code == 0, result.output
    # full: seeds 0, 1 at 500 and 1000, seed 2 only at 1000: every seed at 1000 only
    assert "| SSV full (Phi: critic) | 1, 1000 to 1000 | 18.00 ± 0.00 (s0), 20.00 ± 0.00 (s1), 30.00 ± 0.00 (s2) |" \
        in result.output
    # no_imc: seeds 0 and 1 at 500 (24, 28) and 1000 (21, 19)
    assert "| SSV w/o L_imc | 2, 500 to 1000 | 22.50 ± 2.12 (s0), 23.50 ± 6.36 (s1) | **23.00** ± 0.71 |" \
        in result.output
    saved = json.loads((out / "ssv_seeds.json").read_text())
    assert saved["window"]["no_imc"]["steps"] == [500, 1000]
    assert "| SSV w/o L_imc | 2, 500 to 1000 |" in (out / "ssv_seeds.md").read_text()
    for bad_window, message in ((["1000", "500"], "FIRST 1000 is after LAST 500"),
                                (["3000", "4000"], "no row has an evaluation from step 3000 to 4000")):
        bad = CliRunner().invoke(main, [*map(str, two_seeds), "--out", str(out), "--window", *bad_window])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output
