#!/usr/bin/env python3
"""Writes qlora-ft's default training data and trains its tokenizer.

Outputs, next to this script:
  data.jsonl      about 1200 instruction examples in the Alpaca shape {"instruction", "input",
                  "output"}: small tasks with templated answers (arithmetic, word games, unit
                  conversions, opposites, counting, sorting, days and months), written for this
                  project (CC0, see README.md). A tiny randomly initialised model learns their
                  templates quickly, so the loss of the default run visibly falls within minutes.
  tokenizer.json  byte-level BPE trained on the rendered examples: vocabulary 512, ByteLevel
                  pre-tokenizer and decoder, special tokens <pad> (0), <s> (1, BOS) and </s>
                  (2, EOS), and a TemplateProcessing post-processor "<s> $A </s>" so that both
                  BOS and EOS can be read from tokenizer.json alone (libqlora takes BOS as the
                  first token the template puts before the text and EOS as the last one after it).

Usage: python3 examples/qlora-ft/default/make_default_data.py  (needs `pip install tokenizers`)
Deterministic: the same files for a given Python and `tokenizers` version.
"""
import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20240611
VOCAB_SIZE = 512
SPECIALS = ["<pad>", "<s>", "</s>"]

# The QLoRA repository's Alpaca templates (the prompt; the output follows it).
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")

WORDS = ("apple river garden window candle pencil rabbit orange silver planet bottle forest yellow "
         "rocket basket lemon tiger cloud stone bridge castle dragon flower hammer island jacket kitten "
         "ladder marble needle ocean pepper quiet rain sugar tunnel violet wagon zebra anchor button "
         "carpet dinner engine feather guitar honey insect jungle kettle lizard mirror nest onion parrot "
         "puzzle robot salad tomato umbrella valley walnut yogurt cookie mountain paper spoon table "
         "chair music piano summer winter spring autumn horse mouse cheese bread butter water coffee "
         "shadow pillow blanket camera letter number school teacher doctor farmer sailor").split()

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
             ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
             ("high", "low"), ("long", "short"), ("loud", "quiet"), ("new", "old"), ("rich", "poor"),
             ("strong", "weak"), ("thick", "thin"), ("wet", "dry"), ("young", "old"), ("push", "pull"),
             ("inside", "outside"), ("above", "below"), ("first", "last"), ("day", "night"),
             ("win", "lose"), ("begin", "end"), ("clean", "dirty"), ("true", "false"), ("near", "far"),
             ("heavy", "light")]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

# (from unit, to unit, factor)
CONVERSIONS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
               ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("liters", "milliliters", 1000),
               ("days", "hours", 24), ("weeks", "days", 7), ("feet", "inches", 12), ("dollars", "cents", 100)]

# Colours of things, written for this dataset.
COLOURS = [("a ripe banana", "yellow"), ("fresh grass", "green"), ("a clear daytime sky", "blue"),
           ("snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"),
           ("a lime", "green"), ("milk", "white"), ("a carrot", "orange"), ("a strawberry", "red"),
           ("a blueberry", "blue"), ("chocolate", "brown"), ("a lemon", "yellow"), ("a plum", "purple")]


def make_examples(rng):
    ex = []

    def add(instruction, input_text, output):
        ex.append({"instruction": instruction, "input": input_text, "output": output})

    for _ in range(190):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        add(f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}.")
    for _ in range(150):
        a, b = rng.randint(10, 99), rng.randint(1, 99)
        a, b = max(a, b), min(a, b)
        add(f"What is {a} minus {b}?", "", f"{a} minus {b} is {a - b}.")
    for _ in range(110):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        add(f"What is {a} times {b}?", "", f"{a} times {b} is {a * b}.")
    for _ in range(80):
        w = rng.choice(WORDS)
        add("Reverse the letters of the word.", w, f"The word {w} reversed is {w[::-1]}.")
    for _ in range(70):
        w = rng.choice(WORDS)
        add("Spell the word letter by letter.", w, "-".join(w))
    for _ in range(60):
        w = rng.choice(WORDS)
        add("Write the word in capital letters.", w, w.upper())
    for _ in range(80):
        w = rng.choice(WORDS)
        add(f"How many letters are in the word {w}?", "", f"The word {w} has {len(w)} letters.")
    for _ in range(90):
        w = rng.choice(WORDS)
        letter = rng.choice(sorted(set(w)))
        count = w.count(letter)
        add(f"How many times does the letter {letter} appear in {w}?", "",
            f"The letter {letter} appears {count} time{'s' if count != 1 else ''} in {w}.")
    for _ in range(140):
        frm, to, factor = rng.choice(CONVERSIONS)
        n = rng.randint(2, 20)
        add(f"Convert {n} {frm} to {to}.", "", f"{n} {frm} is {n * factor} {to}.")
    for _ in range(120):
        nums = rng.sample(range(1, 100), 3)
        add("Sort these numbers from smallest to largest.", ", ".join(map(str, nums)),
            ", ".join(map(str, sorted(nums))))
    for _ in range(90):
        nums = rng.sample(range(1, 100), 2)
        add(f"Which is larger, {nums[0]} or {nums[1]}?", "", f"{max(nums)} is larger than {min(nums)}.")
    for _ in range(90):
        n = rng.randint(1, 199)
        add(f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}.")
    for _ in range(50):
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        add(f"What is the opposite of {a}?", "", f"The opposite of {a} is {b}.")
    for _ in range(60):
        d = rng.randrange(7)
        k = rng.randint(1, 6)
        if k == 1:
            add(f"What day comes after {DAYS[d]}?", "", f"The day after {DAYS[d]} is {DAYS[(d + 1) % 7]}.")
        else:
            add(f"What day is {k} days after {DAYS[d]}?", "",
                f"{k} days after {DAYS[d]} is {DAYS[(d + k) % 7]}.")
    for _ in range(40):
        m = rng.randrange(12)
        add(f"Which month comes after {MONTHS[m]}?", "", f"The month after {MONTHS[m]} is {MONTHS[(m + 1) % 12]}.")
    for _ in range(30):
        thing, colour = rng.choice(COLOURS)
        add(f"What colour is {thing}?", "", f"{thing[0].upper() + thing[1:]} is {colour}.")
    for _ in range(40):
        w = rng.choice(WORDS)
        add("What is the first letter of the word?", w, f"The first letter of {w} is {w[0]}.")

    # Drop repeated questions (keeping the first) so every example is distinct.
    seen, unique = set(), []
    for e in ex:
        key = (e["instruction"], e["input"])
        if key not in seen:
            seen.add(key)
            unique.append(e)
    rng.shuffle(unique)
    return unique


def render(e):
    template = PROMPT_INPUT if e["input"] else PROMPT_NO_INPUT
    return template.format(**e) + e["output"]


def train_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A $B:1 </s>:1",
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    return tok


def main():
    rng = random.Random(SEED)
    examples = make_examples(rng)
    with open(os.path.join(HERE, "data.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    tok = train_tokenizer([render(e) for e in examples])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    tok.save(os.path.join(HERE, "tokenizer.json"))
    print(f"{len(examples)} examples, vocabulary {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
