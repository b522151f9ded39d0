#!/usr/bin/env python3
"""A second, independent check of the default confidence score (docs/confidence.md): 95 arithmetic
and fact questions written apart from examples/data/confidence-set.jsonl (other phrasings, other
facts), each asked exactly as a user would: `corral run --json --temperature 0 --max-tokens 12
QUESTION`. An answer is right when it contains the expected number or word(s). Prints the AUROC of
the calibrated score and of geometric_mean, and the accuracy of the 30% most confident answers.

    cargo build --release --workspace --all-targets && python3 scripts/eval-confidence-unseen.py

(~70 s on 2 cores; needs root: each answer comes from a sandboxed runner.)
"""

import json, os, random, re, subprocess

CORRAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "corral")
r = random.Random(7)
qs = []
for _ in range(25):
    a, b = r.randint(1, 9), r.randint(1, 9); qs.append((f"Compute {a} plus {b}.", [str(a+b)]))
for _ in range(15):
    a, b = r.randint(10, 60), r.randint(2, 9); qs.append((f"How much is {a} times {b}?", [str(a*b)]))
for _ in range(15):
    a, b = r.randint(20, 99), r.randint(1, 19); qs.append((f"What do you get if you take {b} away from {a}?", [str(a-b)]))
facts = [
 ("What is the largest planet in our solar system?", ["jupiter"]), ("How many legs does a spider have?", ["8", "eight"]),
 ("Who wrote Hamlet?", ["shakespeare"]), ("What is the chemical symbol for gold?", ["au"]),
 ("What is the freezing point of water in Fahrenheit?", ["32"]), ("How many days are there in a leap year?", ["366"]),
 ("What color do you get by mixing blue and yellow?", ["green"]), ("Which planet is closest to the sun?", ["mercury"]),
 ("What is the tallest mountain on Earth?", ["everest"]), ("What language is spoken in Brazil?", ["portuguese"]),
 ("How many sides does a hexagon have?", ["6", "six"]), ("What is the capital of Canada?", ["ottawa"]),
 ("What is the capital of Australia?", ["canberra"]), ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
 ("What is the boiling point of water in Celsius?", ["100"]), ("What gas do humans need to breathe?", ["oxygen"]),
 ("How many continents are there?", ["7", "seven"]), ("What is the largest ocean?", ["pacific"]),
 ("What is the square root of 81?", ["9", "nine"]), ("How many minutes are in an hour?", ["60", "sixty"]),
 ("In which country are the pyramids of Giza?", ["egypt"]), ("What is the currency of Japan?", ["yen"]),
 ("Who was the first president of the United States?", ["washington"]), ("What is the hardest natural substance?", ["diamond"]),
 ("How many strings does a standard guitar have?", ["6", "six"]), ("What is the capital of Italy?", ["rome"]),
 ("What animal is known as the ship of the desert?", ["camel"]), ("What is H2O commonly called?", ["water"]),
 ("How many hours are in two days?", ["48"]), ("Which organ pumps blood through the body?", ["heart"]),
 ("What is the smallest prime number?", ["2", "two"]), ("What is the capital of Spain?", ["madrid"]),
 ("What planet is known for its rings?", ["saturn"]), ("Which is the longest river in Africa?", ["nile"]),
 ("What do bees make?", ["honey"]), ("How many weeks are in a year?", ["52"]),
 ("What is the main language of Mexico?", ["spanish"]), ("What is the capital of Egypt?", ["cairo"]),
 ("Who discovered penicillin?", ["fleming"]), ("What is frozen water called?", ["ice"]),
]
qs += facts
def words(s): return re.findall(r"-?\d+(?:\.\d+)?|[a-z]+", s.lower())
rows = []
for q, ans in qs:
    out = subprocess.run([CORRAL, "run", "--json", "--temperature", "0", "--max-tokens", "12", q], capture_output=True, text=True)
    d = json.loads(out.stdout)
    ws = words(d["text"]); t = " ".join(ws)
    ok = any((a in ws) if a.replace('-','').isdigit() else (f" {a} " in f" {t} ") for a in ans)
    rows.append((ok, d["confidence"]["score"] or 0.0, d["confidence"]["scores"]["geometric_mean"] or 0.0, q, d["text"]))
def auroc(s, l):
    pos = [x for x, y in zip(s, l) if y]; neg = [x for x, y in zip(s, l) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
l = [r[0] for r in rows]
print(len(rows), "questions,", sum(l), "right")
print("calibrated AUROC", round(auroc([r[1] for r in rows], l), 3), " geometric_mean AUROC", round(auroc([r[2] for r in rows], l), 3))
top = sorted(rows, key=lambda r: -r[1])[:int(len(rows)*0.3)]
print("accuracy of the 30% most confident (calibrated):", round(sum(r[0] for r in top)/len(top), 3))
for r in sorted(rows, key=lambda r: -r[1])[:12]: print(r[0], round(r[1],3), r[3], '->', repr(r[4]))
