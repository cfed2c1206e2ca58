"""Drafts from text already generated: the sibling samples of a GRPO group and earlier completions of
the same prompt (from earlier Generate calls, e.g. the previous epoch).

GRPO asks for G samples of every prompt, epoch after epoch; those samples share long stretches (the
prompt's restatement, the answer's format, the same derivation), so what one sample wrote is a good
guess at what its siblings write next, and it costs no draft forward. The index is an n-gram
continuation table (n = 1 .. max_n context tokens -> counts of the next token) over every text fed
to it. A proposal follows the longest context the table knows, one token at a time, taking the most
frequent continuation; its estimated acceptance per token is that continuation's smoothed frequency
count / (total + 1), so a continuation seen once is worth 1/2 and one seen in 7 of 7 texts 7/8.

An n-gram table rather than a suffix automaton: proposals need only the next token after a context
of a few tokens, which a dict of tuples answers in O(max_n) per token, and texts arrive one token at
a time (a sibling's new tokens), which it absorbs in O(max_n) each. Memory is about max_n entries per
token fed.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

TextSource = Literal["siblings", "history"]
TEXT_SOURCES: tuple[TextSource, ...] = ("siblings", "history")


@dataclass(frozen=True)
class Proposal:
    """A chain of tokens to follow the context, with each token's estimated acceptance (given the
    tokens before it were accepted), and where it came from."""

    tokens: tuple[int, ...]
    probs: tuple[float, ...]  # per token, in (0, 1)
    source: TextSource

    def expected_accepted(self) -> float:
        """Draft tokens the chain is expected to get accepted: the sum of its cumulative products."""
        total, reach = 0.0, 1.0
        for p in self.probs:
            reach *= p
            total += reach
        return total


class SuffixIndex:
    """Next-token counts of every context of min_n .. max_n tokens in the texts fed (shorter ones
    are not kept: one shared token says little about what follows)."""

    def __init__(self, max_n: int = 4, min_n: int = 2):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.table: dict[tuple[int, ...], dict[int, int]] = {}
        self.tokens = 0  # positions fed

    def extend(self, text: Sequence[int], start: int = 0) -> None:
        """Feeds positions start .. len(text) - 1 of text (the earlier ones were fed before, or are
        context only, e.g. the prompt before a completion)."""
        text = list(text)
        lo, end = max(start, 1), len(text)
        table = self.table
        for n in range(self.min_n, self.max_n + 1):  # (a context's counts see positions in order)
            first = max(lo, n)  # position i has the context text[i - n: i]
            # the contexts as tuples built by zip over n shifted slices (a loop of slices and
            # tuple() calls took twice as long: opening a group over a prompt's history runs this
            # over every earlier completion)
            contexts = zip(*(text[first - n + k: end - n + k] for k in range(n)))
            for ctx, nxt in zip(contexts, text[first:]):
                counts = table.get(ctx)
                if counts is None:
                    table[ctx] = {nxt: 1}
                else:
                    counts[nxt] = counts.get(nxt, 0) + 1
        self.tokens += max(0, end - lo)

    def next_token(self, context: Sequence[int]) -> tuple[int, float] | None:
        """The most frequent continuation of the longest known suffix of context (at least min_n
        tokens), with its smoothed frequency; None when no such suffix was seen."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            counts = self.table.get(tuple(context[len(context) - n:]))
            if counts:
                token, count = max(counts.items(), key=lambda kv: kv[1])
                return token, count / (sum(counts.values()) + 1)
        return None

    def propose(self, context: Sequence[int], max_len: int, min_reach: float, source: TextSource,
                scale: float = 1.0) -> Proposal | None:
        """Up to max_len tokens after context, while the chain's cumulative estimated acceptance
        (times scale: the source's calibration) stays at least min_reach."""
        ctx = list(context[-self.max_n:])
        tokens, probs, reach = [], [], scale
        while len(tokens) < max_len:
            nxt = self.next_token(ctx)
            if nxt is None or reach * nxt[1] < min_reach:
                break
            tokens.append(nxt[0])
            probs.append(nxt[1])
            reach *= nxt[1]
            ctx = ctx[1:] + [nxt[0]] if len(ctx) == self.max_n else ctx + [nxt[0]]
        return Proposal(tuple(tokens), tuple(probs), source) if tokens else None


class Calibration:
    """Per source, how often a chain's first token is what the sequence then emitted, against how
    often its estimate said: the n-gram frequency is a guess (siblings writing in step with each
    other repeat continuations that the target then seldom draws; a policy that moved on rewrites
    its history), and what the target emits is an exact draw from it, so P(emitted == x) is the
    probability that x, tested as a lead, is accepted. The ratio scales the first token's estimate
    (so every cumulative estimate after it) where chains compete for a tree's places or are cut.
    Every proposal counts, in trees or not: a source whose chains stop joining keeps being measured.
    Sums decay, so the ratio follows the policy as it moves on."""

    def __init__(self, sources: Sequence[TextSource], prior: float = 4.0, decay: float = 0.999):
        self.decay = decay
        self.sums = {s: [prior, prior] for s in sources}  # source -> [first tokens emitted, estimated]

    def scale(self, source: TextSource) -> float:
        matched, estimated = self.sums[source]
        return matched / estimated

    def observe(self, proposal: Proposal, emitted: int) -> None:
        """The token emitted where proposal's first token was proposed."""
        sums = self.sums[proposal.source]
        sums[0] = self.decay * sums[0] + (proposal.tokens[0] == emitted)
        sums[1] = self.decay * sums[1] + proposal.probs[0]

    def apply(self, proposal: Proposal) -> Proposal:
        """proposal with its first token's estimate scaled (within (0, 1))."""
        first = min(0.99, max(1e-6, proposal.probs[0] * self.scale(proposal.source)))
        return Proposal(proposal.tokens, (first,) + proposal.probs[1:], proposal.source)


@dataclass(frozen=True)
class TextDraftConfig:
    """How the index matches and proposes (fixed here; not flags)."""

    max_n: int = 4  # longest context matched
    min_n: int = 2  # shortest context matched
    max_len: int = 16  # longest chain proposed
    min_reach: float = 0.05  # a chain stops where its cumulative estimated acceptance would fall below this


class HistoryStore:
    """Earlier completions per prompt (keyed by its token content), kept across Generate calls.

    Bounded by max_tokens in all (the least recently used prompts go first); a completion older
    than max_age policy versions is dropped when its prompt is next looked up (the policy moved on:
    what it wrote then is a worse guess now)."""

    def __init__(self, max_tokens: int, max_age: int):
        if max_tokens < 0 or max_age < 0:
            raise ValueError(f"history bounds must be >= 0, got max_tokens {max_tokens}, max_age {max_age}")
        self.max_tokens, self.max_age = max_tokens, max_age
        # prompt -> [(policy version, completion, serial)]
        self._store: OrderedDict[tuple[int, ...], list[tuple[int, tuple[int, ...], int]]] = OrderedDict()
        self.tokens = 0  # completion tokens held
        self.serial = 0  # completions added since start: an entry's serial is the count before it

    def add(self, prompt: tuple[int, ...], version: int, completion: Sequence[int]) -> None:
        self.serial += 1
        if not completion or len(completion) > self.max_tokens:
            return
        self._store.setdefault(prompt, []).append((version, tuple(completion), self.serial - 1))
        self._store.move_to_end(prompt)
        self.tokens += len(completion)
        while self.tokens > self.max_tokens:
            _, evicted = self._store.popitem(last=False)
            self.tokens -= sum(len(c) for _, c, _ in evicted)

    def completions(self, prompt: tuple[int, ...], version: int, before: int | None = None) -> list[tuple[int, ...]]:
        """The prompt's completions at most max_age versions older than `version` (and, with
        `before`, added before serial `before`: not a request's own finished samples)."""
        entries = self._store.get(prompt)
        if not entries:
            return []
        fresh = [e for e in entries if version - e[0] <= self.max_age]
        self.tokens -= sum(len(c) for v, c, _ in entries if version - v > self.max_age)
        if fresh:
            self._store[prompt] = fresh
            self._store.move_to_end(prompt)
        else:
            del self._store[prompt]
        return [c for _, c, n in fresh if before is None or n < before]

    def has(self, prompt: tuple[int, ...], version: int, before: int | None = None) -> bool:
        """Whether completions() would return any (and nothing changes)."""
        return any(version - v <= self.max_age and (before is None or n < before)
                   for v, _, n in self._store.get(prompt, ()))

    def __len__(self) -> int:
        return len(self._store)


@dataclass
class GroupDrafts:
    """The text drafts of one prompt's samples within a request: an index of what the siblings have
    written so far (the prompt included, as context and as text: prompts often get restated), and
    one of the prompt's earlier completions."""

    prompt: tuple[int, ...]
    config: TextDraftConfig
    siblings: SuffixIndex | None
    history: SuffixIndex | None
    fed: dict[int, int] = field(default_factory=dict)  # sample index -> its tokens fed
    # sample index -> (its tokens generated when proposed to, the proposal before calibration)
    proposed: dict[int, tuple[int, Proposal]] = field(default_factory=dict)

    @staticmethod
    def open(prompt: tuple[int, ...], config: TextDraftConfig, sources: Sequence[TextSource],
             history: HistoryStore | None, version: int, before: int | None = None,
             done: Sequence[Sequence[int]] = ()) -> GroupDrafts:
        """The group's indexes: the siblings' from the prompt and the samples already `done`
        (finished before the group opened), the history's from the prompt's completions added
        to the store before serial `before` (earlier requests')."""
        siblings = hist = None
        tail = list(prompt[-config.max_n:])
        if "siblings" in sources:
            siblings = SuffixIndex(config.max_n, config.min_n)
            siblings.extend(prompt)
            for c in done:
                siblings.extend(tail + list(c), start=len(tail))
        if "history" in sources and history is not None:
            completions = history.completions(prompt, version, before)
            if completions:
                hist = SuffixIndex(config.max_n, config.min_n)
                for c in completions:
                    hist.extend(tail + list(c), start=len(tail))
        return GroupDrafts(prompt, config, siblings, hist)

    def feed(self, sample: int, generated: Sequence[int]) -> None:
        """Feeds a sample's tokens generated since its last feed (the prompt's tail as context)."""
        if self.siblings is None:
            return
        done = self.fed.get(sample, 0)
        if len(generated) > done:
            tail = list(self.prompt[-self.config.max_n:])
            self.siblings.extend(tail + list(generated), start=len(tail) + done)
            self.fed[sample] = len(generated)

    def propose(self, context: Sequence[int], max_len: int,
                scale: Callable[[TextSource], float] = lambda source: 1.0) -> Proposal | None:
        """The better of the sources' chains after context (the prompt and the tokens generated),
        by expected accepted tokens, each source's estimates times scale(source) (Calibration);
        the chain as the index estimated it."""
        best, best_value = None, 0.0
        for index, source in ((self.siblings, "siblings"), (self.history, "history")):
            if index is None:
                continue
            factor = scale(source)
            p = index.propose(context, max_len, self.config.min_reach, source, factor)
            value = 0.0 if p is None else factor * p.expected_accepted()
            if value > best_value:
                best, best_value = p, value
        return best


class TextDrafts:
    """The engine's text drafting: which sources are on, the history store, and the live groups
    (one per prompt of a request, opened at its first speculative step, dropped when the request
    is done)."""

    def __init__(self, sources: Sequence[TextSource], history_tokens: int = 0, history_max_age: int = 0,
                 config: TextDraftConfig = TextDraftConfig()):
        unknown = [s for s in sources if s not in TEXT_SOURCES]
        if unknown:
            raise ValueError(f"text draft sources must be among {', '.join(TEXT_SOURCES)}; got {unknown[0]!r}")
        self.sources = tuple(sources)
        self.config = config
        self.history = HistoryStore(history_tokens, history_max_age) if "history" in self.sources else None
        self.calibration = Calibration(self.sources)
        self._groups: dict[tuple[object, int], GroupDrafts] = {}  # (request, prompt index) -> its group
        # request -> the history's serial when it was first admitted: completions added since then
        # are its own samples' (its groups draft from those as siblings) or those of requests
        # running beside it, never its history
        self._marks: dict[object, int] = {}
        self._done: dict[tuple[object, int], list[tuple[int, ...]]] = {}  # key -> samples done before its group opened

    def begin(self, request: object) -> int | None:
        """A request's sequences are admitted (the first call counts, until close): its history is
        what the store holds now. Returns that mark (None without a history source)."""
        return None if self.history is None else self._marks.setdefault(request, self.history.serial)

    def group(self, key: tuple[object, int], prompt: tuple[int, ...], version: int) -> GroupDrafts:
        """The group of key = (request, prompt index), opened on first use."""
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = GroupDrafts.open(prompt, self.config, self.sources, self.history, version,
                                                         self.begin(key[0]), self._done.pop(key, ()))
        return group

    def has_history(self, key: tuple[object, int], prompt: tuple[int, ...], version: int) -> bool:
        """Whether the group of key drafts from earlier requests' completions: its own answer where
        it is open, else whether the store holds completions of prompt fresh at `version` (without
        building the group's indexes: a step that runs plainly needs none)."""
        group = self._groups.get(key)
        if group is not None:
            return group.history is not None
        return self.history is not None and self.history.has(prompt, version, self.begin(key[0]))

    def propose(self, group: GroupDrafts, sample: int, prompt: tuple[int, ...], generated: Sequence[int],
                max_len: int) -> Proposal | None:
        """Feeds the sample's new tokens to its group (and its last proposal's first token, with
        what came instead, to the calibration), then proposes what follows them, calibrated."""
        group.feed(sample, generated)
        self._check(group, sample, generated)
        n = self.config.max_n
        context = (list(prompt[-n:]) + list(generated[-n:]))[-n:]
        proposal = group.propose(context, max_len, self.calibration.scale)
        if proposal is None:
            return None
        group.proposed[sample] = (len(generated), proposal)
        return self.calibration.apply(proposal)

    def _check(self, group: GroupDrafts, sample: int, generated: Sequence[int]) -> None:
        """The sample's last proposal against the token it emitted there, once it has."""
        last = group.proposed.get(sample)
        if last is not None and len(generated) > last[0]:
            del group.proposed[sample]
            self.calibration.observe(last[1], generated[last[0]])

    def finished(self, key: tuple[object, int], prompt: tuple[int, ...], sample: int, generated: Sequence[int],
                 version: int, keep: bool) -> None:
        """A sample is done: its last tokens go to the siblings still running and, when `keep`
        (it completed: not aborted), to the history as written by policy `version`."""
        group = self._groups.get(key)
        if group is not None:
            group.feed(sample, generated)
            self._check(group, sample, generated)
        elif "siblings" in self.sources and generated:  # for the group's siblings' index, should it open
            self._done.setdefault(key, []).append(tuple(generated))
        if keep and self.history is not None:
            self.begin(key[0])  # (before the add, where admission did not: its own samples are never its history)
            self.history.add(prompt, version, generated)

    def close(self, request: object) -> None:
        """Drops the groups (and what waits for them) of a request whose samples are all done (or failed)."""
        for key in [k for k in self._groups if k[0] == request]:
            del self._groups[key]
        for key in [k for k in self._done if k[0] == request]:
            del self._done[key]
        self._marks.pop(request, None)

    @property
    def live_groups(self) -> int:
        return len(self._groups)
