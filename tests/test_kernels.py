"""Score extraction and critical-token selection equal brute force over full attention weights."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from specattn.engine.attention import SequenceAttention, TorchAttentionBackend
from specattn.engine.config import CacheConfig, ModelConfig
from specattn.engine.kv_cache import KVCache
from specattn.kernels.draft_attention import sparse_draft_attention
from specattn.kernels.reference import (
    select_critical_tokens,
    sparse_attention,
    token_budget,
    verification_attention,
    verification_scores,
    write_kv,
)
from specattn.kernels.selection import select_critical_tokens_batched


def _brute_force_scores(q_rows, k, row_pos, scale):
    """Loop over rows and heads: softmax over each row's causal span, averaged, kept as a per-position list."""
    n_heads, group = q_rows.shape[1], q_rows.shape[1] // k.shape[1]
    total = [0.0] * k.shape[0]
    for r, pos in enumerate(row_pos):
        for h in range(n_heads):
            logits = [float(q_rows[r, h] @ k[j, h // group]) * scale for j in range(pos + 1)]
            m = max(logits)
            z = sum(torch.tensor(x - m).exp().item() for x in logits)
            for j in range(pos + 1):
                total[j] += torch.tensor(logits[j] - m).exp().item() / z / (n_heads * len(row_pos))
    return torch.tensor(total)


def test_budget_is_clamped():
    assert token_budget(100, 0.05, 256) == 100
    assert token_budget(4000, 0.05, 256) == 256
    assert token_budget(8000, 0.05, 256) == 400


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_equals_brute_force_topk(seed):
    g = torch.Generator().manual_seed(seed)
    layers, n, heads, kv_heads, d = 3, 50, 6, 2, 8
    scale = d**-0.5
    c, gamma = 40, 4  # scored rows: the first (c) and last (c + gamma) verification queries, scored over [0, c]
    selected, brute = [], []
    for _ in range(layers):
        q_rows = torch.randn(2, heads, d, generator=g)
        k = torch.randn(n, kv_heads, d, generator=g)
        row_pos = [c, c + gamma]
        mask = torch.arange(n)[None, :] <= torch.tensor(row_pos)[:, None]
        scores = verification_scores(q_rows[None], k[None], mask[None], scale)[0]
        ref = _brute_force_scores(q_rows, k, row_pos, scale)
        torch.testing.assert_close(scores, ref.float(), atol=1e-6, rtol=1e-5)
        selected.append(scores[: c + 1])
        brute.append(sorted(sorted(range(c + 1), key=lambda j: -float(ref[j]))[:10]))
    picked = select_critical_tokens(torch.stack(selected), 10)
    assert picked.tolist() == brute


def test_backend_extracts_scores_while_verifying():
    """The paged backend's scores for a verification equal the reference over the same K, for mixed batches."""
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, d, ps = 4, 2, 8, 4
    mc = ModelConfig("llama", 10, heads * d, 8, 1, heads, kv_heads, d, 1e4, 1e-5, 512, True)
    cache = KVCache(mc, CacheConfig(page_size=ps, num_pages=64), torch.float32, "cpu")
    backend = TorchAttentionBackend(cache, d**-0.5)
    # a verification of 5 tokens after 30 cached ones, and a final prefill chunk scoring its last row
    seqs = [
        SequenceAttention(5, 30, list(range(0, 9)), score_rows=(0, 4), score_len=31),
        SequenceAttention(20, 0, list(range(20, 25)), score_rows=(19,), score_len=20),
    ]
    dense_k = [torch.randn(35, kv_heads, d, generator=g), torch.randn(20, kv_heads, d, generator=g)]
    for pos in range(30):
        cache.k[0, seqs[0].page_table[pos // ps] * ps + pos % ps] = dense_k[0][pos]
    backend.plan(seqs)
    q = torch.randn(25, heads, d, generator=g)
    k_new = torch.cat([dense_k[0][30:], dense_k[1]])
    dest = backend.kv_write(0)
    write_kv(k_new, torch.randn_like(k_new), dest.k_cache, dest.v_cache, dest.slots)
    backend(0, q)
    scores = backend.take_scores()
    ref0 = _brute_force_scores(q[[0, 4]], dense_k[0], [30, 34], d**-0.5)[:31]
    ref1 = _brute_force_scores(q[[24]], dense_k[1], [19], d**-0.5)[:20]
    assert scores.seqs == [0, 1] and scores.lengths == [31, 20]
    torch.testing.assert_close(scores.scores[0, 0, :31], ref0.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores.scores[0, 1, :20], ref1.float(), atol=1e-6, rtol=1e-5)
    assert (scores.scores[0, 1, 20:] == -1).all()  # padding ranks below every real weight


def _score_problem(device: str, dtype: torch.dtype, seed: int, lengths: list[int], gammas: list[int], page_size: int = 16, layers: int = 2):
    """Random paged K and two scored query rows per sequence and layer; the reference scores and the base-2 LSE verification returns."""
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, d = 9, 3, 64
    spans = [n + gm for n, gm in zip(lengths, gammas)]  # the last row attends the drafts too
    pages = [-(-n // page_size) for n in spans]
    perm = torch.randperm(sum(pages) + 3, generator=g)
    tables, start = [], 0
    for n in pages:
        tables.append(perm[start : start + n])
        start += n
    k_cache = torch.randn(layers, (sum(pages) + 3) * page_size, kv_heads, d, generator=g).to(dtype)
    q_rows = torch.randn(layers, len(lengths), 2, heads, d, generator=g).to(dtype)
    row_pos = [[n - 1, n - 1 + gm] for n, gm in zip(lengths, gammas)]
    lse2 = torch.zeros(layers, len(lengths), 2, heads)
    ref = torch.full((layers, len(lengths), max(lengths)), -1.0)
    for layer in range(layers):
        for s, (n, gm, table) in enumerate(zip(lengths, gammas, tables)):
            pos = torch.arange(n + gm)
            k = k_cache[layer, table[pos // page_size] * page_size + pos % page_size].float()
            mask = pos[None, :] <= torch.tensor(row_pos[s])[:, None]
            rq = q_rows[layer, s].float()
            ref[layer, s, :n] = verification_scores(rq[None], k[None], mask[None], d**-0.5)[0, :n]
            logits = torch.einsum("rkgd,nkd->rkgn", rq.reshape(2, kv_heads, 3, d), k).reshape(2, heads, -1) * d**-0.5
            lse2[layer, s] = torch.logsumexp(logits.masked_fill(~mask[:, None], float("-inf")), -1) / math.log(2)
    i32 = dict(dtype=torch.int32, device=device)
    args = (
        q_rows.to(device), lse2.to(device), k_cache.to(device), torch.tensor(row_pos, **i32),
        torch.tensor([0] + list(itertools.accumulate(pages))[:-1], **i32), torch.cat(tables).to(**i32),
        torch.tensor(lengths, **i32),
    )
    return args, ref


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_scores_equal_reference(seed):
    """The Triton kernel (interpreted on CPU) computes the reference's weights from verification's base-2 LSE, all layers in one launch."""
    pytest.importorskip("triton")  # requirements-test.txt pins it; the `test` extra alone does not
    from specattn.kernels.scores import verification_scores_paged

    lengths, gammas = [37, 130, 5], [4, 0, 2]
    args, ref = _score_problem("cpu", torch.float32, seed, lengths, gammas)
    out = torch.full((2, 3, 130), float("nan"))
    verification_scores_paged(*args, page_size=16, scale=64**-0.5, out=out)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-4)  # including -1 past each length




@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_triton_scores_equal_reference(dtype):
    from specattn.kernels.scores import verification_scores_paged

    lengths, gammas = [4096, 8191 - 4, 300, 77], [4, 4, 0, 3]
    args, ref = _score_problem("cuda", dtype, 7, lengths, gammas, layers=3)
    out = torch.full((3, 4, max(lengths)), float("nan"), device="cuda")
    verification_scores_paged(*args, page_size=16, scale=64**-0.5, out=out)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=2e-2)


def _selection_problem(seed: int, layers: int, lengths: list[int]) -> torch.Tensor:
    """Random scores of sequences of the given lengths, -1 past each length (as verification leaves them)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.full((layers, len(lengths), max(lengths)), -1.0)
    for s, n in enumerate(lengths):
        scores[:, s, :n] = torch.rand(layers, n, generator=g)
    return scores


def _assert_selection(picked: torch.Tensor, scores: torch.Tensor, lengths: list[int], budgets: list[int]) -> None:
    for s, (n, k) in enumerate(zip(lengths, budgets)):
        assert torch.equal(picked[:, s, :k], select_critical_tokens(scores[:, s, :n], k))
        assert (picked[:, s, k:] == scores.shape[-1]).all()  # padding


def test_batched_selection_equals_per_sequence_reference():
    lengths, budgets = [50, 17, 33], [10, 17, 4]
    scores = _selection_problem(5, 3, lengths)
    _assert_selection(select_critical_tokens_batched(scores, budgets), scores, lengths, budgets)


def _selection_kernel(version: str):
    """The engine's one-launch selection, or the candidate beside the select probe (perf-notes 59), whose function of
    the same name and arguments must pick the same positions."""
    pytest.importorskip("triton")  # requirements-test.txt pins it; the `test` extra alone does not
    if version == "engine":
        from specattn.kernels.radix_select import select_critical_tokens_triton

        return select_critical_tokens_triton
    path = Path(__file__).parent.parent / "scripts" / "radix_select_digits.py"
    spec = importlib.util.spec_from_file_location("radix_select_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.select_critical_tokens_triton


@pytest.mark.parametrize("version", ["engine", "candidate"])
def test_triton_selection_equals_reference(version):
    """The one-launch selection (interpreted on CPU) over rows held whole and rows several blocks long, budgets from
    1 to the whole row, a width that is not a multiple of the block."""
    select_critical_tokens_triton = _selection_kernel(version)

    lengths, budgets = [70, 17, 33, 1, 70], [10, 17, 4, 1, 69]
    scores = _selection_problem(5, 3, lengths)
    k = torch.tensor(budgets, dtype=torch.int32)
    for shape in [(16, False, 4), (128, True, 4)]:  # the row read in chunks each pass; held whole
        picked = select_critical_tokens_triton(scores, k, 72, shape)
        assert picked.shape == (3, 5, 72)
        _assert_selection(picked, scores, lengths, budgets)


@pytest.mark.parametrize("version", ["engine", "candidate"])
def test_triton_selection_takes_ties_lowest_position_first(version):
    """Equal scores at the cut are taken in position order, across chunks too, and every float orders as its value:
    -0.0 ties 0.0, infinities (at the cut as well) and subnormals in place."""
    select_critical_tokens_triton = _selection_kernel(version)

    def select(scores: list[float], k: int, width: int, shape: tuple[int, bool, int]) -> list[int]:
        budget = torch.tensor([k], dtype=torch.int32)
        return select_critical_tokens_triton(torch.tensor([[scores]]), budget, width, shape)[0, 0].tolist()

    tied = [0.0] * 40
    tied[3] = tied[7] = tied[35] = 1.0
    for shape in [(16, False, 4), (64, True, 4)]:  # the ties run over three chunks of 16 in the first
        assert select(tied, 5, 6, shape) == [0, 1, 3, 7, 35, 40]
        assert select(tied, 20, 20, shape) == [*range(19), 35]  # 3, 7, 35 and the first 17 zeros
    odd = [-0.0, 0.0, -1.0, float("inf"), float("-inf"), 1e-40, -1e-40, 3.0]
    assert select(odd, 4, 4, (4, False, 4)) == [0, 3, 5, 7]  # -0.0 and 0.0 tie at the cut: the first one
    assert select(odd, 7, 8, (8, True, 4)) == [0, 1, 2, 3, 5, 6, 7, 8]
    minus_inf_at_cut = [1.0, float("-inf"), 2.0, float("-inf")]
    assert select(minus_inf_at_cut, 3, 4, (4, True, 4)) == [0, 1, 2, 4]
    assert select([float("inf"), 1.0, float("inf")], 2, 2, (4, False, 4)) == [0, 2]


def test_rows_held_in_registers_fit_their_block():
    """The kernel searches only the first BLOCK positions of a row it holds in registers: every width it is given
    must fit, and wider rows are read in chunks."""
    pytest.importorskip("triton")
    from specattn.kernels.radix_select import MAX_REGISTER_ROW, launch_shape

    for width in (1, 300, 1024, 1025, 4096, 8192, MAX_REGISTER_ROW, MAX_REGISTER_ROW + 1, 100_000):
        block, in_registers, warps = launch_shape(width)
        assert in_registers == (width <= MAX_REGISTER_ROW) and (block >= width or not in_registers)
        assert warps in (4, 8, 16)


@pytest.mark.gpu
def test_gpu_batched_selection_equals_reference():
    lengths = [8192, 4000, 300, 1]
    budgets = [token_budget(n, 0.05, 256) for n in lengths]
    scores = _selection_problem(9, 30, lengths)
    _assert_selection(select_critical_tokens_batched(scores.cuda(), budgets).cpu(), scores, lengths, budgets)
    tied = torch.zeros(2, 1, 5000, device="cuda")
    tied[:, :, 4000] = 1.0
    assert select_critical_tokens_batched(tied, [300]).cpu().tolist() == [[[*range(299), 4000]]] * 2


def _draft_case(device: str, dtype: torch.dtype, heads: int, kv_heads: int, seed: int, splits: int = 1):
    """Random K/V slots and per-sequence selected + recent slots (one sequence with no selection, one past a block);
    with splits, some splits of the short sequences attend nothing."""
    g = torch.Generator().manual_seed(seed)
    d, slots = 64, 3000
    k_cache = torch.randn(slots, kv_heads, d, generator=g).to(device, dtype)
    v_cache = torch.randn(slots, kv_heads, d, generator=g).to(device, dtype)
    qkv = torch.randn(4, heads + 2 * kv_heads, d, generator=g).to(device, dtype)
    q = qkv[:, :heads]  # a strided view, as the model passes it
    selected = [torch.randperm(slots, generator=g)[:n] for n in (200, 0, 7, 64)]
    recent = [torch.randint(0, slots, (n,), generator=g) for n in (5, 1, 70, 2)]
    width = 80
    table = torch.zeros(4, width, dtype=torch.int32)
    for row, r in zip(table, recent):
        row[: len(r)] = r
    args = (
        torch.cat(selected).to(device, torch.int32),
        torch.tensor([0, 200, 200, 207, 271], dtype=torch.int32, device=device),
        table.to(device),
        torch.tensor([len(r) for r in recent], dtype=torch.int32, device=device),
    )
    expected = sparse_attention(q, k_cache, v_cache, [torch.cat([s, r]).to(device) for s, r in zip(selected, recent)], d**-0.5)
    return sparse_draft_attention(q, k_cache, v_cache, *args, scale=d**-0.5, splits=splits), expected


@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (14, 2)])
def test_triton_draft_attention_equals_reference(heads, kv_heads, splits):
    got, expected = _draft_case("cpu", torch.float32, heads, kv_heads, seed=heads, splits=splits)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_triton_draft_attention_equals_reference(dtype, splits):
    got, expected = _draft_case("cuda", dtype, 9, 3, seed=5, splits=splits)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_streaming_selection_is_sinks_plus_the_window_before_the_anchor():
    from specattn.engine.config import SpecConfig
    from specattn.engine.drafters import StreamingDrafter

    drafter = StreamingDrafter(SpecConfig(drafter="streaming", budget_ratio=0.1, min_budget=6, sink_tokens=4), 2)
    anchors = [99, 9, 3]  # budgets 10, 6 (the minimum), 4 (the whole span)
    sel = drafter.select(anchors, None, torch.device("cpu"))
    assert sel.budgets == [10, 6, 4]
    rows = [sel.positions[1, j, :k].tolist() for j, k in enumerate(sel.budgets)]
    assert rows == [[0, 1, 2, 3, 94, 95, 96, 97, 98, 99], [0, 1, 2, 3, 8, 9], [0, 1, 2, 3]]
    assert torch.equal(sel.positions[0], sel.positions[1])


def _verify_case(
    device: str, dtype: torch.dtype, q_len: int, kv_lens: list[int], score_lens: list[int], rows: list[tuple[int, int]],
    seed: int, scratch_dtype: torch.dtype = torch.float32, heads: int = 9, kv_heads: int = 3, **blocks,
):
    """A paged cache of shuffled pages, q_len queries per sequence at its last positions, some sequences scored on
    the given pair of query rows over positions [0, score_len).

    Returns the kernel's output and per-position scores (via gather_slot_scores) and the references'."""
    from specattn.kernels.scores import gather_slot_scores
    from specattn.kernels.verify_attention import SlotScores, verify_attention

    g = torch.Generator().manual_seed(seed)
    d, ps = 64, 16
    pages = [-(-n // ps) for n in kv_lens]
    num_slots = (sum(pages) + 2) * ps
    perm = torch.randperm(sum(pages) + 2, generator=g)
    tables = list(perm[: sum(pages)].split(pages))
    k_cache = torch.randn(num_slots, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, kv_heads, d, generator=g).to(dtype)
    qkv = torch.randn(len(kv_lens) * q_len, heads + 2 * kv_heads, d, generator=g).to(dtype)
    q = qkv[:, :heads]  # a strided view, as the model passes it
    out_ref, score_ref = [], torch.full((1, len(kv_lens), max(kv_lens)), -1.0)
    for s, (n, table, n_scored) in enumerate(zip(kv_lens, tables, score_lens)):
        pos = torch.arange(n)
        slots = table[pos // ps] * ps + pos % ps
        qs = q[s * q_len : (s + 1) * q_len]
        out_ref.append(verification_attention(qs, k_cache[slots], v_cache[slots], d**-0.5))
        row_pos = torch.tensor([n - q_len + r for r in rows[s]])
        mask = pos[None, :] <= row_pos[:, None]
        weights = verification_scores(qs[list(rows[s])].float()[None], k_cache[slots].float()[None], mask[None], d**-0.5)[0]
        score_ref[0, s, :n_scored] = weights[:n_scored]
    i32 = dict(dtype=torch.int32, device=device)
    indptr = torch.tensor([0, *itertools.accumulate(pages)], **i32)
    indices = torch.cat(tables).to(**i32)
    slot_scores = SlotScores(
        rows=torch.tensor(rows, **i32),
        lengths=torch.tensor(score_lens, **i32),
        logits=torch.full((kv_heads, 2 * heads // kv_heads, num_slots), float("nan"), device=device,
                          dtype=scratch_dtype),
        lse=torch.full((len(kv_lens), kv_heads, 2 * heads // kv_heads), float("nan"), device=device),
        out=torch.full((1, kv_heads, num_slots), float("nan"), device=device),
    )
    kv = torch.tensor(kv_lens, **i32)
    out = verify_attention(q.to(device), k_cache.to(device), v_cache.to(device), indptr, indices, kv, q_len, ps, d**-0.5,
                           scores=dataclasses.replace(slot_scores, out=slot_scores.out[0]),
                           **blocks)
    scored = [s for s, n in enumerate(score_lens) if n]
    gathered = torch.full((1, len(scored), max(score_lens)), float("nan"), device=device)
    gather_slot_scores(slot_scores.out, indptr[scored], indices, torch.tensor([score_lens[s] for s in scored], **i32),
                       ps, heads, gathered)
    return out.cpu(), torch.cat(out_ref), gathered.cpu(), score_ref[:, scored, : max(score_lens)]


@pytest.mark.parametrize(
    "q_len,kv_lens,score_lens,rows,blocks",
    [
        # a row scored twice; scored spans past the first row (its causal limit applies); an unscored sequence
        (5, [37, 130, 5, 64], [37, 126, 0, 64], [(0, 4), (2, 2), (4, 4), (1, 3)], {}),
        # weights in blocks of 32 shared by 2 programs per (sequence, KV head): blocks 0, 2, … and 1, 3, …
        (1, [1, 90, 17], [0, 90, 17], [(0, 0)] * 3, dict(block_n=16, weight_block=32, weight_chunks=2)),
        # the scored queries moved to the tile's top in every order: second at 0 (or 1) before first, 6 of 6 rows
        (2, [40, 33, 70], [40, 33, 70], [(1, 0), (0, 1), (1, 1)], {}),
        # a 32-row tile (γ = 7) halved twice for the store; first after second, second where first was
        (8, [50, 93], [50, 93], [(7, 0), (3, 7)], {}),
        # a 64-row tile stored whole (γ = 16); 2 · group = 10 scratch rows (group 5)
        (17, [40, 81], [40, 81], [(16, 0), (0, 16)], dict(heads=10, kv_heads=2)),
    ],
)
def test_triton_verify_attention_equals_reference(q_len, kv_lens, score_lens, rows, blocks):
    """Verification (and decode) attention over shuffled pages equals SDPA; the weights it keeps on the way equal
    the reference scores of the two scored rows, over each scored span and -1 past it."""
    out, out_ref, scores, score_ref = _verify_case("cpu", torch.float32, q_len, kv_lens, score_lens, rows, seed=q_len, **blocks)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, score_ref, atol=1e-6, rtol=1e-4)


def test_triton_verify_attention_keeps_scored_logits_in_float16():
    """The engine keeps the scored rows' logits in a float16 scratch: the weights stay within float16's rounding of
    the logits (a few parts in 10⁴ for logits of a few units) of the reference, and the output is unchanged."""
    out, out_ref, scores, score_ref = _verify_case("cpu", torch.float32, 5, [37, 130, 5, 64], [37, 126, 0, 64],
                                                   [(0, 4), (2, 2), (4, 4), (1, 3)], seed=5, scratch_dtype=torch.float16)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, score_ref, atol=1e-5, rtol=3e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scratch_dtype", [torch.float32, torch.float16])
def test_gpu_triton_verify_attention_equals_reference(dtype, scratch_dtype):
    out, out_ref, scores, score_ref = _verify_case(
        "cuda", dtype, 5, [8192, 4096 + 3, 300, 77], [8188, 4094, 0, 73], [(0, 4), (2, 2), (4, 4), (0, 4)], seed=11,
        scratch_dtype=scratch_dtype)
    torch.testing.assert_close(out.float(), out_ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(scores, score_ref, atol=2e-4, rtol=2e-2)
