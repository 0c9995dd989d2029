"""Where a model's yes/no answers come from: accuracy per question template on easy-VQA.

    python bench/yes_no_breakdown.py RUN VAL_MANIFEST [--limit 600] [--cache DIR] [--caption-in-words]

Splits the yes/no questions by polarity ("is there a red shape?" vs "is there not a red shape?"), by what
they ask about (a colour or a shape) and by the true answer. A model that reads the image scores alike in
every row; one that answers from the question's words alone (easy-VQA: positive questions are mostly
"no", negated ones mostly "yes") scores 100% on the common rows and 0% on the rare ones.
`--caption-in-words` puts each image's caption before its question (a diagnostic for a model trained
that way: does the LM compare words when the image is given as text?).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re

from qvlm.data.records import load_records
from qvlm.eval.evaluate import evaluate_vqa
from qvlm.models.vlm import QVLM

COLOURS = r"\b(red|green|blue|black|gray|grey|yellow|teal|brown)\b"


def template(question: str, answer: str) -> str:
    words = f" {question} "
    polarity = "negated" if " not " in words or " no " in words else "positive"
    about = "colour" if re.search(COLOURS, question) else "shape"
    return f"{polarity} {about} question, answer {answer}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("manifest")
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--cache", default=None, help="feature cache folder (as train.feature_cache)")
    parser.add_argument("--caption-in-words", action="store_true")
    args = parser.parse_args()

    records = load_records(args.manifest)
    questions = [r for r in records if r.answer_type == "yes/no"][:args.limit]
    if args.caption_in_words:
        caption = {r.image_path: r.captions[0] for r in records if r.captions}
        questions = [dataclasses.replace(r, question=f"{caption[r.image_path]}. {r.question}") for r in questions]
    result = evaluate_vqa(QVLM.from_pretrained(args.run), questions, batch_size=32, cache=args.cache,
                          max_new_tokens=4)
    rows = collections.defaultdict(lambda: [0, 0])
    for p in result["predictions"]:
        question = p["question"].split(". ", 1)[-1]  # without a caption put in front
        row = rows[template(question, p["answers"][0])]
        row[0] += p["prediction"] == p["answers"][0]
        row[1] += 1
    summary = {"run": args.run, "n": result["n"], "yes_no_accuracy": round(result["exact_match"], 4),
               "by_template": {k: f"{right}/{n}" for k, (right, n) in sorted(rows.items())}}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
