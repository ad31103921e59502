"""A random-weight checkpoint of any preset (real tokenizer) for load tests and benchmarks.

    python bench/make_checkpoint.py --preset small --mode base --out /tmp/ckpt-small
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--mode", default="base")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import torch

    from model.config import preset
    from model.tokenizer import Tokenizer
    from model.vlm import NanoDeepseekOCR
    from model.weights import save_checkpoint
    from pipeline.synth import load_corpus

    corpus = load_corpus("train")
    texts = [*corpus.sentences, *corpus.titles, *corpus.items, "Convert the document to markdown.", "Free OCR."]
    tokenizer = Tokenizer.train(texts, args.vocab_size)
    config = preset(args.preset)
    config.gpt.vocab_size = tokenizer.vocab_size
    config.image_token_id = tokenizer.token_id("<image>")
    torch.manual_seed(0)
    model = NanoDeepseekOCR(config)
    model.init_weights()
    with torch.no_grad():  # zero-init head would only ever emit token 0
        torch.nn.init.normal_(model.gpt.lm_head.weight, std=0.02)
    save_checkpoint(args.out, model, tokenizer=tokenizer, extra={"processor": {"mode": args.mode}})
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
