"""A model of persons: a person's post features pooled, then a small head trained on person labels.

A post model answers for a person by adding up the evidence of their posts (`persons`): whatever a person's posts
say only together (a consistent style, a mix of topics) is lost. `PersonHead` reads the frozen backbone's features
of all of a person's posts (the classification head's inputs, `mbti_lightning.features`): each post is embedded,
the posts are pooled by gated attention (Ilse, Tomczak and Welling, "Attention-based deep multiple instance
learning", ICML 2018) or by their mean, and an MLP gives each head's logits. `train` fits it on the training
split's persons (class-weighted by persons, batches of persons under a post budget, a person with more than
``max_posts`` posts a fresh random subset each epoch and all of them when answering), stopping on held-out
training persons, in seconds.

There are fewer persons than posts, so the person head does not always beat the summed evidence (docs/persons.md).
`decide` chooses per head, on the validation persons the head was not fitted or stopped on: the person head
answers only where the paired bootstrap interval of its per-person MCC minus the summed evidence's lies above 0;
otherwise the summed evidence answers and the decision says why. `log_probs` gives a person's answer under that
decision, everywhere the tool gives one (`report`, ``predict --predictions.per author``, the server's ``posts``,
`explain`).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from mbti_lightning import evaluation
from mbti_lightning import persons as person_rules
from mbti_lightning.errors import UserError
from mbti_lightning.folding import classification_head
from mbti_lightning.metrics import confusion, confusion_metrics

POOLINGS = ("attention", "mean")
#: ``model.person_head``'s settings and their defaults.
DEFAULTS = {"pooling": "attention", "hidden": 32, "max_posts": 64}
#: Posts per training batch at most (a batch is whole persons, each up to ``max_posts`` of their posts).
POST_BUDGET = 512
#: Share of the training persons held out to stop training on (their per-person MCC: their loss keeps rising as the
#: head grows confident long after its answers stop improving), and the epochs without a better one.
HELD_OUT, PATIENCE, MAX_EPOCHS = 0.15, 40, 400
LEARNING_RATE, WEIGHT_DECAY, DROPOUT = 1e-3, 1e-2, 0.1
#: The person head's weights in an exported folder.
WEIGHTS = "person_head.safetensors"
#: Bootstrap resamples of the validation persons for `decide`.
RESAMPLES = 1000
PERSON_HEAD, SUMMED = "person head", evaluation.SUMMED


def settings(given: dict[str, Any]) -> dict[str, Any]:
    """``model.person_head`` with its defaults filled in; a `UserError` naming a setting that cannot work."""
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise UserError(
            f"model.person_head: unknown setting {', '.join(sorted(unknown))}; it takes {', '.join(DEFAULTS)}"
        )
    found = DEFAULTS | given
    if found["pooling"] not in POOLINGS:
        raise UserError(f"model.person_head.pooling {found['pooling']!r}: use one of {', '.join(POOLINGS)}")
    for name in ("hidden", "max_posts"):
        if not isinstance(found[name], int) or found[name] < 1:
            raise UserError(f"model.person_head.{name} must be a positive whole number, got {found[name]!r}")
    return found


class PersonHead(nn.Module):
    """(posts, features) post features and (posts,) person numbers 0..n-1 -> per head (n, classes) logits, and each
    post's weight in its person's pooled features (attention, or 1 / their posts)."""

    def __init__(self, features: int, heads: dict[str, tuple[str, ...]], pooling: str, hidden: int, **_: Any) -> None:
        super().__init__()
        self.pooling, self.sizes = pooling, [len(classes) for classes in heads.values()]
        # The features are standardized with the training posts' statistics (a backbone's output scale is its own).
        self.register_buffer("center", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.embed = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Dropout(DROPOUT))
        if pooling == "attention":  # gated attention: w . (tanh(V h) * sigmoid(U h))
            self.attend_v, self.attend_u = nn.Linear(hidden, hidden // 2), nn.Linear(hidden, hidden // 2)
            self.attend_w = nn.Linear(hidden // 2, 1)
        self.classify = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Dropout(DROPOUT), nn.Linear(hidden, sum(self.sizes))
        )

    def weights(self, h: torch.Tensor, persons: torch.Tensor, n: int) -> torch.Tensor:
        """(posts,) each post's weight among its person's posts, summing to 1 per person."""
        if self.pooling == "mean":
            return 1 / torch.bincount(persons, minlength=n).to(h.dtype)[persons]
        score = self.attend_w(torch.tanh(self.attend_v(h)) * torch.sigmoid(self.attend_u(h)))[:, 0]
        top = score.new_full((n,), -math.inf).scatter_reduce(0, persons, score, "amax")
        e = (score - top[persons]).exp()
        return e / e.new_zeros(n).index_add(0, persons, e)[persons]

    def forward(self, features: torch.Tensor, persons: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        n = int(persons.max()) + 1 if len(persons) else 0
        h = self.embed((features.to(self.center) - self.center) / self.scale)
        weights = self.weights(h, persons, n)
        mean = h.new_zeros(n, h.shape[1]).index_add(0, persons, weights[:, None] * h)
        spread = h.new_zeros(n, h.shape[1]).index_add(0, persons, weights[:, None] * (h - mean[persons]) ** 2)
        pooled = torch.cat([mean, (spread + 1e-6).sqrt()], -1)
        return list(self.classify(pooled).split(self.sizes, -1)), weights


def _members(persons: np.ndarray) -> list[np.ndarray]:
    """Per person 0..n-1, the numbers of their posts."""
    order = np.argsort(persons, kind="stable")
    return np.split(order, np.searchsorted(persons[order], np.arange(1, int(persons.max()) + 1)))


def _batches(members: list[np.ndarray], people: np.ndarray, max_posts: int, rng: np.random.Generator):
    """Batches of whole persons (in a random order) under `POST_BUDGET` posts: (post numbers, person numbers within
    the batch, the persons); a person with more than `max_posts` posts brings a random `max_posts` of them."""
    posts, local, chosen, size = [], [], [], 0
    for person in rng.permutation(people):
        mine = members[person]
        if len(mine) > max_posts:
            mine = rng.choice(mine, max_posts, replace=False)
        if size + len(mine) > POST_BUDGET and chosen:
            yield np.concatenate(posts), np.concatenate(local), np.array(chosen)
            posts, local, chosen, size = [], [], [], 0
        posts.append(mine)
        local.append(np.full(len(mine), len(chosen)))
        chosen.append(person)
        size += len(mine)
    if chosen:
        yield np.concatenate(posts), np.concatenate(local), np.array(chosen)


def train(
    head: PersonHead, features: np.ndarray, labels: np.ndarray, persons: np.ndarray, max_posts: int, seed: int = 0
) -> dict[str, Any]:
    """Fit `head` in place on (posts, features) `features`, (posts, heads) class ids `labels` and (posts,) person
    numbers 0..n-1: each head's cross entropy over persons weighted to balance its classes' persons, averaged over
    heads; the epoch of the highest per-person MCC (mean over heads) on `HELD_OUT` of the persons, held out from
    the fit, is kept. Returns what it did: persons, epochs, the held-out MCC."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device, dtype = head.center.device, head.center.dtype
    head.float()  # trained in fp32 whatever the backbone computes in; it answers in the backbone's dtype
    x = torch.as_tensor(np.asarray(features, dtype=np.float32)).to(device)
    head.center.copy_(x.mean(0))
    head.scale.copy_(x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones_like(head.scale))
    members = _members(persons)
    n = len(members)
    truth = torch.stack([person_rules.labels_of(labels[:, h], persons, k) for h, k in enumerate(head.sizes)], 1)
    truth = truth.to(device)
    weights = []
    for h, k in enumerate(head.sizes):
        counts = torch.bincount(truth[:, h], minlength=k).float()
        weights.append(torch.where(counts > 0, n / (k * counts.clamp(min=1)), 0.0).to(device))
    people = rng.permutation(n)
    held = people[: int(n * HELD_OUT)] if n >= 20 else people[:0]  # too few persons to hold any out: fixed epochs
    fitted = np.setdiff1d(people, held)

    def loss(logits: list[torch.Tensor], chosen: np.ndarray) -> torch.Tensor:
        y = truth[torch.as_tensor(chosen, device=device)]
        losses = [nn.functional.cross_entropy(z, y[:, h], weight=weights[h]) for h, z in enumerate(logits)]
        return torch.stack(losses).mean()

    if len(held):  # every post of the held-out persons, each numbered within them
        held_x = x[torch.as_tensor(np.concatenate([members[p] for p in held]), device=device)]
        held_of = np.concatenate([np.full(len(members[p]), i) for i, p in enumerate(held)])
        held_of, held_truth = torch.as_tensor(held_of, device=device), truth[torch.as_tensor(held, device=device)]
    optimizer = torch.optim.AdamW(head.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    best, best_state, since, epochs = -math.inf, None, 0, 0
    for epoch in range(MAX_EPOCHS if len(held) else PATIENCE * 4):
        head.train()
        for posts, local, chosen in _batches(members, fitted, max_posts, rng):
            logits, _ = head(x[torch.as_tensor(posts, device=device)], torch.as_tensor(local, device=device))
            optimizer.zero_grad()
            loss(logits, chosen).backward()
            optimizer.step()
        epochs = epoch + 1
        if not len(held):
            continue
        head.eval()
        with torch.no_grad():
            logits = head(held_x, held_of)[0]
        value = float(np.mean([mcc(held_truth[:, h], z.argmax(-1), z.shape[-1]) for h, z in enumerate(logits)]))
        if value > best:
            best, best_state, since = value, copy.deepcopy(head.state_dict()), 0
        elif (since := since + 1) >= PATIENCE:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval().to(dtype)
    return {"persons": len(fitted), "held_out": len(held), "epochs": epochs, "held_out_mcc": best}


def mcc(truth: torch.Tensor, predicted: torch.Tensor, k: int) -> float:
    """Matthews correlation of class ids `predicted` against `truth` of `k` classes, as the report computes it."""
    counts = confusion(truth.cpu().numpy(), predicted.cpu().numpy(), np.zeros(len(truth), dtype=int), k).sum(0)
    return float(confusion_metrics(counts)["mcc"])


def decide(
    head_logits: dict[str, torch.Tensor], summed: dict[str, torch.Tensor], truth: dict[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Per head, who answers for a person: the person head where, on these (validation) persons, the `RESAMPLES`
    bootstrap interval of its per-person MCC minus the summed post evidence's lies above 0; otherwise the summed
    evidence. `head_logits` and `summed` are per head the persons' (n, classes) scores, `truth` their labels."""
    out = {}
    for head, z in head_logits.items():
        y, k = truth[head], z.shape[-1]
        people = np.arange(len(y))
        if len(y) < 2:
            out[head] = {"answer": SUMMED, "why": f"{len(y)} validation person: too few to compare the two"}
            continue
        confusions = {
            "model": confusion(y, z.argmax(-1).numpy(), people, k),
            SUMMED: confusion(y, summed[head].argmax(-1).numpy(), people, k),
        }
        scores = evaluation.scored(confusions, RESAMPLES, seed=0)
        mine, theirs, diff = scores["model"]["mcc"], scores[SUMMED]["mcc"], scores[f"model - {SUMMED}"]["mcc"]
        answer = PERSON_HEAD if diff["interval"][0] > 0 else SUMMED
        low, high = diff["interval"]
        out[head] = {
            "answer": answer,
            "why": (
                f"on {len(y)} validation persons, per-person MCC {mine['value']:.3f} (person head) against "
                f"{theirs['value']:.3f} (summed posts), difference {diff['value']:+.3f} [{low:+.3f}, {high:+.3f}]: "
                + ("above 0, the person head answers" if answer == PERSON_HEAD else "not above 0, summed posts answer")
            ),
            "mcc": {PERSON_HEAD: mine["value"], SUMMED: theirs["value"]},
        }
    return out


def answers(model: Any) -> dict[str, str]:
    """Per head of an `MBTIClassifier`, who answers for a person: `PERSON_HEAD` or `SUMMED`."""
    decision = getattr(model, "person_decision", None) or {}
    return {head: decision.get(head, {}).get("answer", SUMMED) for head in model.heads}


def uses_features(model: Any) -> bool:
    """Whether a person's answer from `model` needs their posts' features (the person head answers a head)."""
    return PERSON_HEAD in answers(model).values()


@torch.no_grad()
def log_probs(
    model: Any,
    post_log_probs: dict[str, torch.Tensor],
    features: torch.Tensor | None,
    persons: torch.Tensor,
    rules: dict[str, person_rules.Persons] | None = None,
) -> dict[str, torch.Tensor]:
    """Per head, the (n, classes) log-probabilities of persons 0..n-1 (`persons`: each post's) as `model` answers
    for them: its person head's from the posts' (posts, features) `features` where it answers the head (`answers`),
    else the posts' evidence added up by `rules` (per head; the model's own `persons` by default)."""
    rules = rules or model.persons
    out = {head: rules[head].log_probs(lp, persons) for head, lp in post_log_probs.items()}
    if uses_features(model):
        logits, _ = model.person_head(features, persons)
        for (head, who), z in zip(answers(model).items(), logits):
            if who == PERSON_HEAD:
                out[head] = z.float().log_softmax(-1).cpu()
    return out


@torch.no_grad()
def head_logits(head: PersonHead, h: int, features: torch.Tensor, persons: torch.Tensor) -> torch.Tensor:
    """(n, classes) the logits of head number `h` of person head `head` for persons 0..n-1 (`persons`: each post's)."""
    was_training = head.training
    head.eval()
    try:
        return head(features.to(head.center), persons)[0][h]
    finally:
        head.train(was_training)


def metric_answers(model: Any) -> dict[str, Callable | None]:
    """For `EvalMetrics.set_person_answers`: per head of `model`, its person head's logits where it answers."""
    return {
        head: functools.partial(head_logits, model.person_head, h) if who == PERSON_HEAD else None
        for h, (head, who) in enumerate(answers(model).items())
    }


@torch.no_grad()
def post_weights(model: Any, features: torch.Tensor) -> torch.Tensor | None:
    """(posts,) the weight the person head gives each of one person's posts; None where it answers no head."""
    if not uses_features(model):
        return None
    return model.person_head(features, torch.zeros(len(features), dtype=torch.long))[1].float().cpu()


def _split(dm: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, heads) class ids and (rows,) person numbers 0..n-1 of data module `dm`'s `split`."""
    part = dm.splits[split]
    labels = np.asarray(part["labels"][:]).reshape(len(part), -1)
    return labels, np.unique(np.asarray(part["author"][:]), return_inverse=True)[1]


def fit(head: PersonHead, dm: Any, max_posts: int) -> dict[str, Any]:
    """`train` `head` on the training split of `dm`, whose ``features`` (`features.cached`) are set."""
    labels, persons = _split(dm, "train")
    return train(head, dm.features["train"], labels, persons, max_posts)


@torch.no_grad()
def decide_on_validation(model: Any, dm: Any) -> dict[str, dict[str, Any]]:
    """`decide` for `model` (an `MBTIClassifier` in a frozen fit) on the validation persons of `dm`, from their
    cached features: its post head's evidence added up (its `persons` rules) against its person head."""
    labels, persons = _split(dm, "validation")
    index = torch.as_tensor(persons)
    head = model.person_head
    x = torch.as_tensor(np.asarray(dm.features["validation"], dtype=np.float32)).to(head.center.device)
    post_head = classification_head(model.model)
    post = model.head_logits(post_head(x.to(post_head.weight.dtype)).float())
    summed = {name: model.persons[name].log_probs(z.log_softmax(-1).cpu(), index) for name, z in zip(model.heads, post)}
    was_training = head.training
    head.eval()
    logits = [z.float().cpu() for z in head(x, index.to(x.device))[0]]
    head.train(was_training)
    truth = {
        name: person_rules.labels_of(labels[:, h], persons, len(c)).numpy()
        for h, (name, c) in enumerate(model.heads.items())
    }
    return decide(dict(zip(model.heads, logits)), summed, truth)


@torch.no_grad()
def person_systems(model: Any, outputs: evaluation.SplitOutputs) -> dict[str, dict[str, np.ndarray]]:
    """For `evaluation.figures`: per head, the person head's answers on `outputs`' persons (from its ``inputs``, the
    posts' features), named "model" where it is the model's answer for a person, else `PERSON_HEAD`. Empty without
    a person head."""
    if model.person_head is None:
        return {}
    logits, _ = model.person_head(outputs.inputs.to(model.person_head.center.device), torch.as_tensor(outputs.persons))
    return {
        head: {"model" if who == PERSON_HEAD else PERSON_HEAD: z.argmax(-1).cpu().numpy()}
        for (head, who), z in zip(answers(model).items(), logits)
    }


def save(head: PersonHead, folder: Path) -> None:
    """`head`'s weights into exported `folder` (`WEIGHTS`)."""
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, folder / WEIGHTS)


def load(head: PersonHead, source: str) -> None:
    """`head`'s weights from exported folder or hub id `source` (`WEIGHTS`), cast to its dtype."""
    path = Path(source) / WEIGHTS if Path(source).is_dir() else Path(hf_hub_download(source, WEIGHTS))
    if not path.is_file():
        raise UserError(f"{source} records a person head but holds no {WEIGHTS}: export the checkpoint again")
    dtype = head.center.dtype
    head.load_state_dict({k: v.to(dtype) for k, v in load_file(path).items()})
