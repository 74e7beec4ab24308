"""An embedded English-like corpus, generated offline and deterministically (no downloads, no data files).

A small grammar over a few hundred real English words, with agreement (``a``/``an``, singular/plural
verbs), regular morphology (plural ``-s``/``-es``/``-ies``, past ``-ed``, adverbs ``-ly``), capitalised
sentence starts, commas, quotes and numbers. It is enough structure that a masked character is predictable
from the word's other characters (spelling) and from the neighbouring words (agreement), which is what the
masked-character objective of ``python -m hierkern train`` needs to show learning, and its word and sentence
lengths look like real text (words of 1-14 characters, sentences of 4-25 words).
"""

from __future__ import annotations

import random

__all__ = ["default_corpus"]

_NOUNS = """
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue side
kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face level office door health person art war
history party result change morning reason research girl guy moment air teacher force education foot boy
age policy process music market sense nation plan college interest death experience effect class control
care field development role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event machine river garden window kitchen animal
bird horse forest mountain island letter picture song dream question village engine bridge doctor farmer
""".split()
_VERBS = """
see make know take find give tell work call try ask need feel leave put mean keep let begin seem help show
hear play run move live believe hold bring write sit stand lose pay meet include continue set learn change
lead understand watch follow stop create speak read allow add spend grow open walk win offer remember love
consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass sell
require report decide pull carry visit paint clean answer visit jump cook travel explain protect discover
""".split()
_ADJECTIVES = """
good new first last long great little own other old right big high different small large next early young
important few public bad same able free sure clear recent whole real best black white red blue green
strong possible simple hard easy major better economic social local late happy quiet bright dark warm cold
heavy light quick slow careful honest ancient modern famous strange gentle brave curious empty busy
""".split()
_ADVERBS = """
quickly slowly carefully quietly happily suddenly often never always sometimes rarely finally really
almost already soon today yesterday together again still
""".split()
_PREPOSITIONS = "in on at near behind under over with without from into across through after before".split()
_NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Laura Mike Nora Oscar Paula Sam".split()
_IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "foot": "feet",
    "people": "people",
    "life": "lives",
    "wife": "wives",
}
_IRREGULAR_PAST = {
    "see": "saw",
    "make": "made",
    "know": "knew",
    "take": "took",
    "find": "found",
    "give": "gave",
    "tell": "told",
    "feel": "felt",
    "leave": "left",
    "put": "put",
    "mean": "meant",
    "keep": "kept",
    "let": "let",
    "begin": "began",
    "hear": "heard",
    "run": "ran",
    "hold": "held",
    "bring": "brought",
    "write": "wrote",
    "sit": "sat",
    "stand": "stood",
    "lose": "lost",
    "pay": "paid",
    "meet": "met",
    "set": "set",
    "lead": "led",
    "understand": "understood",
    "speak": "spoke",
    "read": "read",
    "spend": "spent",
    "grow": "grew",
    "win": "won",
    "buy": "bought",
    "send": "sent",
    "build": "built",
    "fall": "fell",
    "cut": "cut",
    "sell": "sold",
    "die": "died",
}


def _plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "x", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb: str) -> str:
    if verb in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


class _Grammar:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, words: list[str]) -> str:
        # Zipf-like: earlier (more common) words are drawn more often, as in real text.
        return (
            words[min(int(self.rng.paretovariate(1.0)) - 1, len(words) - 1)]
            if self.rng.random() < 0.5
            else self.rng.choice(words)
        )

    def noun_phrase(self) -> tuple[list[str], bool]:
        """Words of a noun phrase and whether it is plural."""
        rng = self.rng
        if rng.random() < 0.1:
            return [rng.choice(_NAMES)], False
        plural = rng.random() < 0.35
        noun = self.pick(_NOUNS)
        adjectives = [self.pick(_ADJECTIVES) for _ in range(rng.choice((0, 0, 1, 1, 2)))]
        head = adjectives + [noun]
        if plural:
            head[-1] = _plural(noun)
            det = rng.choice(("the", "some", "many", "these", "those", "two", "three", str(rng.randint(4, 99))))
        else:
            det = rng.choice(("the", "a", "this", "that", "every", "my", "our"))
            if det == "a" and head[0][0] in "aeiou":
                det = "an"
        return [det] + head, plural

    def verb_phrase(self, plural: bool) -> list[str]:
        rng = self.rng
        verb = self.pick(_VERBS)
        tense = rng.random()
        if tense < 0.4:
            words = [_past(verb)]
        elif tense < 0.8:
            words = [verb if plural else _third_person(verb)]
        else:
            words = ["will", verb]
        if rng.random() < 0.25:
            words.insert(0 if words[0] != "will" else 1, rng.choice(_ADVERBS))
        obj, _ = self.noun_phrase()
        words += obj
        if rng.random() < 0.5:
            place, _ = self.noun_phrase()
            words += [rng.choice(_PREPOSITIONS)] + place
        return words

    def clause(self) -> list[str]:
        subject, plural = self.noun_phrase()
        return subject + self.verb_phrase(plural)

    def sentence(self) -> str:
        rng = self.rng
        words = self.clause()
        if rng.random() < 0.3:
            words[-1] += ","
            words += [rng.choice(("and", "but", "because", "while", "so"))] + self.clause()
        text = " ".join(words)
        text = text[0].upper() + text[1:]
        if rng.random() < 0.08:
            return f'"{text}," said {rng.choice(_NAMES)}.'
        return text + rng.choices((".", "!", "?"), weights=(0.85, 0.05, 0.1))[0]


def default_corpus(num_sentences: int = 20000, seed: int = 0) -> list[str]:
    """``num_sentences`` generated English-like sentences, the same for the same ``seed``.

    Args:
        num_sentences: how many sentences.
        seed: the generator's seed.

    Returns:
        A list of raw sentences (strings with spaces and punctuation).
    """
    if num_sentences < 0:
        raise ValueError(f"num_sentences must be non-negative, got {num_sentences}")
    grammar = _Grammar(random.Random(seed))
    return [grammar.sentence() for _ in range(num_sentences)]
