"""Deterministic stand-in "model" text: a short character description that weaves in the prompt's
content phrases, so a test or a dataset can see that each request's parameters reached the reply."""

from __future__ import annotations

import random
import re

MAX_PHRASES = 6
MAX_PHRASE_WORDS = 5
ELABORATED_PHRASES = 3
MIN_WORDS, MAX_WORDS = 60, 110
TUNED_PREFIX = "Fine-tuned profile: "

_CLAUSE_BREAK = re.compile(r"[.,;:!?()\[\]{}\"\n]+")
_WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")
# Function words may sit inside a phrase ("superpower of healing", "eat a lot"), never at its ends.
_JOINERS = frozenset({"of", "a", "an", "the", "and", "with", "for", "to", "in"})
_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each either every few for from
    further had has have having he her here hers herself him himself his how i if in into is it its itself
    just let me might more most must my myself no nor not now of off on once only or other our ours out over
    own please same shall she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who whom why
    will with would you your yours yourself yourselves thing things way
    imagine write describe description detailed detail details complete full give provide create generate
    tell make output answer respond response reply return list paragraph paragraphs sentence sentences word
    words short long brief include including using use following based exactly format text""".split()
)

_NAMES = (
    "Alex Moreno", "Sam Okafor", "Robin Chen", "Jordan Hale", "Casey Lindqvist", "Riley Adebayo",
    "Morgan Ferreira", "Taylor Novak", "Jamie Kowalski", "Avery Nakamura", "Quinn Delacroix", "Rowan Mbeki",
    "Skyler Haddad", "Emerson Bauer", "Parker Ivanova", "Reese Tanaka",
)
_OPENINGS = (
    "Meet {name}: {summary}.",
    "This is {name}, and the short version is {summary}.",
    "{name} is easy to sum up at first glance: {summary}.",
    "Picture {name}, a character best described by {summary}.",
)
_ELABORATIONS = (
    "Those who know {name} always bring up the same thing: {phrase}.",
    "One detail shapes the rest of the picture: {phrase}.",
    "Much of {name}'s story keeps circling back to {phrase}.",
    "Ask around and you will hear about {phrase} before anything else.",
    "Look closer and {phrase} shows in nearly every choice {name} makes.",
    "It is hard to spend an hour with {name} without noticing {phrase}.",
)
_FILLERS = (
    "They wake before dawn and rarely waste a morning.",
    "A quiet sense of humour surfaces at the oddest moments.",
    "Old friends say they have hardly changed in years.",
    "Their hands are never still; there is always something to fix or sketch.",
    "They keep a small notebook full of names, dates and half-finished plans.",
    "Crowds tire them, but one good conversation can carry them for days.",
    "They are slow to trust and fiercely loyal once they do.",
    "Rain makes them restless, while clear skies make them talkative.",
    "A faded jacket, worn at the elbows, goes everywhere with them.",
    "They believe most problems shrink after a meal and a long walk.",
    "When things go wrong they grow calm, almost too calm.",
    "Their laugh is loud, sudden and hard to ignore.",
    "They collect stories from strangers the way others collect stamps.",
    "Deadlines bring out their best work and their worst temper.",
    "They remember every kindness and, unfortunately, every slight.",
    "At night they read until the words blur on the page.",
    "They dislike small talk but love a good argument.",
    "Children and animals seem to trust them instantly.",
    "They keep their promises, even the inconvenient ones.",
    "Under pressure they make careful lists, then ignore them.",
    "They cook badly but with great enthusiasm.",
    "Music is always playing somewhere near them, usually too loud.",
    "They are at their best when someone nearby needs help.",
    "A stubborn streak has cost them more than one friendship.",
)


def _is_content(word: str) -> bool:
    return word.lower() not in _STOPWORDS and (len(word) > 1 or word.isdigit())


def key_phrases(prompt: str, limit: int = MAX_PHRASES) -> list[str]:
    """The prompt's content phrases in order: runs of content words, joined across function words."""
    phrases: list[str] = []
    seen: set[str] = set()

    def keep(run: list[str]) -> None:
        while run and not _is_content(run[-1]):
            run.pop()
        for start in range(0, len(run), MAX_PHRASE_WORDS):
            phrase = " ".join(run[start : start + MAX_PHRASE_WORDS])
            if phrase.lower() not in seen:
                seen.add(phrase.lower())
                phrases.append(phrase)

    for clause in _CLAUSE_BREAK.split(prompt):
        run: list[str] = []
        for word in _WORD.findall(clause):
            if _is_content(word) or (run and word.lower() in _JOINERS):
                run.append(word)
            else:
                keep(run)
                run = []
        keep(run)
        if len(phrases) >= limit:
            break
    return phrases[:limit]


def _summary(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(prompt: str, rng: random.Random, *, tuned: bool = False) -> str:
    """A 60–110 word description built around `prompt`'s phrases; the same `rng` state gives the same text."""
    phrases = key_phrases(prompt) or ["a quiet life that hides more than it shows"]
    name = rng.choice(_NAMES)
    sentences = [rng.choice(_OPENINGS).format(name=name, summary=_summary(phrases))]
    elaborated = rng.sample(phrases, min(ELABORATED_PHRASES, len(phrases)))
    for phrase, template in zip(elaborated, rng.sample(_ELABORATIONS, len(elaborated))):
        sentences.append(template.format(name=name, phrase=phrase))

    target_words = rng.randint(MIN_WORDS, MAX_WORDS)
    words = sum(len(sentence.split()) for sentence in sentences)
    for filler in rng.sample(_FILLERS, len(_FILLERS)):
        if words >= target_words:
            break
        filler_words = len(filler.split())
        if words + filler_words > MAX_WORDS:
            continue
        # Fillers land between the elaborations, never before the opening.
        sentences.insert(rng.randint(1, len(sentences)), filler)
        words += filler_words
    text = " ".join(sentences)
    return TUNED_PREFIX + text if tuned else text
