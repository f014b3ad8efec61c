"""Choice scoring and choice-constrained generation: answers that are always one of the choices.

:func:`score_choices` gives each choice its log-probability after the prompt
(and the generation prompt). The prompt is prefilled once, with the engine's
usual prefix reuse; the choices are then evaluated after it, each token path
of the choices' token trie decoded once in one batch with logits at every
position (:meth:`edgevlm.prefill.KVPrefix.evaluate_after`), and the KV cache
is cut back to the prompt.

A choice's log-probability is the sum of its tokens' log-softmax values.
When a choice's tokens are a proper prefix of another choice's tokens
(``"1"`` and ``"10"`` with a digit-splitting tokenizer), the shorter one also
gets the probability that the model does not continue towards the longer
ones, ``log(1 - sum p(continuation))``; without it the shorter choice would
hold the longer one's mass and always win.

**Tokenisation.** A choice is scored as the text the model would write after
the prompt. Its tokens are those of the prompt's tail (the text after the
last image) tokenised jointly with the choice, minus the tail's own tokens,
so that a choice is split the way the tokenizer splits it in context.
Templates whose generation prompt ends without white space (LLaVA's
``ASSISTANT:``) are answered after a space, so the choice is scored as
``" " + choice`` there (:func:`answer_lead`). When the joint tokenisation
changes the tail's own tokens (a merge across the boundary), the choice is
tokenised after a newline anchor instead (:attr:`ChoiceScores.joint`).

:func:`generate_choice` is the alternative: greedy decoding under a GBNF
grammar that only admits the choices (llama.cpp's grammar sampler). Both
pick the same choice for single-token choices whenever the greedy path uses
the choices' own tokens; they can legitimately differ otherwise (the grammar
also admits other token splits of a choice, and picks token by token).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgevlm.errors import InvalidRequestError, RuntimeFailure
from edgevlm.llm import LlamaContext, LlamaModel, Sampler
from edgevlm.prefill import KVPrefix
from edgevlm.stats import PrefillStats

class ScoringContext(Protocol):
    """What scoring needs from the context holding the prompt: its batch, its room, its last logits."""

    n_batch: int

    def check_fits(self, n_cells: int, what: str = "the prompt", detail: str = "", alternative: str = "") -> None: ...

    def logits(self) -> np.ndarray: ...


class BranchEvaluator(Protocol):
    """Evaluates tokens after the prompt and cuts them back (:meth:`edgevlm.prefill.KVPrefix.evaluate_after`)."""

    def evaluate_after(self, tokens: Sequence[int]) -> np.ndarray: ...


#: Anchor text a choice is tokenised after when the joint tokenisation merges across the boundary.
ANCHOR = "\n"


@dataclass(frozen=True)
class ChoiceScores:
    """How likely each choice is as the answer (:meth:`edgevlm.VLM.score_choices`).

    Attributes:
        choices: the choices, in the order given.
        tokens: each choice's tokens as scored (the answer lead included).
        logprobs: each choice's total log-probability (natural log).
        probabilities: the log-probabilities normalised over the choices (sum to 1).
        next_logprobs: log-softmax of the whole vocabulary at the answer position
            (for comparing models: KL divergence, top-1 agreement).
        prefill: what the prompt's prefill reused and evaluated.
        evaluated_tokens: choice tokens decoded after the prompt.
        decode_calls: llama.cpp decode calls those took (one per token path).
        joint: whether every choice was tokenised jointly with the prompt's tail.
    """

    choices: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]
    logprobs: tuple[float, ...]
    probabilities: tuple[float, ...]
    next_logprobs: np.ndarray = field(repr=False)
    prefill: PrefillStats = field(default_factory=PrefillStats)
    evaluated_tokens: int = 0
    decode_calls: int = 0
    joint: bool = True

    @property
    def best(self) -> int:
        """Index of the most probable choice (the first one on a tie)."""
        return int(np.argmax(self.logprobs))

    @property
    def choice(self) -> str:
        """The most probable choice."""
        return self.choices[self.best]

    def probability(self, choice: str) -> float:
        """The normalised probability of ``choice``.

        Raises:
            InvalidRequestError: ``choice`` is not one of the choices.
        """
        if choice not in self.choices:
            raise InvalidRequestError(f"{choice!r} is not one of the choices")
        return self.probabilities[self.choices.index(choice)]


@dataclass(frozen=True)
class ChoiceGeneration:
    """A choice generated under a grammar that admits only the choices.

    Attributes:
        choice: the generated choice.
        index: its index among the choices.
        tokens: the tokens generated (the end-of-generation token excluded).
        prefill: what the prompt's prefill reused and evaluated.
    """

    choice: str
    index: int
    tokens: tuple[int, ...]
    prefill: PrefillStats


def check_choices(choices: Sequence[str]) -> tuple[str, ...]:
    """The choices as a tuple, refused when empty, blank or repeated.

    Raises:
        InvalidRequestError: saying which choice is wrong.
    """
    if isinstance(choices, str) or not choices:
        raise InvalidRequestError("give at least two choices as a list of strings")
    out = tuple(choices)
    for i, choice in enumerate(out):
        if not isinstance(choice, str) or not choice.strip():
            raise InvalidRequestError(f"choice {i + 1} is empty: every choice needs some text")
        if out.index(choice) != i:
            raise InvalidRequestError(f"choice {choice!r} is given twice")
    if len(out) < 2:
        raise InvalidRequestError("give at least two choices (one choice leaves nothing to choose)")
    return out


def answer_lead(tail_text: str, choice: str) -> str:
    """The white space a reply starts with after ``tail_text``: a space after ``ASSISTANT:``-like ends."""
    return " " if tail_text and not tail_text[-1].isspace() and not choice[:1].isspace() else ""


def choice_tokens(model: LlamaModel, tail_text: str, tail_tokens: Sequence[int],
                  choice: str) -> tuple[tuple[int, ...], bool]:
    """The tokens of ``choice`` as the model writes it after the prompt, and whether they are joint.

    Args:
        model: the tokenizer.
        tail_text: the rendered prompt after its last image (all of it for text-only prompts).
        tail_tokens: the prompt's last text chunk, as it is in the KV cache.
        choice: the choice, its answer lead included.

    Returns:
        (tokens, joint): joint is False when the anchored tokenisation had to be used.
    """
    base = model.tokenize(tail_text, add_special=False)
    if base and list(tail_tokens[-len(base):]) == base:
        joint = model.tokenize(tail_text + choice, add_special=False)
        if joint[:len(base)] == base and len(joint) > len(base):
            return tuple(joint[len(base):]), True
    anchor = model.tokenize(ANCHOR, add_special=False)
    anchored = model.tokenize(ANCHOR + choice, add_special=False)
    if anchored[:len(anchor)] == anchor and len(anchored) > len(anchor):
        return tuple(anchored[len(anchor):]), False
    return tuple(model.tokenize(choice, add_special=False)), False


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_paths(sequences: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The token paths to decode so that every token of every sequence has its logits.

    A sequence's last token needs the logits after all the tokens before it,
    so each sequence needs its prefix without the last token decoded; a path
    that is a prefix of another is covered by it.
    """
    needed = {seq[:-1] for seq in sequences if len(seq) > 1}
    return sorted(p for p in needed if not any(len(q) > len(p) and q[:len(p)] == p for q in needed))


@dataclass(frozen=True)
class TrieLogits:
    """Log-softmax rows after the prompt (the empty path) and after each decoded token path."""

    rows: dict[tuple[int, ...], np.ndarray]

    def sequence_logprob(self, seq: tuple[int, ...], others: Sequence[tuple[int, ...]]) -> float:
        """log p(seq) plus, when ``seq`` is a proper prefix of ``others``, log p(not continuing)."""
        total = float(sum(self.rows[seq[:i]][tok] for i, tok in enumerate(seq)))
        nexts = {o[len(seq)] for o in others if len(o) > len(seq) and o[:len(seq)] == seq}
        if nexts:
            mass = float(np.exp(self.rows[seq][sorted(nexts)]).sum())
            total += math.log(max(1.0 - mass, 1e-300))
        return total


def evaluate_trie(kv: BranchEvaluator, first: np.ndarray, sequences: Sequence[tuple[int, ...]]) -> tuple[TrieLogits, int, int]:
    """Decode the token paths after the prompt the KV cache holds; the cache is cut back after each.

    Returns:
        (the rows, tokens decoded, decode calls).
    """
    rows = {(): log_softmax(first)}
    n_tokens = 0
    paths = token_paths(sequences)
    for path in paths:
        logits = kv.evaluate_after(path)
        for i in range(len(path)):
            rows[path[:i + 1]] = log_softmax(logits[i])
        n_tokens += len(path)
    return TrieLogits(rows), n_tokens, len(paths)


def score_sequences(kv: BranchEvaluator, ctx: ScoringContext, choices: tuple[str, ...],
                    tokens: Sequence[tuple[int, ...]], prefill: PrefillStats,
                    *, joint: bool = True) -> ChoiceScores:
    """Score each choice's ``tokens`` after the prompt the context holds (logits of its last position).

    Raises:
        InvalidRequestError: two choices with the same tokens, or a choice longer than a batch.
        ContextOverflowError: the prompt and the longest choice do not fit the context.
    """
    for i, seq in enumerate(tokens):
        if tokens.index(seq) != i:
            raise InvalidRequestError(f"choices {choices[tokens.index(seq)]!r} and {choices[i]!r} are the "
                                      "same tokens to this model; make them differ")
        if len(seq) > ctx.n_batch:
            raise InvalidRequestError(f"choice {choices[i][:40]!r} is {len(seq)} tokens, more than a batch "
                                      f"({ctx.n_batch}); use shorter choices")
    ctx.check_fits(prefill.kv_cells + max(len(s) for s in tokens), "the prompt and the longest choice")
    first = ctx.logits()
    trie, n_tokens, calls = evaluate_trie(kv, first, tokens)
    logprobs = tuple(trie.sequence_logprob(seq, tokens) for seq in tokens)
    weights = np.exp(np.asarray(logprobs) - max(logprobs))
    probabilities = tuple(float(w) for w in weights / weights.sum())
    return ChoiceScores(choices=choices, tokens=tuple(tokens), logprobs=logprobs, probabilities=probabilities,
                        next_logprobs=trie.rows[()], prefill=prefill, evaluated_tokens=n_tokens,
                        decode_calls=calls, joint=joint)


# ---------------------------------------------------------------------------- grammar


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal (quotes, backslashes and control characters escaped)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choice_grammar(answers: Sequence[str]) -> str:
    """A GBNF grammar whose only sentences are ``answers`` (each written exactly, leads included)."""
    return "root ::= " + " | ".join(gbnf_literal(a) for a in answers) + "\n"


class GrammarSampler(Sampler):
    """Greedy sampling under a GBNF grammar (llama.cpp's grammar sampler, then greedy)."""

    def __init__(self, model: LlamaModel, grammar: str) -> None:
        try:
            super().__init__(model, temperature=0.0, grammar=grammar)
        except InvalidRequestError:
            raise InvalidRequestError("llama.cpp refused the choices' grammar; check the choices' characters") from None


def generate_answer(model: LlamaModel, ctx: LlamaContext, kv: KVPrefix, answers: Sequence[str],
                    prefill: PrefillStats) -> tuple[int, tuple[int, ...]]:
    """Greedy decoding of one of ``answers`` under their grammar; the KV cache is cut back afterwards.

    Returns:
        (index of the answer generated, its tokens).

    Raises:
        RuntimeFailure: the grammar ended on text that is not an answer (a llama.cpp fault).
    """
    sampler = GrammarSampler(model, choice_grammar(answers))
    limit = max(len(a.encode("utf-8")) for a in answers) + 1  # every token holds a byte at least
    generated: list[int] = []
    try:
        with kv.branch() as start:
            for _ in range(limit):
                token = sampler.sample(ctx)
                if model.is_eog(token):
                    break
                generated.append(token)
                text = model.detokenize(generated)
                if settled_answer(text, answers):
                    break
                ctx.check_fits(prefill.kv_cells + len(generated), "the prompt and the answer")
                ctx.decode_tokens([token], start + len(generated) - 1, logits_last=True)
    finally:
        sampler.close()
    text = model.detokenize(generated)
    if text not in answers:
        raise RuntimeFailure(f"the constrained answer {text[:60]!r} is not one of the choices")
    return answers.index(text), tuple(generated)


def settled_answer(text: str, answers: Sequence[str]) -> bool:
    """``text`` is an answer that no other answer extends (nothing is left to decide)."""
    return text in answers and not any(a != text and a.startswith(text) for a in answers)


def generation_answers(choices: Sequence[str], lead: Callable[[str], str]) -> list[str]:
    """The texts the grammar admits: each choice behind its answer lead."""
    return [lead(c) + c for c in choices]
