"""Where does a quantized model lose accuracy? Quantize once, then switch groups of quantizers off.

    .venv/bin/python benchmarks/quant_diagnosis.py leansam-efficientvit-s w8a8 minmax --images 40
    .venv/bin/python benchmarks/quant_diagnosis.py leansam-efficientvit-s w4a4 ahcptq --breakdown

Box mIoU on the first ``--images`` coco-mini val images for FP32, all quantizers, and with the
softmax quantizers / weights / activations / HLUQ / CAG quantizers / the decoder / the encoder
left in full precision; prints the softmax quantizers' calibrated granularity (tau, s).
``--breakdown`` instead quantizes one decoder attention or MLP at a time (everything else in full
precision) and, for the one that loses most, each of its quantizers alone, all of them, and
everything but them. QUANTIZATION.md's "Softmax" and "Where W4A4 loses" sections.
"""

from __future__ import annotations

import argparse

from quantization import DATA, _miou

from leansam import SamPredictor, create_model
from leansam.eval import EvalDataset, evaluate
from leansam.quant import QuantConfig, calibration_samples, quantize, quantized_tensors, quantizers
from leansam.quant.quantizers import HLUQ, CAGQuantizer, Log2Quantizer

OFF = {
    "all quantizers": lambda n, z: False,
    "no softmax quantizers": lambda n, z: isinstance(z, Log2Quantizer),
    "weights only": lambda n, z: not n.endswith("w_quant"),
    "activations only": lambda n, z: n.endswith("w_quant"),
    "no HLUQ quantizers": lambda n, z: isinstance(z, HLUQ),
    "no CAG quantizers": lambda n, z: isinstance(z, CAGQuantizer),
    "encoder only": lambda n, z: n.startswith("mask_decoder"),
    "decoder only": lambda n, z: n.startswith("image_encoder"),
    "decoder only, no softmax": lambda n, z: (
        n.startswith("image_encoder") or isinstance(z, Log2Quantizer)
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("bits")
    p.add_argument("method", nargs="?", default="minmax")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--softmax", default="agq", choices=("agq", "log2"))
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="per decoder module, then quantizer")
    args = p.parse_args()
    val = EvalDataset.load(
        DATA / "val2017", DATA / "annotations" / "instances_val2017.json", limit=args.images
    )
    model = create_model(args.model, pretrained=True)
    print("objects", val.num_objects())
    print("fp32", _miou(evaluate(SamPredictor(model), val, "box", progress=False)))
    samples = calibration_samples(
        model, DATA / "train2017", DATA / "annotations" / "instances_train2017.json", count=16
    )
    cfg = QuantConfig.from_bits(
        args.method, args.bits, iters=args.iters, softmax=args.softmax, seed=args.seed
    )
    q = quantize(model, cfg, samples, progress=False)
    qs = dict(quantizers(q))
    print(
        {n: (float(z.tau), float(z.scale)) for n, z in qs.items() if isinstance(z, Log2Quantizer)}
    )

    def score(on) -> dict:
        for n, z in qs.items():
            z.enabled = on(n, z)
        return _miou(evaluate(SamPredictor(q), val, "box", progress=False))

    if not args.breakdown:
        for label, off in OFF.items():
            print(label, score(lambda n, z, off=off: not off(n, z)), flush=True)
        return
    parts = dict.fromkeys(_decoder_module(n) for n in qs if n.startswith("mask_decoder"))
    for part in parts:
        parts[part] = score(lambda n, z, part=part: n.startswith(part + "."))
        print("only", part, parts[part], flush=True)
    worst = min(parts, key=lambda p: parts[p]["all"])
    mine = [n for n in qs if n.startswith(worst + ".")]
    tensor = {id(z): t for t, z in quantized_tensors(q)}  # the names keep_8bit takes
    for name in mine:
        label = tensor[id(qs[name])]
        print("only", label, score(lambda n, z, name=name: n == name), flush=True)
    print("all of", worst, score(lambda n, z: n in mine), flush=True)
    print("everything but", worst, score(lambda n, z: n not in mine), flush=True)


def _decoder_module(name: str) -> str:
    """``mask_decoder.transformer.layers.0.self_attn.q_proj.a_quant`` -> its attention or MLP."""
    parts = name.split(".")
    cut = 3 if parts[2] == "final_attn_token_to_image" else 5
    return ".".join(parts[:cut])


if __name__ == "__main__":
    main()
