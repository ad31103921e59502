"""``ndocr``: the user-facing command line.

    ndocr info --preset full             parameter count per component (meta device, no memory)
    ndocr tokens 1191x1684 --mode gundam image-token schedule of an image or a size
    ndocr ocr page.png --checkpoint DIR  OCR images; writes result.mmd, boxes drawn, figure crops
    ndocr synth --out DIR --pages 10     synthetic document pages + a JSONL manifest
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from model.config import preset
    from model.vlm import NanoDeepseekOCR

    config = preset(args.preset)
    with torch.device("meta"):
        model = NanoDeepseekOCR(config)
    counts = model.component_params()
    counts["total"] = sum(counts.values())
    if args.json:
        print(json.dumps({"preset": args.preset, "params": counts}, indent=2))
    else:
        print(f"preset {args.preset}")
        for name, n in counts.items():
            print(f"  {name:<16} {n:>15,}")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from model.processor import token_report

    print(json.dumps(token_report(args.image, mode=args.mode, max_crops=args.max_crops)))
    return 0


def cmd_ocr(args: argparse.Namespace) -> int:
    import torch

    from model.config import processor_config
    from model.engine import Engine, GenerationRequest, SamplingParams
    from model.grounding import render_result
    from model.processor import ImageProcessor, load_image
    from model.tasks import prompt_for
    from model.vlm import ImageViews
    from model.weights import load_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, meta = load_checkpoint(args.checkpoint, device=device)
    if tokenizer is None:
        raise SystemExit(f"{args.checkpoint} has no tokenizer.json")
    mode = args.mode or (meta.get("processor") or {}).get("mode") or "gundam"
    processor = ImageProcessor(processor_config(mode, max_crops=args.max_crops))
    prompt = args.prompt or prompt_for(args.task)
    engine = Engine(model, tokenizer, device=device, compile_encoder=False)  # a few pages: compiling costs more
    params = SamplingParams(max_new_tokens=args.max_tokens)
    out = Path(args.out)
    requests, pages = [], []
    for path in args.images:
        processed = processor.process(path)
        requests.append(GenerationRequest(prompt, [ImageViews.from_processed(processed)], params=params))
        pages.append(path)
    results = engine.generate(requests)
    for path, result in zip(pages, results):
        target = out / Path(path).stem if len(pages) > 1 else out
        written = render_result(load_image(path), result.text, target)
        print(json.dumps({"image": str(path), "out": str(target), "tokens": len(result.token_ids),
                          "finish_reason": result.finish_reason,
                          "files": {k: str(v) for k, v in written.items() if isinstance(v, (str, Path))}}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ndocr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter count per component")
    p.add_argument("--preset", default="full", choices=["tiny", "small", "full"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tokens", help="image-token schedule of an image path or WxH")
    p.add_argument("image", help="an image path or a size such as 1191x1684")
    p.add_argument("--mode", default="gundam", choices=["tiny", "small", "base", "large", "gundam"])
    p.add_argument("--max-crops", type=int, default=9)
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser("ocr", help="OCR images with a checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--mode", choices=["tiny", "small", "base", "large", "gundam"],
                   help="default: the mode the checkpoint was trained with")
    p.add_argument("--max-crops", type=int, default=9)
    p.add_argument("--task", default="markdown", help="markdown, free, grounding, figure, describe")
    p.add_argument("--prompt", help="a raw prompt containing <image> (overrides --task)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--device")
    p.add_argument("--out", default="artifacts/ocr")
    p.set_defaults(func=cmd_ocr)

    sub.add_parser("synth", help="synthetic pages + manifest (ndocr synth --help for its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # the generator owns its flags (argparse's REMAINDER drops leading --options)
        from pipeline.synth import synth_main

        return synth_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ndocr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
