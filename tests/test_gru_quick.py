"""gru/train.py --quick: a preset of flags (the default model on a shorter schedule) that explicit flags override,
that a resumed run must repeat, and that --help documents."""

import shlex

import pytest
import torch

import gru.train as train_script

# 64 sentences in batches of 16, tiny sizes: one epoch takes a few seconds, most of them reading MSRA.
TINY = ["--limit-train", "64", "--validation-size", "32", "--embedding-dim", "16", "--hidden-size", "16",
        "--batch-size", "16", "--device", "cpu"]


def test_quick_sets_exactly_the_preset_and_leaves_every_other_flag_at_its_default():
    quick, default = vars(train_script.parse_args(["--quick"])), vars(train_script.parse_args([]))
    assert {name: quick[name] for name in train_script.QUICK_PRESET} == train_script.QUICK_PRESET
    assert quick["epochs"] < default["epochs"] and quick["out_dir"] != default["out_dir"]
    changed = {name for name in default if quick[name] != default[name]}
    assert changed == {"quick", *train_script.QUICK_PRESET}


@pytest.mark.parametrize("argv", [["--quick", "--epochs", "3", "--out-dir", "runs/x"],
                                  ["--epochs", "3", "--out-dir", "runs/x", "--quick"]])
def test_a_flag_given_beside_quick_wins_wherever_it_stands(argv):
    args = train_script.parse_args(argv)
    assert args.quick and args.epochs == 3 and args.out_dir == "runs/x"


def test_help_documents_the_preset(capsys):
    with pytest.raises(SystemExit):
        train_script.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--quick" in help_text and "--epochs 2" in help_text and "beside --quick wins" in help_text


def test_the_resume_command_of_a_quick_run_restores_its_settings():
    args = train_script.parse_args(["--quick", "--lr", "0.01", "--out-dir", "runs/gru-quick-x"])
    command = train_script.resume_command(args)
    assert command == "python gru/train.py --out-dir runs/gru-quick-x --resume --quick --lr 0.01"
    again = vars(train_script.parse_args(shlex.split(command)[2:]))
    assert again["resume"] and all(again[name] == vars(args)[name] for name in train_script.FIXED_ON_RESUME)


def test_a_quick_run_resumes_with_quick_and_is_refused_in_one_line_without_it(tmp_path, capsys, monkeypatch,
                                                                             one_thread):
    monkeypatch.setattr(train_script, "plot_curves", lambda history, path: None)
    out_dir = tmp_path / "run"
    assert train_script.main(["--quick", *TINY, "--stop-after", "1", "--out-dir", str(out_dir)]) == 0
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    assert saved["args"]["quick"] is True and saved["args"]["epochs"] == 2 and saved["epoch"] == 1
    capsys.readouterr()
    assert train_script.main([*TINY, "--epochs", "2", "--out-dir", str(out_dir), "--resume"]) == 1
    assert capsys.readouterr().err == ("error: --quick was True in the saved run and is False now; a resumed run "
                                       "keeps its settings (start a new run with --out-dir)\n")
    assert train_script.main(["--quick", *TINY, "--out-dir", str(out_dir), "--resume"]) == 0
    assert torch.load(out_dir / "last.pt", weights_only=True)["epoch"] == 2
