#!/usr/bin/env python3
"""Labelled question set for evaluating confidence scores: examples/data/confidence-set.jsonl.

What it is for: measuring how well a confidence score (see docs/confidence.md) predicts whether a
tiny model (SmolLM2-135M-Instruct, Gemma 3 270M base) answers a short question correctly. The set
spans "usually right" to "never right" within each kind, which is what a score has to separate.

Kinds (each with sub-kinds of rising difficulty and several phrasings, some with an instruction
such as "Answer with the number only."):
  arithmetic      addition, subtraction (incl. negative results), multiplication, exact division
  dates           weekday/month order, weekday offsets, days in a month/year, leap years,
                  the date N days after a date, the weekday of a date (computed with datetime)
  units           metric and time conversions, dozens, decimals, conversions to the larger unit
  strings         first/last letter, length, count of a letter, reversal, the letter before/after
                  a letter, which of two words comes first alphabetically (no "uppercase this
                  word": the checks compare lower-cased text, so they could not tell)
  elements        symbol of an element, element of a symbol, atomic numbers (package periodictable)
  countries       capitals, country of a capital, continent, ISO alpha-2 code (package countryinfo)
  classification  even/odd, prime or not, sentiment, animal or plant, larger/smaller of two
                  numbers, true/false comparisons and sums
  extraction      a price, quantity, year, city, person, e-mail address or time from a sentence

Facts come from the packages; a few of their capitals are out of date or one of several, and are
corrected with every accepted answer (CAPITAL_OVERRIDE, with reasons). The only hand-written lists
are names and words for templates and classification (words, sentiment adjectives, animals and
plants, people, cities, objects) and the few stop-lists that keep short answers from matching by
accident.

Each line is one JSON object with keys in this order:
  id, kind, subkind, split, prompt, answers, check, labels
check is "number" (one of answers appears as a standalone number in the model's answer; digits,
plus the word form for 2..20), "text" (one of answers, lower-case, appears as whole words in the
lower-cased answer; all accepted aliases are listed) or "label" (answers[0] is the gold label, one
of labels; correct when it appears as a whole word and no other label does). labels is [] except
for "label". A question whose answer already appears in its prompt (as a number for "number", as
words for "text") is never generated, except in extraction, where that is the task; there the
harder sub-kinds carry a distractor of the same type and use "label" with both candidates.

Split, decided once: the kinds countries and extraction are entirely "test" (kinds the tuning part
lacks); for every other kind a seeded shuffle puts half of each sub-kind's items (rounded down) in
"tune" and the rest in "test".

Deterministic: one random.Random(20261207), package data read in sorted order; running it twice
gives a byte-identical file. Needs Python >= 3.11 and two pinned PyPI packages (data only):

    periodictable==2.1.0   chemical elements (names, symbols, atomic numbers)
    countryinfo==1.0.1     countries (names, capitals, regions, ISO codes)

    pip install --target /tmp/pydeps periodictable==2.1.0 countryinfo==1.0.1
    PYTHONPATH=/tmp/pydeps python3 scripts/make-confidence-set.py > examples/data/confidence-set.jsonl

The file goes to standard output; counts per kind and split go to standard error.
"""
import calendar
import datetime
import json
import re
import random
import sys
import unicodedata
from decimal import Decimal
from fractions import Fraction

SEED = 20261207
PINNED = {"periodictable": "2.1.0", "countryinfo": "1.0.1"}
INSTALL = ("pip install --target /tmp/pydeps "
           + " ".join(f"{k}=={v}" for k, v in PINNED.items())
           + "\nthen run with PYTHONPATH=/tmp/pydeps")


def die(msg):
    print(f"make-confidence-set: {msg}", file=sys.stderr)
    sys.exit(1)


if sys.version_info < (3, 11):
    die("needs Python >= 3.11 (countryinfo 1.0.1 does)")
try:
    import importlib.metadata
    import periodictable
    from countryinfo import CountryInfo
except ImportError as e:
    die(f"missing package {e.name!r}; install the pinned versions:\n{INSTALL}")
for _pkg, _want in PINNED.items():
    _have = importlib.metadata.version(_pkg)
    if _have != _want:
        die(f"{_pkg} {_have} installed, {_want} pinned (other data would give another file); "
            f"install the pinned versions:\n{INSTALL}")

KINDS = ["arithmetic", "dates", "units", "strings", "elements", "countries", "classification",
         "extraction"]
TEST_ONLY_KINDS = {"countries", "extraction"}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]

NUM_RE = re.compile(r"\d+(?:\.\d+)?")


def fmt(x):
    """A number in plain digits: 42, -7, 2.5 (no exponent, no trailing zeros)."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    d = Decimal(x.numerator) / Decimal(x.denominator)
    s = format(d, "f").rstrip("0").rstrip(".")
    if Fraction(s) != x:
        raise ValueError(f"{x} has no short decimal form")
    return s


def num_answers(x):
    """Accepted forms of a number: digits, plus the word for the integers 2..20."""
    x = Fraction(x)
    out = [fmt(x)]
    if x.denominator == 1 and 2 <= x <= 20:
        out.append(NUMBER_WORDS[x.numerator])
    return out


def whole(needle, hay):
    """Whether needle occurs in hay as whole words (no letter or digit on either side)."""
    return re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", hay) is not None


def fold(s):
    """Lower case without diacritics: 'Bogotá' -> 'bogota'."""
    s = unicodedata.normalize("NFKD", s.lower())
    return "".join(c for c in s if not unicodedata.combining(c))


def aliases(name):
    """A proper name's accepted lower-case spellings: as written, without diacritics, hyphens
    as spaces, apostrophes dropped."""
    out = []
    for v in (name.lower(), fold(name)):
        for w in (v, v.replace("-", " "), v.replace("'", ""), v.replace("'", "").replace("-", " ")):
            if w not in out:
                out.append(w)
    return out


def dedup(xs):
    out = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


class Builder:
    def __init__(self, rng):
        self.rng = rng
        self.items = []
        self.prompts = set()
        self.keys = set()

    def add(self, kind, subkind, prompt, answers, check, labels=(), key=None, guard=True):
        """Adds an item unless its prompt or question (key) is already there or, with guard, its
        answer can be read off the prompt. Returns whether it was added."""
        key = (kind, key if key is not None else prompt)
        if prompt in self.prompts or key in self.keys:
            return False
        answers = dedup(answers)
        labels = list(labels)
        assert check in ("number", "text", "label"), check
        assert answers and all(isinstance(a, str) and a for a in answers), answers
        if check == "number":
            assert not labels
            for a in answers:
                assert re.fullmatch(r"-?\d+(\.\d+)?", a) or a in NUMBER_WORDS, a
            if guard:
                in_prompt = {Fraction(n) for n in NUM_RE.findall(prompt)}
                for a in answers:
                    if a in NUMBER_WORDS:
                        if whole(a, prompt.lower()):
                            return False
                    elif abs(Fraction(a)) in in_prompt:
                        return False
        elif check == "text":
            assert not labels
            assert all(a == a.lower() for a in answers), answers
            if guard and any(whole(a, prompt.lower()) for a in answers):
                return False
        else:
            assert len(answers) == 1 and answers[0] in labels and len(set(labels)) == len(labels)
            assert all(x == x.lower() for x in labels), labels
        self.prompts.add(prompt)
        self.keys.add(key)
        self.items.append({"kind": kind, "subkind": subkind, "prompt": prompt,
                           "answers": answers, "check": check, "labels": labels})
        return True

    def fill(self, kind, subkind, n, make, **kw):
        """Calls make() until n items of this sub-kind were added; make returns the arguments of
        add after kind and subkind, as a dict, or None to skip. A make that takes an argument gets
        the number of items added so far (label kinds use it to alternate the gold label)."""
        got = tries = 0
        counted = make.__code__.co_argcount == 1
        while got < n:
            tries += 1
            if tries > 20000:
                die(f"{kind}/{subkind}: only {got} of {n} distinct items could be made")
            args = make(got) if counted else make()
            if args is not None and self.add(kind, subkind, **args):
                got += 1


def pick(rng, xs):
    return xs[rng.randrange(len(xs))]


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------

ADD_T = ["What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.",
         "What is the sum of {a} and {b}?", "{a} + {b} = ?",
         "What is {a} + {b}? Answer with the number only.", "Add {a} and {b}."]
SUB_T = ["What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}.",
         "Subtract {b} from {a}.", "{a} - {b} = ?",
         "What is {a} - {b}? Answer with the number only."]
MUL_T = ["What is {a} × {b}?", "What is {a} times {b}?", "What is {a} * {b}?",
         "Multiply {a} by {b}.", "What is the product of {a} and {b}?", "{a} x {b} = ?",
         "What is {a} times {b}? Answer with the number only."]
DIV_T = ["What is {a} / {b}?", "What is {a} divided by {b}?", "Divide {a} by {b}.",
         "{a} ÷ {b} = ?", "What is {a} ÷ {b}? Answer with the number only.",
         "How many times does {b} go into {a}?"]


def gen_arithmetic(b):
    rng = b.rng
    K = "arithmetic"

    def binop(templates, op, lo_a, hi_a, lo_b, hi_b, cond=lambda a, c: True):
        def make():
            a, c = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
            if not cond(a, c):
                return None
            value = {"+": a + c, "-": a - c, "*": a * c}[op]
            key = (op,) + (tuple(sorted((a, c))) if op in "+*" else (a, c))
            return {"prompt": pick(rng, templates).format(a=a, b=c),
                    "answers": num_answers(value), "check": "number", "key": key}
        return make

    def div(lo_q, hi_q, lo_d, hi_d):
        def make():
            q, d = rng.randint(lo_q, hi_q), rng.randint(lo_d, hi_d)
            a = q * d
            return {"prompt": pick(rng, DIV_T).format(a=a, b=d), "answers": num_answers(q),
                    "check": "number", "key": ("/", a, d)}
        return make

    b.fill(K, "add-1digit", 20, binop(ADD_T, "+", 2, 9, 2, 9))
    b.fill(K, "add-2digit", 20, binop(ADD_T, "+", 10, 99, 10, 99))
    b.fill(K, "add-3digit", 20, binop(ADD_T, "+", 100, 999, 100, 999))
    b.fill(K, "sub-1digit", 20, binop(SUB_T, "-", 10, 18, 2, 9, lambda a, c: a - c >= 2))
    b.fill(K, "sub-2digit", 20, binop(SUB_T, "-", 20, 99, 10, 89, lambda a, c: a - c >= 2))
    b.fill(K, "sub-3digit", 20, binop(SUB_T, "-", 200, 999, 100, 899, lambda a, c: a - c >= 2))
    b.fill(K, "sub-negative", 20, binop(SUB_T, "-", 10, 89, 20, 99, lambda a, c: c - a >= 2))
    b.fill(K, "mul-1digit", 20, binop(MUL_T, "*", 2, 9, 2, 9))
    b.fill(K, "mul-2x1digit", 20, binop(MUL_T, "*", 12, 99, 3, 9))
    b.fill(K, "mul-2digit", 20, binop(MUL_T, "*", 12, 99, 12, 99))
    b.fill(K, "div-1digit", 20, div(2, 9, 2, 9))
    b.fill(K, "div-2digit", 20, div(11, 40, 11, 25))


# ---------------------------------------------------------------------------------------------
# dates
# ---------------------------------------------------------------------------------------------

def ordinal(n):
    suf = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suf}"


def date_answers(d):
    m, n = MONTHS[d.month - 1].lower(), d.day
    return [f"{m} {n}", f"{n} {m}", f"{m} {ordinal(n)}", f"{ordinal(n)} {m}",
            f"{ordinal(n)} of {m}"]


def show_date(d):
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def gen_dates(b):
    rng = b.rng
    K = "dates"

    def weekday_next():
        i, after = rng.randrange(7), rng.random() < 0.5
        d = WEEKDAYS[i]
        if after:
            t = ["What day comes after {d}?", "What day of the week comes after {d}?",
                 "If today is {d}, what day is tomorrow?", "Which day follows {d}?",
                 "What day comes after {d}? Answer with one word."]
            ans = WEEKDAYS[(i + 1) % 7]
        else:
            t = ["What day comes before {d}?", "What day of the week comes before {d}?",
                 "If today is {d}, what day was yesterday?", "Which day is just before {d}?"]
            ans = WEEKDAYS[(i - 1) % 7]
        return {"prompt": pick(rng, t).format(d=d), "answers": [ans.lower()], "check": "text",
                "key": ("weekday", i, after)}

    def month_next():
        i, after = rng.randrange(12), rng.random() < 0.5
        m = MONTHS[i]
        if after:
            t = ["What month comes after {m}?", "Which month follows {m}?",
                 "If it is {m} now, what month is next?",
                 "What month comes after {m}? Answer with one word."]
            ans = MONTHS[(i + 1) % 12]
        else:
            t = ["What month comes before {m}?", "Which month is just before {m}?",
                 "If it is {m} now, what month was last month?"]
            ans = MONTHS[(i - 1) % 12]
        return {"prompt": pick(rng, t).format(m=m), "answers": [ans.lower()], "check": "text",
                "key": ("month", i, after)}

    def weekday_offset():
        i, n = rng.randrange(7), rng.randint(2, 20)
        forward = rng.random() < 0.7
        d = WEEKDAYS[i]
        if forward:
            t = ["If today is {d}, what day will it be in {n} days?",
                 "What day of the week is {n} days after {d}?",
                 "Today is {d}. What day is it {n} days from now?"]
            ans = WEEKDAYS[(i + n) % 7]
        else:
            t = ["If today is {d}, what day was it {n} days ago?",
                 "What day of the week is {n} days before {d}?"]
            ans = WEEKDAYS[(i - n) % 7]
        if n % 7 == 0:
            return None  # the answer would be the day in the prompt
        return {"prompt": pick(rng, t).format(d=d, n=n), "answers": [ans.lower()],
                "check": "text", "key": ("offset", i, n if forward else -n)}

    def days_in_month():
        m = rng.randrange(12)
        if m == 1:
            y = rng.randint(1990, 2030)
            days = 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
            t = ["How many days are in February {y}?", "How many days did February {y} have?",
                 "How many days are in February {y}? Answer with the number only."]
            return {"prompt": pick(rng, t).format(y=y), "answers": num_answers(days),
                    "check": "number", "key": ("dim", 2, y)}
        days = calendar.monthrange(2001, m + 1)[1]
        t = ["How many days are in {m}?", "How many days does {m} have?",
             "How many days are there in the month of {m}?"]
        return {"prompt": pick(rng, t).format(m=MONTHS[m]), "answers": num_answers(days),
                "check": "number", "key": ("dim", m + 1)}

    def days_in_year():
        y = rng.randint(1890, 2110)
        leap = (y % 4 == 0 and y % 100 != 0) or y % 400 == 0
        if rng.random() < 0.5 and not leap:
            return None  # about half of them leap years
        days = (datetime.date(y + 1, 1, 1) - datetime.date(y, 1, 1)).days
        t = ["How many days are in the year {y}?", "How many days did the year {y} have?",
             "How many days does the year {y} have? Answer with the number only."]
        return {"prompt": pick(rng, t).format(y=y), "answers": num_answers(days),
                "check": "number", "key": ("diy", y)}

    def leap_year(i):
        gold = ["yes", "no"][i % 2]
        kind_ = rng.random()
        if kind_ < 0.3:
            y = rng.choice([1600, 1700, 1800, 1900, 2000, 2100, 2200, 2400])
        else:
            y = rng.randint(1890, 2099)
        leap = (y % 4 == 0 and y % 100 != 0) or y % 400 == 0
        if leap != (gold == "yes"):
            return None
        t = ["Is {y} a leap year?", "Was {y} a leap year? Answer yes or no.",
             "Is the year {y} a leap year? Answer yes or no."]
        return {"prompt": pick(rng, t).format(y=y), "answers": [gold], "check": "label",
                "labels": ["yes", "no"], "key": ("leap", y)}

    def date_plus(cross):
        def make():
            d0 = datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randrange(3650))
            n = rng.randint(2, 9) if not cross else rng.randint(10, 60)
            d1 = d0 + datetime.timedelta(days=n)
            if (d1.month != d0.month) != cross:
                return None
            t = ["What is the date {n} days after {d}?", "What date is {n} days after {d}?",
                 "If today is {d}, what is the date in {n} days?"]
            return {"prompt": pick(rng, t).format(n=n, d=show_date(d0)),
                    "answers": date_answers(d1), "check": "text", "key": ("plus", d0, n)}
        return make

    def weekday_of_date():
        d = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(80 * 365))
        t = ["What day of the week was {d}?", "What day of the week is {d}?",
             "On what day of the week did {d} fall?"]
        p = pick(rng, t).format(d=show_date(d))
        if d.year >= 2026 and " was " in p:
            p = p.replace(" was ", " is ")
        return {"prompt": p, "answers": [WEEKDAYS[d.weekday()].lower()], "check": "text",
                "key": ("wd", d)}

    b.fill(K, "weekday-next", 14, weekday_next)
    b.fill(K, "month-next", 20, month_next)
    b.fill(K, "weekday-offset", 20, weekday_offset)
    b.fill(K, "days-in-month", 20, days_in_month)
    b.fill(K, "days-in-year", 10, days_in_year)
    b.fill(K, "leap-year", 20, leap_year)
    b.fill(K, "date-plus-same-month", 12, date_plus(False))
    b.fill(K, "date-plus-next-month", 14, date_plus(True))
    b.fill(K, "weekday-of-date", 20, weekday_of_date)


# ---------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------

# (larger unit, plural, smaller unit plural, factor); a unit's definition, not a looked-up fact.
METRIC = [("kilometer", "kilometers", "meters", 1000), ("meter", "meters", "centimeters", 100),
          ("centimeter", "centimeters", "millimeters", 10),
          ("meter", "meters", "millimeters", 1000), ("kilogram", "kilograms", "grams", 1000),
          ("liter", "liters", "milliliters", 1000)]
TIME = [("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60),
        ("day", "days", "hours", 24), ("week", "weeks", "days", 7),
        ("year", "years", "months", 12), ("dozen", "dozen", "eggs", 12),
        ("hour", "hours", "seconds", 3600)]
UNIT_T = ["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}.",
          "{N} {big} is how many {small}?",
          "How many {small} are in {n} {big}? Answer with the number only.",
          "How many {small} is {n} {big}?"]
DOZEN_T = ["How many eggs are in {n} dozen?", "How many eggs is {n} dozen eggs?",
           "{N} dozen eggs is how many eggs? Answer with the number only."]
REVERSE_T = ["How many {big} are in {n} {small}?", "Convert {n} {small} to {big}.",
             "{N} {small} is how many {big}?",
             "How many {big} is {n} {small}? Answer with the number only."]
REVERSE_DOZEN_T = ["How many dozen is {n} eggs?", "{N} eggs make how many dozen?"]


def gen_units(b):
    rng = b.rng
    K = "units"

    def conv(table, amounts):
        def make():
            big1, big, small, f = pick(rng, table)
            n = pick(rng, amounts)
            n = Fraction(n)
            if big1 == "dozen":
                t = DOZEN_T
            else:
                t = UNIT_T
            if (n * f).denominator != 1:
                return None  # a whole number of the smaller unit
            s = fmt(n)
            bigw = big1 if n == 1 else big
            p = pick(rng, t).format(n=s, N=s, big=bigw, small=small)
            return {"prompt": p, "answers": num_answers(n * f), "check": "number",
                    "key": ("conv", big1, small, n)}
        return make

    def reverse():
        big1, big, small, f = pick(rng, METRIC + TIME)
        q = Fraction(rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 1.5, 2.5, 3.5, 4.5, 0.5, 0.25]))
        n = q * f
        if n.denominator != 1:
            return None
        t = REVERSE_DOZEN_T if big1 == "dozen" else REVERSE_T
        p = pick(rng, t).format(n=fmt(n), N=fmt(n), big=big, small=small)
        return {"prompt": p, "answers": num_answers(q), "check": "number",
                "key": ("rev", big1, small, n)}

    decimals = [Fraction(k, 2) for k in range(3, 20, 2)] + [Fraction(k, 4) for k in (1, 3, 5, 7)]
    b.fill(K, "metric-small", 25, conv(METRIC, list(range(2, 10))))
    b.fill(K, "time-small", 25, conv(TIME[:6], list(range(2, 10))))
    b.fill(K, "metric-2digit", 25, conv(METRIC, list(range(11, 100))))
    b.fill(K, "time-2digit", 25, conv(TIME, list(range(11, 100))))
    b.fill(K, "decimal", 25, conv(METRIC + TIME[:5], decimals))
    b.fill(K, "to-larger-unit", 25, reverse)


# ---------------------------------------------------------------------------------------------
# strings
# ---------------------------------------------------------------------------------------------

WORDS = dedup("""
dog cat sun cup hat pen box bus egg fox owl key map bed car cake fish frog lamp milk moon nest
rain ring rose ship star tree wolf bread cloud grape horse house knife mouse paper queen sheep
snake spoon storm sugar train water whale apple lemon ocean river tiger zebra table chair
garden window pencil rabbit monkey turtle candle planet rocket bottle basket butter cookie
dragon flower forest guitar hammer island jacket kitten ladder marble needle pepper pillow
puzzle saddle silver spider summer winter ticket tomato violin wallet yellow purple camera
doctor engine friend mirror morning picture teacher weather blanket chicken diamond elephant
giraffe holiday kitchen library mountain notebook octopus pumpkin sandwich umbrella vacation
strawberry butterfly chocolate dinosaur telephone yesterday bicycle balloon coffee letter puppy
carpet cabbage castle cable candy canvas carrot banana bandit banner barrel battle beach bean
bear beard
""".split())
# Single letters that also stand alone in ordinary English ("a", "I", "it's", "don't", "I'd",
# "I'm"): a "text" check on them would match by accident.
BAD_LETTERS = set("aistdm")
QUOTE = ["'{w}'", "\"{w}\"", "the word '{w}'", "the word \"{w}\""]


def gen_strings(b):
    rng = b.rng
    K = "strings"

    def q(w):
        return pick(rng, QUOTE).format(w=w)

    def first_letter():
        w = pick(rng, WORDS)
        if w[0] in BAD_LETTERS:
            return None
        t = ["What is the first letter of {q}?", "What letter does {q} start with?",
             "What is the first letter of {q}? Answer with one letter."]
        return {"prompt": pick(rng, t).format(q=q(w)), "answers": [w[0]], "check": "text",
                "key": ("first", w)}

    def last_letter():
        w = pick(rng, WORDS)
        if w[-1] in BAD_LETTERS:
            return None
        t = ["What is the last letter of {q}?", "What letter does {q} end with?",
             "What is the last letter of {q}? Answer with one letter."]
        return {"prompt": pick(rng, t).format(q=q(w)), "answers": [w[-1]], "check": "text",
                "key": ("last", w)}

    def letter_count():
        w = pick(rng, WORDS)
        t = ["How many letters are in {q}?", "How many letters does {q} have?",
             "Count the letters in {q}. Answer with the number only."]
        return {"prompt": pick(rng, t).format(q=q(w)), "answers": num_answers(len(w)),
                "check": "number", "key": ("len", w)}

    def count_letter(i):
        w = pick(rng, WORDS)
        # every other item a letter that occurs more than once
        c = pick(rng, sorted(x for x in set(w) if (w.count(x) > 1) == (i % 2 == 1)) or ["-"])
        if c == "-":
            return None
        t = ["How many times does the letter '{c}' appear in {q}?",
             "How many '{c}'s are in {q}?",
             "Count the letter '{c}' in {q}. Answer with the number only."]
        return {"prompt": pick(rng, t).format(c=c, q=q(w)), "answers": num_answers(w.count(c)),
                "check": "number", "key": ("count", w, c)}

    def reverse():
        w = pick(rng, WORDS)
        if len(w) > 7:
            return None
        t = ["Reverse {q}.", "Spell {q} backwards.", "What is {q} written backwards?",
             "Write {q} in reverse order. Answer with one word."]
        return {"prompt": pick(rng, t).format(q=q(w)), "answers": [w[::-1]], "check": "text",
                "key": ("rev", w)}

    def neighbour_letter():
        i = rng.randrange(1, 25)
        after = rng.random() < 0.5
        c = chr(ord("a") + i)
        ans = chr(ord(c) + (1 if after else -1))
        if ans in BAD_LETTERS:
            return None
        t = (["What letter comes after '{c}' in the alphabet?",
              "Which letter follows '{c}' in the alphabet?"] if after else
             ["What letter comes before '{c}' in the alphabet?",
              "Which letter is just before '{c}' in the alphabet?"])
        return {"prompt": pick(rng, t).format(c=c), "answers": [ans], "check": "text",
                "key": ("nb", c, after)}

    def alphabetical(prefix):
        def make(i):
            w1, w2 = pick(rng, WORDS), pick(rng, WORDS)
            if min(w1, w2) != [w1, w2][i % 2]:
                w1, w2 = w2, w1  # the gold word alternates between first and second
            shared = 0
            while shared < min(len(w1), len(w2)) and w1[shared] == w2[shared]:
                shared += 1
            if w1 == w2 or (shared >= 1) != prefix or w1.startswith(w2) or w2.startswith(w1):
                return None
            t = ["Which word comes first in alphabetical order: '{a}' or '{b}'?",
                 "Which comes first alphabetically, \"{a}\" or \"{b}\"?",
                 "In a dictionary, which word comes first: {a} or {b}? Answer with one word."]
            return {"prompt": pick(rng, t).format(a=w1, b=w2), "answers": [min(w1, w2)],
                    "check": "label", "labels": [w1, w2],
                    "key": ("alpha",) + tuple(sorted((w1, w2)))}
        return make

    b.fill(K, "first-letter", 24, first_letter)
    b.fill(K, "last-letter", 24, last_letter)
    b.fill(K, "letter-count", 24, letter_count)
    b.fill(K, "count-letter", 24, count_letter)
    b.fill(K, "reverse", 24, reverse)
    b.fill(K, "neighbour-letter", 20, neighbour_letter)
    b.fill(K, "alphabetical-easy", 20, alphabetical(False))
    b.fill(K, "alphabetical-shared-prefix", 20, alphabetical(True))


# ---------------------------------------------------------------------------------------------
# elements
# ---------------------------------------------------------------------------------------------

# Symbols that, lower-cased, are ordinary words or word fragments ("in", "as", "it's"): a "text"
# check on them would match by accident, so they are never the answer.
BAD_SYMBOLS = {"i", "s", "he", "be", "in", "as", "at", "no", "am", "re", "la", "ho", "pa", "ta",
               "es", "er", "pm", "md", "th", "po", "mo", "os"}
# Other accepted spellings of element names (British and older forms).
ELEMENT_ALIASES = {"aluminum": ["aluminium"], "sulfur": ["sulphur"], "cesium": ["caesium"],
                   "tungsten": ["wolfram"]}
# Well-known beyond the first 30: silver, tin, iodine, platinum, gold, mercury, lead, uranium.
FAMOUS_Z = set(range(1, 31)) | {47, 50, 53, 78, 79, 80, 82, 92}


def gen_elements(b):
    rng = b.rng
    K = "elements"
    els = sorted(((e.number, e.symbol, e.name) for e in periodictable.elements
                  if 1 <= e.number <= 103), key=lambda e: e[0])
    if len(els) != 103:
        die(f"periodictable lists {len(els)} elements 1..103")
    common = [e for e in els if e[0] in FAMOUS_Z]
    rare = [e for e in els if e[0] not in FAMOUS_Z]

    def symbol_of(pool):
        def make():
            z, sym, name = pick(rng, pool)
            if sym.lower() in BAD_SYMBOLS:
                return None
            t = ["What is the chemical symbol for {n}?", "What is the symbol of the element {n}?",
                 "What is the chemical symbol of {n}? Answer with the symbol only."]
            return {"prompt": pick(rng, t).format(n=name), "answers": [sym.lower()],
                    "check": "text", "key": ("sym", z)}
        return make

    def element_of(pool):
        def make():
            z, sym, name = pick(rng, pool)
            t = ["Which element has the chemical symbol {s}?",
                 "What element has the symbol {s}?",
                 "Which chemical element is {s}? Answer with the element name only."]
            return {"prompt": pick(rng, t).format(s=sym),
                    "answers": [name] + ELEMENT_ALIASES.get(name, []), "check": "text",
                    "key": ("el", z)}
        return make

    def atomic_number(pool):
        def make():
            z, sym, name = pick(rng, pool)
            t = ["What is the atomic number of {n}?", "What is the atomic number of {n}?",
                 "How many protons does an atom of {n} have?",
                 "What is the atomic number of {n}? Answer with the number only."]
            return {"prompt": pick(rng, t).format(n=name), "answers": num_answers(z),
                    "check": "number", "key": ("z", z)}
        return make

    b.fill(K, "symbol-common", 25, symbol_of(common))
    b.fill(K, "symbol-rare", 25, symbol_of(rare))
    b.fill(K, "name-from-symbol-common", 25, element_of(common))
    b.fill(K, "name-from-symbol-rare", 25, element_of(rare))
    b.fill(K, "atomic-number-common", 25, atomic_number(common))
    b.fill(K, "atomic-number-rare", 25, atomic_number(rare))


# ---------------------------------------------------------------------------------------------
# countries
# ---------------------------------------------------------------------------------------------

# Well-known countries (ISO alpha-2), asked about first: identities only, their facts come from
# the package.
FAMOUS = ["FR", "DE", "IT", "ES", "PT", "GB", "IE", "NL", "BE", "CH", "AT", "SE", "NO", "DK", "FI",
          "PL", "GR", "RU", "TR", "EG", "KE", "NG", "ZA", "MA", "CN", "JP", "KR", "IN", "TH",
          "VN", "ID", "AU", "NZ", "CA", "US", "MX", "BR", "AR", "PE", "CL", "CO", "CU"]
# Left out: territories and former states in the package's list, entries with a disputed
# capital, and Equatorial Guinea (capital being moved).
EXCLUDE = {"HK", "MO", "PR", "PS", "EH", "RE", "GP", "MQ", "GF", "NC", "PF", "CS", "AN", "IL",
           "GQ"}
# Where the package's capital is out of date or one of several: every accepted answer.
# KZ renamed Nur-Sultan back to Astana (2022); BI moved its capital to Gitega (2019); BO, LK,
# SZ and ZA have several capitals; common spellings for UA, MN, MM; "Washington D.C." as a word.
CAPITAL_OVERRIDE = {"KZ": ["astana", "nur-sultan", "nur sultan"], "BI": ["gitega", "bujumbura"],
                    "BO": ["sucre", "la paz"], "LK": ["sri jayawardenepura kotte", "kotte",
                                                      "colombo"],
                    "SZ": ["mbabane", "lobamba"], "ZA": ["pretoria", "cape town", "bloemfontein"],
                    "UA": ["kyiv", "kiev"], "MN": ["ulaanbaatar", "ulan bator"],
                    "MM": ["naypyidaw", "nay pyi taw", "naypyitaw"], "US": ["washington"]}
# Names as used in the questions (current or common English names).
RENAME = {"MK": "North Macedonia", "SZ": "Eswatini", "CZ": "Czech Republic",
          "TL": "East Timor", "CI": "Ivory Coast", "BS": "Bahamas", "GM": "Gambia"}
WITH_THE = {"BS", "GM", "NL", "US", "GB", "CZ", "PH", "AE", "CD", "CG", "CF", "DO", "MV", "SB"}
NAME_ALIASES = {"US": ["united states", "usa", "united states of america", "u.s.", "u.s.a."],
                "GB": ["united kingdom", "uk", "britain", "great britain", "england"],
                "CZ": ["czechia"], "NL": ["holland"], "CI": ["côte d'ivoire", "cote d'ivoire"],
                "TL": ["timor-leste", "timor leste"], "MK": ["macedonia"], "SZ": ["swaziland"],
                "CV": ["cabo verde"], "TR": ["türkiye", "turkiye"], "MM": ["burma"],
                "RU": ["russian federation"], "KR": ["republic of korea"],
                "CD": ["dr congo", "drc"]}
# Names contained in another country's name ("Sudan" in "South Sudan", "Guinea" in
# "Guinea-Bissau", "Republic of the Congo" in "Democratic Republic of the Congo"): a "text" check
# would accept the other country.
AMBIGUOUS_NAMES = {"SD", "GN", "CG", "CD", "NE"}
# Transcontinental, or put on a continent differently by different sources.
NO_CONTINENT = {"RU", "TR", "KZ", "GE", "AM", "AZ", "CY", "EG", "TT", "ID", "PA"}
# ISO codes that, lower-cased, are ordinary words ("it", "in", "no"): a "text" check would match
# them by accident.
BAD_CODES = {"am", "as", "at", "be", "by", "do", "id", "in", "is", "it", "me", "my", "no", "so",
             "to", "us", "ma", "pa", "ad", "al", "la", "ne", "re", "an", "go", "he", "hi", "of",
             "on", "or", "we", "ok"}


def load_countries():
    out = {}
    for key, v in sorted(CountryInfo.all().items()):
        a2 = (v.get("ISO") or {}).get("alpha2")
        cap = v.get("capital")
        if not a2 or a2 in EXCLUDE or key in ("burma", "wales", "scotland"):
            continue
        if not isinstance(cap, str) or not cap or "/" in cap:
            continue
        if (v.get("population") or 0) < 300_000:
            continue
        if a2 in out:
            die(f"countryinfo lists {a2} twice ({out[a2]['key']}, {key})")
        name = RENAME.get(a2, v["name"])
        display = ("the " if a2 in WITH_THE else "") + name
        region, sub, inter = v.get("region"), v.get("subregion"), v.get("intermediateregion")
        continent = None
        if region in ("Africa", "Asia", "Europe", "Oceania"):
            continent = region
        elif region == "Americas":
            if inter == "South America":
                continent = "South America"
            elif sub == "Northern America" or inter in ("Central America", "Caribbean"):
                continent = "North America"
        continents = [continent.lower()] if continent else []
        if inter == "Central America":
            continents.append("central america")  # a part of North America, commonly named
        out[a2] = {"key": key, "a2": a2, "name": name, "display": display,
                   "capital": CAPITAL_OVERRIDE.get(a2, aliases(cap)),
                   "capital_name": cap, "continent": continents,
                   "names": dedup(aliases(name) + NAME_ALIASES.get(a2, [])),
                   "population": v.get("population") or 0}
    for a2 in FAMOUS:
        if a2 not in out:
            die(f"countryinfo has no usable entry for {a2}")
    return out


def gen_countries(b):
    rng = b.rng
    K = "countries"
    cs = load_countries()
    famous = [cs[a] for a in FAMOUS]
    others = [c for a, c in sorted(cs.items()) if a not in FAMOUS]

    def capital(pool):
        def make():
            c = pick(rng, pool)
            t = ["What is the capital of {c}?", "What is the capital city of {c}?",
                 "Name the capital of {c}.", "Which city is the capital of {c}?",
                 "What is the capital of {c}? Answer with the city name only."]
            return {"prompt": pick(rng, t).format(c=c["display"]), "answers": c["capital"],
                    "check": "text", "key": ("cap", c["a2"])}
        return make

    def country_of_capital():
        c = pick(rng, famous) if rng.random() < 0.6 else pick(rng, others)
        cap = c["capital_name"]
        if c["a2"] in CAPITAL_OVERRIDE and c["a2"] not in ("UA", "US"):
            return None  # several or renamed capitals: no single city to ask about
        if c["a2"] in AMBIGUOUS_NAMES:
            return None
        if c["a2"] == "US":
            cap = "Washington, D.C."
        t = ["{cap} is the capital of which country?",
             "Which country has {cap} as its capital?",
             "Of which country is {cap} the capital? Answer with the country name only."]
        return {"prompt": pick(rng, t).format(cap=cap), "answers": c["names"], "check": "text",
                "key": ("country", c["a2"])}

    def continent():
        c = pick(rng, famous) if rng.random() < 0.5 else pick(rng, others)
        if not c["continent"] or c["a2"] in NO_CONTINENT or c["a2"] == "AU":
            return None
        t = ["Which continent is {c} in?", "On which continent is {c}?",
             "Which continent is {c} in? Answer with the continent name only."]
        return {"prompt": pick(rng, t).format(c=c["display"]),
                "answers": c["continent"], "check": "text",
                "key": ("cont", c["a2"])}

    def alpha2():
        c = pick(rng, famous) if rng.random() < 0.5 else pick(rng, others)
        code = c["a2"].lower()
        if code in BAD_CODES:
            return None
        t = ["What is the two-letter country code of {c}?",
             "What is the ISO alpha-2 code of {c}?",
             "What is the two-letter ISO country code for {c}? Answer with the code only."]
        return {"prompt": pick(rng, t).format(c=c["display"]), "answers": [code],
                "check": "text", "key": ("a2", c["a2"])}

    b.fill(K, "capital-famous", 35, capital(famous))
    b.fill(K, "capital-other", 40, capital(others))
    b.fill(K, "country-of-capital", 25, country_of_capital)
    b.fill(K, "continent", 30, continent)
    b.fill(K, "alpha2-code", 20, alpha2)


# ---------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------

POSITIVE = ["wonderful", "excellent", "amazing", "fantastic", "great", "brilliant", "superb",
            "delightful", "outstanding", "lovely"]
NEGATIVE = ["terrible", "awful", "horrible", "disappointing", "dreadful", "bad", "poor",
            "unpleasant", "miserable", "boring"]
SUBJECTS = ["movie", "hotel", "restaurant", "book", "concert", "phone", "service", "trip", "meal",
            "show", "game", "class"]
ANIMALS = ["a dog", "a cat", "a horse", "a cow", "a lion", "a tiger", "an eagle", "a shark",
           "a frog", "a snake", "a rabbit", "an elephant", "a dolphin", "an owl", "a bee",
           "an ant", "a wolf", "a bear", "a goat", "a salmon", "a parrot", "a camel", "a penguin",
           "a spider", "a zebra", "a turtle"]
PLANTS = ["an oak tree", "a rose", "a tulip", "a cactus", "a fern", "a daisy", "a sunflower",
          "a maple tree", "a pine tree", "a willow", "a lily", "an orchid", "a carrot",
          "a potato", "bamboo", "wheat", "grass", "moss", "an apple tree", "a dandelion",
          "ivy", "clover", "a palm tree", "lettuce", "a strawberry plant"]
TRICKY_ANIMALS = ["coral", "a sea anemone", "a sea sponge", "a sea cucumber", "a starfish",
                  "a jellyfish", "a sea squirt", "a sea pen"]
TRICKY_PLANTS = ["a Venus flytrap", "a sundew", "duckweed", "mistletoe", "a water lily",
                 "seagrass", "a bladderwort"]


def is_prime(n):
    return n >= 2 and all(n % p for p in range(2, int(n ** 0.5) + 1))


def gen_classification(b):
    rng = b.rng
    K = "classification"

    def even_odd(i):
        n = rng.randint(1, 99) if rng.random() < 0.5 else rng.randint(100, 99999)
        gold = "even" if n % 2 == 0 else "odd"
        if gold != ["even", "odd"][i % 2]:
            return None
        t = ["Is {n} even or odd?", "Is the number {n} odd or even?",
             "Is {n} an even or an odd number? Answer with one word."]
        return {"prompt": pick(rng, t).format(n=n), "answers": [gold], "check": "label",
                "labels": ["even", "odd"], "key": ("eo", n)}

    def prime(lo, hi):
        def make(i):
            gold = ["yes", "no"][i % 2]
            n = rng.randint(lo, hi)
            if is_prime(n) != (gold == "yes"):
                return None
            if gold == "no" and hi > 50 and (n % 2 == 0 or n % 3 == 0 or n % 5 == 0):
                return None  # hard composites only: no factor 2, 3 or 5
            t = ["Is {n} a prime number?", "Is {n} prime? Answer yes or no.",
                 "Is the number {n} prime?"]
            return {"prompt": pick(rng, t).format(n=n), "answers": [gold], "check": "label",
                    "labels": ["yes", "no"], "key": ("prime", n)}
        return make

    def art(word):
        return ("an " if word[0] in "aeiou" else "a ") + word

    def review(sentence, gold):
        t = ['Is this review positive or negative? "{s}"',
             'Review: "{s}" Is the sentiment positive or negative?',
             'What is the sentiment of this review: "{s}" Answer positive or negative.']
        return {"prompt": pick(rng, t).format(s=sentence), "answers": [gold], "check": "label",
                "labels": ["positive", "negative"], "key": ("sent", sentence)}

    def sentiment(i):
        gold = ["positive", "negative"][i % 2]
        adj = pick(rng, POSITIVE if gold == "positive" else NEGATIVE)
        verb = pick(rng, ["loved", "enjoyed", "adored"] if gold == "positive"
                    else ["hated", "disliked", "regretted"])
        s = pick(rng, SUBJECTS)
        forms = ["The {s} was {a}.", "I thought the {s} was {a}.", "What {aa} {s}!",
                 "I {v} the {s}."]
        sent = pick(rng, forms).format(s=s, a=adj, aa=art(adj), v=verb)
        return review(sent[0].upper() + sent[1:], gold)

    def sentiment_contrast(i):
        gold = ["positive", "negative"][i % 2]
        p, n, s = pick(rng, POSITIVE), pick(rng, NEGATIVE), pick(rng, SUBJECTS)
        if gold == "positive":
            forms = ["I expected the {s} to be {n}, but it was {p}.",
                     "At first the {s} seemed {n}, but in the end it was {p}.",
                     "Despite a slow start, the {s} was {p}.",
                     "The {s} was not {n} at all; it was {p}."]
        else:
            forms = ["I expected the {s} to be {p}, but it was {n}.",
                     "The {s} looked {p} at first, but it turned out to be {n}.",
                     "The {s} was not {p} at all.",
                     "I would never recommend this {s} to anyone."]
        return review(pick(rng, forms).format(s=s, p=p, n=n), gold)

    def animal_plant(animals, plants):
        def make(i):
            gold = ["animal", "plant"][i % 2]
            x = pick(rng, animals if gold == "animal" else plants)
            bare = x.split(" ", 1)[1] if x.startswith(("a ", "an ")) else x
            t = ["Is {x} an animal or a plant?", "Animal or plant: {b}?",
                 "Is {x} a plant or an animal? Answer with one word."]
            p = pick(rng, t).format(x=x, b=bare)
            return {"prompt": p[0].upper() + p[1:], "answers": [gold], "check": "label",
                    "labels": ["animal", "plant"], "key": ("ap", bare)}
        return make

    def larger_int(i):
        a = rng.randint(10, 999)
        digits = list(str(a))
        rng.shuffle(digits)
        if rng.random() < 0.6:
            c = int("".join(digits))  # the same digits in another order
        else:
            c = a + rng.choice([-1, 1]) * rng.randint(1, 30)
        if c == a or c < 10 or len(str(c)) != len(str(a)):
            return None
        big = rng.random() < 0.6
        gold = max(a, c) if big else min(a, c)
        if gold != [a, c][i % 2]:
            a, c = c, a  # the gold number alternates between first and second
        t = (["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
              "Which is greater, {a} or {b}? Answer with the number only."] if big else
             ["Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"])
        return {"prompt": pick(rng, t).format(a=a, b=c), "answers": [str(gold)],
                "check": "label", "labels": [str(a), str(c)],
                "key": ("cmp", big) + tuple(sorted((a, c)))}

    def larger_decimal(i):
        w = rng.randint(0, 9)
        x = Fraction(w) + Fraction(rng.randint(1, 9), 10)
        y = Fraction(w) + Fraction(rng.randint(11, 99), 100)
        if y.denominator != 100 or x == y:
            return None
        a, c = (x, y) if rng.random() < 0.5 else (y, x)
        big = rng.random() < 0.7
        gold = max(a, c) if big else min(a, c)
        if gold != [a, c][i % 2]:
            a, c = c, a
        t = (["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
              "Which is greater, {a} or {b}? Answer with the number only."] if big else
             ["Which is smaller, {a} or {b}?"])
        return {"prompt": pick(rng, t).format(a=fmt(a), b=fmt(c)), "answers": [fmt(gold)],
                "check": "label", "labels": [fmt(a), fmt(c)],
                "key": ("dcmp", big) + tuple(sorted((a, c)))}

    def true_false(i):
        gold = ["true", "false"][i % 2]
        if rng.random() < 0.5:
            a, c = rng.randint(2, 99), rng.randint(2, 99)
            if a == c:
                return None
            rel = pick(rng, ["greater than", "less than"])
            truth = (a > c) if rel == "greater than" else (a < c)
            claim = f"{a} is {rel} {c}"
        else:
            a, c = rng.randint(2, 50), rng.randint(2, 50)
            s = a + c + (0 if gold == "true" else rng.choice([-10, -2, -1, 1, 2, 10]))
            truth = s == a + c
            claim = f"{a} + {c} = {s}"
        if truth != (gold == "true"):
            return None
        t = ["True or false: {c}.", "Is it true or false that {c}?",
             "True or false: {c}. Answer with one word."]
        return {"prompt": pick(rng, t).format(c=claim), "answers": [gold], "check": "label",
                "labels": ["true", "false"], "key": ("tf", claim)}

    b.fill(K, "even-odd", 22, even_odd)
    b.fill(K, "prime-small", 12, prime(2, 50))
    b.fill(K, "prime-large", 14, prime(51, 500))
    b.fill(K, "sentiment", 18, sentiment)
    b.fill(K, "sentiment-contrast", 14, sentiment_contrast)
    b.fill(K, "animal-plant", 18, animal_plant(ANIMALS, PLANTS))
    b.fill(K, "animal-plant-tricky", 12, animal_plant(TRICKY_ANIMALS, TRICKY_PLANTS))
    b.fill(K, "larger-int", 10, larger_int)
    b.fill(K, "larger-decimal", 10, larger_decimal)
    b.fill(K, "true-false", 20, true_false)


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------

PEOPLE = ["Maria", "Tom", "Anna", "David", "Sofia", "James", "Lucas", "Emma", "Omar", "Priya",
          "Chen", "Fatima", "Carlos", "Olga", "Kenji", "Amara", "Lena", "Ivan", "Nadia", "Pedro",
          "Hannah", "Samuel", "Yuki", "Ahmed", "Clara", "Diego", "Elena", "Felix", "Hugo",
          "Irene", "Jonas", "Leila", "Marco", "Nina", "Oscar", "Tariq", "Vera", "Zara"]
SURNAMES = ["lopez", "smith", "novak", "tanaka", "okafor", "silva", "meyer", "kowalski", "haddad",
            "jensen", "rossi", "patel", "kim", "garcia", "ivanova", "moreau"]
CITIES = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Dublin", "Oslo",
          "Cairo", "Tokyo", "Seoul", "Lima", "Toronto", "Chicago", "Boston", "Denver", "Sydney",
          "Mumbai", "Nairobi", "Warsaw", "Athens", "Helsinki", "Istanbul", "Bangkok", "Manila",
          "Montreal", "Dallas", "Seattle", "Munich"]
THINGS = [("lamp", "lamps"), ("chair", "chairs"), ("jacket", "jackets"), ("clock", "clocks"),
          ("backpack", "backpacks"), ("kettle", "kettles"), ("camera", "cameras"),
          ("mirror", "mirrors"), ("rug", "rugs"), ("blender", "blenders"), ("book", "books"),
          ("umbrella", "umbrellas"), ("teapot", "teapots"), ("helmet", "helmets")]
BUILDINGS = ["museum", "library", "hotel", "bridge", "stadium", "theater", "school", "hospital"]
EVENTS = ["meeting", "concert", "class", "appointment", "interview", "party", "game", "lecture"]


def clock(h, m, pm):
    return f"{h}:{m:02d} {'pm' if pm else 'am'}"


def gen_extraction(b):
    rng = b.rng
    K = "extraction"

    def price():
        who, (thing, _), day = pick(rng, PEOPLE), pick(rng, THINGS), pick(rng, WEEKDAYS)
        p = rng.randint(5, 400)
        t = ["{w} paid {p} dollars for the {t} on {d}. How much did {w} pay?",
             "{w} bought a {t} for ${p} on {d}. How much did the {t} cost?",
             "On {d}, {w} spent {p} euros on a new {t}. How much did the {t} cost?",
             "The {t} that {w} bought on {d} cost {p} dollars. What was the price of the {t}?"]
        return {"prompt": pick(rng, t).format(w=who, t=thing, d=day, p=p),
                "answers": num_answers(p), "check": "number", "guard": False}

    def quantity():
        who, (one, many) = pick(rng, PEOPLE), pick(rng, THINGS)
        q, p = rng.randint(2, 12), rng.randint(15, 600)
        t = ["{w} bought {q} {m} for {p} dollars. How many {m} did {w} buy?",
             "For {p} euros, {w} ordered {q} {m}. How many {m} did {w} order?",
             "{w} bought {q} {m} for {p} dollars. How much did {w} pay?"]
        i = rng.randrange(len(t))
        ans = p if i == 2 else q
        return {"prompt": t[i].format(w=who, m=many, q=q, p=p), "answers": num_answers(ans),
                "check": "number", "guard": False}

    def year():
        y, n = rng.randint(1850, 2023), rng.randint(20, 900)
        if rng.random() < 0.5:
            bld, city = pick(rng, BUILDINGS), pick(rng, CITIES)
            t = "The {b} in {c} was built in {y} and has {n} seats. In what year was the {b} built?"
            p = t.format(b=bld, c=city, y=y, n=n)
        else:
            who, city = pick(rng, PEOPLE), pick(rng, CITIES)
            y = rng.randint(1930, 2010)
            t = "{w} was born in {c} in {y} and has {n} books. In what year was {w} born?"
            p = t.format(w=who, c=city, y=y, n=n)
        return {"prompt": p, "answers": num_answers(y), "check": "number", "guard": False}

    def city(i):
        who, day = pick(rng, PEOPLE), pick(rng, WEEKDAYS)
        c1, c2 = pick(rng, CITIES), pick(rng, CITIES)
        if c1 == c2:
            return None
        order = (c1, c2)  # the gold city alternates between first and second
        forms = [("{w} flew from {a} to {b} on {d}. Where did {w} fly to?", c2),
                 ("{w} flew from {a} to {b} on {d}. Which city did {w} leave from?", c1),
                 ("{w} lives in {a} but works in {b}. Where does {w} work?", c2),
                 ("{w} lives in {a} but works in {b}. In which city does {w} live?", c1),
                 ("The train left {a} at noon and reached {b} at night. "
                  "Where did the train arrive?", c2)]
        t, gold = pick(rng, [f for f in forms if f[1] == order[i % 2]])
        return {"prompt": t.format(w=who, a=c1, b=c2, d=day), "answers": [gold.lower()],
                "check": "label", "labels": [c1.lower(), c2.lower()]}

    def person(i):
        n1, n2 = pick(rng, PEOPLE), pick(rng, PEOPLE)
        (thing, _), day = pick(rng, THINGS), pick(rng, WEEKDAYS)
        if n1 == n2:
            return None
        order = (n1, n2)
        forms = [("{a} gave a {t} to {b} on {d}. Who received the {t}?", n2),
                 ("{a} gave a {t} to {b} on {d}. Who gave the {t}?", n1),
                 ("{a} called {b} on {d} to ask about the {t}. Who made the call?", n1),
                 ("{a} sold a {t} to {b} on {d}. Who bought the {t}?", n2),
                 ("{a} helped {b} fix a {t} on {d}. Who needed help?", n2)]
        t, gold = pick(rng, [f for f in forms if f[1] == order[i % 2]])
        return {"prompt": t.format(a=n1, b=n2, t=thing, d=day), "answers": [gold.lower()],
                "check": "label", "labels": [n1.lower(), n2.lower()]}

    def email():
        who, sur = pick(rng, PEOPLE), pick(rng, SURNAMES)
        addr = pick(rng, ["{f}.{s}@example.com", "{f}{s}@example.org", "{f}_{s}@mail.example.net"]
                    ).format(f=who.lower(), s=sur)
        phone = f"555-01{rng.randint(0, 99):02d}"
        t = ["You can reach {w} at {e} or at {ph}. What is {w}'s email address?",
             "For questions, write to {w} at {e}. What email address should you write to?",
             "{w}'s phone is {ph} and email is {e}. What is {w}'s email?"]
        return {"prompt": pick(rng, t).format(w=who, e=addr, ph=phone), "answers": [addr],
                "check": "text", "guard": False}

    def time_(i):
        ev, day = pick(rng, EVENTS), pick(rng, WEEKDAYS)
        h1 = rng.randint(8, 11)
        m1, m2 = rng.choice([0, 15, 30, 45]), rng.choice([0, 15, 30, 45])
        h2 = rng.randint(1, 5)
        s, e = clock(h1, m1, False), clock(h2, m2, True)
        starts, ends = f"{h1}:{m1:02d}", f"{h2}:{m2:02d}"
        order = (starts, ends)
        forms = [("The {ev} on {d} starts at {s} and ends at {e}. "
                  "When does the {ev} start?", starts),
                 ("The {ev} on {d} starts at {s} and ends at {e}. What time does it end?", ends)]
        t, gold = pick(rng, [f for f in forms if f[1] == order[i % 2]])
        return {"prompt": t.format(ev=ev, d=day, s=s, e=e), "answers": [gold], "check": "label",
                "labels": [starts, ends]}

    b.fill(K, "price", 20, price)
    b.fill(K, "quantity", 20, quantity)
    b.fill(K, "year", 20, year)
    b.fill(K, "city", 20, city)
    b.fill(K, "person", 20, person)
    b.fill(K, "email", 10, email)
    b.fill(K, "time", 10, time_)


# ---------------------------------------------------------------------------------------------

def main():
    if len(sys.argv) != 1:
        die("takes no arguments; it writes the set to standard output:\n"
            "  PYTHONPATH=/tmp/pydeps python3 scripts/make-confidence-set.py"
            " > examples/data/confidence-set.jsonl")
    rng = random.Random(SEED)
    b = Builder(rng)
    gens = {"arithmetic": gen_arithmetic, "dates": gen_dates, "units": gen_units,
            "strings": gen_strings, "elements": gen_elements, "countries": gen_countries,
            "classification": gen_classification, "extraction": gen_extraction}
    for k in KINDS:
        gens[k](b)

    # Split: whole kinds to test, else half of each sub-kind (seeded shuffle) to tune.
    split = [None] * len(b.items)
    groups = {}
    for i, it in enumerate(b.items):
        groups.setdefault((it["kind"], it["subkind"]), []).append(i)
    for (kind, _), idx in groups.items():
        if kind in TEST_ONLY_KINDS:
            for i in idx:
                split[i] = "test"
            continue
        order = list(idx)
        rng.shuffle(order)
        for j, i in enumerate(order):
            split[i] = "tune" if j < len(order) // 2 else "test"

    counters, out = {}, []
    counts = {}
    for it, sp in zip(b.items, split):
        k = it["kind"]
        counters[k] = counters.get(k, 0) + 1
        counts[(k, sp)] = counts.get((k, sp), 0) + 1
        obj = {"id": f"{k}-{counters[k]:04d}", "kind": k, "subkind": it["subkind"], "split": sp,
               "prompt": it["prompt"], "answers": it["answers"], "check": it["check"],
               "labels": it["labels"]}
        out.append(json.dumps(obj, ensure_ascii=False))
    sys.stdout.buffer.write(("\n".join(out) + "\n").encode("utf-8"))
    sys.stdout.buffer.flush()

    print(f"{'kind':<16}{'tune':>6}{'test':>6}{'all':>6}", file=sys.stderr)
    for k in KINDS:
        tu, te = counts.get((k, "tune"), 0), counts.get((k, "test"), 0)
        print(f"{k:<16}{tu:>6}{te:>6}{tu + te:>6}", file=sys.stderr)
    tu = sum(v for (k, s), v in counts.items() if s == "tune")
    te = sum(v for (k, s), v in counts.items() if s == "test")
    print(f"{'total':<16}{tu:>6}{te:>6}{tu + te:>6}", file=sys.stderr)


if __name__ == "__main__":
    main()
