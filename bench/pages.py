"""End-to-end OCR pages/s through the Engine: A4 pages in Gundam mode (903 vision slots each),
a fixed ~800 output tokens per page (random weights; the stop id never occurs; no n-gram
blocker), every page of a run submitted as one ``Engine.generate`` call.

The pages enter as the processor's uint8 views (``ImageViews``), so the time covers the host to
device copy, the vision encoder, prompt assembly, prefill, decoding and detokenisation. The
image processor itself (PIL resize and tiling on the CPU, parallel across a Serve replica's or
Ray Data's processes) is timed separately per page. A second pass times the phases on their own.

    python bench/pages.py                       # full preset, 128 pages x 800 tokens on CUDA
    python bench/pages.py --preset tiny --quick --device cpu
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common import ROOT, Table, a4_page, base_parser, build_model, report, sync

from model.engine import Engine, GenerationRequest, SamplingParams
from model.tasks import TASK_PROMPTS
from model.tokenizer import Tokenizer


class BenchTokenizer:
    """The project's tokenizer, trained on the bundled corpus, wrapped so that a random model's
    ids beyond its vocabulary still decode (modulo the vocabulary): the engine's detokenising
    work stays in the timing."""

    def __init__(self) -> None:
        texts = [p.read_text() for p in sorted((ROOT / "pipeline" / "corpus").glob("*.txt"))]
        self.inner = Tokenizer.train(texts * 2, vocab_size=4096)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, ids, skip_special: bool = False) -> str:
        v = self.inner.vocab_size
        return self.inner.decode([int(i) % v for i in ids], skip_special=skip_special)


def processor_ms_per_page(n: int = 3) -> float:
    from PIL import Image

    from model.processor import ImageProcessor

    rng = np.random.default_rng(0)
    proc = ImageProcessor.from_mode("gundam")
    img = Image.fromarray(rng.integers(0, 256, (1684, 1191, 3), dtype=np.uint8))
    out = proc.process(img)
    assert out.n_image_tokens == 903, out.n_image_tokens
    t0 = time.perf_counter()
    for _ in range(n):
        proc.process(img)
    return (time.perf_counter() - t0) / n * 1e3


def phases(engine: Engine, requests: list[GenerationRequest], device) -> dict[str, float]:
    """Encoder, prompt assembly, prefill and decode timed one after another (Engine.generate's work)."""
    out = {}
    sync(device)
    t0 = time.perf_counter()
    vision = engine.encode_images([r.images[0] for r in requests])
    sync(device)
    out["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    embeds = [engine.prompt_embeds(r.prompt, [v])[0] for r, v in zip(requests, vision)]
    sync(device)
    out["prompt_s"] = time.perf_counter() - t0
    max_len = max(e.shape[0] for e in embeds) + requests[0].params.max_new_tokens + 1
    batch = engine._decode_batch(len(requests), max_len)
    t0 = time.perf_counter()
    batch.add([(i, e, r.params) for i, (e, r) in enumerate(zip(embeds, requests))])
    out["prefill_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = 0
    while batch.active:
        batch.step()
        steps += 1
    out["decode_s"] = time.perf_counter() - t0
    out["decode_steps"] = steps
    return out


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--preset", default="full")
    p.add_argument("--pages", type=int, default=128)
    p.add_argument("--tokens", type=int, default=800)
    p.add_argument("--eager-encoder", action="store_true", help="Engine(compile_encoder=False) (compiled is the CUDA default)")
    p.add_argument("--ngram", action="store_true",
                   help="decode with the reference's n-gram blocker (the default for requests) instead of none")
    args = p.parse_args()
    if args.quick:
        args.preset, args.pages, args.tokens = "tiny", 3, 16
    device = torch.device(args.device)
    tok = BenchTokenizer()
    from model.config import preset as preset_config

    vocab = max(preset_config(args.preset).gpt.vocab_size, tok.vocab_size)
    model = build_model(args.preset, device, seed=args.seed, vocab_size=vocab, image_token_id=tok.token_id("<image>"))
    engine = Engine(model, tok, device=device, compile_encoder=False if args.eager_encoder else None)  # bf16 + graphed decoding on CUDA
    rng = np.random.default_rng(args.seed)
    pages = [a4_page(rng) for _ in range(min(args.pages, 16))]
    pages = [pages[i % len(pages)] for i in range(args.pages)]  # content does not change the cost
    params = SamplingParams(max_new_tokens=args.tokens, stop_ids=frozenset({-1}))  # never stops early
    if not args.ngram:
        params.ngram_size = 0
    prompt = TASK_PROMPTS["free"]
    requests = [GenerationRequest(prompt, [pg], params=params) for pg in pages]

    warm = [GenerationRequest(prompt, [pg], params=SamplingParams(max_new_tokens=4, ngram_size=0,
                                                                   stop_ids=frozenset({-1})))
            for pg in pages[:engine.encode_batch]]
    t0 = time.perf_counter()
    engine.generate(warm)  # cuBLAS, cuDNN and Triton warm-up (and the encoder's compile)
    warm_s = time.perf_counter() - t0
    runs = []
    for _ in range(1 if args.quick else 2):  # the first run also allocates the cache and captures the graph
        sync(device)
        t0 = time.perf_counter()
        results = engine.generate(requests)
        sync(device)
        runs.append(time.perf_counter() - t0)
        assert all(len(r.token_ids) == args.tokens for r in results), "a page stopped early"
        assert all(r.image_tokens == 903 for r in results)
    ph = phases(engine, requests, device)
    proc_ms = processor_ms_per_page(1 if args.quick else 3)
    n, best = args.pages, runs[-1]
    rows = [[f"{n} x {args.tokens}", f"{runs[0]:.2f}", f"{best:.2f}", f"{n / best:.2f}", f"{n * args.tokens / best:,.0f}",
             f"{ph['encode_s']:.2f}", f"{ph['prompt_s']:.2f}", f"{ph['prefill_s']:.2f}", f"{ph['decode_s']:.2f}",
             f"{proc_ms:.0f}"]]
    notes = [f"model: {args.preset} preset, random weights, {'bf16' if device.type == 'cuda' else 'fp32'}; "
             f"{'the default n-gram blocker (30-grams, window 90)' if args.ngram else 'no n-gram blocker'}; "
             f"engine on this device: fast={engine.fast}, encode batch {engine.encode_batch}, "
             f"compile_encoder={engine.compile_encoder} (warm-up call {warm_s:.0f} s)",
             "pages/s = pages / end-to-end seconds of `Engine.generate` on all pages at once (second run: cache "
             "and decode graph already built; the first run includes allocating and capturing them)",
             "phases: the same work timed step by step (encoder, prompt embeddings, prefill + first token, decode loop)",
             "processor ms/page: `ImageProcessor.process` of a 1191x1684 page on one CPU core (not in pages/s; "
             "runs in parallel on the CPUs)",
             "DeepSeek-OCR's published figure: ~2.3 pages/s on one A100-40G (vLLM)"]
    table = Table("End-to-end pages/s (bench/pages.py" + (" --eager-encoder)" if args.eager_encoder else ")"),
                  ["pages x tokens", "first run s", "run s", "pages/s", "output tokens/s", "encode s",
                   "prompts s", "prefill s", "decode s", "processor ms/page"], rows, notes)
    report(table, device, args, {"runs_s": runs, "phases": ph, "pages": n, "tokens": args.tokens,
                                 "pages_per_s": n / best, "processor_ms": proc_ms})


if __name__ == "__main__":
    main()
