"""The experiment scripts' command lines: the command a result quotes, list options, and a tiny run of each
benchmark script (their figures are measured by hand, not asserted)."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from common.cli import ViewsslCommand, ViewsslGroup, comma_list, int_list, invocation
from common.errors import ViewsslError


def test_invocation_quotes_the_commands_own_arguments():
    @click.command(cls=ViewsslCommand)
    @click.option("--name")
    def script(name):
        click.echo(invocation("python -m experiments.script"))

    result = CliRunner().invoke(script, ["--name", "a b"])
    assert result.exit_code == 0 and result.output == "python -m experiments.script --name 'a b'\n"

    @click.group(cls=ViewsslGroup)
    @click.option("--debug", is_flag=True)
    def group(debug):
        pass

    @group.command("sub")
    @click.argument("x")
    def sub(x):
        click.echo(invocation("viewssl"))

    result = CliRunner().invoke(group, ["--debug", "sub", "it's"])
    assert result.exit_code == 0 and result.output == "viewssl --debug sub 'it'\"'\"'s'\n"  # the root's arguments


def test_list_options():
    assert comma_list(" full, no_imc ,", "--rows", ("full", "no_imc")) == ["full", "no_imc"]
    with pytest.raises(ViewsslError, match=r"^--rows: unknown nope, x \(choose from full, no_imc\)$"):
        comma_list("full,nope,x", "--rows", ("full", "no_imc"))
    with pytest.raises(ViewsslError, match="^--rows: empty list"):
        comma_list(" , ", "--rows", ("full",))
    assert int_list("0, 1,2,", "--seeds") == [0, 1, 2]
    with pytest.raises(ViewsslError, match="^--seeds: not comma-separated integers: '0,one'$"):
        int_list("0,one", "--seeds")
    with pytest.raises(ViewsslError, match="^--seeds: empty list$"):
        int_list(",", "--seeds")
    # a repeat would run twice and count as two seeds (a spread of 0 over copies of one run)
    with pytest.raises(ViewsslError, match="^--seeds: 0 given more than once$"):
        int_list("0,1,0", "--seeds")
    # numpy refuses a negative seed: the experiments' evaluation died with a traceback after the training
    assert int_list("-1,2", "--seeds") == [-1, 2]
    with pytest.raises(ViewsslError, match="^--seeds: -1 is below 0$"):
        int_list("2,-1", "--seeds", minimum=0)
    with pytest.raises(ViewsslError, match="^--methods: vicreg given more than once$"):
        comma_list("vicreg,vicreg", "--methods", ("vicreg",))


def test_bench_render_tiny_run_and_one_line_error():
    from experiments.bench_render import main

    result = CliRunner().invoke(main, ["--size", "16", "--n", "2", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "# command: python -m experiments.bench_render --size 16 --n 2 --repeats 1" in result.output
    rows = [line.split("|")[1].strip() for line in result.output.splitlines() if line.startswith("| ")]
    assert rows == ["kind", "objects", "heads", "sequences"]
    result = CliRunner().invoke(main, ["--scales", "small,huge"])
    assert result.exit_code == 2 and result.output.strip() == "Error: --scales: unknown huge (choose from small, full)"


def test_bench_knn_tiny_run_agrees_with_scikit_learn():
    pytest.importorskip("sklearn")
    from experiments.bench_knn import main

    result = CliRunner().invoke(main, ["--n", "200", "--dim", "16", "--k", "5", "--classes", "4", "--repeat", "1",
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "predictions identical: True (0 of 200 differ)" in result.output
    result = CliRunner().invoke(main, ["--n", "10"])  # k defaults to 20
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "Error: --k 20: more neighbours than the 10 gallery vectors of --n"


def test_bench_encoder_tiny_run_returns_its_figures():
    import torch

    from experiments.bench_encoder import main

    threads = torch.get_num_threads()
    try:
        figures = main.main(["--batch-size", "2", "--image-size", "16", "--repeats", "1", "--warmup", "0",
                             "--device", "cpu", "--threads", "1"], standalone_mode=False)
    finally:
        torch.set_num_threads(threads)
    assert figures["batch_size"] == 2 and figures["full_step_s"] > 0 and figures["bare_backbone_s"] > 0
    assert figures["ratio_cpu"] > 0 and figures["traj_weight"] == 0.2
    # each training image costs five backbone passes: its two views and the trajectory's (left, centre, right)
    assert figures["backbone_passes_per_s"] == pytest.approx(5 * 2 / figures["full_step_s"])


def test_every_seed_option_refuses_a_negative_seed():
    """numpy's generators refuse a negative seed (the evaluation's subsets and box queries use them): every --seed of
    the CLI and of the experiment scripts says so before anything runs, and --seeds too."""
    import click

    from experiments import bench_knn, calibration_fits, frame_pairs, ssv_heads, traj_objects
    from experiments.cli import cli

    def seed_options(command, path):
        for p in command.params:
            if p.name == "seed":
                yield path, p
        for name, sub in getattr(command, "commands", {}).items():
            yield from seed_options(sub, path + [name])

    found = list(seed_options(cli, [])) + [([m.__name__], p) for m in (ssv_heads, bench_knn, calibration_fits)
                                           for p in m.main.params if p.name == "seed"]
    assert len(found) >= 10, [path for path, _ in found]
    for path, option in found:
        assert isinstance(option.type, click.IntRange) and option.type.min == 0, path
    for script in (traj_objects, frame_pairs):
        res = CliRunner().invoke(script.main, ["--quick", "--seeds", "0,-1"])
        assert res.exit_code == 2 and "--seeds: -1 is below 0" in res.output, res.output
