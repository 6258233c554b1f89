"""Pretrain the small "foundation" ViT that the accuracy comparison starts from.

No ImageNet weights are reachable offline, so the source task is Fashion-MNIST (Debian's
dataset-fashion-mnist: `apt-get install dataset-fashion-mnist`), and the downstream task of
reproduce.py is a different dataset (scikit-learn's digits): a transfer, as in the paper.

    python benchmarks/accuracy/pretrain_teacher.py [--steps 1500] [--out benchmarks/accuracy]

writes teacher_fmnist_vit.safetensors (the weights) and teacher_fmnist_vit.json (how they
were made: model config, steps, accuracy, device, versions, date).
"""

import argparse
import datetime
import json
import os

import torch
from safetensors.torch import save_file

from tunecomp.cli import load_timm_model
from tunecomp.data import load_dataset
from tunecomp.provenance import device_name, versions
from tunecomp.train import TrainConfig, train

MODEL = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}
HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=HERE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = load_dataset("fashion_mnist", image_size=KWARGS["img_size"])
    model = load_timm_model(MODEL, None, num_classes=10, **KWARGS)
    cfg = TrainConfig(steps=args.steps, batch_size=128, lr=2e-3, warmup_steps=100, eval_every=args.steps,
                      log_every=100, seed=args.seed, progress=True)
    result = train(model, data.train, data.test, cfg, os.path.join("runs", "pretrain-fmnist"), device="cpu")
    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(args.out, "teacher_fmnist_vit.safetensors"))
    record = {
        "model": MODEL, "kwargs": KWARGS, "num_classes": 10, "source_task": "Fashion-MNIST (60k train, 10k test), 28x28 resized to 16x16",
        "steps": args.steps, "batch_size": 128, "lr": 2e-3, "seed": args.seed,
        "test_accuracy": result["final_accuracy"], "seconds": result["seconds"],
        "device": device_name("cpu"), **versions(), "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/accuracy/pretrain_teacher.py " + f"--steps {args.steps} --seed {args.seed}",
    }
    with open(os.path.join(args.out, "teacher_fmnist_vit.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
