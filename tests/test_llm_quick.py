"""--quick is a preset of flags: the default model with a shorter schedule, explicit flags beside it win, it cannot
be combined with --preset, and a resume checks its settings like any other flag's."""

import pytest

from llm.checkpoint import take_saved_settings
from llm.runs import CheckpointError
from llm.train import QUICK, build_parser, parse_args, settings_given

SCHEDULE = ("max_steps", "warmup_steps", "eval_every", "out_dir")


def test_quick_sets_the_short_schedule_and_keeps_everything_else_at_the_default():
    default, quick = vars(parse_args([])), vars(parse_args(["--quick"]))
    assert {name: quick[name] for name in SCHEDULE} == {name: QUICK[name] for name in SCHEDULE}
    assert quick["max_steps"] < default["max_steps"] and quick["out_dir"] != default["out_dir"]
    differing = {name for name in default if default[name] != quick[name]}
    assert differing == set(SCHEDULE) | {"quick"}  # same model, batch, learning rate, data and seed


def test_a_flag_given_beside_quick_wins():
    args = parse_args(["--quick", "--max-steps", "1200", "--out-dir", "runs/elsewhere"])
    assert (args.max_steps, args.out_dir) == (1200, "runs/elsewhere")
    assert (args.warmup_steps, args.eval_every) == (QUICK["warmup_steps"], QUICK["eval_every"])
    assert parse_args(["--max-steps", "1200", "--quick"]).max_steps == 1200  # in either order


def test_quick_and_a_preset_together_are_refused_in_one_line():
    with pytest.raises(SystemExit) as refused:
        parse_args(["--quick", "--preset", "wikitext-gpu"])
    assert str(refused.value.code) == "error: --quick and --preset wikitext-gpu are both presets; pass one"


def test_quick_is_documented_in_help_with_its_settings():
    help_text = " ".join(build_parser().format_help().split())
    assert "--quick" in help_text
    assert f"{QUICK['max_steps']} steps" in help_text and QUICK["out_dir"] in help_text


def saved_args(argv) -> dict:
    return {**vars(parse_args(argv)), "world_size": 1}


def test_resume_with_quick_continues_a_quick_run_and_refuses_another():
    argv = ["--quick", "--resume"]
    args = parse_args(argv)
    take_saved_settings(args, settings_given(argv), saved_args(["--quick"]), world_size=1)  # the same: accepted
    assert args.max_steps == QUICK["max_steps"]
    args = parse_args(argv)  # a default run resumed with --quick: the preset's steps are a changed setting
    default_steps = parse_args([]).max_steps
    changed = f"^--max-steps was {default_steps} in the saved run and is {QUICK['max_steps']}"
    with pytest.raises(CheckpointError, match=changed):
        take_saved_settings(args, settings_given(argv), saved_args([]), world_size=1)


def test_resume_without_quick_takes_the_quick_schedule_from_the_saved_run():
    argv = ["--out-dir", QUICK["out_dir"], "--resume"]  # what the stop message tells the reader to type
    args = parse_args(argv)
    take_saved_settings(args, settings_given(argv), saved_args(["--quick"]), world_size=1)
    assert {name: getattr(args, name) for name in SCHEDULE} == {name: QUICK[name] for name in SCHEDULE}


def test_the_stop_at_step_test_hook_is_hidden_from_help_but_still_parses():
    assert "--stop-at-step" not in build_parser().format_help() and "stop-at-step" not in build_parser().format_usage()
    assert parse_args(["--stop-at-step", "3"]).stop_at_step == 3
