"""The offline demo: a synthetic MBTI corpus, a tokenizer trained on it, and a tiny Phi-3 config.

Nothing here downloads. The corpus has the columns of `minhaozhang/mbti` (author, body, mbti and one
letter column per axis) and roughly its class balance. Each post mixes neutral words with cue words
for its author's letters, plus cue words for the opposite letters as noise, so every axis can be
learned but not perfectly.
"""

from __future__ import annotations

import random
from pathlib import Path

from mbti_lightning.cache import build_atomically, cache_root
from mbti_lightning.labels import AXES

#: Bump when the generator, tokenizer or model config changes, so stale cached files are not reused.
VERSION = "v2"
DEMO = "demo"

#: Share of the second letter of each axis in the real data (anchors.md section 2 majority rates).
SECOND_LETTER_SHARE = {"E-I": 0.7886, "N-S": 0.074, "F-T": 0.5386, "J-P": 0.5919}

CUES = {
    "E": "party friends crowd talk outgoing club festival meetup social loud group team",
    "I": "alone quiet book home solitude recharge introspective headphones reading cozy silence private",
    "N": "theory abstract imagine possibility future symbolism concept pattern meaning vision idea intuition",
    "S": "practical detail concrete fact hands routine present realistic tangible experience specific tools",
    "F": "feel empathy heart values harmony kindness emotions care compassion hurt love support",
    "T": "logic analysis efficient objective reason data argument debate rational system evidence critique",
    "J": "plan schedule organized deadline list decided structure calendar tidy prepared order goal",
    "P": "spontaneous improvise flexible whatever adapt procrastinate explore random open wing chill options",
}
NEUTRAL = """i you it the a to and of in is that this was for on with but so just like have
not be are my me what do think really know get one people would can they about if all
out there time when or at your some more good because from even also how too much then
them now been very did want had see make go still only way any back other well over day
thing things lot same work game new year week world life last first long little going
right sure always never maybe pretty said got something someone everyone nothing into
again why where who which while after before through around here say feel like mean
post reddit comment thread sub read watch play music movie show food coffee cat dog
""".split()


def generate_rows(
    num_rows: int = 16_000, seed: int = 0, cues_per_axis: float = 3.0, cue_accuracy: float = 0.75
) -> dict[str, list]:
    """Make the synthetic corpus as columns: author, body, mbti, E-I, N-S, F-T, J-P.

    Authors write 1-15 posts each. A post has 30-60 neutral words and, per axis, a Poisson-like
    number of cue words (mean `cues_per_axis`, at most 5), each for the author's letter with
    probability `cue_accuracy` and for the opposite letter otherwise. With the defaults, the best
    possible J-P classifier reaches an MCC of about 0.65.
    """
    rng = random.Random(seed)
    cues = {letter: words.split() for letter, words in CUES.items()}
    columns: dict[str, list] = {"author": [], "body": [], "mbti": [], **{axis: [] for axis in AXES}}
    author = 0
    while len(columns["body"]) < num_rows:
        letters = [pair[rng.random() < SECOND_LETTER_SHARE[axis]] for axis, pair in AXES.items()]
        for _ in range(rng.randint(1, 15)):
            words = rng.choices(NEUTRAL, k=rng.randint(30, 60))
            for letter, (first, second) in zip(letters, AXES.values()):
                other = second if letter == first else first
                for _ in range(sum(rng.random() < cues_per_axis / 5 for _ in range(5))):
                    pool = cues[letter] if rng.random() < cue_accuracy else cues[other]
                    words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
            columns["author"].append(f"user{author:05d}")
            columns["body"].append(" ".join(words))
            columns["mbti"].append("".join(letters).lower())
            for axis, letter in zip(AXES, letters):
                columns[axis].append(letter)
        author += 1
    return {name: values[:num_rows] for name, values in columns.items()}


#: `person_rows`' topic words: cue words of N-S, an axis its corpora do not label by.
TOPICS = ("theory", "practical")


def person_rows(cue: str, persons: int = 400, posts: int = 8, seed: int = 0) -> dict[str, list]:
    """A corpus that tells a post model from a model of persons, as columns author, body, mbti (E-I labelled, 7 in
    10 persons I, the other letters random): each person writes `posts` posts of 20-40 neutral words, and

    - ``cue: post``: each post carries an E or I cue word, for the person's letter with probability 0.75, so every
      post is weak independent evidence and adding it up is the best rule;
    - ``cue: person``: each post carries a topic word (`TOPICS`) twice; an I person keeps to one topic, an E person
      picks one at random for each post. Any one post is as likely under either letter: the letter shows only
      across a person's posts.
    """
    rng = random.Random(seed)
    if cue not in ("post", "person"):
        raise ValueError(f"cue must be 'post' or 'person', got {cue!r}")
    columns: dict[str, list] = {"author": [], "body": [], "mbti": []}
    for person in range(persons):
        introvert = rng.random() < 0.7
        letters = ("I" if introvert else "E") + "".join(rng.choice(pair[0] + pair[1]) for pair in ("NS", "FT", "JP"))
        topic = rng.choice(TOPICS)
        for _ in range(posts):
            words = rng.choices(NEUTRAL, k=rng.randint(20, 40))
            if cue == "post":
                letter = (
                    letters[0] if rng.random() < 0.75 else "IE"[introvert]
                )  # the other letter a quarter of the time
                extra = [rng.choice(CUES[letter].split())]
            else:
                extra = [topic if introvert else rng.choice(TOPICS)] * 2
            for word in extra:
                words.insert(rng.randrange(len(words) + 1), word)
            columns["author"].append(f"person{person:04d}")
            columns["body"].append(" ".join(words))
            columns["mbti"].append(letters)
    return columns


#: How a data module reads `person_rows` from a CSV file (``--data.KEY VALUE`` with ``data_files``): E-I, split by
#: person 50/20/30.
PERSON_DATA = {
    "dataset": "csv",
    "text_column": "body",
    "type_column": "mbti",
    "author_column": "author",
    "split": "author",
    "target": "E-I",
    "keep_fraction": 1.0,
    "test_fraction": 0.3,
}


def write_person_rows(path: Path, cue: str, persons: int, posts: int = 8, seed: int = 0) -> Path:
    """`person_rows` as a CSV file at `path` (read with `PERSON_DATA`)."""
    import csv

    rows = person_rows(cue, persons=persons, posts=posts, seed=seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows))
        writer.writerows(zip(*rows.values()))
    return path


def corpus_path() -> Path:
    """The demo corpus as a parquet file, generated on first use."""

    def build(tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(generate_rows()), tmp / "train.parquet")

    return build_atomically(cache_root() / f"demo-{VERSION}" / "corpus", build) / "train.parquet"


def model_dir() -> Path:
    """A local model folder: a byte-level BPE tokenizer trained on the corpus, a tiny Phi-3 config and weights.

    The tokenizer deliberately has no pad token, like many base-model tokenizers; the data module
    gives it one. The weights are a seeded random initialisation, saved so that the folder loads
    like a pretrained model (``from_scratch: false``), as a base for adapters (LoRA) must.
    """

    def build(tmp: Path) -> None:
        import pyarrow.parquet as pq
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1024,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(pq.read_table(corpus_path(), columns=["body"])["body"].to_pylist(), trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512
        )
        fast.save_pretrained(tmp)
        config = Phi3Config(
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            original_max_position_embeddings=512,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            pad_token_id=None,
        )
        with torch.random.fork_rng():  # seeded here, without touching the caller's random state
            torch.manual_seed(0)
            Phi3ForCausalLM(config).save_pretrained(tmp)

    return build_atomically(cache_root() / f"demo-{VERSION}" / "model", build)


def resolve(name_or_path: str) -> str:
    """Map the name ``demo`` to the local demo model folder; pass anything else through."""
    return str(model_dir()) if name_or_path == DEMO else name_or_path
