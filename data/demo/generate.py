"""Generate the rnnlm demo corpus from a deterministic probabilistic grammar.

The grammar is a small English-like language with subject-verb number
agreement (across relative clauses, prepositional phrases and adverbs),
determiner/noun number agreement, animacy selection (verbs choose animate or
inanimate objects, some adjectives only fit one kind of noun), nine tense
forms, tense/time-adverb agreement, yes/no and wh-questions, imperatives,
coordination and punctuation tokens.

It is written as an LL(1) probabilistic grammar with bounded nesting:
whenever a nonterminal has several expansions, they begin with disjoint
words, so the word emitted decides which expansion was taken.  A sentence is
therefore a walk through a finite automaton whose state (the parser stack)
is a function of the words emitted so far, and the exact probability of every
next word given the sentence prefix is available.  ``Automaton.step`` gives
that distribution; sampling and scoring use the very same numbers.

Usage::

    python data/demo/generate.py            # (re)write train/valid/test/optimum
    python data/demo/generate.py --check    # exit 1 if committed files differ

Only the standard library is used: ``random.Random`` (Mersenne Twister, whose
``random()`` stream is guaranteed stable across Python versions) drives the
sampling, so the files are byte-identical on every platform.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

EOS = "<eos>"
PH = "?NUM"  # placeholder for a subject's number, filled in at its head noun

SPLITS = {
    # name: (seed, number of word tokens to reach; <eos> not counted)
    "train": (20240101, 200_000),
    "valid": (20240202, 20_000),
    "test": (20240303, 20_000),
}

# --------------------------------------------------------------------------
# Lexicon.  Within each list the order is the frequency rank: word i gets
# weight 1 / (i + 1) (Zipf), renormalised over the words a state allows.
# --------------------------------------------------------------------------

ANIMATE_NOUNS = [
    ("dog", "dogs"), ("cat", "cats"), ("man", "men"), ("woman", "women"),
    ("child", "children"), ("teacher", "teachers"), ("bird", "birds"),
    ("girl", "girls"), ("boy", "boys"), ("friend", "friends"),
    ("farmer", "farmers"), ("doctor", "doctors"), ("horse", "horses"),
    ("student", "students"), ("king", "kings"), ("mouse", "mice"),
    ("wolf", "wolves"), ("baby", "babies"), ("neighbor", "neighbors"),
    ("pilot", "pilots"),
]
INANIMATE_NOUNS = [
    ("house", "houses"), ("book", "books"), ("car", "cars"), ("tree", "trees"),
    ("garden", "gardens"), ("door", "doors"), ("letter", "letters"),
    ("river", "rivers"), ("ball", "balls"), ("box", "boxes"),
    ("table", "tables"), ("city", "cities"), ("picture", "pictures"),
    ("song", "songs"), ("bridge", "bridges"), ("boat", "boats"),
]
NOUN_NUM_WEIGHT = {"sg": 0.62, "pl": 0.38}

NAMES = ["john", "mary", "tom", "alice", "sarah", "peter"]

# subject pronouns: (word, number), all animate;
# object pronouns: (word, number, animacy or None for either)
SUBJ_PRONOUNS = [("he", "sg"), ("she", "sg"), ("they", "pl"), ("it", "sg"),
                 ("we", "pl"), ("you", "pl")]
OBJ_PRONOUNS = [("him", "sg", "a"), ("her", "sg", "a"), ("it", "sg", "i"),
                ("them", "pl", None), ("me", "sg", "a"), ("us", "pl", "a"),
                ("you", "pl", "a")]

# determiner: number it imposes (None: either)
DETERMINERS = [
    ("the", None), ("a", "sg"), ("his", None), ("my", None), ("this", "sg"),
    ("some", "pl"), ("every", "sg"), ("two", "pl"), ("their", None),
    ("these", "pl"), ("that", "sg"), ("our", None), ("many", "pl"),
    ("those", "pl"), ("your", None), ("three", "pl"), ("no", None),
    ("several", "pl"),
]

# adjective: animacy of the nouns it may modify (None: any)
ADJECTIVES = [
    ("big", None), ("old", None), ("little", None), ("happy", "a"),
    ("small", None), ("red", "i"), ("young", "a"), ("black", None),
    ("hungry", "a"), ("new", "i"), ("white", None), ("angry", "a"),
    ("beautiful", None), ("empty", "i"), ("tired", "a"), ("broken", "i"),
]

# verb: (base, 3sg, past, -ing, class)
#   intr: no object; tr_a / tr_i / tr_ai: animate / inanimate / any object;
#   give: inanimate object + "to" + animate object.
VERBS = [
    ("see", "sees", "saw", "seeing", "tr_ai"),
    ("like", "likes", "liked", "liking", "tr_ai"),
    ("run", "runs", "ran", "running", "intr"),
    ("sleep", "sleeps", "slept", "sleeping", "intr"),
    ("find", "finds", "found", "finding", "tr_ai"),
    ("chase", "chases", "chased", "chasing", "tr_a"),
    ("want", "wants", "wanted", "wanting", "tr_ai"),
    ("open", "opens", "opened", "opening", "tr_i"),
    ("help", "helps", "helped", "helping", "tr_a"),
    ("give", "gives", "gave", "giving", "give"),
    ("sing", "sings", "sang", "singing", "intr"),
    ("know", "knows", "knew", "knowing", "tr_ai"),
    ("write", "writes", "wrote", "writing", "tr_i"),
    ("laugh", "laughs", "laughed", "laughing", "intr"),
    ("watch", "watches", "watched", "watching", "tr_ai"),
    ("meet", "meets", "met", "meeting", "tr_a"),
    ("build", "builds", "built", "building", "tr_i"),
    ("wait", "waits", "waited", "waiting", "intr"),
    ("swim", "swims", "swam", "swimming", "intr"),
    ("follow", "follows", "followed", "following", "tr_a"),
    ("carry", "carries", "carried", "carrying", "tr_i"),
    ("show", "shows", "showed", "showing", "give"),
    ("smile", "smiles", "smiled", "smiling", "intr"),
    ("dance", "dances", "danced", "dancing", "intr"),
    ("visit", "visits", "visited", "visiting", "tr_a"),
    ("paint", "paints", "painted", "painting", "tr_i"),
    ("cry", "cries", "cried", "crying", "intr"),
    ("send", "sends", "sent", "sending", "give"),
    ("arrive", "arrives", "arrived", "arriving", "intr"),
]
FORM_INDEX = {"base": 0, "3sg": 1, "past": 2, "ing": 3}
# object animacy a gap of each kind may stand for
GAP_CLASSES = {"a": {"tr_a", "tr_ai"}, "i": {"tr_i", "tr_ai", "give"}}

# tense: weight in a free clause
TENSES = {
    "pres": 0.26, "past": 0.26, "fut": 0.11, "presprog": 0.09,
    "presadv": 0.06, "can": 0.06, "negpres": 0.06, "pastprog": 0.05,
    "negpast": 0.05,
}
ALL_T = tuple(TENSES)
FREQ_ADVERBS = ["often", "always", "never", "sometimes", "usually"]
MANNER_ADVERBS = ["quickly", "slowly", "quietly", "happily", "loudly", "well"]
TIME_ADVERBS = {
    "pres": ["today", "again"],
    "presadv": [],
    "past": ["yesterday", "again", "earlier"],
    "fut": ["tomorrow", "soon", "again", "later"],
    "presprog": ["now", "today"],
    "pastprog": ["then", "earlier"],
    "can": ["now", "today", "tomorrow"],
    "negpres": ["today"],
    "negpast": ["yesterday"],
    "imp": ["now", "today", "again"],
}
# sentence-initial "ADV ," restricts the tenses of the sentence's clauses
FRONT_ADVERBS = [
    ("yesterday", ("past", "pastprog", "negpast")),
    ("sometimes", ("pres", "negpres")),
    ("tomorrow", ("fut",)),
    ("now", ("presprog", "can")),
]
NP_PREPS = ["with", "near", "from", "behind"]  # attach to a noun
LOC_PREPS = ["in", "at", "on", "under", "across"]  # attach to a verb phrase
CONJUNCTIONS = ["and", "but", "because", "while"]
# yes/no and wh-question auxiliaries: (subject number, verb form, tense)
QUESTION_AUX = [
    ("does", "sg", "base", "pres"), ("did", None, "base", "past"),
    ("do", "pl", "base", "pres"), ("will", None, "base", "fut"),
    ("is", "sg", "ing", "presprog"), ("can", None, "base", "can"),
    ("are", "pl", "ing", "presprog"), ("was", "sg", "ing", "pastprog"),
    ("were", "pl", "ing", "pastprog"),
]

MAX_DEPTH = 2  # noun phrases nested this deep take no modifiers
REL_P = (0.16, 0.07)  # P(relative clause) on a noun at depth 0, 1
PP_P = (0.10, 0.06)  # P(prepositional phrase) on a noun at depth 0, 1
ADJ_P = (0.25, 0.10)  # P(first adjective), P(second adjective)


def zipf(items):
    """[(weight, item)] with weight 1/(rank+1), in list order."""
    return [(1.0 / (i + 1), it) for i, it in enumerate(items)]


def normalized(options):
    """Drop zero weights and scale the rest to sum to one."""
    options = [(w, r) for w, r in options if w > 0]
    total = sum(w for w, _ in options)
    if total <= 0:
        raise AssertionError("a grammar state has no continuation")
    return [(w / total, r) for w, r in options]


def compat(required, value):
    return required is None or value is None or required == value


# --------------------------------------------------------------------------
# Grammar rules.  A nonterminal is a tuple (NAME, *params); a terminal is a
# word string.  rules(nt) -> [(probability, right-hand side tuple)].
# ("SET", num) is an empty action: it replaces the placeholder PH in the
# rest of the stack by the subject's number.
# --------------------------------------------------------------------------


def rules(nt):  # noqa: C901 - one branch per nonterminal reads best here
    name, *a = nt

    if name == "S":
        return [
            (0.66, (("DECL",),)),
            (0.12, (("YNQ",),)),
            (0.14, (("WHQ",),)),
            (0.08, (("IMP",),)),
        ]

    if name == "DECL":
        fronted = [(0.10 * w, (adv, ",", ("CLAUSES", tenses, False)))
                   for w, (adv, tenses) in normalized(zipf(FRONT_ADVERBS))]
        return [(0.90, (("CLAUSES", ALL_T, True),)), *fronted]

    if name == "CLAUSES":
        tenses, trail = a
        return [(1.0, (("NP", "subj", 0, None, None),
                       ("VP", PH, tenses, "main", trail, 0, None),
                       ("CONJ", tenses, trail)))]

    if name == "CONJ":
        tenses, trail = a
        out = [(0.88, (".", EOS))]
        for w, c in normalized(zipf(CONJUNCTIONS)):
            out.append((0.12 * w, (c, ("NP", "subj", 0, None, None),
                                   ("VP", PH, tenses, "main", trail, 0, None),
                                   ".", EOS)))
        return out

    if name == "YNQ":
        return [(w, (aux, ("NP", "subj", 0, num, None),
                     ("VFORM", form, tense, "main", True, 0, None, True),
                     "?", EOS))
                for w, (aux, num, form, tense) in normalized(zipf(QUESTION_AUX))]

    if name == "WHQ":
        return [
            (0.40, ("who", ("VP", "sg", ALL_T, "main", True, 0, None), "?", EOS)),
            (0.25, ("what", ("AUXQ", "i", True), "?", EOS)),
            (0.20, ("where", ("AUXQ", None, False), "?", EOS)),
            (0.15, ("why", ("AUXQ", None, True), "?", EOS)),
        ]

    if name == "AUXQ":  # AUX NP VERB..., the verb's object possibly a gap
        gap, loc = a
        return [(w, (aux, ("NP", "subj", 0, num, None),
                     ("VFORM", form, tense, "main", True, 0, gap, loc)))
                for w, (aux, num, form, tense) in normalized(zipf(QUESTION_AUX))]

    if name == "IMP":
        body = (("VFORM", "base", "imp", "main", True, 0, None, True), ("IMPEND",))
        return [(0.75, body), (0.25, ("please", *body))]

    if name == "IMPEND":
        return [(0.7, (".", EOS)), (0.3, ("!", EOS))]

    if name == "VP":  # tensed verb phrase agreeing with num
        num, tenses, ctx, trail, d, gap = a
        assert num in ("sg", "pl"), nt
        pres = "3sg" if num == "sg" else "base"

        def vform(form, tense):
            return ("VFORM", form, tense, ctx, trail, d, gap, True)

        out = []
        for w, t in normalized([(TENSES[t], t) for t in tenses]):
            if t == "pres":
                out.append((w, (vform(pres, t),)))
            elif t == "presadv":
                for w2, adv in normalized(zipf(FREQ_ADVERBS)):
                    out.append((w * w2, (adv, vform(pres, t))))
            elif t == "past":
                out.append((w, (vform("past", t),)))
            elif t == "presprog":
                out.append((w, ("is" if num == "sg" else "are", vform("ing", t))))
            elif t == "pastprog":
                out.append((w, ("was" if num == "sg" else "were", vform("ing", t))))
            elif t == "fut":
                out.append((w, ("will", vform("base", t))))
            elif t == "can":
                out.append((w, ("can", vform("base", t))))
            elif t == "negpres":
                out.append((w, ("does" if num == "sg" else "do", "not",
                                vform("base", t))))
            elif t == "negpast":
                out.append((w, ("did", "not", vform("base", t))))
            else:
                raise AssertionError(t)
        return out

    if name == "VFORM":  # the verb itself, inflected
        form, tense, ctx, trail, d, gap, loc = a
        verbs = [v for v in VERBS if gap is None or v[4] in GAP_CLASSES[gap]]
        return [(w, (v[FORM_INDEX[form]], ("VREST", v[4], tense, ctx, trail, d, gap, loc)))
                for w, v in normalized(zipf(verbs))]

    if name == "VREST":  # objects and (main clauses only) adjuncts
        vclass, tense, ctx, trail, d, gap, loc = a
        if gap is not None:
            objects = ("to", ("NP", "obj", d + 1, None, "a")) if vclass == "give" else ()
        elif vclass == "intr":
            objects = ()
        elif vclass == "give":
            objects = (("NP", "obj", d + 1, None, "i"), "to", ("NP", "obj", d + 1, None, "a"))
        else:
            objects = (("NP", "obj", d + 1, None, {"tr_a": "a", "tr_i": "i"}.get(vclass)),)
        if ctx == "main":
            objects += (("ADJUNCTS", vclass == "intr" and gap is None, tense, trail, loc),)
        return [(1.0, objects)]

    if name == "ADJUNCTS":  # [manner adverb] [locative PP] [time adverb]
        manner, tense, trail, loc = a
        rest = ("LOC", tense, trail, loc)
        out = [(0.8 if manner else 1.0, (rest,))]
        if manner:
            out += [(0.2 * w, (adv, rest)) for w, adv in normalized(zipf(MANNER_ADVERBS))]
        return out

    if name == "LOC":
        tense, trail, loc = a
        rest = ("TIME", tense, trail)
        out = [(0.82 if loc else 1.0, (rest,))]
        if loc:
            out += [(0.18 * w, (p, ("NP", "pobj", 1, None, "i"), rest))
                    for w, p in normalized(zipf(LOC_PREPS))]
        return out

    if name == "TIME":
        tense, trail = a
        advs = TIME_ADVERBS[tense] if trail else []
        if not advs:
            return [(1.0, ())]
        return [(0.85, ())] + [(0.15 * w, (adv,)) for w, adv in normalized(zipf(advs))]

    if name == "NP":
        role, d, num, anim = a
        if role == "subj":
            anim = "a"  # subjects are animate
        opts = []
        if role == "subj":
            prons, names_p, det_p = SUBJ_PRONOUNS, 0.08, 0.72
            opts += [(0.20 * w, (p, pn, "a")) for w, (p, pn) in normalized(zipf(prons))]
        else:
            names_p, det_p = (0.06, 0.82) if role == "obj" else (0.04, 0.88)
            pron_p = 1.0 - names_p - det_p
            opts += [(pron_p * w, pron) for w, pron in normalized(zipf(OBJ_PRONOUNS))]
        opts += [(names_p * w, (n, "sg", "a")) for w, n in normalized(zipf(NAMES))]
        out = [(w, (word, ("SET", wn)) if role == "subj" else (word,))
               for w, (word, wn, wa) in opts if compat(num, wn) and compat(anim, wa)]
        for w, (det, dn) in normalized(zipf(DETERMINERS)):
            if compat(num, dn):
                out.append((det_p * w, (det, ("NBAR", role, d, num or dn, anim, 0))))
        return normalized(out)

    if name == "NBAR":  # adjectives and the head noun
        role, d, num, anim, k = a
        out = []
        if k < len(ADJ_P):
            for w, (adj, aa) in normalized(zipf(ADJECTIVES)):
                if compat(anim, aa):
                    out.append((ADJ_P[k] * w, (adj, ("NBAR", role, d, num, anim or aa, k + 1))))
        adj_total = sum(w for w, _ in out)
        nouns = []
        for kind, pairs in (("a", ANIMATE_NOUNS), ("i", INANIMATE_NOUNS)):
            if not compat(anim, kind) or (role == "subj" and kind != "a"):
                continue
            for rank, pair in enumerate(pairs):
                for nn, word in (("sg", pair[0]), ("pl", pair[1])):
                    if compat(num, nn):
                        nouns.append((NOUN_NUM_WEIGHT[nn] / (rank + 1), (word, nn, kind)))
        for w, (word, nn, kind) in normalized(nouns):
            rhs = (word, ("SET", nn)) if role == "subj" else (word,)
            out.append(((1.0 - adj_total) * w, (*rhs, ("NMOD", nn, kind, d))))
        return normalized(out)

    if name == "NMOD":  # [relative clause | prepositional phrase] after a noun
        num, anim, d = a
        if d >= MAX_DEPTH:
            return [(1.0, ())]
        out = [(1.0 - REL_P[d] - PP_P[d], ())]
        relprons = ["that", "who"] if anim == "a" else ["that", "which"]
        out += [(REL_P[d] * w, (rp, ("RELBODY", num, anim, d)))
                for w, rp in normalized(zipf(relprons))]
        out += [(PP_P[d] * w, (p, ("NP", "pobj", d + 1, None, None)))
                for w, p in normalized(zipf(NP_PREPS))]
        return out

    if name == "RELBODY":  # subject gap (animate heads) or object gap
        num, anim, d = a
        obj_gap = (("NP", "subj", d + 1, None, None), ("VP", PH, ALL_T, "emb", False, d + 1, anim))
        if anim == "i":
            return [(1.0, obj_gap)]
        return [(0.55, (("VP", num, ALL_T, "emb", False, d, None),)), (0.45, obj_gap)]

    raise AssertionError(f"unknown nonterminal {nt!r}")


def _fill(stack, num):
    """Replace the number placeholder in the nonterminals of stack."""
    out = []
    for item in stack:
        if isinstance(item, tuple) and PH in item:
            item = tuple(num if x == PH else x for x in item)
        out.append(item)
    return tuple(out)


class Automaton:
    """The grammar as a deterministic automaton over parser stacks.

    ``step(state)`` returns ``{word: (probability, next_state)}``; the start
    state of every sentence is ``START``; the sentence ends with ``<eos>``,
    after which the state is ``()`` and the next sentence starts from
    ``START`` again.
    """

    START = (("S",),)

    def __init__(self):
        self._memo = {}

    def _expand(self, stack):
        top, rest = stack[0], stack[1:]
        if isinstance(top, str):
            return {top: (1.0, rest)}
        if top[0] == "SET":
            return self._expand(_fill(rest, top[1]))
        out = {}
        for p, rhs in rules(top):
            new = rhs + rest
            if not new:
                raise AssertionError(f"{top!r} can end the stack without <eos>")
            for word, (q, nxt) in self._expand(new).items():
                if word in out:
                    if out[word][1] != nxt:
                        raise AssertionError(
                            f"grammar not deterministic: {word!r} after {stack!r}")
                    out[word] = (out[word][0] + p * q, nxt)
                else:
                    out[word] = (p * q, nxt)
        return out

    def step(self, state):
        try:
            return self._memo[state]
        except KeyError:
            pass
        dist = self._expand(state)
        total = sum(p for p, _ in dist.values())
        if abs(total - 1.0) > 1e-9:
            raise AssertionError(f"probabilities sum to {total} after {state!r}")
        self._memo[state] = dist
        return dist

    def sample_sentence(self, rng):
        """Sample one sentence; return (words, per-token log-probs incl. <eos>)."""
        state, words, logps = self.START, [], []
        while True:
            dist = self.step(state)
            items = list(dist.items())
            u = rng.random()
            acc = 0.0
            word, (p, nxt) = items[-1]  # if rounding leaves u above the total
            for cand in items:
                acc += cand[1][0]
                if u < acc:
                    word, (p, nxt) = cand
                    break
            logps.append(math.log(p))
            if word == EOS:
                assert nxt == ()
                return words, logps
            words.append(word)
            state = nxt

    def score_sentence(self, words):
        """Per-token log-probs of a sentence's words and its <eos>."""
        state, logps = self.START, []
        for word in [*words, EOS]:
            dist = self.step(state)
            if word not in dist:
                raise ValueError(f"{word!r} impossible after {' '.join(words)!r}")
            p, state = dist[word]
            logps.append(math.log(p))
        if state != ():
            raise ValueError(f"sentence does not end after <eos>: {words!r}")
        return logps

    def reachable_states(self):
        """Every state reachable from START (the automaton is finite)."""
        seen, todo = {self.START}, [self.START]
        while todo:
            for _, nxt in self.step(todo.pop()).values():
                if nxt and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def entropy_rate(self):
        """(expected -ln p per sentence, expected tokens per sentence incl. <eos>).

        Their ratio is the source's entropy rate in nats/token, the value the
        optimum of a long sample converges to.  Sentences have bounded
        length, so the state graph is acyclic and a memoised recursion works.
        """
        memo = {(): (0.0, 0.0)}  # filled in post-order, without deep recursion
        stack = [(self.START, False)]
        while stack:
            state, done = stack.pop()
            if state in memo:
                continue
            if done:
                h = n = 0.0
                for p, nxt in self.step(state).values():
                    hn, nn = memo[nxt]
                    h += p * (-math.log(p) + hn)
                    n += p * (1.0 + nn)
                memo[state] = (h, n)
                continue
            stack.append((state, True))
            stack.extend((nxt, False) for _, nxt in self.step(state).values()
                         if nxt not in memo)
        return memo[self.START]

    def vocabulary(self):
        vocab = set()
        for s in self.reachable_states():
            vocab.update(self.step(s))
        vocab.discard(EOS)
        return vocab


def lexicon():
    """Every word the grammar can emit (``Automaton.vocabulary`` agrees, slowly)."""
    words = {w for pair in ANIMATE_NOUNS + INANIMATE_NOUNS for w in pair}
    words.update(NAMES, (w for w, _ in SUBJ_PRONOUNS), (w for w, *_ in OBJ_PRONOUNS))
    words.update(w for w, _ in DETERMINERS + ADJECTIVES + FRONT_ADVERBS)
    words.update(w for v in VERBS for w in v[:4])
    words.update(aux for aux, *_ in QUESTION_AUX)
    words.update(FREQ_ADVERBS, MANNER_ADVERBS, NP_PREPS, LOC_PREPS, CONJUNCTIONS)
    words.update(w for advs in TIME_ADVERBS.values() for w in advs)
    words.update(["who", "which", "what", "where", "why", "not", "please", "to",
                  ".", "?", "!", ","])
    return words


def generate_split(auto, seed, n_words):
    """Return (text, list of per-token log-probs) for one split."""
    rng = random.Random(seed)
    lines, logps, count = [], [], 0
    while count < n_words:
        words, lp = auto.sample_sentence(rng)
        lines.append(" ".join(words) + "\n")
        logps.extend(lp)
        count += len(words)
    return "".join(lines), logps


def score_text(auto, text):
    """Per-token log-probs of a corpus in the toolkit's convention.

    Tokens are the whitespace-split words of each line plus one <eos> per
    line; every token, every <eos> included, is scored.
    """
    logps = []
    for line in text.splitlines():
        logps.extend(auto.score_sentence(line.split()))
    return logps


def optimum_entry(logps):
    x = -sum(logps) / len(logps)
    return {
        "tokens": len(logps),
        "cross_entropy_nats": round(x, 10),
        "perplexity": round(math.exp(x), 10),
        "bits_per_token": round(x / math.log(2), 10),
    }


def build_all():
    """Return {filename: contents} for every generated file."""
    auto = Automaton()
    files, stats = {}, {}
    for split, (seed, n_words) in SPLITS.items():
        text, gen_logps = generate_split(auto, seed, n_words)
        parsed = score_text(auto, text)
        # the written text, re-parsed, must score exactly as it was sampled
        if parsed != gen_logps:
            raise AssertionError(f"{split}: re-parsed log-probs differ from sampling")
        files[f"{split}.txt"] = text
        stats[split] = optimum_entry(parsed)
        words = set(text.split())
        if not words <= lexicon():
            raise AssertionError(f"{split}: words outside the lexicon")
        if split == "train" and words != lexicon():
            raise AssertionError(f"train lacks {sorted(lexicon() - words)}")
    test, valid = stats["test"], stats["valid"]
    optimum = {
        "test_tokens": test["tokens"],
        "cross_entropy_nats": test["cross_entropy_nats"],
        "perplexity": test["perplexity"],
        "bits_per_token": test["bits_per_token"],
        "valid_tokens": valid["tokens"],
        "valid_cross_entropy_nats": valid["cross_entropy_nats"],
        "valid_perplexity": valid["perplexity"],
        "valid_bits_per_token": valid["bits_per_token"],
        "vocab_size": len(lexicon()),
        "note": (
            "Exact optimum of test.txt (and valid.txt) under the generating grammar: "
            "mean over all tokens (whitespace-split words plus one <eos> per line, "
            "<eos> included) of -ln p(token | words of the current sentence so far). "
            "vocab_size counts words, not <eos>. Rounded to 10 decimals. "
            "Produced by data/demo/generate.py."
        ),
    }
    files["optimum.json"] = json.dumps(optimum, indent=2) + "\n"
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="regenerate in memory; exit 1 if a committed file differs")
    ap.add_argument("--out", type=Path, default=HERE,
                    help="directory to write (default: this script's directory)")
    args = ap.parse_args(argv)
    files = build_all()
    if args.check:
        bad = []
        for name, text in files.items():
            path = args.out / name
            if not path.exists() or path.read_bytes() != text.encode("utf-8"):
                bad.append(name)
        if bad:
            print(f"differs from generator output: {', '.join(bad)}", file=sys.stderr)
            return 1
        print("demo corpus up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_bytes(text.encode("utf-8"))
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
