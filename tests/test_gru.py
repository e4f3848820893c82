"""GRU chapter: hand-written GRU = torch.nn.GRU, CRF = brute force, the tagger trains, round-trips."""

import itertools
import json

import pytest
import torch
from conftest import call_main

import gru.eval as eval_script
import gru.train as train_script
from gru.corpus import (
    PAD,
    TAGS,
    UNK,
    build_vocab,
    collate,
    load_msra,
    make_batches,
    repair_tags,
    spans_to_tags,
    split_long,
    tags_to_spans,
)
from gru.crf import CRF
from gru.model import HandwrittenGRU, Tagger, TaggerConfig, TorchGRU
from gru.tagging import entity_scores, tag_text

TINY_TRAIN = ("--limit-train", "96", "--validation-size", "48", "--embedding-dim", "16", "--hidden-size", "16",
              "--batch-size", "16", "--device", "cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (1, True), (2, False), (2, True)])
def test_handwritten_gru_matches_torch_outputs_states_and_gradients(num_layers, bidirectional):
    reference = TorchGRU(5, 7, num_layers, bidirectional)
    handwritten = HandwrittenGRU(5, 7, num_layers, bidirectional)
    handwritten.load_state_dict(reference.state_dict())  # same names and shapes: the weights copy across
    inputs = torch.randn(4, 6, 5)
    lengths = torch.tensor([6, 3, 1, 5])
    initial_state = torch.randn(num_layers * (2 if bidirectional else 1), 4, 7)
    results = []
    for module in (reference, handwritten):
        leaf_inputs, leaf_state = inputs.clone().requires_grad_(), initial_state.clone().requires_grad_()
        outputs, final_state = module(leaf_inputs, lengths, leaf_state)
        loss = (outputs * torch.linspace(-1, 1, outputs.shape[-1])).pow(2).sum() + final_state.pow(3).sum()
        gradients = torch.autograd.grad(loss, [leaf_inputs, leaf_state, *module.parameters()])
        results.append((outputs, final_state, gradients))
    (out_a, state_a, grads_a), (out_b, state_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state_b, state_a, atol=1e-6, rtol=1e-5)
    assert len(grads_a) == len(grads_b) == 2 + 4 * num_layers * (2 if bidirectional else 1)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-4)


def test_padding_never_changes_the_handwritten_gru_result():
    gru = HandwrittenGRU(3, 4, num_layers=2, bidirectional=True)
    sentence = torch.randn(1, 5, 3)
    alone_outputs, alone_state = gru(sentence, torch.tensor([5]))
    padded = torch.cat([sentence, 100 * torch.randn(1, 4, 3)], dim=1)  # garbage in the padding
    batch = torch.cat([padded, torch.randn(1, 9, 3)])  # beside a longer sentence
    outputs, state = gru(batch, torch.tensor([5, 9]))
    torch.testing.assert_close(outputs[0, :5], alone_outputs[0])
    torch.testing.assert_close(state[:, 0], alone_state[:, 0])
    assert outputs[0, 5:].abs().max() == 0  # padding outputs are zero, as in torch.nn.GRU with packed input


def brute_force_paths(crf, emissions, length):
    """Scores of all K^length tag paths of one sentence, enumerated."""
    paths = list(itertools.product(range(crf.num_tags), repeat=length))
    tags = torch.tensor(paths)  # (P, length)
    scores = crf.path_score(emissions[None, :length].expand(len(paths), -1, -1), tags, torch.ones_like(tags).bool())
    return paths, scores


def test_crf_partition_function_and_viterbi_equal_brute_force():
    crf = CRF(3)
    with torch.no_grad():
        for parameter in crf.parameters():
            parameter.normal_()
    emissions = torch.randn(3, 5, 3)
    lengths = torch.tensor([5, 2, 1])
    mask = torch.arange(5)[None] < lengths[:, None]
    log_partition = crf.log_partition(emissions, mask)
    best_paths = crf.viterbi(emissions, mask)
    for row, length in enumerate(lengths.tolist()):
        paths, scores = brute_force_paths(crf, emissions[row], length)
        torch.testing.assert_close(log_partition[row], torch.logsumexp(scores, 0))
        assert best_paths[row] == list(paths[int(scores.argmax())])


def test_crf_probabilities_of_all_paths_sum_to_one():
    crf = CRF(2)
    emissions = torch.randn(1, 4, 2)
    paths, _ = brute_force_paths(crf, emissions[0], 4)
    tags = torch.tensor(paths)
    nll = crf.neg_log_likelihood(emissions.expand(len(paths), -1, -1), tags, torch.ones_like(tags).bool())
    torch.testing.assert_close(torch.exp(-nll).sum(), torch.tensor(1.0))


def test_ill_formed_tag_paths_are_repaired_and_well_formed_ones_kept():
    assert repair_tags(["B-PER", "E-PER", "S-LOC", "O"]) == ["B-PER", "E-PER", "S-LOC", "O"]
    assert repair_tags(["B-ORG", "M-ORG", "O"]) == ["B-ORG", "E-ORG", "O"]  # never closed
    assert repair_tags(["O", "M-LOC", "E-LOC"]) == ["O", "B-LOC", "E-LOC"]  # never opened
    assert repair_tags(["B-PER", "E-LOC"]) == ["S-PER", "S-LOC"]  # type changes mid-entity
    assert tags_to_spans(["B-ORG", "M-ORG", "E-ORG", "O", "S-PER"]) == [(0, 3, "ORG"), (4, 5, "PER")]
    assert spans_to_tags([(0, 3, "ORG"), (4, 5, "PER")], 5) == ["B-ORG", "M-ORG", "E-ORG", "O", "S-PER"]


def test_long_sentences_are_cut_at_punctuation_and_never_inside_an_entity():
    chars = list("我们在北京，他们在上海工作。")
    tags = ["O", "O", "O", "B-LOC", "E-LOC", "O", "O", "O", "O", "B-LOC", "E-LOC", "O", "O", "O"]
    pieces = split_long(chars, tags, max_length=8)
    assert ["".join(c) for c, _ in pieces] == ["我们在北京，", "他们在上海工作。"]
    pieces = split_long(list("ABCD北京EF"), ["O"] * 4 + ["B-LOC", "E-LOC"] + ["O"] * 2, max_length=5)
    assert [len(c) for c, _ in pieces] == [4, 4]  # no punctuation: cut before the entity, not through it
    assert sum((t for _, t in pieces), []) == ["O"] * 4 + ["B-LOC", "E-LOC"] + ["O"] * 2


def test_vocabulary_is_sorted_with_pad_and_unk_first_and_rare_characters_dropped():
    sentences = [(list("北京北京上"), ["O"] * 5), (list("海京"), ["O"] * 2)]
    assert build_vocab(sentences, min_count=2) == [PAD, UNK, "京", "北"]
    assert build_vocab(list(reversed(sentences)), min_count=1) == [PAD, UNK, "上", "京", "北", "海"]


def test_entity_scores_are_strict_about_boundaries_and_types():
    gold = [["B-PER", "E-PER", "O", "S-LOC"]]
    assert entity_scores(gold, gold)["f1"] == 1.0
    half = entity_scores(gold, [["B-PER", "M-PER", "E-PER", "S-LOC"]])  # PER one character too long
    assert half["precision"] == half["recall"] == 0.5
    assert entity_scores(gold, [["B-ORG", "E-ORG", "O", "S-LOC"]])["per_type"]["PER"]["recall"] == 0.0


def test_checkpoints_cross_load_between_handwritten_and_torch_gru():
    config = TaggerConfig(vocab_size=20, num_tags=len(TAGS), embedding_dim=6, hidden_size=5, impl="handwritten")
    handwritten = Tagger(config).eval()
    reference = Tagger(TaggerConfig(**{**config.to_dict(), "impl": "torch"})).eval()
    reference.load_state_dict(handwritten.state_dict())
    char_ids, lengths = torch.randint(2, 20, (3, 7)), torch.tensor([7, 4, 2])
    torch.testing.assert_close(handwritten.emissions(char_ids, lengths), reference.emissions(char_ids, lengths))
    assert handwritten.decode(char_ids, lengths) == reference.decode(char_ids, lengths)


@pytest.fixture(scope="module")
def msra_sentences():
    """A small slice of the real MSRA training file."""
    train, _ = load_msra(validation_size=100, max_length=100)
    return train[:128]


@pytest.mark.parametrize("output", ["crf", "softmax"])
def test_tiny_tagger_training_on_real_sentences_lowers_the_loss(msra_sentences, output):
    vocab = build_vocab(msra_sentences, min_count=1)
    char_to_id, tag_to_id = {c: i for i, c in enumerate(vocab)}, {t: i for i, t in enumerate(TAGS)}
    model = Tagger(TaggerConfig(len(vocab), len(TAGS), embedding_dim=16, hidden_size=16, dropout=0.0, output=output))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    batches = make_batches(msra_sentences, 16)
    losses = []
    for step in range(16):
        char_ids, tag_ids, lengths = collate(msra_sentences, batches[step % len(batches)], char_to_id, tag_to_id, "cpu")
        loss = model.loss(char_ids, tag_ids, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny real training run stopped after one of two epochs and resumed, and the same run without a break."""
    out_dir = tmp_path_factory.mktemp("gru-run")
    first = train_script.main([*TINY_TRAIN, "--out-dir", str(out_dir), "--epochs", "2", "--stop-after", "1"])
    after_first = torch.load(out_dir / "last.pt", weights_only=True)
    second = train_script.main([*TINY_TRAIN, "--out-dir", str(out_dir), "--epochs", "2", "--resume"])
    straight_dir = tmp_path_factory.mktemp("gru-straight")
    assert train_script.main([*TINY_TRAIN, "--out-dir", str(straight_dir), "--epochs", "2"]) == 0
    return out_dir, first, second, after_first, straight_dir


def test_training_writes_checkpoints_and_resumes(trained_run):
    out_dir, first, second, after_first, straight_dir = trained_run
    assert first == 0 and second == 0
    assert after_first["epoch"] == 1
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert (out_dir / "curves.png").stat().st_size > 0
    checkpoint = torch.load(out_dir / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and [row["epoch"] for row in checkpoint["history"]] == [1, 2]
    assert checkpoint["vocab"] == after_first["vocab"] and checkpoint["tags"] == TAGS
    assert not torch.equal(checkpoint["model"]["tag_scores.weight"], after_first["model"]["tag_scores.weight"])
    straight = torch.load(straight_dir / "last.pt", weights_only=True)  # two epochs without a break
    for name, weight in straight["model"].items():
        torch.testing.assert_close(checkpoint["model"][name], weight, rtol=0, atol=0)


def test_vocabulary_and_tags_round_trip_with_the_checkpoint(trained_run):
    checkpoint = torch.load(trained_run[0] / "best.pt", weights_only=True)
    vocab = checkpoint["vocab"]
    assert vocab[:2] == [PAD, UNK] and vocab[2:] == sorted(vocab[2:])
    train, _ = load_msra(validation_size=48, max_length=100)
    assert vocab == build_vocab(train[:96], min_count=2)  # rebuilt from the same sentences: the same list
    model = Tagger(TaggerConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    assert model.embedding.num_embeddings == len(vocab) and model.tag_scores.out_features == len(checkpoint["tags"])
    char_to_id = {c: i for i, c in enumerate(vocab)}
    entities = tag_text(model.eval(), "我在北京工作", char_to_id, checkpoint["tags"], "cpu", 100)
    assert all(0 <= start < end <= 6 and kind in ("PER", "LOC", "ORG") for start, end, kind, _ in entities)


def test_training_refuses_to_overwrite_or_to_resume_another_config(trained_run, capsys):
    out_dir = trained_run[0]
    before = (out_dir / "best.pt").read_bytes()
    for extra in ([], ["--resume", "--hidden-size", "32"]):
        code, _, err = call_main(train_script.main, [*TINY_TRAIN, "--out-dir", str(out_dir), *extra], capsys)
        assert code != 0 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert (out_dir / "best.pt").read_bytes() == before  # the earlier good checkpoint is untouched


@pytest.mark.slow
def test_eval_cli_tags_a_sentence_as_spans_with_types(trained_run, run_cli):
    checkpoint = str(trained_run[0] / "best.pt")
    tagged = run_cli("gru/eval.py", "--checkpoint", checkpoint, "--tag", "中国人民银行行长在北京发表讲话")
    assert tagged.returncode == 0, tagged.stderr
    lines = tagged.stdout.strip().splitlines()
    assert lines == ["no entities found"] or all(line.split()[1] in ("PER", "LOC", "ORG") for line in lines)


def test_eval_tags_a_5000_character_text_in_pieces(trained_run, capsys):
    text = "我在北京工作，" * 715  # 5,005 characters
    code, out, err = call_main(eval_script.main, ["--checkpoint", str(trained_run[0] / "best.pt"), "--json",
                                                  "--tag", text], capsys)
    assert code == 0, err
    assert all(0 <= e["start"] < e["end"] <= len(text) and text[e["start"]:e["end"]] == e["text"]
               for e in json.loads(out))


def test_eval_prints_entity_metrics_as_json(trained_run, capsys):
    code, out, err = call_main(eval_script.main, ["--checkpoint", str(trained_run[0] / "best.pt"), "--json",
                                                  "--limit", "300"], capsys)
    assert code == 0, err
    scores = json.loads(out)
    assert {"f1", "precision", "recall", "per_type"} <= scores.keys() and 0 <= scores["f1"] <= 1


@pytest.mark.parametrize("arguments", [
    ["--tag", ""],
    ["--tag", "hello world"],
    ["--tag", "   "],
])
def test_eval_rejects_bad_input_with_one_clear_line(trained_run, capsys, arguments):
    code, _, err = call_main(eval_script.main, ["--checkpoint", str(trained_run[0] / "best.pt"), *arguments], capsys)
    assert code != 0
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_cli_rejects_a_missing_checkpoint(run_cli):
    result = run_cli("gru/eval.py", "--checkpoint", "missing.pt", "--tag", "北京")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_eval_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    code, _, err = call_main(eval_script.main, ["--checkpoint", str(broken), "--tag", "北京"], capsys)
    assert code != 0 and err.startswith("error:") and len(err.strip().splitlines()) == 1
