"""Conversation summaries for the escalation desk, and their measurement against human summaries.

Two writers:

- ``extractive``: the customer's most informative turn and the agent's, cleaned of handles, links
  and sign-offs. Chosen (turn picks, length) on the *tune* half of a dialogue file only;
- ``model``: the base language model (SmolLM2-135M by default) asked for a two-sentence summary.

``eval summaries`` reports ROUGE-1/2/L F1 (rouge-score, Porter stemming) of each against the
references beside the lead baseline (first customer turn + last agent turn, raw text) on the *report*
half, which tuned nothing. With several references per dialogue, ROUGE is reported both ways: the best
reference (``max``) and the average over references (``mean``).

The desk summary of an escalation (``escalation_brief``) uses the same writer on the employee's turns,
plus what the bot suggested (cited tickets), why the employee escalated, and a rules-based severity.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import InputError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.schema import Escalation

Generate = Callable[[list[dict[str, str]]], str]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SPLITS = ("tune", "report", "all")

# --- dialogues ------------------------------------------------------------------------------------


@dataclass
class Dialogue:
    id: str
    turns: list[tuple[str, str]]  # (speaker "customer" | "agent", text)
    references: list[str] = field(default_factory=list)


def read_dialogues(path: Path) -> list[Dialogue]:
    """TweetSumm-style JSONL: {"conversation_id", "turns": [{"speaker", "text"}], "summaries": [...]}."""
    if not path.is_file():
        raise InputError(f"dialogue file not found: {path}")
    dialogues: list[Dialogue] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not JSON ({err.msg})") from err
        turns = [
            (str(t.get("speaker")), str(t.get("text") or "").strip())
            for t in row.get("turns") or []
            if isinstance(t, dict) and str(t.get("text") or "").strip()
        ]
        references = [s for s in row.get("summaries") or [] if isinstance(s, str) and s.strip()]
        if not turns or not references:
            raise InputError(f"{path}:{number}: a dialogue needs turns and at least one reference summary")
        dialogues.append(Dialogue(str(row.get("conversation_id", number)), turns, references))
    if not dialogues:
        raise InputError(f"no dialogues in {path}")
    return dialogues


def split_of(dialogue_id: str) -> str:
    """A fixed half split by a hash of the id: "tune" (choices were made on it) or "report"."""
    return "tune" if hashlib.sha256(dialogue_id.encode()).digest()[0] % 2 == 0 else "report"


def select_split(dialogues: Sequence[Dialogue], split: str) -> list[Dialogue]:
    if split == "all":
        return list(dialogues)
    return [d for d in dialogues if split_of(d.id) == split]


# --- writers --------------------------------------------------------------------------------------

_HANDLE = re.compile(r"(?<!\w)@\w+")
_URL = re.compile(r"https?://\S+")
_SIGNOFF = re.compile(r"(?:\s[\^*~-]\s?[A-Z]{1,3}\w*|\s-\s?\w+)\s*$")  # "^Clarissa", " -AB", "*JS"
_SPACE = re.compile(r"\s+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def clean(text: str) -> str:
    """A turn without @handles, links and agents' initials: words a summary would use."""
    text = _URL.sub(" ", text)
    text = _HANDLE.sub(" ", text)
    text = _SIGNOFF.sub("", text)
    return _SPACE.sub(" ", text).strip(" .,:;-")


def lead_summary(turns: Sequence[tuple[str, str]]) -> str:
    """The baseline: the first customer turn and the last agent turn, as written."""
    customer = next((t for s, t in turns if s == "customer"), "")
    agent = next((t for s, t in reversed(turns) if s == "agent"), "")
    return " ".join(x for x in (customer, agent) if x)


def _words(text: str) -> int:
    return len(text.split())


def _cut(text: str, limit: int) -> str:
    """The first sentences of ``text`` up to about ``limit`` words (a sentence is not cut mid-way
    unless the first one alone is longer)."""
    out: list[str] = []
    for sentence in _SENTENCE.split(text):
        if out and _words(" ".join(out)) + _words(sentence) > limit:
            break
        out.append(sentence)
    joined = " ".join(out)
    words = joined.split()
    return joined if len(words) <= limit else " ".join(words[:limit])


@dataclass(frozen=True)
class ExtractiveConfig:
    """Chosen on the tune half of tweetsumm_dev (see ``tune_extractive``); the report half tuned nothing."""

    customer_turns: int = 1  # the first N customer turns (the problem is stated early)
    customer_words: int = 30
    agent_pick: str = "last"  # first, last or longest agent turn
    agent_words: int = 40


def extractive_summary(turns: Sequence[tuple[str, str]], config: ExtractiveConfig | None = None) -> str:
    config = config or ExtractiveConfig()
    customer = [clean(t) for s, t in turns if s == "customer"]
    customer = [t for t in customer if _words(t) >= 2] or customer
    agent = [clean(t) for s, t in turns if s == "agent"]
    agent = [t for t in agent if _words(t) >= 2] or agent
    problem = _cut(" ".join(customer[: config.customer_turns]), config.customer_words) if customer else ""
    reply = ""
    if agent:
        pick = {"first": agent[0], "last": agent[-1], "longest": max(agent, key=_words)}[config.agent_pick]
        reply = _cut(pick, config.agent_words)
    return " ".join(x for x in (problem, reply) if x)


SUMMARY_SYSTEM = (
    "You summarize support conversations for technicians. Write two short sentences: first what the "
    "customer's problem is, then what the agent did or suggested. No greetings, no names."
)


def summary_prompt(turns: Sequence[tuple[str, str]], *, max_chars: int = 3000) -> list[dict[str, str]]:
    lines = [f"{'Customer' if s == 'customer' else 'Agent'}: {clean(t)}" for s, t in turns]
    dialogue = "\n".join(lines)[-max_chars:]
    return [
        {"role": "system", "content": SUMMARY_SYSTEM},
        {"role": "user", "content": f"Conversation:\n{dialogue}\n\nSummary:"},
    ]


def model_summary(turns: Sequence[tuple[str, str]], generate: Generate) -> str:
    text = generate(summary_prompt(turns)).strip()
    return _SPACE.sub(" ", text)


# --- measuring ------------------------------------------------------------------------------------


def rouge_scores(prediction: str, references: Sequence[str]) -> dict[str, dict[str, float]]:
    """ROUGE F1 against each reference: {"max": {rouge1, rouge2, rougeL}, "mean": {...}}."""
    from rouge_score import rouge_scorer

    scorer = _scorer(rouge_scorer)
    per_ref = [scorer.score(ref, prediction) for ref in references]
    return {
        "max": {k: max(s[k].fmeasure for s in per_ref) for k in ROUGE_TYPES},
        "mean": {k: statistics.fmean(s[k].fmeasure for s in per_ref) for k in ROUGE_TYPES},
    }


_SCORER: Any = None


def _scorer(module: Any) -> Any:
    global _SCORER
    if _SCORER is None:
        _SCORER = module.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return _SCORER


def corpus_rouge(predictions: Sequence[str], dialogues: Sequence[Dialogue]) -> dict[str, dict[str, float]]:
    """Mean over dialogues of each dialogue's max- and mean-over-references ROUGE F1."""
    rows = [rouge_scores(p, d.references) for p, d in zip(predictions, dialogues)]
    return {
        how: {k: round(statistics.fmean(r[how][k] for r in rows), 4) for k in ROUGE_TYPES}
        for how in ("max", "mean")
    }


def tune_extractive(dialogues: Sequence[Dialogue]) -> tuple[ExtractiveConfig, float]:
    """Grid search on the given (tune) dialogues by mean-over-references ROUGE-1+2+L."""
    best: tuple[float, ExtractiveConfig] | None = None
    for customer_turns in (1, 2):
        for customer_words in (20, 30, 40, 60):
            for agent_pick in ("first", "last", "longest"):
                for agent_words in (15, 25, 40):
                    config = ExtractiveConfig(customer_turns, customer_words, agent_pick, agent_words)
                    scores = corpus_rouge([extractive_summary(d.turns, config) for d in dialogues], dialogues)
                    total = sum(scores["mean"].values())
                    if best is None or total > best[0]:
                        best = (total, config)
    assert best is not None
    return best[1], best[0]


def evaluate_summaries(
    dialogues: Sequence[Dialogue], *, methods: Iterable[str] = ("extractive",), generate: Generate | None = None,
    batch_generate: Callable[[list[list[dict[str, str]]]], list[str]] | None = None,
) -> dict[str, Any]:
    """ROUGE of each method beside the lead baseline, on the same dialogues in the same run."""
    report: dict[str, Any] = {"dialogues": len(dialogues), "rouge": {}}
    report["rouge"]["lead"] = corpus_rouge([lead_summary(d.turns) for d in dialogues], dialogues)
    for method in methods:
        if method == "extractive":
            predictions = [extractive_summary(d.turns) for d in dialogues]
        elif method == "model":
            if batch_generate is not None:
                predictions = [_SPACE.sub(" ", t).strip() for t in batch_generate([summary_prompt(d.turns) for d in dialogues])]
            elif generate is not None:
                predictions = [model_summary(d.turns, generate) for d in dialogues]
            else:
                raise InputError("the model method needs a language model")
        else:
            raise InputError(f"unknown summary method {method!r} (extractive, model)")
        report["rouge"][method] = corpus_rouge(predictions, dialogues)
        report.setdefault("examples", {})[method] = predictions[:2]
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['dialogues']} dialogues ({report.get('split', 'all')} split of {report.get('data', '?')})",
             f"{'method':<12} {'how':<5} {'ROUGE-1':>8} {'ROUGE-2':>8} {'ROUGE-L':>8}"]
    for method, scores in report["rouge"].items():
        for how in ("max", "mean"):
            s = scores[how]
            lines.append(f"{method:<12} {how:<5} {s['rouge1']:>8.3f} {s['rouge2']:>8.3f} {s['rougeL']:>8.3f}")
    lines.append("max: best of the references per dialogue; mean: average over the references")
    return "\n".join(lines)


# --- the desk summary of an escalation -------------------------------------------------------------

SEVERITY_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("line stopped", re.compile(
        r"\b(line|production|plant|station|whole (team|floor|office)|everyone|all users)\b[^.!?]{0,40}\b"
        r"(stopped|down|halted|standing|blocked|dead|cannot work|can't work)\b|\b(outage|emergency|smoke|fire|"
        r"safety|injur\w*|nobody can|no one can|cannot work|can't work|completely (down|dead))\b", re.I)),
    ("degraded", re.compile(
        r"\b(slow\w*|intermittent\w*|sometimes|keeps?|again|error\w*|fail\w*|jam\w*|crash\w*|freez\w*|"
        r"not working|doesn't work|does not work|won't|will not|broken|stuck|leak\w*|overheat\w*|noise)\b", re.I)),
]


def severity_of(text: str) -> tuple[str, str]:
    """line stopped / degraded / minor, with the words that decided it (rules: explainable, unmeasured)."""
    for label, pattern in SEVERITY_RULES:
        found = pattern.search(text or "")
        if found:
            return label, f'mentions "{found.group(0).strip()}"'
    return "minor", "nothing says work is blocked or failing"


@dataclass(frozen=True)
class Brief:
    text: str
    severity: str
    severity_reason: str


MACHINE = re.compile(r"\b(?:machine|printer|press|line|station|laptop|model|device|unit)\s*[#:]?\s*([A-Z0-9][\w-]{1,20})", re.I)


def escalation_brief(*, session: Session, escalation: Escalation, generate: Generate | None = None) -> Brief:
    """The desk's view: the problem, the machine, what the bot suggested (cited tickets) and why the
    employee escalated, with a severity. ``generate`` (the model) writes the problem sentence; without
    it the extractive writer does."""
    from sqlalchemy import select

    from core.schema import Message, MessageRole, Rating, Ticket

    messages = list(session.scalars(
        select(Message).where(Message.conversation_id == escalation.conversation_id).order_by(Message.id)
    ))
    turns = [
        ("customer" if m.role == MessageRole.user else "agent", m.text)
        for m in messages
        if m.text and m.role in (MessageRole.user, MessageRole.assistant, MessageRole.technician)
    ]
    employee = " ".join(t for s, t in turns if s == "customer")
    problem = model_summary(turns, generate) if generate is not None and turns else ""
    if not problem:
        problem = extractive_summary([(s, t) for s, t in turns if s == "customer"]) or "(no question stored)"
    answers = [m for m in messages if m.role == MessageRole.assistant and m.text]
    cited: list[str] = []
    for m in answers:
        cited += [str(s) for s in (m.sources or []) if str(s) not in cited]
    machines = [t.machine for t in (session.get(Ticket, c) for c in cited) if t is not None and t.machine]
    found = MACHINE.search(employee)
    machine = found.group(0) if found else (f"{machines[0]} (from the cited ticket)" if machines else "not stated")
    suggested = (answers[-1].text.split("\n")[0][:240] if answers else "nothing (no answer yet)")
    if cited:
        suggested += f" (cited: {', '.join(cited)})"
    why = escalation.reason
    if not why and answers:
        bad = session.scalar(
            select(Rating).where(Rating.message_id.in_([m.id for m in answers]), Rating.value < 0).limit(1)
        )
        if bad is not None:
            why = f"rated the answer 👎{': ' + bad.reason if bad.reason else ''}"
    severity, reason = severity_of(employee + " " + (escalation.reason or ""))
    text = "\n".join([
        f"Problem: {problem}",
        f"Machine: {machine}",
        f"Bot suggested: {suggested}",
        f"Why escalated: {why or 'the employee asked for a technician'}",
        f"Severity: {severity} ({reason})",
    ])
    return Brief(text=text, severity=severity, severity_reason=reason)
