"""TreePO tree sampler: segment-level tree search over the engine's shared paged KV cache.

docs/algorithm.md section 1 ("Tree sampling"), level-synchronous over all prompts of a batch:
1. every prompt is prefilled once; its root forks into b0 children (fixed b or random);
2. all active paths of all prompts decode one segment together, token by token, one batched
   forward per token (a path that samples EOS stops early and waits);
3. each new segment is classified (repetition / answer / eos / max_len / max_depth / active);
4. per prompt, the children budget moves from early-stopped paths to survivors
   (total = max(a, min(W - F, b * (a + f)))), spread uniformly or by log-prob (branching.py);
5. a prompt with no active path and fewer than W leaves falls back depth-first: a random
   answered leaf is cut at a segment boundary and min(b, W - F) children continue from exactly
   prompt + response[:k * l] - the fork shares that prefix's pages, nothing is re-prefilled
   except the one boundary token whose logits the children sample from.
A child is a fork *after* its parent's next-token forward: the children share every KV page of
the parent (the tail page copied) and draw different first tokens from the same logits row.
Finished leaves keep their pages until their prompt's tree is complete (fallback needs them).
A call that raises (a KeyboardInterrupt included) frees every page it took: it runs inside the
engine's transaction(), which restores the page pool as it was when the call began.
The sampler drives the engine's public low-level API (new_sequence, fork, forward, sample_into,
free) and reads its accounting (counters, kv_usage) for the tree stats.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from treepo.engine.config import SamplingParams
from treepo.engine.engine import Engine
from treepo.engine.kv_cache import KVCacheExhausted
from treepo.engine.sampling import mix_seed
from treepo.engine.sequence import Sequence
from treepo.progress import Rate
from treepo.progress import progress as progress_bar

from . import branching
from .text_rules import boxed_spans, has_repetition
from .tree import FALLBACK_CANDIDATES, Leaf, Node, Tree, TreeConfig, TreeStats


@dataclass
class _Path:
    """One path of a tree while it grows: its sequence and where its current segment hangs."""

    seq: Sequence
    prompt: int  # index of the prompt (tree) in the batch
    parent_node: int  # node this path's current segment hangs under
    depth: int  # depth of the current segment's node
    uid: int  # per-tree path id: the sampling stream
    from_fallback: bool  # the path continues a fallback (its leaf will say so)
    n_children: int = 1  # children to fork at the next level (parents only)
    seg_start: int = 0  # index in seq.token_ids where the current segment starts
    seg_limit: int = 0  # tokens the current segment may take
    done: bool = False  # segment finished (length reached or EOS)
    eos: bool = False  # the segment ended on a stop token
    node: int | None = None  # node created for the current segment
    prefill: bool = False  # a root or fallback stub: its pending tokens count as prefill


@dataclass
class _TreeState:
    """One prompt's tree while it is sampled."""

    index: int  # the prompt's index in the batch
    tree: Tree
    rng: random.Random
    finished: list = field(default_factory=list)  # (leaf, path) kept for fallback
    seqs: list = field(default_factory=list)  # every sequence of this tree (freed at the end)
    next_uid: int = 0
    complete: bool = False


class TreeSampler:
    """`TreeSampler(engine, config).sample(prompt_token_ids, sampling_params) -> list[Tree]`."""

    def __init__(self, engine: Engine, config: TreeConfig | None = None, decode_fn=None):
        self.engine = engine
        self.config = config or TreeConfig()
        tok = engine.tokenizer
        # text rules read the decoded segment; without a tokenizer they see token ids (see README)
        self.decode_fn = decode_fn or ((lambda ids: tok.decode(ids)) if tok is not None else None)
        self.training_step = 0  # for the branching-temperature schedule
        self._bar, self._rate, self._decoded0 = progress_bar(None), Rate(), 0  # sample() sets them

    # ------------------------------------------------------------------ public
    def sample(self, prompt_token_ids, params: SamplingParams | None = None,
               keys: list[int] | None = None, progress: str | None = None) -> list[Tree]:
        """One tree per prompt. `keys` (default: the prompt's index) name each prompt's random
        streams, so a prompt gets the same tree whatever batch or rank it is sampled in.
        progress: a label for a progress bar of leaves finished, with the tokens decoded per
        second (treepo/progress.py: shown on a terminal only)."""
        params = params or SamplingParams()
        cfg, eng = self.config, self.engine
        prompts = [eng.check_prompt(p, f"prompt {i}") for i, p in enumerate(prompt_token_ids)]
        for i, p in enumerate(prompts):
            if len(p) + cfg.max_response_len > eng.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_response_len="
                                 f"{cfg.max_response_len} it exceeds max_model_len={eng.max_model_len}")
        self._stop_ids = eng.stop_token_ids(params)
        t0 = time.perf_counter()
        counters0 = eng.counters()
        eng.reset_peak_kv()
        keys = list(range(len(prompts))) if keys is None else list(keys)
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        self._keys = keys
        states = [_TreeState(i, Tree(p, [Node(0, None, 0)], [], TreeStats()),
                             random.Random(mix_seed(cfg.seed, keys[i]))) for i, p in enumerate(prompts)]
        self._timing = {"decode": 0.0, "branch": 0.0}
        # admit prompts in waves that surely fit the page pool (no-sharing bound: nothing to preempt)
        usage = eng.kv_usage()
        per_prompt = [branching.page_bound(len(p), cfg.max_response_len, cfg.max_width, usage.page_size)
                      for p in prompts]
        if per_prompt and max(per_prompt) > usage.num_pages:
            raise KVCacheExhausted(max(per_prompt), usage.num_free, usage.num_pages)
        todo = list(range(len(prompts)))
        # an error or a KeyboardInterrupt anywhere (prefill, fork, decode, fallback) gives every
        # page of the call back: the engine restores its pool as it was here (engine.transaction)
        self._bar = progress_bar(progress, len(prompts) * cfg.max_width, "leaf")
        self._rate, self._decoded0 = Rate(), counters0["decode_tokens"]
        with eng.transaction(), self._bar:
            while todo:
                wave, budget = [], eng.kv_usage().num_free
                while todo and (not wave or per_prompt[todo[0]] <= budget):
                    budget -= per_prompt[todo[0]]
                    wave.append(todo.pop(0))
                self._run_wave([states[i] for i in wave], wave, params)
            for st in states:  # each tree freed itself when complete; nothing should be left
                self._free_tree(st)
        wall = time.perf_counter() - t0
        fwd = eng.counters()["forward_passes"] - counters0["forward_passes"]
        eng.sync_counters()
        peak = eng.kv_usage().peak_used
        for st in states:
            s = st.tree.stats
            s.forward_passes, s.peak_kv_pages, s.wall_time = fwd, peak, wall
            s.decode_time, s.branch_time = self._timing["decode"], self._timing["branch"]
            if len(st.tree.leaves) < cfg.max_width and s.limit is None:
                s.limit = "fallback disabled" if not cfg.fallback else "no candidates"
        return [st.tree for st in states]

    # ------------------------------------------------------------------ one wave of prompts
    def _run_wave(self, states: list[_TreeState], idx: list[int], params):
        """Grow the trees of these prompts level by level until every one is complete."""
        cfg, eng = self.config, self.engine
        parents = []
        for st, i in zip(states, idx):
            seq = eng.new_sequence(st.tree.prompt_token_ids, tag=i)
            st.seqs.append(seq)
            b0 = cfg.branch_factor
            if cfg.init_divergence == "random":
                b0 = st.rng.randint(cfg.init_min, cfg.init_max)
            parents.append(_Path(seq, i, 0, 0, self._new_uid(st), False, n_children=min(b0, cfg.max_width),
                                 prefill=True))
        by_prompt = dict(zip(idx, states))
        while parents:
            t = time.perf_counter()
            paths = self._fork_and_decode_segment(parents, by_prompt, params)
            self._timing["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            parents = []
            for i, st in by_prompt.items():
                if st.complete:
                    continue
                mine = [p for p in paths if p.prompt == i]
                parents += self._classify_and_branch(st, mine)
            self._timing["branch"] += time.perf_counter() - t

    def _new_uid(self, st: _TreeState) -> int:
        """The next path id of a tree; path uid samples from the stream (cfg.seed, prompt key, uid)."""
        st.next_uid += 1
        return st.next_uid - 1

    def _fork_and_decode_segment(self, parents: list[_Path], by_prompt, params) -> list[_Path]:
        """One level: forward the parents' pending tokens, fork each parent into its n_children
        (the parent's sequence is the first; all sample their first token from its logits row),
        then decode one segment for every child together, token by token. Returns the children."""
        eng, cfg = self.engine, self.config
        pending = [p.seq.num_tokens - p.seq.num_cached for p in parents]
        logits = eng.forward([p.seq for p in parents])
        paths, rows = [], []
        for r, par in enumerate(parents):
            st = by_prompt[par.prompt]
            if par.prefill:
                st.tree.stats.prefill_tokens += pending[r]
            else:
                st.tree.stats.decode_tokens += pending[r]
            kids = eng.fork(par.seq, par.n_children - 1)
            st.seqs += kids
            seqs = [par.seq] + kids
            for s in seqs:
                resp = s.num_tokens - s.num_prompt
                paths.append(_Path(s, par.prompt, par.parent_node, par.depth + 1, self._new_uid(st),
                                   par.from_fallback, seg_start=s.num_tokens,
                                   seg_limit=min(cfg.segment_len, cfg.max_response_len - resp)))
                rows.append(r)
        logits = logits[torch.tensor(rows, device=logits.device)]
        decoding = paths
        while True:
            keys = [(cfg.seed, self._keys[p.prompt], p.uid) for p in decoding]
            tokens = eng.sample_into([p.seq for p in decoding], logits, params, keys)
            for k, p in enumerate(decoding):
                if tokens[k] in self._stop_ids:
                    p.done = p.eos = True
                elif p.seq.num_tokens - p.seg_start >= p.seg_limit:
                    p.done = True
            decoding = [p for p in decoding if not p.done]
            if not decoding:
                return paths
            logits = eng.forward([p.seq for p in decoding])
            for p in decoding:
                by_prompt[p.prompt].tree.stats.decode_tokens += 1

    # ------------------------------------------------------------------ classification + branching
    def _text(self, ids):
        return self.decode_fn(ids) if self.decode_fn is not None else ids

    def _classify(self, p: _Path) -> str | None:
        """The finish reason of a path after its new segment (one of FINISH_REASONS, in the order of
        docs/algorithm.md section 1 step 3), or None: it stays active."""
        cfg = self.config
        seg = p.seq.token_ids[p.seg_start:]
        resp_len = p.seq.num_tokens - p.seq.num_prompt
        rep = False
        if cfg.rep_count:
            rep = has_repetition(self._text(seg), cfg.rep_window, cfg.rep_count)
        if rep and cfg.repetition_priority == "first":
            return "repetition"
        if cfg.stop_policy != "eos" and self.decode_fn is not None:
            # a complete \boxed{} that ends inside the new segment (it may start earlier)
            resp = p.seq.token_ids[p.seq.num_prompt:]
            before = len(self.decode_fn(resp[: len(resp) - len(seg)]))
            boxed = any(e > before for _, e in boxed_spans(self.decode_fn(resp)))
            if boxed and (cfg.stop_policy == "boxed" or p.eos):
                return "answer"
        if p.eos:
            return "eos"
        if resp_len >= cfg.max_response_len:
            return "max_len"
        if p.depth >= cfg.max_depth:
            return "max_depth"
        if rep:
            return "repetition"
        return None

    def _classify_and_branch(self, st: _TreeState, paths: list[_Path]) -> list[_Path]:
        """Record each path's new segment as a node, turn finished paths into leaves, and return
        the next level's parents (survivors with their children counts, or a fallback stub)."""
        cfg, eng, tree = self.config, self.engine, st.tree
        survivors, finished_now = [], 0
        for p in paths:
            seg = p.seq.token_ids[p.seg_start:]
            node = Node(len(tree.nodes), p.parent_node, p.depth, list(seg),
                        p.seq.logprobs[len(p.seq.logprobs) - len(seg):], p.from_fallback)
            tree.nodes.append(node)
            tree.nodes[p.parent_node].children.append(node.id)
            p.node = node.id
            reason = self._classify(p)
            if reason is None:
                survivors.append(p)
                continue
            node.finish_reason = reason
            seq = p.seq
            leaf = Leaf(seq.output_ids, list(seq.logprobs), self._path_ids(tree, node.id), reason,
                        p.from_fallback, list(seq.model_logprobs) if seq.model_logprobs else None)
            tree.leaves.append(leaf)
            finished_now += 1
            if cfg.fallback:
                st.finished.append((leaf, p))
            else:
                eng.free(seq)
        self._bar.update(finished_now)
        self._bar.set_postfix_str(self._rate(eng.counters()["decode_tokens"] - self._decoded0), refresh=False)
        parents = []
        if survivors:
            total = branching.children_budget(cfg.max_width, len(tree.leaves), len(survivors), finished_now,
                                              cfg.branch_factor)
            for p, c in zip(survivors, self._allocate(st, survivors, total)):
                parents.append(_Path(p.seq, p.prompt, p.node, p.depth, p.uid, p.from_fallback, n_children=c))
        elif len(tree.leaves) < cfg.max_width and cfg.fallback:
            parents.append(self._fallback(st))
        if not parents:
            self._free_tree(st)
            st.complete = True
        return parents

    @staticmethod
    def _path_ids(tree: Tree, node_id: int) -> list[int]:
        path = []
        while node_id:
            path.append(node_id)
            node_id = tree.nodes[node_id].parent
        return path[::-1]

    def _allocate(self, st: _TreeState, paths: list[_Path], total: int) -> list[int]:
        """Children per surviving path: every path >= 1, summing to total (branching.py)."""
        cfg = self.config
        if cfg.branch_policy == "uniform":
            return branching.uniform_allocation(total, len(paths), st.rng)
        stats = [branching.path_statistic(p.seq.logprobs, p.seq.num_tokens - p.seg_start, cfg.logprob_statistic)
                 for p in paths]
        return branching.logprob_allocation(stats, total, cfg.branch_temperature_at(self.training_step), cfg.prefer)

    def _fallback(self, st: _TreeState) -> _Path:
        """Segment-aligned depth-first fallback (docs/algorithm.md section 1 step 5) from a kept
        leaf, or the root: a stub sequence whose children continue prompt + response[:k * l]."""
        cfg, eng, tree = self.config, self.engine, st.tree
        st.tree.stats.fallbacks += 1
        reasons = FALLBACK_CANDIDATES[cfg.fallback_candidates]
        cands = [(lf, p) for lf, p in st.finished if lf.finish_reason in reasons]
        n = branching.fallback_children(cfg.max_width, len(tree.leaves), cfg.branch_factor)
        if cands:
            leaf, p = st.rng.choice(cands)
            k = st.rng.randrange(leaf.depth)  # cut after k whole segments: 0 .. depth-1
            node = tree.node_at_depth(leaf, k)
            (seq,) = eng.fork(p.seq, 1, num_tokens=p.seq.num_prompt + k * cfg.segment_len)
        elif st.finished:  # no candidate: restart from the prompt (its pages are still shared)
            k, node = 0, 0
            src = st.finished[0][1].seq
            (seq,) = eng.fork(src, 1, num_tokens=src.num_prompt)
        else:
            k, node = 0, 0
            seq = eng.new_sequence(tree.prompt_token_ids, tag=st.index)
        st.seqs.append(seq)
        return _Path(seq, st.index, node, k, self._new_uid(st), True, n_children=n, prefill=True)

    def _free_tree(self, st: _TreeState):
        """Free every sequence of a tree (its leaves' pages included)."""
        for seq in st.seqs:
            if seq.table:
                self.engine.free(seq)
        st.seqs.clear()
        st.finished.clear()
