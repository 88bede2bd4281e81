"""Seeing a tree: a text outline, and a self-contained HTML page a person can read and share.

A TreePO tree (docs/algorithm.md section 1) is judged by looking at it: where the paths forked, which
segments they share, how each leaf ended and what it was worth. The page therefore shows, per tree,
the tree itself scaled to the page width (one column per depth, one row per leaf, inner nodes at the
mean row of their children), each node as a box with the start of its segment's text, depth and
token count, coloured by the finish reason of the path that ended there (or by reward when leaf
rewards are given; fallback edges dashed), and below it a panel with every leaf's full text, finish
reason, reward and advantage. Clicking a node highlights its root-to-node path and the leaves below
it; clicking a leaf in the panel highlights its path; the selection goes into the address
(`#t<tree>n<node>`), so a link to the file opens with the same path picked.

The page has no external resources (inline CSS and a few lines of JS: it works offline and can be
mailed as one file), escapes every text it shows, and hides special tokens: text is decoded with
`skip_special_tokens=True` when the decode function takes it, and `<|...|>` tokens (`<|im_end|>`,
`<|endoftext|>`) are stripped from whatever it returns.

Manual check in a browser (tests/test_viz.py does the same when /usr/bin/chromium exists):
  PYTHONPATH=. python -m treepo.cli sample --tree -n 8 --max-tokens 64 --segment-len 16 --depth 4 --html /tmp/tree.html
  chromium --headless --no-sandbox --disable-gpu --screenshot=/tmp/tree.png --window-size=1400,1000 file:///tmp/tree.html
then open /tmp/tree.png (or /tmp/tree.html, and click a node).
"""
from __future__ import annotations

import html
import inspect
import re

from .tree import Tree

COLORS = {"answer": "#2e9e44", "eos": "#3a7bd5", "repetition": "#e8891c", "max_len": "#8a8a8a",
          "max_depth": "#8e44ad", None: "#ffffff"}
"""Finish reason -> colour (None: an inner node)."""

SNIPPET = 60  # characters of a segment's text shown in its box (two lines)
ROW, BOX = 64, 56  # px per leaf row; box height (< ROW, so boxes in one column never overlap)
SPECIAL = re.compile(r"<\|[^<>|]{0,64}\|>")  # <|im_end|>, <|endoftext|>, <|start_header_id|>, ...


def clean(text: str) -> str:
    """Text with `<|...|>` special tokens removed."""
    return SPECIAL.sub("", text)


def _text_decoder(decode):
    """ids -> readable text: decode(ids, skip_special_tokens=True) when decode takes that keyword,
    then special tokens stripped; token ids joined by spaces without a decode function."""
    if decode is None:
        return lambda ids: " ".join(map(str, ids))
    try:
        params = inspect.signature(decode).parameters.values()
        skips = any(p.name == "skip_special_tokens" or p.kind is p.VAR_KEYWORD for p in params)
    except (TypeError, ValueError):  # a builtin or C function without a signature
        skips = False
    if skips:
        return lambda ids: clean(decode(ids, skip_special_tokens=True))
    return lambda ids: clean(decode(ids))


def _snippet(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def outline(tree: Tree, decode=None, width: int = 60) -> str:
    """Indented outline: one line per node (depth, id, tokens, finish reason, text snippet)."""
    decode = _text_decoder(decode)
    lines = [f"prompt ({len(tree.prompt_token_ids)} tokens): {len(tree.leaves)} leaves, "
             f"{len(tree.nodes) - 1} nodes, {tree.stats.fallbacks} fallbacks"]

    def walk(nid, indent):
        n = tree.nodes[nid]
        tag = f" [{n.finish_reason}]" if n.finish_reason else ""
        fb = " (fallback)" if n.from_fallback else ""
        lines.append(f"{'  ' * indent}d{n.depth} #{n.id} {len(n.token_ids)}t{tag}{fb}: "
                     f"{_snippet(decode(n.token_ids), width)!r}")
        for c in n.children:
            walk(c, indent + 1)

    for c in tree.nodes[0].children:
        walk(c, 1)
    return "\n".join(lines)


def _reward_color(r: float, lo: float, hi: float) -> str:
    """Light red (lo) -> yellow -> light green (hi); when every reward is the same, its sign decides."""
    x = (r - lo) / (hi - lo) if hi > lo else 0.5 + 0.5 * ((r > 0) - (r < 0))
    return f"hsl({120 * x:.0f},70%,82%)"


def _rows(tree: Tree) -> tuple[dict[int, float], int]:
    """Node id -> row (leaves consecutive, depth-first; an inner node at the mean of its children), and
    the number of rows."""
    row: dict[int, float] = {}
    count = 0

    def place(nid):
        nonlocal count
        kids = tree.nodes[nid].children
        if not kids:
            row[nid] = count
            count += 1
        else:
            row[nid] = sum(place(c) for c in kids) / len(kids)
        return row[nid]

    place(0)
    return row, count


def _number(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def tree_html(tree: Tree, index: int, decode=None, rewards: list[float] | None = None,
              advantages: list[float] | None = None, prompt_text: str | None = None,
              reward_range: tuple[float, float] | None = None) -> str:
    """One tree's section: heading, the tree as positioned boxes over an SVG of edges, the leaf panel.
    rewards / advantages: one per leaf of tree.leaves; reward_range: the (lo, hi) of the colour scale."""
    text = _text_decoder(decode)
    nodes = tree.nodes
    row, rows = _rows(tree)
    columns = max(n.depth for n in nodes) + 1
    col = 100 / columns  # % of the page width per depth
    height = rows * ROW + 8
    lo, hi = reward_range or ((min(rewards), max(rewards)) if rewards else (0.0, 1.0))
    leaves_at: dict[int, list[int]] = {}  # node id -> indices of the leaves ending there
    for i, leaf in enumerate(tree.leaves):
        leaves_at.setdefault(leaf.path[-1], []).append(i)

    def left(depth):  # % of the box's left edge; boxes take 88% of a column
        return depth * col + 0.02 * col

    def top(nid):
        return 4 + row[nid] * ROW

    edges = []
    for n in nodes[1:]:
        p = nodes[n.parent]
        x0, y0 = left(p.depth) + 0.88 * col, top(p.id) + BOX / 2
        x1, y1 = left(n.depth), top(n.id) + BOX / 2
        xm = (x0 + x1) / 2
        fb = " fb" if n.from_fallback else ""
        edges.append(f'<path data-n="{n.id}" class="edge{fb}" d="M{x0:.3f} {y0:.1f} C{xm:.3f} {y0:.1f} '
                     f'{xm:.3f} {y1:.1f} {x1:.3f} {y1:.1f}"/>')

    prompt_full = text(tree.prompt_token_ids)
    boxes = []
    for n in nodes:
        pos = f"left:{left(n.depth):.3f}%;top:{top(n.id):.0f}px;width:{0.88 * col:.3f}%;height:{BOX}px"
        if n.id == 0:
            if prompt_text is not None:
                snip = _snippet(prompt_text, SNIPPET)
            else:  # a chat template's prompt starts with the system prompt: its end says more
                snip = " ".join(prompt_full.split())
                snip = snip if len(snip) <= SNIPPET else "..." + snip[-(SNIPPET - 3):]
            boxes.append(f'<div class="node root" data-n="0" style="{pos}" title="{html.escape(prompt_full)}">'
                         f'<div class="meta">prompt &middot; {len(tree.prompt_token_ids)} tok</div>'
                         f'<div class="txt">{html.escape(snip)}</div></div>')
            continue
        seg = text(n.token_ids)
        snip = _snippet(seg, SNIPPET)
        meta = [f"#{n.id}", f"d{n.depth}", f"{len(n.token_ids)} tok"]
        style, cls = pos, "node"
        mine = leaves_at.get(n.id, [])
        if n.finish_reason or mine:
            reason = n.finish_reason or tree.leaves[mine[0]].finish_reason
            meta.append(reason)
            cls += " leaf"
            style += f";border-left-color:{COLORS.get(reason, '#444')}"
            if rewards is not None and mine:
                meta.append(f"r={rewards[mine[0]]:g}")
                style += f";background:{_reward_color(rewards[mine[0]], lo, hi)}"
            else:
                style += f";background:{COLORS.get(reason, '#444')}22"
        if n.from_fallback:
            meta.append("fallback")
        meta_s = " &middot; ".join(html.escape(m) for m in meta)
        body = html.escape(snip) or f'<i class="empty">({"no text" if n.token_ids else "empty"})</i>'
        boxes.append(f'<div class="{cls}" data-n="{n.id}" data-p="{n.parent}" style="{style}" '
                     f'title="{html.escape(seg)}"><div class="meta">{meta_s}</div><div class="txt">{body}</div></div>')

    head = html.escape(prompt_text) if prompt_text is not None else f"prompt {index}"
    st = tree.stats
    out = [f'<section class="tree" id="t{index}">', f"<h2>{head}</h2>",
           f'<p class="stats">{len(tree.leaves)} leaves, {len(nodes) - 1} nodes, {st.fallbacks} fallbacks, '
           f"{st.processed_tokens} tokens processed &middot; "
           f'<span class="status">click a node or a leaf to highlight its path</span></p>',
           f'<details><summary>prompt ({len(tree.prompt_token_ids)} tokens)</summary>'
           f'<pre class="full">{html.escape(prompt_full)}</pre></details>',
           f'<div class="scroll"><div class="canvas" style="height:{height}px;min-width:{columns * 190}px">',
           f'<svg class="edges" viewBox="0 0 100 {height}" preserveAspectRatio="none" '
           f'xmlns="http://www.w3.org/2000/svg">', *edges, "</svg>", *boxes, "</div></div>"]
    out.append('<table class="leaves"><thead><tr><th>leaf</th><th>node</th><th>depth</th><th>tokens</th>'
               "<th>finish</th><th>reward</th><th>advantage</th><th>fallback</th><th>response</th></tr></thead>"
               "<tbody>")
    for i, leaf in enumerate(tree.leaves):
        r = rewards[i] if rewards is not None else None
        a = advantages[i] if advantages is not None else None
        swatch = f' style="background:{_reward_color(r, lo, hi)}"' if r is not None else ""
        colour = COLORS.get(leaf.finish_reason, "#444")
        out.append(f'<tr data-n="{leaf.path[-1]}"><td>{i}</td><td>#{leaf.path[-1]}</td><td>{leaf.depth}</td>'
                   f"<td>{len(leaf.token_ids)}</td>"
                   f'<td><span class="chip" style="background:{colour}"></span>{html.escape(leaf.finish_reason)}</td>'
                   f'<td{swatch}>{_number(r, "g")}</td><td>{_number(a, "+.3f")}</td>'
                   f'<td>{"yes" if leaf.from_fallback else ""}</td>'
                   f'<td><div class="full">{html.escape(text(leaf.token_ids).strip())}</div></td></tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px 24px;color:#222}
h1{font-size:20px;margin:0 0 6px} h2{font-size:16px;margin:22px 0 2px}
.legend span.chip,.leaves span.chip{display:inline-block;width:12px;height:12px;border:1px solid #555;
 border-radius:2px;margin:0 4px 0 10px;vertical-align:-1px}
.leaves span.chip{margin-left:0}
.grad{display:inline-block;width:90px;height:12px;vertical-align:-1px;border:1px solid #555;margin:0 4px;
 background:linear-gradient(90deg,hsl(0,70%,82%),hsl(60,70%,82%),hsl(120,70%,82%))}
.stats{color:#555;margin:0 0 4px} .status{color:#a61e4d}
details{margin:0 0 8px;color:#555} summary{cursor:pointer}
.scroll{overflow-x:auto} .canvas{position:relative}
svg.edges{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none;overflow:visible}
.edge{fill:none;stroke:#9a9a9a;stroke-width:1.5;vector-effect:non-scaling-stroke}
.edge.fb{stroke-dasharray:6 4} .edge.sub{stroke:#555} .edge.on{stroke:#d6336c;stroke-width:3}
.node{position:absolute;box-sizing:border-box;padding:2px 7px;border:1px solid #888;
 border-left-width:1px;border-radius:5px;background:#fff;overflow:hidden;cursor:pointer;font-size:12.5px}
.node.leaf{border-left-width:7px} .node.root{background:#f1f3f5}
.node .meta{color:#555;font-size:11px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.node .txt{overflow:hidden;display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;
 word-break:break-word;line-height:1.3} .empty{color:#999}
.node.on{box-shadow:0 0 0 3px #d6336c} .node.sub{box-shadow:0 0 0 2px #555}
.picked .node:not(.on):not(.sub),.picked .edge:not(.on):not(.sub){opacity:.3}
.leaves{border-collapse:collapse;margin-top:10px;width:100%;font-size:13px}
.leaves th{text-align:left;border-bottom:2px solid #aaa;padding:3px 6px;white-space:nowrap}
.leaves td{vertical-align:top;border-top:1px solid #ddd;padding:3px 6px;white-space:nowrap}
.leaves td:last-child{white-space:normal;width:70%} .leaves tr[data-n]{cursor:pointer}
.leaves tr.on td{background-color:#fff0f6} .picked .leaves tr[data-n]:not(.on){opacity:.45}
.full{white-space:pre-wrap;word-break:break-word;max-height:11em;overflow:auto;margin:0;
 font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace}
"""

# pick(tree section, node id): the path root..node gets "on", the nodes below it "sub", the leaf rows
# ending at or below it "on"; picking the picked node again clears. The address keeps the selection.
JS = """
(function () {
  function pick(tree, n, remember) {
    var par = {}, path = {}, below = {}, k, count = 0;
    tree.querySelectorAll('.node').forEach(function (e) { par[e.dataset.n] = e.dataset.p; });
    var clear = tree.dataset.pick === n;
    if (!clear) {
      for (k = n; k !== undefined; k = par[k]) path[k] = 1;
      Object.keys(par).forEach(function (j) {
        for (k = j; k !== undefined; k = par[k]) if (k === n) { below[j] = 1; break; }
      });
    }
    tree.querySelectorAll('.node,.edge').forEach(function (e) {
      var j = e.dataset.n;
      e.classList.toggle('on', !!path[j]);
      e.classList.toggle('sub', !path[j] && !!below[j]);
    });
    tree.querySelectorAll('tr[data-n]').forEach(function (e) {
      e.classList.toggle('on', !!below[e.dataset.n]);
      if (below[e.dataset.n]) count++;
    });
    tree.classList.toggle('picked', !clear);
    if (clear) delete tree.dataset.pick; else tree.dataset.pick = n;
    var chain = [];
    for (k = n; k !== undefined; k = par[k]) chain.unshift('#' + k);
    tree.querySelector('.status').textContent = clear ? 'click a node or a leaf to highlight its path'
      : 'path ' + chain.join(' \\u2192 ') + ', ' + count + (count === 1 ? ' leaf' : ' leaves') + ' below';
    try {  // some browsers refuse history changes on file:// pages: the highlight stays all the same
      if (remember) history.replaceState(null, '', clear ? location.pathname : '#' + tree.id + 'n' + n);
    } catch (err) {}
  }
  document.addEventListener('click', function (ev) {
    var e = ev.target.closest('[data-n]'), tree = e && e.closest('.tree');
    if (tree && !String(window.getSelection())) pick(tree, e.dataset.n, true);
  });
  var m = /^#(t\\d+)n(\\d+)$/.exec(location.hash), tree = m && document.getElementById(m[1]);
  if (tree && tree.querySelector('.node[data-n="' + m[2] + '"]')) pick(tree, m[2], false);
})();
"""


def _per_tree(name: str, values, trees: list[Tree]):
    if values is None:
        return [None] * len(trees)
    if len(values) != len(trees):
        raise ValueError(f"{name} has {len(values)} lists for {len(trees)} trees; give one per tree")
    for i, (v, t) in enumerate(zip(values, trees)):
        if v is not None and len(v) != len(t.leaves):
            raise ValueError(f"{name}[{i}] has {len(v)} values for tree {i}'s {len(t.leaves)} leaves")
    return [None if v is None else [float(x) for x in v] for v in values]


def trees_html(trees: list[Tree], decode=None, rewards: list[list[float]] | None = None,
               prompts_text: list[str] | None = None, advantages: list[list[float]] | None = None,
               title: str = "TreePO trees") -> str:
    """A self-contained HTML page with one section per tree (see the module docstring).

    decode: token ids -> text (a tokenizer's decode; None shows token ids); rewards / advantages:
    per tree, one value per leaf of tree.leaves (None: not shown); prompts_text: a heading per tree.
    """
    rewards = _per_tree("rewards", rewards, trees)
    advantages = _per_tree("advantages", advantages, trees)
    if prompts_text is not None and len(prompts_text) != len(trees):
        raise ValueError(f"prompts_text has {len(prompts_text)} entries for {len(trees)} trees")
    every = [r for rs in rewards if rs for r in rs]
    span = (min(every), max(every)) if every else None
    chips = "".join(f'<span class="chip" style="background:{c}"></span>{k or "inner node"}'
                    for k, c in COLORS.items())
    if span and span[0] < span[1]:
        scale = f' &middot; leaf fill: reward {span[0]:g}<span class="grad"></span>{span[1]:g}'
    elif span:
        scale = (f' &middot; leaf fill: reward {span[0]:g} (every leaf)<span class="chip" '
                 f'style="background:{_reward_color(span[0], *span)}"></span>')
    else:
        scale = ""
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="legend">finish reason (box edge):{chips} &middot; dashed edge: fallback{scale}</p>']
    for i, t in enumerate(trees):
        parts.append(tree_html(t, i, decode, rewards[i], advantages[i],
                               prompts_text[i] if prompts_text is not None else None, span))
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts)
