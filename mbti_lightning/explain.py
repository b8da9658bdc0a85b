"""`mbti-lightning explain`: which words a prediction rests on, checked for faithfulness, and leaks flagged.

Per text and head, each token's attribution toward the predicted letter by Integrated Gradients over
the input embeddings (captum's `LayerIntegratedGradients`, from an all-padding baseline), on the text
as the model saw it (type mentions masked, truncated as in training). The explained quantity is the
predicted letter's logit margin over the other letter (for the 16-way type, its log-probability), so
the attributions of a text add up to that quantity's change from the baseline, within the reported
convergence delta. Word pieces are summed into words for display.

Faithfulness: removing (replacing by the unknown token) the 10% of tokens with the most attribution
should lower the predicted letter's probability more than removing a random 10%. Leaks: words that are
type vocabulary (types, INxJ, Ni, "introvert"...) among a text's five strongest words are flagged.
Writes a self-contained HTML page and JSON with every number.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mbti_lightning.loading import Loaded
from mbti_lightning.masking import PLACEHOLDER, is_type_vocabulary, mask_type_mentions
from mbti_lightning.predict import per_author, prediction_records

TEMPLATE = Path(__file__).parent / "templates" / "explain.html"
#: Share of a text's tokens removed by the faithfulness check, and random draws to compare with.
REMOVE, DRAWS = 0.1, 5
#: How many of a text's strongest words are checked for type vocabulary.
TOP_WORDS = 5


def _quantity(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(batch, classes) head logits -> (batch,) what is explained: for two classes the margin of the `target`
    class's logit over the other's, else the target's log-probability."""
    if logits.shape[-1] == 2:
        return logits.gather(1, target[:, None])[:, 0] - logits.gather(1, 1 - target[:, None])[:, 0]
    return logits.log_softmax(-1).gather(1, target[:, None])[:, 0]


class Explainer:
    """Integrated Gradients for one `MBTIClassifier` (in eval mode) and its tokenizer."""

    def __init__(self, model, tokenizer, max_length: int, mask: bool, steps: int = 50, batch_size: int = 16) -> None:
        from captum.attr import LayerIntegratedGradients

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
        self._head, self._ig = 0, LayerIntegratedGradients(self._forward, model.model.get_input_embeddings())
        # Removed tokens become the unknown (or mask) token, not padding: decoders pool the last non-pad token.
        self.remove_id = tokenizer.mask_token_id or tokenizer.unk_token_id or tokenizer.pad_token_id

    def _forward(self, input_ids, attention_mask, target):
        return _quantity(self.model.head_logits(self.model(input_ids, attention_mask))[self._head], target)

    @torch.no_grad()
    def head_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        return [x.float().log_softmax(-1) for x in self.model.head_logits(self.model(input_ids, attention_mask))]

    def encode(self, texts: list[str]) -> tuple[list[str], dict]:
        """The texts as the model sees them (masked) and their truncated encoding with word ids and offsets."""
        seen = [mask_type_mentions(t)[0] for t in texts] if self.mask else list(texts)
        enc = self.tokenizer(seen, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        return seen, enc

    def explain(self, texts: list[str]) -> list[dict]:
        """Per text: per head the prediction, per-word attributions, the delta, faithfulness and leak flags."""
        seen, enc = self.encode(texts)
        out = [{"text": text, "heads": {}} for text in seen]
        device = self.model.device
        for start in tqdm(range(0, len(texts), self.batch_size), desc="explaining", unit="batch"):
            rows = range(start, min(start + self.batch_size, len(texts)))
            batch = self.tokenizer.pad({"input_ids": [enc["input_ids"][i] for i in rows]}, return_tensors="pt")
            ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            log_probs = self.head_log_probs(ids, attention)
            baseline = torch.full_like(ids, self.tokenizer.pad_token_id)
            for h, (head, classes) in enumerate(self.heads.items()):
                self._head = h
                target = log_probs[h].argmax(-1)
                attributions, delta = self._ig.attribute(
                    ids,
                    baselines=baseline,
                    additional_forward_args=(attention, target),
                    n_steps=self.steps,
                    internal_batch_size=self.batch_size * 4,
                    return_convergence_delta=True,
                )
                per_token = attributions.sum(-1).detach().float().cpu() * attention.cpu()
                with torch.no_grad():
                    explained = _quantity(self.model.head_logits(self.model(ids, attention))[h], target).cpu()
                    at_baseline = self._at_baseline(ids, attention, baseline, target).cpu()
                drops = self._faithfulness(ids, attention, per_token, h, target, log_probs[h])
                for k, i in enumerate(rows):
                    n = int(attention[k].sum())
                    words = self._words(seen[i], enc, i, per_token[k, :n])
                    strongest = sorted(words, key=lambda w: -w["attribution"])[:TOP_WORDS]
                    out[i]["heads"][head] = {
                        "letter": classes[int(target[k])],
                        "probability": float(log_probs[h][k, target[k]].exp()),
                        "probabilities": dict(zip(classes, log_probs[h][k].exp().tolist())),
                        "words": words,
                        "explained": float(explained[k]),
                        "at_baseline": float(at_baseline[k]),
                        "attribution_sum": float(per_token[k].sum()),
                        "delta": float(delta[k]),
                        "tokens": n,
                        "drop_top": drops[0][k],
                        "drop_random": drops[1][k],
                        "leaks": [w["word"] for w in strongest if w["attribution"] > 0 and self._leak(w["word"])],
                    }
        return out

    def _at_baseline(self, ids, attention, baseline, target) -> torch.Tensor:
        """The explained quantity with the embeddings of the baseline in place of the text's, as Integrated
        Gradients' path starts (the ids still locate the pooled token)."""
        layer = self.model.model.get_input_embeddings()
        replacement = layer(baseline)
        hook = layer.register_forward_hook(lambda module, args, output: replacement)
        try:
            return self._forward(ids, attention, target)
        finally:
            hook.remove()

    def _leak(self, word: str) -> bool:
        return is_type_vocabulary(word) and not (self.mask and word in PLACEHOLDER)

    def _words(self, text: str, enc, row: int, scores: torch.Tensor) -> list[dict]:
        """Word pieces summed per word (the tokenizer's word ids), with each word's span in `text`."""
        words: dict[int, dict] = {}
        for position, (word, (begin, end)) in enumerate(zip(enc.word_ids(row), enc["offset_mapping"][row])):
            if word is None or position >= len(scores) or end <= begin:
                continue
            entry = words.setdefault(word, {"begin": begin, "end": end, "attribution": 0.0})
            entry["end"] = end
            entry["attribution"] += float(scores[position])
        out = []
        for entry in words.values():
            begin = (
                entry["begin"]
                + len(text[entry["begin"] : entry["end"]])
                - len(text[entry["begin"] : entry["end"]].lstrip())
            )
            out.append(
                {
                    "word": text[begin : entry["end"]],
                    "begin": begin,
                    "end": entry["end"],
                    "attribution": entry["attribution"],
                }
            )
        return out

    @torch.no_grad()
    def _faithfulness(self, ids, attention, per_token, h, target, log_probs) -> tuple[list[float], list[float]]:
        """Per row, how much the predicted letter's probability falls when the top 10% of its tokens by attribution
        are removed, and when a random 10% are (mean over `DRAWS` draws)."""
        before = log_probs.gather(1, target[:, None])[:, 0].exp().cpu()
        generator = torch.Generator().manual_seed(0)
        lengths = attention.sum(1).cpu()
        chosen_top, chosen_random = [], [[] for _ in range(DRAWS)]
        for k, n in enumerate(lengths.tolist()):
            count = max(1, math.ceil(REMOVE * n))
            chosen_top.append(per_token[k, :n].argsort(descending=True)[:count])
            for d in range(DRAWS):
                chosen_random[d].append(torch.randperm(n, generator=generator)[:count])

        def probability_after(chosen: list[torch.Tensor]) -> torch.Tensor:
            removed = ids.clone()
            for k, positions in enumerate(chosen):
                removed[k, positions.to(ids.device)] = self.remove_id
            after = self.head_log_probs(removed, attention)[h]
            return after.gather(1, target[:, None])[:, 0].exp().cpu()

        top = before - probability_after(chosen_top)
        random = torch.stack([before - probability_after(c) for c in chosen_random]).mean(0)
        return top.tolist(), random.tolist()


def summary(explained: list[dict], heads: dict) -> dict:
    """Per head: mean faithfulness drops and their ratio, the largest relative delta, and the leak count."""
    out = {}
    for head in heads:
        rows = [e["heads"][head] for e in explained]
        top, random = float(np.mean([r["drop_top"] for r in rows])), float(np.mean([r["drop_random"] for r in rows]))
        out[head] = {
            "texts": len(rows),
            "mean_drop_top": top,
            "mean_drop_random": random,
            "ratio": top / random if random > 0 else None,
            "better_than_random": top > random,
            "max_abs_delta": float(max(abs(r["delta"]) for r in rows)),
            "texts_with_leaks": sum(bool(r["leaks"]) for r in rows),
            "leaked_words": sorted({w for r in rows for w in r["leaks"]}),
        }
    return out


def person_posts(explained: list[dict], heads: dict, authors: list, rules: dict | None = None) -> dict:
    """Per author with several posts: their letters (their posts' evidence added up with the model's `rules`, as
    `predict --predictions.per author`) and their posts ordered by how much each weighed toward the person's
    letter."""
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
        _, _, probs = per_author([author] * len(posts), log_probs, rules)
        (record,) = prediction_records(heads, probs)
        weights = {}
        for head, classes in heads.items():
            letter = classes[int(probs[head][0].argmax())]
            weights[head] = sorted(
                ({"post": i, "weight": float(log_probs[head][j, classes.index(letter)])} for j, i in enumerate(posts)),
                key=lambda p: -p["weight"],
            )
        out[str(author)] = {"posts": posts, "prediction": record, "weighed_most": weights}
    return out


def colour(value: float, scale: float, positive: str, negative: str) -> str:
    """A background colour for an attribution: `positive` or `negative` hue, as opaque as |value| / scale."""
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    hue = positive if value > 0 else negative
    return f"rgba({hue}, {alpha * 0.85:.3f})"


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
            scale = max((abs(w["attribution"]) for w in r["words"]), default=0)
            pos, neg = (hues[1], hues[0]) if len(classes) == 2 else ("40, 160, 60", "210, 40, 40")
            spans, cursor, text = [], 0, e["text"]
            for w in sorted(r["words"], key=lambda w: w["begin"]):
                spans.append(html.escape(text[cursor : w["begin"]]))
                style = colour(sign * w["attribution"], scale, pos, neg)
                flag = ' class="leak"' if w["word"] in r["leaks"] else ""
                tip = f"{w['attribution']:+.3f} toward {r['letter']}"
                spans.append(f'<span{flag} style="background:{style}" title="{tip}">{html.escape(w["word"])}</span>')
                cursor = w["end"]
            spans.append(html.escape(text[cursor:]))
            per_head[head] = r | {"html": "".join(spans)}
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
    people = person_posts(explained, model.heads, authors, model.persons) if authors else {}
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
        "removed": f"{REMOVE:.0%}",
        "draws": DRAWS,
    }
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "summary": summaries, "people": people, "texts": explained}
    (out / "explanations.json").write_text(json.dumps(report, indent=2))
    (out / "explanations.html").write_text(render(explained, model.heads, summaries, people, meta))
    return report
