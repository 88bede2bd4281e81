"""The tree page (treepo/rollout/viz.py): what a reader sees must be in it, readable and safe.

Structure tests parse the page with html.parser (so they see what a browser sees: attributes and text
unescaped) for hand-made trees whose "tokens" decode to text with special tokens, `<script>` and
quotes. The browser test renders the page in headless Chromium when /usr/bin/chromium exists (skipped
otherwise, as in CI): a screenshot that is not blank, and the DOM after the page's script ran with a
path picked through the address.
"""
from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import pytest
from trainer_fixtures import tiny_checkpoint
from tree_cases import KINDS, build_tree, random_tree

from treepo.rollout.viz import BOX, SNIPPET, _reward_color, clean, outline, trees_html

WORDS = {3: "Let's", 4: " add", 5: ' "7"', 6: " and 5", 7: "<script>alert('x')</script>", 8: " = 12.",
         9: " \\boxed{12}", 10: " <|im_end|>", 11: " O'Brien & co", 12: " think\n\nagain", 13: " wait"}
RED, YELLOW, GREEN = "hsl(0,70%,82%)", "hsl(60,70%,82%)", "hsl(120,70%,82%)"
SPECIAL_ID = 2  # a special token: dropped by the tokenizer-like decode when skip_special_tokens=True


def decode_plain(ids):
    """A decode without skip_special_tokens: special tokens come back as text."""
    return "".join("<|endoftext|>" if i == SPECIAL_ID else WORDS.get(i, f" w{i}") for i in ids)


class Tokenizer:
    def __init__(self):
        self.calls = []

    def decode(self, ids, skip_special_tokens=False):
        self.calls.append(skip_special_tokens)
        return decode_plain([i for i in ids if not (skip_special_tokens and i == SPECIAL_ID)])


def hand_tree():
    """prompt -> #1 -> {#2 -> {#4, #5}, #3, #6}: leaves #3 #4 #5 #6 (in that order), #6 a fallback
    segment of one special token, #3 ends with `<|im_end|>` and a special token."""
    edges = [(0, [3, 4, 5, 6], False), (1, [7, 8], False), (1, [9, 10, SPECIAL_ID], False),
             (2, [11, 12], False), (2, [13], False), (1, [SPECIAL_ID], True)]
    return build_tree([3, 4, SPECIAL_ID, 5], edges, random.Random(0))


class Page(HTMLParser):
    """Collects the node boxes, the leaf rows and the scripts of a page (text unescaped)."""

    def __init__(self, page):
        super().__init__()
        self.nodes, self.rows, self.scripts, self.stack = {}, [], [], []  # nodes: of the last tree, by id
        self.tag_attrs, self.boxes = [], 0
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tag_attrs.append((tag, a))
        cls = a.get("class") or ""
        if tag == "div" and "node" in cls.split():
            self.nodes[int(a["data-n"])] = {"attrs": a, "meta": "", "txt": ""}
            self.cur_node = int(a["data-n"])
            self.boxes += 1
        if tag == "tr" and "data-n" in a:
            self.rows.append({"node": int(a["data-n"]), "cells": []})
        if tag == "td" and self.rows:
            self.rows[-1]["cells"].append("")
        self.stack.append((tag, cls))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        tags = [t for t, _ in self.stack]
        classes = [c for _, c in self.stack]
        if tags and tags[-1] == "script":
            self.scripts.append(data)
        elif "txt" in classes:
            self.nodes[self.cur_node]["txt"] += data
        elif "meta" in classes:
            self.nodes[self.cur_node]["meta"] += data
        elif "td" in tags and self.rows and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1] += data


def snip(text):
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "..."


@pytest.mark.parametrize("decode_kind", ["tokenizer", "plain"])
def test_page_shows_each_node_and_leaf_readably(decode_kind):
    tree = hand_tree()
    tok = Tokenizer()
    decode = tok.decode if decode_kind == "tokenizer" else decode_plain
    rewards = [1.0, 0.0, -1.0, 0.5]
    advantages = [0.25, -0.5, -1.25, 0.0]
    assert len(tree.leaves) == len(rewards)
    page = trees_html([tree], decode, [rewards], ['prompt "<q>"'], [advantages])
    p = Page(page)
    if decode_kind == "tokenizer":
        assert tok.calls and all(tok.calls)  # skip_special_tokens=True on every decode

    # every node is a box with the (escaped, special-token-free) start of its segment as text
    assert sorted(p.nodes) == [n.id for n in tree.nodes]
    for n in tree.nodes[1:]:
        seg = clean(decode_plain([i for i in n.token_ids if i != SPECIAL_ID]))
        box = p.nodes[n.id]
        assert box["txt"] == (snip(seg) or "(no text)")
        assert box["attrs"]["title"] == seg  # the whole segment on hover, unescaped by the parser
        assert box["attrs"]["data-p"] == str(n.parent)
        assert f"#{n.id}" in box["meta"] and f"d{n.depth}" in box["meta"] and f"{len(n.token_ids)} tok" in box["meta"]
    assert p.nodes[6]["meta"] == "#6 · d2 · 1 tok · eos · r=0.5 · fallback" and p.nodes[6]["txt"] == "(no text)"
    assert p.nodes[4]["meta"] == "#4 · d3 · 2 tok · eos · r=0" and p.nodes[2]["meta"] == "#2 · d2 · 2 tok"
    assert p.nodes[3]["txt"] == "\\boxed{12}"
    assert p.nodes[0]["txt"] == 'prompt "<q>"'

    # the leaf panel: one row per leaf with node, depth, tokens, finish, reward, advantage, fallback, text
    assert [r["node"] for r in p.rows] == [leaf.path[-1] for leaf in tree.leaves]
    for leaf, row, r, a in zip(tree.leaves, p.rows, rewards, advantages):
        text = clean(decode_plain([i for i in leaf.token_ids if i != SPECIAL_ID])).strip()
        assert row["cells"] == [str(tree.leaves.index(leaf)), f"#{leaf.path[-1]}", str(leaf.depth),
                                str(len(leaf.token_ids)), leaf.finish_reason, f"{r:g}", f"{a:+.3f}",
                                "yes" if leaf.from_fallback else "", text]
    assert p.rows[2]["cells"][-1] == "Let's add \"7\" and 5<script>alert('x')</script> = 12. wait"

    # special tokens hidden, text escaped, nothing from outside the file
    assert "<|" not in page and "&lt;|" not in page and "im_end" not in page and "endoftext" not in page
    assert page.count("<script") == 1 and len(p.scripts) == 1 and "&lt;script&gt;alert" in page
    assert "O&#x27;Brien &amp; co" in page
    assert not re.search(r"\b(src|href)=|url\(|@import|https?://(?!www\.w3\.org/2000/svg)", page)
    assert page.rstrip().endswith("</html>")


def test_existing_callers_and_bad_input():
    rng = random.Random(1)
    trees = [random_tree(rng, "random"), random_tree(rng, "fallback0")]
    p = Page(trees_html(trees))  # no decode: token ids; no rewards: no reward cells
    assert p.boxes == sum(len(t.nodes) for t in trees)
    assert all(row["cells"][5] == row["cells"][6] == "" for row in p.rows)
    n = trees[1].nodes[1]
    assert p.nodes[1]["attrs"]["title"] == " ".join(map(str, n.token_ids))
    page = trees_html(trees, decode_plain, [[0.0] * len(t.leaves) for t in trees], prompts_text=["a", "b"])
    assert page.count('<section class="tree"') == 2
    with pytest.raises(ValueError, match="rewards has 1 lists for 2 trees"):
        trees_html(trees, rewards=[[1.0]])
    with pytest.raises(ValueError, match=r"advantages\[1\] has 1 values for tree 1's"):
        trees_html(trees, advantages=[[0.0] * len(trees[0].leaves), [0.0]])
    with pytest.raises(ValueError, match="prompts_text has 1 entries"):
        trees_html(trees, prompts_text=["a"])


@pytest.mark.parametrize("kind", KINDS)
def test_boxes_fit_the_page_and_never_overlap(kind):
    rng = random.Random(7)
    for _ in range(5):
        tree = random_tree(rng, kind)
        p = Page(trees_html([tree]))
        columns: dict[float, list[float]] = {}
        for nid, box in p.nodes.items():
            style = dict(kv.split(":", 1) for kv in box["attrs"]["style"].split(";"))
            left, width = float(style["left"].rstrip("%")), float(style["width"].rstrip("%"))
            assert 0 <= left and left + width < 100
            columns.setdefault(left, []).append(float(style["top"].rstrip("px")))
        assert len(columns) == max(n.depth for n in tree.nodes) + 1
        assert all(p.nodes[n.id]["txt"] == "(empty)" for n in tree.nodes[1:] if not n.token_ids)
        for tops in columns.values():
            tops.sort()
            assert all(b - a >= BOX for a, b in zip(tops, tops[1:]))


def test_reward_colours():
    assert [_reward_color(r, -1.0, 1.0) for r in (-1.0, 0.0, 1.0)] == [RED, YELLOW, GREEN]
    assert [_reward_color(r, r, r) for r in (-1.0, 0.0, 1.0)] == [RED, YELLOW, GREEN]  # all equal: the sign
    tree = hand_tree()
    page = trees_html([tree], rewards=[[-1.0] * len(tree.leaves)])
    assert "reward -1 (every leaf)" in page and page.count(f"background:{RED}") == 2 * len(tree.leaves) + 1
    page = trees_html([tree, tree], rewards=[[-1.0] * 4, [0.0, 1.0, 0.0, 0.0]])  # one scale for the page
    assert 'reward -1<span class="grad"></span>1' in page and page.count(f"background:{GREEN}") == 2


def test_outline_hides_special_tokens():
    text = outline(hand_tree(), Tokenizer().decode)
    assert "im_end" not in text and "endoftext" not in text and "<script>" in text


def test_cli_sample_tree_writes_the_page_with_rewards(tmp_path, capsys):
    from treepo.cli import main

    model, page = tiny_checkpoint(str(tmp_path / "model")), tmp_path / "tree.html"
    main(["sample", "--tree", "--model", model, "--raw", "--prompt", "abc", "-n", "4", "--max-tokens", "8",
          "--segment-len", "4", "--depth", "2", "--answer", "7", "--html", str(page)])
    out = capsys.readouterr().out
    assert out.count("--- leaf") == 4 and out.count("reward -1, advantage +0.000") == 4  # no leaf says 7
    p = Page(page.read_text())
    assert len(p.rows) == 4 and all(r["cells"][5:7] == ["-1", "+0.000"] for r in p.rows)
    assert p.nodes[0]["txt"] == "abc"


# ---------------------------------------------------------------------------- in a real browser

CHROMIUM = "/usr/bin/chromium"


def chromium(tmp_path, *args):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_page_in_headless_chromium(tmp_path):
    tree = hand_tree()
    page = tmp_path / "tree.html"
    page.write_text(trees_html([tree], Tokenizer().decode, [[1.0, 0.0, -1.0, 0.5]], ["7 + 5?"]))

    png = tmp_path / "tree.png"
    chromium(tmp_path, f"--screenshot={png}", "--window-size=1400,1000", page.as_uri())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1400, 1000)
    try:
        from PIL import Image
    except ImportError:
        assert len(data) > 20_000  # a blank 1400 x 1000 page compresses to a few KB
    else:
        img = Image.open(png).convert("RGB")
        colours = img.getcolors(maxcolors=1 << 24)  # [(count, (r, g, b))]
        ink = sum(count for count, (r, g, b) in colours if r + g + b < 600)
        assert ink > 0.01 * 1400 * 1000 and len(colours) > 50  # text, boxes, colours

    # the page's script ran: the path picked through the address is highlighted, the rest is not
    dom = chromium(tmp_path, "--dump-dom", page.as_uri() + "#t0n4")
    p = Page(dom)
    on = {n for n, b in p.nodes.items() if "on" in b["attrs"]["class"].split()}
    assert on == {0, 1, 2, 4}
    rows_on = [a["data-n"] for t, a in p.tag_attrs if t == "tr" and "on" in (a.get("class") or "").split()]
    assert rows_on == ["4"]
    assert "path #0 → #1 → #2 → #4, 1 leaf below" in dom
    dom = chromium(tmp_path, "--dump-dom", page.as_uri() + "#t0n1")
    rows_on = [a["data-n"] for t, a in Page(dom).tag_attrs if t == "tr" and "on" in (a.get("class") or "").split()]
    assert sorted(rows_on) == sorted(str(leaf.path[-1]) for leaf in tree.leaves)  # every leaf is below #1
