"""Seeing a tree: a text outline and a self-contained HTML page with one SVG picture per tree.

Nodes are laid out by depth (x) and by the order of the leaves below them (y); a node is coloured
by the finish reason of the path that ended there (inner nodes white), or by reward when leaf
rewards are given. Hovering a node shows its segment's text.
"""
from __future__ import annotations

import html

from .tree import Tree

COLORS = {"answer": "#2e9e44", "eos": "#3a7bd5", "repetition": "#e8891c", "max_len": "#8a8a8a",
          "max_depth": "#8e44ad", None: "#ffffff"}


def _snippet(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def outline(tree: Tree, decode=None, width: int = 60) -> str:
    """Indented outline: one line per node (depth, id, tokens, finish reason, text snippet)."""
    decode = decode or (lambda ids: " ".join(map(str, ids)))
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
    x = 0.5 if hi == lo else (r - lo) / (hi - lo)
    red, green = int(220 * (1 - x)), int(180 * x)
    return f"#{red:02x}{green:02x}40"


def tree_svg(tree: Tree, decode=None, rewards: list[float] | None = None, dx: int = 90, dy: int = 18) -> str:
    decode = decode or (lambda ids: " ".join(map(str, ids)))
    nodes = tree.nodes
    y = {}
    order = []

    def place(nid):  # leaves get consecutive rows, inner nodes the mean of their children
        kids = nodes[nid].children
        if not kids:
            y[nid] = len(order)
            order.append(nid)
            return y[nid]
        ys = [place(c) for c in kids]
        y[nid] = sum(ys) / len(ys)
        return y[nid]

    place(0)
    leaf_reward = {}
    if rewards is not None:
        for leaf, r in zip(tree.leaves, rewards):
            leaf_reward[leaf.path[-1]] = r
    lo, hi = (min(rewards), max(rewards)) if rewards else (0, 1)
    depth = max(n.depth for n in nodes)
    W, H = (depth + 1) * dx + 40, max(len(order), 1) * dy + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="10">']
    for n in nodes[1:]:
        x0, y0 = 20 + nodes[n.parent].depth * dx, 10 + y[n.parent] * dy
        x1, y1 = 20 + n.depth * dx, 10 + y[n.id] * dy
        dash = ' stroke-dasharray="4 2"' if n.from_fallback else ""
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#999"{dash}/>')
    for n in nodes:
        cx, cy = 20 + n.depth * dx, 10 + y[n.id] * dy
        fill = COLORS.get(n.finish_reason, "#fff")
        if n.id in leaf_reward:
            fill = _reward_color(leaf_reward[n.id], lo, hi)
        label = "prompt" if n.id == 0 else decode(n.token_ids)
        info = f"#{n.id} depth {n.depth} {n.finish_reason or ''}"
        if n.id in leaf_reward:
            info += f" reward {leaf_reward[n.id]:g}"
        out.append(f'<circle cx="{cx}" cy="{cy}" r="6" fill="{fill}" stroke="#333"><title>'
                   f'{html.escape(info)}\n{html.escape(label)}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)


def trees_html(trees: list[Tree], decode=None, rewards: list[list[float]] | None = None,
               prompts_text: list[str] | None = None) -> str:
    legend = " ".join(f'<span style="background:{c};border:1px solid #333;padding:0 6px">&nbsp;</span> {k or "inner"}'
                      for k, c in COLORS.items())
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>TreePO trees</title></head>",
             "<body style='font-family:sans-serif'>", f"<p>{legend}; dashed edges: fallback</p>"]
    for i, t in enumerate(trees):
        head = html.escape(prompts_text[i]) if prompts_text else f"prompt {i}"
        parts.append(f"<h3>{head}</h3><p>{len(t.leaves)} leaves, {len(t.nodes) - 1} nodes, "
                     f"{t.stats.processed_tokens} tokens processed</p>")
        parts.append(tree_svg(t, decode, rewards[i] if rewards else None))
    parts.append("</body></html>")
    return "\n".join(parts)
