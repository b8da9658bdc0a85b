"""`mbti-lightning explain`: contributions that point at the demo's planted cues toward their letter, add up from an
undecided reference to the answer, beat random removal (ERASER), remove with the unknown token, render in a real
browser, and flag a leaking model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, fit_demo

from mbti_lightning import faithfulness
from mbti_lightning.cli import cli_main
from mbti_lightning.demo import CUES, generate_rows

pytest.importorskip("captum")

SHORT = ["--trainer.max_epochs", "1", "--trainer.val_check_interval", "100"]


def explain(run: Path, ckpt: Path, texts: list[str], *args: str) -> dict:
    mp = pytest.MonkeyPatch()
    mp.chdir(run)
    mp.setattr(sys, "argv", ["mbti-lightning"])
    try:
        cli_main(
            ["explain", "--config", str(REPO / "configs/demo.yaml"), "--ckpt_path", str(ckpt), *args]
            + ["--texts", json.dumps(texts), "--out", str(run / "explained")]
        )
    finally:
        mp.undo()
    return json.loads((run / "explained/explanations.json").read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return fit_demo(tmp_path_factory.mktemp("explain"), *SHORT) / "last.ckpt"


@pytest.fixture(scope="module")
def explained(demo) -> dict:
    rows = generate_rows(num_rows=80, seed=123)
    return explain(demo.parents[2], demo, rows["body"][:80]) | {"truth": rows["J-P"][:80]}


@pytest.mark.slow
def test_the_planted_cue_words_are_the_top_words_of_right_answers_and_push_toward_their_letter(explained):
    right = [t for t, truth in zip(explained["texts"], explained["truth"]) if t["heads"]["J-P"]["letter"] == truth]
    assert len(right) >= 40
    hits, cues, toward_their_letter = 0, 0, 0
    for text in right:
        head = text["heads"]["J-P"]
        top = sorted(head["words"], key=lambda w: -w["contribution"])[:3]
        hits += any(w["word"] in CUES[head["letter"]].split() for w in top)
        for word in head["words"]:
            for letter in "JP":
                if word["word"] in CUES[letter].split():
                    cues += 1
                    toward_their_letter += (word["contribution"] > 0) == (letter == head["letter"])
    # Measured on this fit (1 epoch of the demo, 80 generated texts; `bench/explain_check.py`): 61 of the 62 right
    # answers (0.98), and 167 of 167 cue words toward their own letter.
    assert hits / len(right) >= 0.85, hits / len(right)
    assert toward_their_letter / cues >= 0.95, (toward_their_letter, cues)


@pytest.mark.slow
def test_contributions_add_up_from_an_undecided_reference_and_beat_random_removal(explained):
    for text in explained["texts"]:
        head = text["heads"]["J-P"]
        # The demo's padding text answers J and its unknown-token text P: weighted, the reference is undecided, so
        # the contributions add up toward the letter shown (from all-padding, the old reference, 40% of these texts
        # added up toward the other letter).
        assert head["reference"]["probability"] == pytest.approx(0.5, abs=1e-3)
        change = head["value"] - head["reference"]["value"]
        # Captum's completeness check: the sum differs from the change by the reported delta, and that is small.
        assert abs(head["contributions"] - change - head["delta"]) < 1e-3
        assert abs(head["delta"]) <= 0.05 * abs(change) + 0.02
    summary = explained["summary"]["J-P"]
    assert summary["toward_letter_shown"] == 1.0
    for share in ("5%", "10%", "20%"):
        figures = summary["faithfulness"][share]
        assert figures["comprehensiveness_interval"][0] > 0 and figures["sufficiency_interval"][0] > 0, figures


def test_a_removed_token_becomes_the_unknown_token_even_where_its_id_is_0_and_is_deleted_without_one():
    # Llama's and Phi-3's unknown token is id 0; `unk or pad` fell through to padding, moving a decoder's pooled token.
    llama = SimpleNamespace(unk_token_id=0, mask_token_id=None, pad_token_id=32000)
    assert faithfulness.removal_id(llama) == 0
    byte_level = SimpleNamespace(unk_token_id=None, mask_token_id=None, pad_token_id=50256)
    assert faithfulness.removal_id(byte_level) is None
    ids, generator = [1, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], torch.Generator().manual_seed(0)
    contributions = torch.tensor([9.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    erased = faithfulness.variants(ids, list(range(1, 11)), contributions, 0, generator)
    assert erased[("10%", "comprehensiveness", -1)] == [1, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0]
    assert erased[("10%", "sufficiency", -1)] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 20]
    deleted = faithfulness.variants(ids, list(range(1, 11)), contributions, None, generator)
    assert deleted[("20%", "comprehensiveness", -1)] == [1, 11, 12, 13, 14, 15, 16, 17, 18]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium), which .ci/run installs"
)
def test_the_page_renders_its_shaded_words_and_letters_in_a_real_browser(demo, explained, tmp_path):
    page = demo.parents[2] / "explained/explanations.html"
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    assert dom.count('style="background:rgba(') >= sum(len(t["heads"]["J-P"]["words"]) for t in explained["texts"])
    assert "Why this letter" in dom and "J-P: <span" in dom.replace("\n", "")
    assert dom.count("at the reference J (0.500)") + dom.count("at the reference P (0.500)") == len(explained["texts"])
    shot = tmp_path / "page.png"
    subprocess.run([*command[:-2], f"--screenshot={shot}", "--window-size=1000,1200", page.as_uri()], timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG"


def leaky_corpus(path: Path) -> Path:
    """The demo corpus with "as an INTP"-style mentions of the author's own type in half the posts."""
    rows = generate_rows(num_rows=4000, seed=5)
    rows["body"] = [f"as an {t} {b}" if i % 2 else b for i, (t, b) in enumerate(zip(rows["mbti"], rows["body"]))]
    pq.write_table(pa.table(rows), path)
    return path


@pytest.mark.slow
def test_a_model_trained_on_unmasked_type_names_is_flagged_and_a_masked_one_is_not(tmp_path):
    data = ["--data.dataset", "parquet", "--data.data_files", str(leaky_corpus(tmp_path / "leaky.parquet"))]
    texts = [f"as an {t} i think it went fine" for t in ("INTJ", "ENFP", "ISTP", "ESFJ")] * 3
    flags = {}
    for mask in ("false", "true"):
        run = tmp_path / mask
        run.mkdir()
        args = [*data, "--data.mask_type_mentions", mask, "--data.keep_fraction", "1.0"]
        ckpt = fit_demo(run, *SHORT, *args) / "last.ckpt"
        flags[mask] = explain(run, ckpt, texts, *args)["summary"]["J-P"]["texts_with_leaks"]
    assert flags["false"] >= 6 and flags["true"] == 0, flags


def sentencepiece_decoder(folder: Path) -> Path:
    """A tiny random Llama with a SentencePiece-style tokenizer trained here, as Gemma's and Phi-3's are: pieces
    carry the space (``▁``), no pre-tokenizer splits words (so its word ids give a text one word), and a BOS
    token opens every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"])
    tokenizer.train_from_iterator(generate_rows(num_rows=2000, seed=1)["body"], trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        bos_token_id=bos,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_words_are_words_with_a_sentencepiece_tokenizer_from_an_undecided_reference(tmp_path):
    from mbti_lightning.explain import Explainer
    from mbti_lightning.model import MBTIClassifier
    from mbti_lightning.tokenizer import load_tokenizer

    folder = sentencepiece_decoder(tmp_path / "llama")
    tokenizer = load_tokenizer(str(folder))
    texts = ["i made a plan, for the whole week!", "whatever   lol lets just improvise", "ok"]
    assert set(tokenizer(texts[0]).word_ids()) == {None, 0}  # the tokenizer's word ids: one word for the text
    model = MBTIClassifier(model_name_or_path=str(folder), from_scratch=True)
    model.configure_model()
    for text, explained in zip(texts, Explainer(model, tokenizer, 64, mask=False, steps=50).explain(texts)):
        head = explained["heads"]["J-P"]
        assert [w["word"] for w in head["words"]] == text.split()
        assert all(text[w["begin"] : w["end"]] == w["word"] for w in head["words"])
        assert head["reference"]["probability"] == pytest.approx(0.5, abs=0.05)
        change = head["value"] - head["reference"]["value"]
        assert sum(w["contribution"] for w in head["words"]) == pytest.approx(head["contributions"], abs=1e-5)
        assert abs(head["delta"]) <= 0.05 * abs(change) + 0.02  # captum's completeness gap, as on the demo model


def test_the_page_says_where_the_reference_is_not_undecided(explained):
    from mbti_lightning.explain import render

    text = explained["texts"][0]
    head = text["heads"]["J-P"]
    assert head["reference"]["undecided"] and "is not undecided" not in render(
        [text], {"J-P": ("J", "P")}, explained["summary"], {}, explained["meta"]
    )
    head["reference"] |= {"probability": 0.9999993, "undecided": False}  # both references lean one way
    page = render([text], {"J-P": ("J", "P")}, explained["summary"], {}, explained["meta"])
    assert f"The reference is not undecided ({head['letter']} 1.000,\nmore than 0.05 from 0.500)" in page
