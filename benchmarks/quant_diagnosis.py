"""Where does a quantized model lose accuracy? Quantize once, then switch groups of quantizers off.

    .venv/bin/python benchmarks/quant_diagnosis.py leansam-efficientvit-s w8a8 minmax --images 40

Box mIoU on the first ``--images`` coco-mini val images for FP32, all quantizers, and with the
softmax quantizers / activations / the decoder / the encoder left in full precision; prints the
softmax quantizers' calibrated granularity (tau, s). QUANTIZATION.md's "Softmax" section.
"""

from __future__ import annotations

import argparse

from quantization import DATA, _miou

from leansam import SamPredictor, create_model
from leansam.eval import EvalDataset, evaluate
from leansam.quant import QuantConfig, calibration_samples, quantize
from leansam.quant.model import quantizers
from leansam.quant.quantizers import Log2Quantizer

OFF = {
    "all quantizers": lambda n, z: False,
    "no softmax quantizers": lambda n, z: isinstance(z, Log2Quantizer),
    "weights only": lambda n, z: not n.endswith("w_quant"),
    "encoder only": lambda n, z: n.startswith("mask_decoder"),
    "decoder only": lambda n, z: n.startswith("image_encoder"),
    "decoder only, no softmax": lambda n, z: (
        n.startswith("image_encoder") or isinstance(z, Log2Quantizer)
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("bits")
    p.add_argument("method", nargs="?", default="minmax")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--softmax", default="agq", choices=("agq", "log2"))
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
    cfg = QuantConfig.from_bits(args.method, args.bits, iters=40, softmax=args.softmax)
    q = quantize(model, cfg, samples, progress=False)
    qs = dict(quantizers(q))
    print(
        {n: (float(z.tau), float(z.scale)) for n, z in qs.items() if isinstance(z, Log2Quantizer)}
    )
    for label, off in OFF.items():
        for n, z in qs.items():
            z.enabled = not off(n, z)
        print(label, _miou(evaluate(SamPredictor(q), val, "box", progress=False)), flush=True)


if __name__ == "__main__":
    main()
