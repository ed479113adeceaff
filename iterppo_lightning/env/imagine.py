"""Imagined conversations from an LLM (personas -> outcome-conditioned dialogues -> critique), as a trajectory buffer.

Hong, Levine & Dragan (2023), "Zero-Shot Goal-Directed Dialogue via RL on
Imagined Conversations": with no logs and no simulator, an LLM can still
*imagine* the data. It lists personas relevant to the task, writes a
suboptimal but human-like dialogue for each persona conditioned on a sampled
outcome (the outcome becomes the reward label, so successes and failures are
balanced by construction rather than by the LLM's optimism), and a critique
pass rewrites each dialogue so the simulated customer reveals their needs one
at a time instead of all at once. The parsed dialogues are ordinary
`Conversation`s: iteration-0 data for the critic and the demonstrations pi_0
is behaviour-cloned from.

LLM text is untrusted: every dialogue is parsed defensively and anything that
cannot be turned into a valid record is dropped and counted (``rejected``),
never guessed at.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iterppo_lightning.data.buffer import save_buffer
from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.models.chat_generation import generate_chat
from iterppo_lightning.utils.atomic_io import atomic_dir, atomic_write_json
from iterppo_lightning.utils.progress import Progress
from iterppo_lightning.utils.seeding import imagine_outcome_rng

__all__ = [
    "ImagineConfig",
    "ImagineReport",
    "imagine_conversations",
    "imagine_personas",
    "imagine_dialogues",
    "parse_personas",
    "parse_dialogue",
    "persona_prompt",
    "dialogue_prompt",
    "critique_prompt",
    "sample_outcomes",
    "write_imagined_buffer",
    "REPORT_FILE",
]

REPORT_FILE = "imagine_report.json"
POLICY_ID = "imagined"

# Closing customer messages for a dialogue that ends on the agent's line: the
# terminal turn needs a customer message, and a neutral one that agrees with the
# sampled outcome adds no information the label does not already carry.
CLOSING_TEXT = {1: "thanks, i will buy it", 0: "no thanks, bye"}

# Rejection reasons (keys of ImagineReport.rejected).
NO_SPEAKER_LINES = "no speaker lines"
NO_CUSTOMER_LINE = "no customer line"
NO_AGENT_LINE = "no agent line"
REPETITIVE = "repetitive"
OUTCOME_MISMATCH = "outcome mismatch"


# ---------------------------------------------------------------------- config / report
@dataclass
class ImagineConfig:
    task: str = (
        "A shop assistant helps an online customer choose a laptop, phone or headphones and tries to make a sale."
    )
    """The goal-directed task, in words; every prompt quotes it."""
    personas: int = 8
    """Personas to ask the LLM for (it may return fewer; the report lists those parsed)."""
    dialogues_per_persona: int = 4
    """Dialogues imagined per persona, each with its own sampled outcome."""
    success_prob: float = 0.5
    """P(sampled outcome = success) per dialogue: the class balance of the reward labels."""
    max_turns: int = 6
    """Agent turns kept per dialogue (longer dialogues keep their first turns and their ending)."""
    critique: bool = True
    """Run the rewrite pass that makes the customer reveal needs gradually."""
    max_new_tokens: int = 256
    temperature: float = 0.8
    batch_size: int = 8
    """Prompts per generate call."""
    seed: int = 0
    """Seeds the sampled outcomes (generation uses torch's RNG, which the caller seeds)."""

    def __post_init__(self) -> None:
        if not self.task.strip():
            raise ValueError("imagine.task must not be empty")
        for name in ("personas", "dialogues_per_persona", "max_turns", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"imagine.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.success_prob <= 1.0:
            raise ValueError(f"imagine.success_prob must be in [0, 1], got {self.success_prob}")
        if not self.temperature > 0.0:
            raise ValueError(f"imagine.temperature must be > 0, got {self.temperature}")


@dataclass
class ImagineReport:
    conversations: list[Conversation]
    """The dialogues that parsed, in request order (persona-major)."""
    personas: list[str]
    requested: int
    """Dialogues asked of the LLM (len(personas) * dialogues_per_persona)."""
    parsed: int
    """Dialogues kept; requested == parsed + sum(rejected.values())."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Why dialogues were dropped: reason -> count."""
    critique_used: int = 0
    """Kept dialogues whose rewrite parsed and replaced the original."""
    critique_kept_original: int = 0
    """Kept dialogues whose rewrite did not parse (or changed the ending), so the original stayed."""
    raw_personas: str = ""
    """The LLM's persona list as written, for diagnosing a poor parse."""
    raw_dialogues: list[str] = field(default_factory=list)
    """Every generated dialogue as written (before critique), in request order."""
    raw_critiques: list[str] = field(default_factory=list)
    """Every rewrite as written, in the order of `conversations` before the critique."""
    cut_off: int = 0
    """Generations (dialogues and rewrites) that ran into max_new_tokens; their unfinished last line was dropped."""
    config: ImagineConfig | None = None

    def summary(self) -> dict:
        """Everything but the conversations (those are in the buffer): the content of imagine_report.json."""
        successes = sum(c.success for c in self.conversations)
        return {
            "personas": self.personas,
            "requested": self.requested,
            "parsed": self.parsed,
            "parse_rate": self.parsed / self.requested if self.requested else 0.0,
            "rejected": dict(self.rejected),
            "successes": successes,
            "failures": self.parsed - successes,
            "critique_used": self.critique_used,
            "critique_kept_original": self.critique_kept_original,
            "cut_off": self.cut_off,
            "config": asdict(self.config) if self.config is not None else None,
            "raw_personas": self.raw_personas,
            "raw_dialogues": self.raw_dialogues,
            "raw_critiques": self.raw_critiques,
        }


# ---------------------------------------------------------------------- prompts
def persona_prompt(config: ImagineConfig) -> str:
    """Plain instructions, no model-specific syntax: any chat model's template wraps them."""
    return (
        f"List {config.personas} different customers for this task, one per line, each with what they want, "
        f"their budget and their personality: {config.task}"
    )


def dialogue_prompt(task: str, persona: str, outcome: int) -> str:
    # The task is quoted so "this task" refers to something; the outcome is stated, not implied,
    # because the label is only worth as much as the LLM's adherence to it.
    ending = "buying" if outcome else "leaving without buying"
    return (
        f"Write a realistic conversation for this task between Customer and Agent: {task} "
        f"Customer: {persona}. The conversation ends with the customer {ending}. The agent is imperfect. "
        "Write each message on its own line starting with 'Customer:' or 'Agent:'."
    )


def critique_prompt(dialogue: str) -> str:
    """The paper's critique: simulated humans in LLM dialogues over-share; real customers must be asked."""
    return (
        "Rewrite this conversation so the customer reveals their needs one at a time, only when asked, "
        f"and keep the same ending. Same line format.\n\n{dialogue}"
    )


# ---------------------------------------------------------------------- parsing
_BOLD = r"(?:\*\*|__|\*|_)?"
_SPEAKER_LINE = re.compile(
    r"^\s*(?:\d+\s*[.):]\s*|[-*\u2022>]\s+)*"  # numbering, bullets, quote marks
    + _BOLD
    + r"\s*(?:the\s+)?(?P<speaker>customer|user|client|buyer|sales\s*agent|agent|shop\s+assistant|assistant"
    r"|sales\s*person|seller)"
    r"(?:\s*\([^)]*\))?\s*"  # "Customer (Anna):"
     + _BOLD + r"\s*:\s*" + _BOLD + r"\s*(?P<text>.*)$",
    re.IGNORECASE,
)
_CUSTOMER_WORDS = ("customer", "user", "client", "buyer")
# "Receipt:", "Model:", "Severine:": a speaker (or label) the dialogue should not have.
_OTHER_TAG = re.compile(r"^\s*[*_]*[A-Za-z][\w .'()-]{0,30}[*_]*\s*:(?:\s|$)")
# "(smiling) Ah, ...", "(2019-05-02 10:13) I want ...": stage directions and stamps, not message text.
_LEADING_ASIDE = re.compile(r"^\([^()]{0,60}\)\s*")

_LIST_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022+])\s+(?P<text>.+)$")

# Phrases that state how a dialogue ends. Leaving is matched first and removed, so
# "I won't buy it" is not read as "buy it".
_LEAVE = re.compile(
    r"(?:\bnot|n't|\bnever)\s+(?:\w+\s+){0,3}?(?:buy|buying|take|get|purchase|order)\b"
    r"|\b(?:no,?\s+thanks?|no thank you|no deal|i'?ll pass|without buying|maybe later|think about it"
    r"|(?:look|shop|try)\s+elsewhere|too (?:expensive|pricey)|out of my budget|not interested|leave|leaving)\b",
    re.IGNORECASE,
)
_BUY = re.compile(
    r"\b(?:i'?ll|i will|i'?d like to|let me|i'?m going to|i'?m gonna|i want to)\s+(?:\w+\s+)?"
    r"(?:buy|take|get|order|purchase|go with|go for)\b"
    r"|\b(?:buy|purchase|order)\s+(?:it|them|this|that|one)\b"
    r"|\b(?:deal|sold|checkout|check out)\b|\badd (?:it|them) to (?:my )?(?:cart|basket)\b",
    re.IGNORECASE,
)


def _clean(text: str) -> str:
    """Strip markdown emphasis and wrapping quotes an LLM puts around a message."""
    text = text.replace("**", "").replace("__", "").strip().strip("*_").strip()
    text = _LEADING_ASIDE.sub("", text)
    return text.strip('"\u201c\u201d').strip()


def parse_personas(text: str, limit: int) -> list[str]:
    """Persona strings from an LLM's list: numbered or bulleted lines, at most `limit`, without duplicates.

    When no line is numbered or bulleted (the model obeyed "one per line"
    literally), every non-empty line is a persona, except header-like lines
    ending in ':' ("Here are 8 customers:").
    """
    lines = [line for line in text.splitlines() if line.strip()]
    items = [m.group("text") for m in map(_LIST_ITEM.match, lines) if m]
    if not items:
        items = [line for line in lines if not line.rstrip().endswith(":")]
    personas: list[str] = []
    for item in items:
        persona = _clean(item).rstrip(".").strip()
        if persona and persona.lower() not in {p.lower() for p in personas}:
            personas.append(persona)
    return personas[:limit]


def _speaker_lines(text: str) -> list[tuple[str, str]]:
    """(role, message) for every tagged line, consecutive messages of one speaker merged.

    Untagged lines are preambles or stage directions ("(The customer leaves.)") and
    are ignored, except right after a bare tag ("**Customer:**" alone on its line),
    where they are the message. Lines of other speakers ("Narrator: ...") are ignored.
    """
    lines: list[list[str]] = []
    for raw in text.splitlines():
        m = _SPEAKER_LINE.match(raw)
        if m:
            role = "customer" if m.group("speaker").lower() in _CUSTOMER_WORDS else "agent"
            lines.append([role, _clean(m.group("text"))])
        elif lines and not lines[-1][1] and raw.strip() and not _OTHER_TAG.match(raw):
            lines[-1][1] = _clean(raw)
    merged: list[tuple[str, str]] = []
    for role, message in lines:
        if not message:
            continue
        if merged and merged[-1][0] == role:
            merged[-1] = (role, f"{merged[-1][1]} {message}")
        else:
            merged.append((role, message))
    return merged


def _ending(text: str) -> int | None:
    """1 if `text` says the customer buys, 0 if it says they leave, None when it is unclear."""
    leaves = bool(_LEAVE.search(text))
    buys = bool(_BUY.search(_LEAVE.sub(" ", text)))
    if leaves == buys:
        return None
    return int(buys)


def _render(lines: list[tuple[str, str]]) -> str:
    return "\n".join(f"{'Customer' if role == 'customer' else 'Agent'}: {message}" for role, message in lines)


def _dialogue_lines(text: str, outcome: int) -> tuple[list[tuple[str, str]] | None, str | None]:
    """The dialogue's speaker lines starting with the customer, or None and the reason it is unusable."""
    lines = _speaker_lines(text)
    if not lines:
        return None, NO_SPEAKER_LINES
    if lines[0][0] == "agent":  # an agent greeting has no customer message (state) to answer
        lines = lines[1:]
    if not lines:
        return None, NO_CUSTOMER_LINE
    replies = [message for role, message in lines if role == "agent"]
    if not replies:
        return None, NO_AGENT_LINE
    if 2 * len(set(replies)) < len(replies):  # a generation stuck in a loop, not a conversation
        return None, REPETITIVE
    last_customer = next(message for role, message in reversed(lines) if role == "customer")
    said = _ending(last_customer)
    if said is not None and said != outcome:
        return None, OUTCOME_MISMATCH
    return lines, None


def _to_conversation(
    lines: list[tuple[str, str]], outcome: int, conversation_id: str, persona: str, max_turns: int
) -> Conversation:
    """Alternating lines -> agent turns plus a terminal turn carrying `outcome`.

    Past `max_turns` the middle is dropped but the customer's final message kept:
    it is what the outcome label is about.
    """
    final = lines[-1][1] if lines[-1][0] == "customer" else CLOSING_TEXT[outcome]
    body = lines[:-1] if lines[-1][0] == "customer" else lines
    turns = [
        Turn(customer=customer, suggestion=reply, sent=reply, business_action="accept")
        for (_, customer), (_, reply) in zip(body[0::2], body[1::2])
    ][:max_turns]
    turns.append(Turn(customer=final, outcome=outcome))
    return Conversation(
        conversation_id=conversation_id,
        turns=turns,
        iteration=0,
        policy_id=POLICY_ID,
        metadata={"persona": persona, "imagined": True, "sampled_outcome": outcome},
    )


def _parse(
    text: str, outcome: int, conversation_id: str, persona: str, max_turns: int
) -> tuple[Conversation | None, str | None]:
    if outcome not in (0, 1):
        raise ValueError(f"outcome must be 0 or 1, got {outcome!r}")
    lines, reason = _dialogue_lines(text, outcome)
    if lines is None:
        return None, reason
    return _to_conversation(lines, outcome, conversation_id, persona, max_turns), None


def parse_dialogue(text: str, outcome: int, conversation_id: str, persona: str, max_turns: int) -> Conversation | None:
    """A Conversation from "Customer: ..." / "Agent: ..." lines, or None when the text is unusable.

    Unusable: no tagged lines, no customer line (after dropping a leading agent
    line), no agent line, or a final customer message that plainly states the
    opposite of `outcome` (a mislabelled dialogue would teach the critic the
    wrong reward). Each customer message and the agent's reply form one turn
    (suggestion = sent = reply, accepted); the last customer message is the
    terminal turn with `outcome`.
    """
    return _parse(text, outcome, conversation_id, persona, max_turns)[0]


# ---------------------------------------------------------------------- generation
def _generate(model, tokenizer, prompts: list[str], config: ImagineConfig, what: str = "replies") -> list[str]:
    """One reply per prompt, one generate call per `batch_size` prompts; a long run reports `what` it has written
    so far on stderr (utils/progress.py)."""
    replies: list[str] = []
    progress = Progress("imagine", len(prompts), what)
    for start in range(0, len(prompts), config.batch_size):
        chunk = [[{"role": "user", "content": p}] for p in prompts[start : start + config.batch_size]]
        replies.extend(
            generate_chat(
                model,
                tokenizer,
                chunk,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                batch_size=config.batch_size,
            )
        )
        progress.update(len(replies))
    progress.close()
    return replies


def _cut_off(tokenizer, text: str, max_new_tokens: int) -> bool:
    """Whether a reply (probably) stopped at the token limit rather than at end-of-turn.

    generate_chat returns text only, so its tokens are counted again; a decoded
    sample can re-encode to a few tokens fewer, hence the margin. No tokenizer
    (a stubbed generator) means no check.
    """
    if tokenizer is None:
        return False
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 3


def _complete_lines(tokenizer, texts: list[str], config: ImagineConfig) -> tuple[list[str], int]:
    """Texts with the last line dropped where generation was cut off, and how many were.

    A message cut mid-sentence would become an agent demonstration (or the
    customer's closing words) that no one would ever send.
    """
    out, cut = [], 0
    for text in texts:
        if _cut_off(tokenizer, text, config.max_new_tokens):
            text, cut = text.rsplit("\n", 1)[0] if "\n" in text else "", cut + 1
        out.append(text)
    return out, cut


def _restates_task(persona: str, task: str) -> bool:
    """Whether a "persona" is the task echoed back (small models do this), which conditions on nothing."""
    return difflib.SequenceMatcher(None, persona.lower(), task.lower()).ratio() > 0.7


def imagine_personas(model, tokenizer, config: ImagineConfig) -> tuple[list[str], str]:
    """(personas, raw text): the LLM's list of customers for the task (echoes of the task left out)."""
    raw = _generate(model, tokenizer, [persona_prompt(config)], config)[0]
    personas = [p for p in parse_personas(raw, config.personas) if not _restates_task(p, config.task)]
    return personas, raw


def sample_outcomes(config: ImagineConfig, n: int) -> list[int]:
    """Outcome labels drawn before generation, so the class balance is the config's, not the LLM's."""
    rng = imagine_outcome_rng(config.seed)
    return [int(rng.random() < config.success_prob) for _ in range(n)]


def imagine_dialogues(model, tokenizer, config: ImagineConfig, personas: list[str]) -> ImagineReport:
    """Outcome-conditioned dialogues for the given personas, critiqued and parsed."""
    jobs = [(p_index, j) for p_index in range(len(personas)) for j in range(config.dialogues_per_persona)]
    outcomes = sample_outcomes(config, len(jobs))
    prompts = [dialogue_prompt(config.task, personas[p], o) for (p, _), o in zip(jobs, outcomes)]
    raw = _generate(model, tokenizer, prompts, config, "dialogues")
    texts, cut = _complete_lines(tokenizer, raw, config)

    report = ImagineReport(
        conversations=[],
        personas=list(personas),
        requested=len(jobs),
        parsed=0,
        raw_dialogues=raw,
        cut_off=cut,
        config=config,
    )
    kept: list[tuple[Conversation, list[tuple[str, str]]]] = []
    for (p, j), outcome, text in zip(jobs, outcomes, texts):
        lines, reason = _dialogue_lines(text, outcome)
        if lines is None:
            report.rejected[reason] = report.rejected.get(reason, 0) + 1
            continue
        conv_id = f"imagined-s{config.seed}-p{p}-d{j}"
        conv = _to_conversation(lines, outcome, conv_id, personas[p], config.max_turns)
        conv.metadata["critiqued"] = False
        kept.append((conv, lines))

    if config.critique and kept:
        _apply_critique(model, tokenizer, config, kept, report)
    report.conversations = [conv for conv, _ in kept]
    report.parsed = len(report.conversations)
    return report


def _apply_critique(
    model,
    tokenizer,
    config: ImagineConfig,
    kept: list[tuple[Conversation, list[tuple[str, str]]]],
    report: ImagineReport,
) -> None:
    """Replace each kept dialogue by its rewrite when the rewrite parses with the same ending."""
    # The rewrite is asked of the normalised dialogue, so model preambles and stage
    # directions in the original do not leak into it.
    report.raw_critiques = _generate(
        model, tokenizer, [critique_prompt(_render(lines)) for _, lines in kept], config, "critiques"
    )
    rewrites, cut = _complete_lines(tokenizer, report.raw_critiques, config)
    report.cut_off += cut
    for i, ((conv, _), text) in enumerate(zip(kept, rewrites)):
        outcome = conv.metadata["sampled_outcome"]
        better, _ = _parse(text, outcome, conv.conversation_id, conv.metadata["persona"], config.max_turns)
        if better is None:
            report.critique_kept_original += 1
            continue
        better.metadata["critiqued"] = True
        kept[i] = (better, kept[i][1])
        report.critique_used += 1


def imagine_conversations(model, tokenizer, config: ImagineConfig) -> ImagineReport:
    """Personas -> outcome-conditioned dialogues -> critique: the whole pipeline on one chat model.

    Generation samples with torch's RNG; seed it (and `config.seed`) for a reproducible run.
    """
    personas, raw_personas = imagine_personas(model, tokenizer, config)
    report = imagine_dialogues(model, tokenizer, config, personas)
    report.raw_personas = raw_personas
    return report


# ---------------------------------------------------------------------- output
def write_imagined_buffer(report: ImagineReport, folder: str | Path) -> Path:
    """Write `folder/buffer` (the conversations) and `folder/imagine_report.json`, as one new folder at once
    (a new folder: never overwritten); returns the buffer path.

    Refuses an empty report: an iteration-0 buffer with no conversations would
    only fail later, in behaviour cloning, far from the cause (the report's
    ``rejected`` counts and raw texts say why nothing parsed).
    """
    if not report.conversations:
        raise ValueError(
            f"no imagined conversation parsed ({len(report.personas)} personas, {report.requested} dialogues "
            f"requested, rejected: {report.rejected}); nothing to write"
        )
    folder = Path(folder)
    with atomic_dir(folder) as tmp:  # an interrupted write leaves no half folder behind
        save_buffer(report.conversations, tmp / "buffer")
        atomic_write_json(tmp / REPORT_FILE, report.summary())
    return folder / "buffer"
