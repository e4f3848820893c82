"""lstm/train.py --quick: a preset of flags (the default model on a shorter schedule) that explicit flags override,
that a resumed run must repeat, and that --help documents."""

import shlex

import pytest
import torch

import lstm.train

# Blake's poems and a tiny model: a run of 12 steps takes about a second.
TINY = ["--books", "blake-poems.txt", "--hidden-size", "8", "--embedding-size", "8", "--seq-len", "20",
        "--batch-size", "4", "--eval-every", "5", "--steps", "12"]


def test_quick_sets_exactly_the_preset_and_leaves_every_other_flag_at_its_default():
    quick, default = vars(lstm.train.parse_args(["--quick"])), vars(lstm.train.parse_args([]))
    assert {name: quick[name] for name in lstm.train.QUICK_PRESET} == lstm.train.QUICK_PRESET
    assert quick["steps"] < default["steps"] and quick["out_dir"] != default["out_dir"]
    changed = {name for name in default if quick[name] != default[name]}
    assert changed == {"quick", *lstm.train.QUICK_PRESET}


@pytest.mark.parametrize("argv", [["--quick", "--steps", "7", "--out-dir", "runs/x"],
                                  ["--steps", "7", "--out-dir", "runs/x", "--quick"]])
def test_a_flag_given_beside_quick_wins_wherever_it_stands(argv):
    args = lstm.train.parse_args(argv)
    assert args.quick and args.steps == 7 and args.out_dir == "runs/x"
    assert args.seq_len == lstm.train.QUICK_PRESET["seq_len"]  # the rest of the preset still holds


def test_quick_is_refused_in_one_line_for_the_adding_problem(capsys):
    with pytest.raises(SystemExit) as exit_:
        lstm.train.parse_args(["--quick", "--task", "adding"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("--quick is a preset for the language model (--task lm)")


def test_help_documents_the_preset(capsys):
    with pytest.raises(SystemExit):
        lstm.train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--quick" in help_text and "--steps 1000 --seq-len 50" in help_text and "beside --quick wins" in help_text


def test_the_resume_command_of_a_quick_run_restores_its_settings():
    args = lstm.train.parse_args(["--quick", "--steps", "7", "--out-dir", "runs/lstm-quick-x"])
    command = lstm.train.resume_command(args)
    assert command.startswith("python lstm/train.py --out-dir runs/lstm-quick-x --resume --quick")
    again = lstm.train.parse_args(shlex.split(command)[2:])
    assert again.resume and lstm.train.fixed_arguments(again) == lstm.train.fixed_arguments(args)


def test_a_quick_run_resumes_with_quick_and_is_refused_in_one_line_without_it(tmp_path, capsys, one_thread):
    out_dir = tmp_path / "run"
    lstm.train.main(["--quick", *TINY, "--steps", "6", "--out-dir", str(out_dir)])
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    assert saved["train_arguments"]["quick"] is True and saved["train_arguments"]["steps"] == 6
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        lstm.train.main([*TINY, "--steps", "6", "--out-dir", str(out_dir), "--resume"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: --quick was True in the saved run and is False now; a resumed "
                                               "run keeps its settings (start a new run with --out-dir)")
    lstm.train.main(["--quick", *TINY, "--steps", "6", "--out-dir", str(out_dir), "--resume"])  # accepted: nothing left
    assert "test bpc" in capsys.readouterr().out
