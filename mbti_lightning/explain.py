"""`mbti-lightning explain`: which words a prediction rests on, checked for faithfulness, and leaks flagged.

Per text and head, each token's contribution toward the letter shown (the predicted one) by Integrated
Gradients over the input embeddings (captum's `IntegratedGradients`) on the text as the model saw it (type
mentions masked, truncated as in training). What is explained is the shown letter's logit margin over the
other letter (for the 16-way type, its log-probability). The reference is a mix of two texts without content,
every word the padding token and every word the unknown token (special tokens kept), weighted so that their
mean answer is undecided (`neutral_weights`; Expected Gradients' distribution of references; where both lean
one way, the nearer): a text's contributions then add up, within captum's convergence delta, to its answer
minus an undecided one, so they add up toward the letter shown. Positive is toward the letter shown. Word
pieces are summed into words.

Faithfulness as ERASER measures it (DeYoung et al., 2020): comprehensiveness, the fall of the shown letter's
probability when the top k% of a text's tokens by contribution are removed, and sufficiency, its fall when
only they are kept, for k in `SHARES`, each against the same count of tokens chosen at random; summarised as
differences with a 95% bootstrap interval over texts. Removing a token replaces it by the unknown token (else
the mask token) where the tokenizer has one, else deletes it (padding would move a decoder's pooled token).
Leaks: words that are type vocabulary (types, INxJ, Ni, "introvert"...) among a text's five strongest words
are flagged. Writes a self-contained HTML page and JSON with every number.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mbti_lightning import faithfulness, person_head
from mbti_lightning.cache import atomic_open
from mbti_lightning.folding import head_inputs
from mbti_lightning.loading import Loaded
from mbti_lightning.masking import PLACEHOLDER, is_type_vocabulary, mask_type_mentions
from mbti_lightning.predict import per_author, prediction_records

TEMPLATE = Path(__file__).parent / "templates" / "explain.html"
#: How far (in probability) the reference's answer may be from undecided before the page says it is not.
UNDECIDED = 0.05
#: How many of a text's strongest words are checked for type vocabulary.
TOP_WORDS = 5


def _quantity(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(batch, classes) head logits -> (batch,) what is explained: for two classes the margin of the `target`
    class's logit over the other's, else the target's log-probability."""
    if logits.shape[-1] == 2:
        return logits.gather(1, target[:, None])[:, 0] - logits.gather(1, 1 - target[:, None])[:, 0]
    return logits.log_softmax(-1).gather(1, target[:, None])[:, 0]


def neutral(classes: int) -> float:
    """The explained quantity (`_quantity`) of an undecided answer: an axis's margin 0, the type's log(1/16)."""
    return 0.0 if classes == 2 else -math.log(classes)


def as_probability(value: float, classes: int) -> float:
    """The shown letter's probability for an explained quantity (`_quantity`)."""
    return 1 / (1 + math.exp(-value)) if classes == 2 else math.exp(value)


def neutral_weights(values: torch.Tensor, undecided: float) -> torch.Tensor:
    """(2, batch) explained quantities at two references -> (2, batch) weights, adding up to 1, under which their
    mean is `undecided`; where both lie on one side of it, all the weight on the nearer."""
    first, second = values[0] - undecided, values[1] - undecided
    crossing = (first > 0) != (second > 0)
    weight = torch.where(crossing, second / (second - first).where(crossing, 1), (first.abs() <= second.abs()).float())
    return torch.stack([weight, 1 - weight])


class Explainer:
    """Integrated Gradients for one `MBTIClassifier` (in eval mode) and its tokenizer."""

    def __init__(self, model, tokenizer, max_length: int, mask: bool, steps: int = 50, batch_size: int = 16) -> None:
        from captum.attr import IntegratedGradients

        # Gradients flow to the input embeddings alone: no weight needs one, so no layer keeps its inputs for it
        # (at Phi-3-mini's size that is gigabytes of activations).
        self.model, self.tokenizer, self.max_length, self.mask = (
            model.eval().requires_grad_(False),
            tokenizer,
            max_length,
            mask,
        )
        self.steps, self.batch_size = steps, batch_size
        self.heads = model.heads
        self.embeddings = model.model.get_input_embeddings()
        self._head, self._ig = 0, IntegratedGradients(self._quantity)
        self.removal = faithfulness.removal_id(tokenizer)

    def _logits(self, ids: torch.Tensor, attention: torch.Tensor, embedded: torch.Tensor | None = None) -> list:
        """Per head (batch, classes) logits; with `embedded`, those embeddings take the place of the ids' (the ids
        still locate the token a decoder pools)."""
        hook = None if embedded is None else self.embeddings.register_forward_hook(lambda *_: embedded)
        try:
            return self.model.head_logits(self.model(ids, attention))
        finally:
            if hook is not None:
                hook.remove()

    def _quantity(self, embedded, ids, attention, target) -> torch.Tensor:
        return _quantity(self._logits(ids, attention, embedded)[self._head], target)

    def encode(self, texts: list[str]) -> tuple[list[str], dict]:
        """The texts as the model sees them (masked) and their truncated encoding with word ids and offsets."""
        seen = [mask_type_mentions(t)[0] for t in texts] if self.mask else list(texts)
        enc = self.tokenizer(
            seen,
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        return seen, enc

    @torch.no_grad()
    def features(self, texts: list[str]) -> torch.Tensor:
        """(texts, features) what the model's classification head reads of each text: the posts' features a person
        head pools."""
        _, enc = self.encode(texts)
        collected = []
        for start in range(0, len(texts), self.batch_size):
            ids, attention = self._pad(enc["input_ids"][start : start + self.batch_size])
            with head_inputs(self.model.model) as inputs:
                self._logits(ids, attention)
            collected.extend(inputs)
        return torch.cat(collected)

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        return batch["input_ids"].to(self.model.device), batch["attention_mask"].to(self.model.device)

    def explain(self, texts: list[str]) -> list[dict]:
        """Per text: per head the answer, the reference's, per-word contributions, the delta, faithfulness, leaks."""
        seen, enc = self.encode(texts)
        out = [{"text": text, "heads": {}} for text in seen]
        generator = torch.Generator().manual_seed(0)
        for start in tqdm(range(0, len(texts), self.batch_size), desc="explaining", unit="batch"):
            rows = range(start, min(start + self.batch_size, len(texts)))
            ids, attention = self._pad([enc["input_ids"][i] for i in rows])
            special = self.tokenizer.pad({"input_ids": [enc["special_tokens_mask"][i] for i in rows]})["input_ids"]
            kept = (torch.tensor(special, device=ids.device) == 1) | (attention == 0)
            with torch.no_grad():
                embedded, logits = self.embeddings(ids), self._logits(ids, attention)
                references = self._references(ids, embedded, kept)
            for h, (head, classes) in enumerate(self.heads.items()):
                self._head = h
                target = logits[h].argmax(-1)
                with torch.no_grad():  # (references, batch, classes)
                    at_references = torch.stack([self._logits(ids, attention, r)[h] for r in references.values()])
                values = torch.stack([_quantity(x, target) for x in at_references])
                weights = neutral_weights(values, neutral(len(classes)))
                undecided = as_probability(neutral(len(classes)), len(classes))
                attributions, delta = 0, 0
                for j, reference in enumerate(references.values()):
                    if not weights[j].any():
                        continue
                    part, part_delta = self._ig.attribute(
                        embedded,
                        baselines=reference,
                        additional_forward_args=(ids, attention, target),
                        n_steps=self.steps,
                        internal_batch_size=self.batch_size * 4,
                        return_convergence_delta=True,
                    )
                    attributions = attributions + weights[j, :, None, None] * part.float()
                    delta = delta + weights[j] * part_delta.float()
                per_token = attributions.sum(-1).detach().float().cpu() * attention.cpu()
                value, probabilities = _quantity(logits[h], target).cpu(), logits[h].softmax(-1).cpu()
                shown = at_references.softmax(-1).gather(2, target[None, :, None].expand(len(values), -1, 1))[..., 0]
                values, weights, shown = values.cpu(), weights.cpu(), shown.cpu()
                for k, i in enumerate(rows):
                    n = int(attention[k].sum())
                    words = self._words(seen[i], enc, i, per_token[k, :n])
                    strongest = sorted(words, key=lambda w: -w["contribution"])[:TOP_WORDS]
                    removable = [p for p in range(n) if not kept[k, p]]
                    at_reference = float(weights[:, k] @ values[:, k])
                    reference = as_probability(at_reference, len(classes))
                    out[i]["heads"][head] = {
                        "letter": classes[int(target[k])],
                        "probability": float(probabilities[k, target[k]]),
                        "probabilities": dict(zip(classes, probabilities[k].tolist())),
                        "value": float(value[k]),
                        "reference": {
                            "value": at_reference,
                            "probability": reference,
                            "neutral": undecided,
                            "undecided": abs(reference - undecided) <= UNDECIDED,
                            "texts": [
                                {"word": word, "weight": float(weights[j, k]), "probability": float(shown[j, k])}
                                for j, word in enumerate(references)
                            ],
                        },
                        "contributions": float(per_token[k].sum()),
                        "delta": float(delta[k]),
                        "tokens": n,
                        "words": words,
                        "faithfulness": self._faithfulness(
                            enc["input_ids"][i], removable, per_token[k], h, int(target[k]), generator
                        )
                        if removable
                        else None,
                        "leaks": [w["word"] for w in strongest if w["contribution"] > 0 and self._leak(w["word"])],
                    }
        return out

    @torch.no_grad()
    def _references(self, ids, embedded, kept) -> dict[str, torch.Tensor]:
        """The two reference texts, embedded: every word the padding token, and every word the removal token (the
        vocabulary's mean embedding where the tokenizer has none, or pads with it); special tokens and padding
        kept. Neither carries content."""
        pad, other = self.tokenizer.pad_token_id, self.removal
        ends = {self.tokenizer.pad_token: torch.tensor([pad], device=ids.device)}
        if other is None or other == pad:  # through the layer, as some models scale their embeddings there
            ends["the mean token"] = torch.arange(self.embeddings.num_embeddings, device=ids.device)
        else:
            ends[self.tokenizer.convert_ids_to_tokens(other)] = torch.tensor([other], device=ids.device)
        ends = {name: self.embeddings(tokens).mean(0) for name, tokens in ends.items()}
        return {name: torch.where(kept[..., None], embedded, end.expand_as(embedded)) for name, end in ends.items()}

    @torch.no_grad()
    def _faithfulness(self, ids, removable, contributions, h, target, generator) -> dict:
        """ERASER's comprehensiveness and sufficiency of one text's contributions (`faithfulness`)."""
        erased = faithfulness.variants(ids, removable, contributions, self.removal, generator)
        rows = [ids, *erased.values()]
        probabilities = []
        for start in range(0, len(rows), self.batch_size * 4):
            logits = self._logits(*self._pad(rows[start : start + self.batch_size * 4]))[h]
            probabilities += logits.float().softmax(-1)[:, target].tolist()
        return faithfulness.scores(probabilities[0], dict(zip(erased, probabilities[1:])))

    def _leak(self, word: str) -> bool:
        return is_type_vocabulary(word) and not (self.mask and word in PLACEHOLDER)

    def _words(self, text: str, enc, row: int, scores: torch.Tensor) -> list[dict]:
        """Word pieces summed per word, with each word's span in `text`. A word is what whitespace separates in the
        text, whatever the tokenizer's own word ids say (a SentencePiece tokenizer such as Gemma's or Phi-3's gives
        the whole text one): a piece starts a word where whitespace comes before it, at its start (``▁word``,
        ``Ġword``) or at the end of the piece before (``word▁``); a piece of whitespace alone goes with the next."""
        words: list[dict] = []
        carried, special = 0.0, enc["special_tokens_mask"][row]
        for position, (begin, end) in enumerate(enc["offset_mapping"][row]):
            if position >= len(scores) or end <= begin or special[position]:
                continue
            piece, score = text[begin:end], float(scores[position])
            if not piece.strip():
                carried += score
                continue
            lead = len(piece) - len(piece.lstrip())
            if not words or lead or text[begin - 1].isspace() or words[-1]["open"]:
                words.append({"begin": begin + lead, "contribution": 0.0})
            words[-1] |= {"end": begin + len(piece.rstrip()), "open": piece != piece.rstrip()}
            words[-1]["contribution"] += score + carried
            carried = 0.0
        if words:
            words[-1]["contribution"] += carried
        return [
            {
                "word": text[w["begin"] : w["end"]],
                "begin": w["begin"],
                "end": w["end"],
                "contribution": w["contribution"],
            }
            for w in words
        ]


def summary(explained: list[dict], heads: dict) -> dict:
    """Per head: the share of texts whose contributions add up toward the letter shown, ERASER's figures, the
    largest delta relative to the change it explains, and the leaks."""
    out = {}
    for head in heads:
        rows = [e["heads"][head] for e in explained]
        scored = [r["faithfulness"] for r in rows if r["faithfulness"] is not None]
        out[head] = {
            "texts": len(rows),
            "toward_letter_shown": float(np.mean([r["contributions"] > 0 for r in rows])),
            "faithfulness": faithfulness.summary(scored) if scored else None,
            "max_abs_delta": float(max(abs(r["delta"]) for r in rows)),
            "texts_with_leaks": sum(bool(r["leaks"]) for r in rows),
            "leaked_words": sorted({w for r in rows for w in r["leaks"]}),
        }
    return out


def person_posts(
    explained: list[dict], heads: dict, authors: list, model: Any = None, features: torch.Tensor | None = None
) -> dict:
    """Per author with several posts: their letters (as `predict --predictions.per author` gives them: `model`'s
    answer for a person, from their posts' `features` where its person head answers), their posts ordered by how much
    each weighed toward the person's letter and, where the person head answers, by the weight its attention gave
    each post (``attention``)."""
    out = {}
    for author in dict.fromkeys(authors):
        posts = [i for i, a in enumerate(authors) if a == author]
        if len(posts) < 2:
            continue
        log_probs = {
            head: torch.tensor(
                [[math.log(explained[i]["heads"][head]["probabilities"][c]) for c in heads[head]] for i in posts]
            )
            for head in heads
        }
        mine = None if features is None else features[posts]
        _, _, probs = per_author([author] * len(posts), log_probs, model=model, features=mine)
        (record,) = prediction_records(heads, probs)
        weights = {}
        for head, classes in heads.items():
            letter = classes[int(probs[head][0].argmax())]
            weights[head] = sorted(
                ({"post": i, "weight": float(log_probs[head][j, classes.index(letter)])} for j, i in enumerate(posts)),
                key=lambda p: -p["weight"],
            )
        out[str(author)] = {"posts": posts, "prediction": record, "weighed_most": weights, "attention": None}
        attention = None if mine is None else person_head.post_weights(model, mine)
        if attention is not None:
            order = attention.argsort(descending=True).tolist()
            out[str(author)]["attention"] = [{"post": posts[j], "weight": float(attention[j])} for j in order]
    return out


def colour(value: float, scale: float, positive: str, negative: str) -> str:
    """A background colour for a contribution: `positive` or `negative` hue, as opaque as |value| / scale."""
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    hue = positive if value > 0 else negative
    return f"rgba({hue}, {alpha * 0.85:.3f})"


def toward(value: float, letter: str, classes: tuple[str, ...]) -> str:
    """A contribution in words: positive is toward the letter shown; a negative one is also said the other way
    (toward the axis's other letter, or against the type)."""
    if value >= 0:
        return f"{value:+.3f} toward {letter}"
    other = f"toward {classes[1 - classes.index(letter)]}" if len(classes) == 2 else f"against {letter}"
    return f"{value:+.3f} toward {letter} ({-value:.3f} {other})"


def render(explained: list[dict], heads: dict, summaries: dict, people: dict, meta: dict) -> str:
    """The self-contained page: each text with its words shaded, per head, the summaries and the people."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    hues = ("230, 120, 20", "30, 110, 220")  # the first letter orange, the second blue
    sections = []
    for e in explained:
        per_head = {}
        for head, classes in heads.items():
            r = e["heads"][head]
            # Shade toward each letter of an axis in its own colour; for the type, toward (green) and against (red).
            sign = 1 if len(classes) != 2 or r["letter"] == classes[1] else -1
            scale = max((abs(w["contribution"]) for w in r["words"]), default=0)
            pos, neg = (hues[1], hues[0]) if len(classes) == 2 else ("40, 160, 60", "210, 40, 40")
            spans, cursor, text = [], 0, e["text"]
            for w in sorted(r["words"], key=lambda w: w["begin"]):
                spans.append(html.escape(text[cursor : w["begin"]]))
                style = colour(sign * w["contribution"], scale, pos, neg)
                flag = ' class="leak"' if w["word"] in r["leaks"] else ""
                tip = html.escape(toward(w["contribution"], r["letter"], classes))
                spans.append(f'<span{flag} style="background:{style}" title="{tip}">{html.escape(w["word"])}</span>')
                cursor = w["end"]
            spans.append(html.escape(text[cursor:]))
            per_head[head] = r | {
                "html": "".join(spans),
                "sum_in_words": toward(r["contributions"], r["letter"], classes),
            }
        sections.append(per_head)
    env = Environment(loader=FileSystemLoader(TEMPLATE.parent), autoescape=select_autoescape(["html"]))
    return env.get_template(TEMPLATE.name).render(
        sections=sections, heads=heads, summaries=summaries, people=people, meta=meta, hues=hues
    )


def run(loaded: Loaded, texts: list[str], authors: list | None, out: Path, steps: int) -> dict:
    """Explain `texts` to the `loaded` model (with `authors`, also per person), write ``explanations.html`` and
    ``explanations.json``."""
    start = time.perf_counter()
    model, max_length, mask = loaded.model, loaded.max_length, loaded.mask
    explainer = Explainer(model, loaded.tokenizer, max_length, mask, steps)
    explained = explainer.explain(texts)
    seconds = time.perf_counter() - start
    summaries = summary(explained, model.heads)
    features = explainer.features(texts) if authors and person_head.uses_features(model) else None
    people = person_posts(explained, model.heads, authors, model, features) if authors else {}
    meta = {
        "steps": steps,
        "texts": len(texts),
        "seconds": round(seconds, 2),
        "texts_per_s": round(len(texts) / seconds, 2),
    }
    meta |= {
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "masked": mask,
        "max_length": max_length,
        "reference": "texts of one uninformative token each (padding, unknown), weighted so that their mean answer "
        "is undecided (special tokens kept)",
        "removal": "deleted"
        if explainer.removal is None
        else loaded.tokenizer.convert_ids_to_tokens(explainer.removal),
        "draws": faithfulness.DRAWS,
    }
    report = {"meta": meta, "summary": summaries, "people": people, "texts": explained}
    for name, text in (
        ("explanations.json", json.dumps(report, indent=2)),
        ("explanations.html", render(explained, model.heads, summaries, people, meta)),
    ):
        with atomic_open(out / name, "w") as f:  # whole, or the earlier file: never half of one
            f.write(text)
    return report
