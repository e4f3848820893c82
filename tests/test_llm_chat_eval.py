"""The held-out evaluation: batched decoding equals decoding alone, and every task gets its chapter's metric."""

import json

import pytest
import torch

from llm.chat_eval import generate_batch
from llm.generate import generate
from llm.model import Llama, LlamaConfig

torch.set_num_threads(1)


def lively_model() -> Llama:
    """A tiny random model with large weights, so that its greedy continuations vary from token to token."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=61, context_length=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.5)
    return model.eval()


def test_batched_greedy_answers_equal_the_answers_decoded_one_by_one():
    model = lively_model()
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7, 7, 7, 7, 7], [30, 31]]
    alone = [generate(model, prompt, 12, temperature=0) for prompt in prompts]
    assert len({tuple(answer) for answer in alone}) == len(prompts)  # the check is not trivial
    assert generate_batch(model, prompts, 12, stop_ids=set()) == alone


def test_a_row_stops_at_its_end_token_and_the_others_go_on():
    model = lively_model()
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]
    alone = [generate(model, prompt, 12, temperature=0) for prompt in prompts]
    stop = alone[0][3]  # the fourth token of the first answer ends it
    answers = generate_batch(model, prompts, 12, stop_ids={stop})
    first_stop = alone[0].index(stop)
    assert answers[0] == alone[0][:first_stop]
    second = alone[1][: alone[1].index(stop)] if stop in alone[1] else alone[1]
    assert answers[1] == second


def test_sampled_answers_follow_the_generator():
    model = lively_model()
    prompts = [[1, 2, 3]] * 4
    first = generate_batch(model, prompts, 8, set(), temperature=1.0, generator=torch.Generator().manual_seed(5))
    again = generate_batch(model, prompts, 8, set(), temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert first == again and len({tuple(answer) for answer in first}) > 1


@pytest.mark.slow
def test_chat_eval_scores_every_task_of_a_model_fine_tuned_here(tmp_path, run_cli):
    from data import fetch
    from llm.sft import main as sft
    from llm.train import main as pretrain
    from tests.test_llm_sft import TINY_PRETRAIN, TINY_SFT

    text_file = tmp_path / "wiki.txt"
    text_file.write_text((fetch("wikitext-2") / "valid.raw").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    pretrain([*TINY_PRETRAIN, "--text-file", str(text_file), "--data-dir", str(tmp_path / "data"),
              "--out-dir", str(tmp_path / "base")])
    sft([*TINY_SFT, "--checkpoint", str(tmp_path / "base" / "best.pt"), "--out-dir", str(tmp_path / "sft")])
    result = run_cli("llm/chat_eval.py", "--checkpoint", str(tmp_path / "sft" / "model.pt"), "--count",
                     "translation=6,surnames=8,entities=3,chitchat=3", "--json", "--out", str(tmp_path / "r.json"),
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report == json.loads((tmp_path / "r.json").read_text())
    metrics = {task: value["metric"] for task, value in report["tasks"].items()}
    assert metrics == {"translation": "bleu", "surnames": "accuracy_percent", "entities": "entity_f1",
                       "chitchat": "answer_loss"}
    assert 0 <= report["tasks"]["surnames"]["value"] <= 100 and report["tasks"]["chitchat"]["value"] > 0
    bad = run_cli("llm/chat_eval.py", "--checkpoint", str(tmp_path / "sft" / "model.pt"), "--count", "poems=3")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: --count takes")
