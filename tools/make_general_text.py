"""Writes the general-text evaluation set of eval-fidelity: English prose from no training
domain, all from Debian packages (no download beyond `apt-get download`):

- `debian-handbook` (en-US HTML, tags stripped): modern expository prose, a book;
- `dict-devil`: Ambrose Bierce's "The Devil's Dictionary" (1911), literary English;
- `fortunes`: quotations and jokes from the fortune files that hold prose (art, education,
  literature, love, people, science, wisdom, ...).

Documents of the three sources are interleaved, so an evenly spaced slice (eval-fidelity
--max-sequences) draws from all of them. No training run uses these packages.

    python3 tools/make_general_text.py OUT.jsonl [WORK_DIR]
"""
import glob
import gzip
import html
import json
import os
import re
import subprocess
import sys

PACKAGES = ["debian-handbook", "dict-devil", "fortunes"]
FORTUNE_FILES = ["art", "education", "food", "humorists", "literature", "love", "medicine",
                 "people", "pets", "politics", "science", "songs-poems", "wisdom", "work"]
CHUNK = 4000


def unpack(work):
    root = os.path.join(work, "root")
    if not os.path.isdir(root):
        os.makedirs(work, exist_ok=True)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=work, check=True)
        for deb in glob.glob(os.path.join(work, "*.deb")):
            subprocess.run(["dpkg", "-x", deb, root], check=True)
    return root


def chunks(text):
    """Paragraph-aligned pieces of about CHUNK characters."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if len(cur) + len(para) > CHUNK and cur:
            out.append(cur)
            cur = ""
        cur += para + "\n\n"
    if cur.strip():
        out.append(cur)
    return out


def is_prose(paragraph):
    """A paragraph of sentences: eight words or more, ending as a sentence ends."""
    return len(paragraph.split()) >= 8 and paragraph[-1] in '.!?:"”)' and not paragraph.startswith(("#", "$"))


def handbook(root):
    docs = []
    pages = sorted(glob.glob(os.path.join(root, "usr/share/doc/debian-handbook/html/en-US/*.html")))
    for page in pages:
        raw = open(page, encoding="utf-8", errors="replace").read()
        body = re.sub(r"(?s)<(script|style|head).*?</\1>", " ", raw)
        body = re.sub(r"(?i)</(p|div|h\d|li|pre|tr)>", "\n\n", body)
        text = html.unescape(re.sub(r"<[^>]+>", " ", body))
        paras = (re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n"))
        # prose only: no navigation, headings, tables of contents or command listings
        text = "\n\n".join(p for p in paras if is_prose(p))
        docs.extend(c for c in chunks(text) if len(c) > 1000)
    return docs


def devil(root):
    text = gzip.open(os.path.join(root, "usr/share/dictd/devil.dict.dz"), "rt", errors="replace").read()
    return chunks(text)


def fortunes(root):
    docs = []
    for name in FORTUNE_FILES:
        path = os.path.join(root, "usr/share/games/fortunes", name)
        if os.path.exists(path):
            text = open(path, encoding="utf-8", errors="replace").read().replace("\n%\n", "\n\n")
            docs.extend(chunks(text))
    return docs


def main():
    out = sys.argv[1]
    work = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(out) or ".", "general-text-debs")
    root = unpack(work)
    sources = [handbook(root), devil(root), fortunes(root)]
    mixed = []
    for i in range(max(map(len, sources))):
        for s in sources:
            if i < len(s):
                mixed.append(s[i])
    with open(out + ".tmp", "w") as f:
        for d in mixed:
            f.write(json.dumps({"text": d}) + "\n")
    os.replace(out + ".tmp", out)
    print(f"{out}: {len(mixed)} documents ({', '.join(str(len(s)) for s in sources)} from {', '.join(PACKAGES)}), "
          f"{sum(map(len, mixed)) / 1e6:.1f} M characters")


if __name__ == "__main__":
    main()
