"""Writes data/prompts/train.txt: the chat prompts whose dense answers become the self-data
corpus (`skipgpt self-data`). Written for this project: instruction templates crossed with
topic lists, in a fixed order (no randomness, no download). data/prompts/eval.txt, the
generation check's prompts, is written by hand and shares no topic with these lists.

    python3 tools/make_prompts.py > data/prompts/train.txt
"""

EXPLAIN = [
    "photosynthesis", "how vaccines work", "inflation", "the water cycle", "compound interest",
    "how a bicycle stays upright", "why leaves change color in autumn", "how airplanes fly",
    "what a black hole is", "how the internet works", "supply and demand", "how batteries store energy",
    "the difference between weather and climate", "how memory works in the brain", "what DNA does",
    "how a refrigerator keeps food cold", "why the sky is blue", "how earthquakes happen",
    "what an algorithm is", "how bees make honey", "the greenhouse effect", "how a camera works",
    "why we sleep", "how tides work", "what a democracy is", "how muscles grow",
    "how recycling works", "what a credit score is", "how rainbows form", "how volcanoes erupt",
]
TIPS = [
    "learning a new language", "saving money", "sleeping better", "studying for exams",
    "staying focused while working from home", "making friends in a new city", "running a first marathon",
    "keeping houseplants alive", "writing a good resume", "reducing stress", "cooking healthy meals on a budget",
    "public speaking", "organizing a small kitchen", "traveling with children", "starting a vegetable garden",
    "taking better photos with a phone", "preparing for a job interview", "drinking more water",
    "reading more books", "keeping a journal",
]
STORIES = [
    "a lighthouse keeper who finds a message in a bottle", "a cat that wants to become a chef",
    "two friends lost in a snowy forest", "a girl who can talk to trees", "an old clock that stops time",
    "a dragon afraid of the dark", "a boy who builds a boat from scraps", "a city where it never rains",
    "a librarian who discovers a secret door", "a fox and a crow who start a bakery",
    "a musician who loses her hearing", "the last tree on a distant planet",
    "a grandmother's recipe that grants wishes", "a small town's first snowfall",
    "a detective who solves crimes with smells",
]
COMPARE = [
    ("cats", "dogs as pets"), ("trains", "planes for long trips"), ("tea", "coffee"),
    ("renting", "buying a home"), ("e-books", "paper books"), ("solar power", "wind power"),
    ("city life", "country life"), ("walking", "cycling to work"), ("summer", "winter holidays"),
    ("public schools", "homeschooling"), ("email", "phone calls at work"), ("frogs", "toads"),
]
CODE = [
    "reverse a string in Python", "read a text file line by line in Python",
    "count the words in a sentence in Python", "check whether a number is prime in Python",
    "find the largest number in a list in Python", "write a for loop in JavaScript",
    "remove duplicates from a list in Python", "convert Celsius to Fahrenheit in Python",
    "sort a dictionary by its values in Python", "create a simple class in Python",
    "compute the average of a list of numbers in Python", "write a function that adds two numbers in C",
]
QUESTIONS = [
    "What is the capital of Australia, and why was it chosen?", "How many planets are in the solar system?",
    "Who was Marie Curie?", "What causes the seasons on Earth?", "Why do we have leap years?",
    "What is the tallest mountain in the world?", "How do fish breathe underwater?",
    "What are the primary colors?", "Why is exercise good for the heart?", "How does a compass work?",
    "What is the difference between a virus and a bacterium?", "Why do cats purr?",
    "What was the Renaissance?", "How are clouds formed?", "What does a judge do?",
    "Why is the ocean salty?", "How long does it take light from the Sun to reach Earth?",
    "What is a haiku?", "Why do onions make people cry?", "What is the speed of sound?",
]


def main():
    prompts = []
    for t in EXPLAIN:
        prompts.append(f"Explain {t} in simple terms.")
        prompts.append(f"Can you explain {t} to a ten-year-old?")
    for t in TIPS:
        prompts.append(f"Give me three tips for {t}.")
        prompts.append(f"What are the most common mistakes people make when {t}?")
    for t in STORIES:
        prompts.append(f"Write a short story about {t}.")
        prompts.append(f"Write a short poem about {t}.")
    for a, b in COMPARE:
        prompts.append(f"What are the pros and cons of {a} versus {b}?")
    for t in CODE:
        prompts.append(f"How do I {t}?")
    prompts.extend(QUESTIONS)
    for p in prompts:
        print(p)


if __name__ == "__main__":
    main()
